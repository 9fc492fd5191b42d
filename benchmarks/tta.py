"""Time to accuracy: for each method, the rounds and wall seconds until the personalized accuracy first
reaches a target, both weighted by test samples (PFLlib's figure) and as the mean over clients.

Each method runs alone, through the real simulation (``fedse.simulation.simulate``), one after the
other. Every client's train and evaluate handler is timed where it runs (a wrapper around fedse's
own ClientApp, the way ``benchmarks/attacks.py`` wraps it), so each round's wall time splits into
client training, client evaluation, and the rest: the framework (Flower's engine, messages, the
guard, aggregation, checkpoints, the report). Clients run one at a time (``simulation.client_cpus``
set to every core), as PFLlib runs them, so the three parts add up to the round.

    python benchmarks/tta.py --config configs/fmnist_dir01.yaml --methods fedse-la,fedala \\
        --target 0.95 --out benchmarks/results/tta_fmnist.json

Output: one row per method with, for each metric, the first round at or above the target and the
wall seconds until the end of that round (None where it was not reached), the median seconds a
round spent on client training, client evaluation and the framework, and every round's two
accuracies and seconds (``per_round``). Rows already in ``--out`` are
kept (a stopped benchmark continues where it stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedse.federation.client as fedse_client  # noqa: E402
from fedse.analysis.report import (  # noqa: E402
    COL_LOCAL_ACC_MEAN,
    COL_LOCAL_ACC_WEIGHTED,
    COL_ROUND,
    COL_SECONDS,
    round_rows,  # noqa: E402
)
from fedse.config import load_config  # noqa: E402
from fedse.io import atomic_write_json  # noqa: E402
from fedse.records import CONFIG, SERVER_ROUND  # noqa: E402
from fedse.simulation import simulate  # noqa: E402


def timed_factory(log_dir: Path) -> Callable[..., ClientApp]:
    """fedse's ClientApp with each handler timed: one JSON line a message in ``log_dir`` (one file a
    process, so concurrent actors never share a file)."""

    def factory(export_dir: str | Path | None = None, state_root: str | Path | None = None) -> ClientApp:
        app = ClientApp()
        export = None if export_dir is None else str(export_dir)
        root = None if state_root is None else str(state_root)

        def timed(kind: str, handler: Callable[[], Message], msg: Message) -> Message:
            started = time.perf_counter()
            reply = handler()
            seconds = time.perf_counter() - started
            line = {"kind": kind, "round": int(msg.content[CONFIG].get(SERVER_ROUND, 0)), "seconds": seconds}
            with open(log_dir / f"{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            return reply

        @app.train()
        def _train(msg: Message, context: Context) -> Message:
            return timed("train", lambda: fedse_client.handle_train(msg, context, root), msg)

        @app.evaluate()
        def _evaluate(msg: Message, context: Context) -> Message:
            return timed("evaluate", lambda: fedse_client.handle_evaluate(msg, context, export, root), msg)

        return app

    return factory


def _first(rows: list[dict], key: str, target: float) -> tuple[int | None, float | None]:
    """The first round whose ``key`` reaches ``target``, and the wall seconds until its end."""
    elapsed = 0.0
    for row in rows:
        elapsed += row[COL_SECONDS] or 0.0
        if row[key] is not None and row[key] >= target:
            return row[COL_ROUND], round(elapsed, 1)
    return None, None


def one(config: Path | None, overrides: list[str], method: str, target: float) -> dict:
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as timings:
        cfg = load_config(
            config,
            [
                *overrides,
                f"personalization.policy={method}",
                f"simulation.client_cpus={os.cpu_count()}",  # one client at a time, as PFLlib runs them
                f"output.dir={out}",
                "output.client_models=false",
            ],
        )
        started = time.perf_counter()
        result = simulate(cfg, quiet=True, client_app_factory=timed_factory(Path(timings)))
        wall = time.perf_counter() - started
        lines = [json.loads(x) for f in Path(timings).glob("*.jsonl") for x in f.read_text().splitlines()]
    rows = round_rows(result.outcome.log)
    per_round = {}
    for row in rows:
        r = row[COL_ROUND]
        train = sum(x["seconds"] for x in lines if x["kind"] == "train" and x["round"] == r)
        evaluate = sum(x["seconds"] for x in lines if x["kind"] == "evaluate" and x["round"] == r)
        per_round[r] = {
            "round": r,
            "weighted": row[COL_LOCAL_ACC_WEIGHTED],
            "mean": row[COL_LOCAL_ACC_MEAN],
            "seconds": round(row[COL_SECONDS] or 0.0, 2),
            "train": round(train, 2),
            "evaluate": round(evaluate, 2),
            "framework": round((row[COL_SECONDS] or 0.0) - train - evaluate, 2),
        }
    weighted_round, weighted_s = _first(rows, COL_LOCAL_ACC_WEIGHTED, target)
    mean_round, mean_s = _first(rows, COL_LOCAL_ACC_MEAN, target)
    median = {
        k: round(statistics.median(p[k] for p in per_round.values()), 2) for k in ("train", "evaluate", "framework")
    }
    return {
        "method": method,
        "target": target,
        "weighted": {"round": weighted_round, "seconds": weighted_s},
        "mean": {"round": mean_round, "seconds": mean_s},
        "median_seconds_a_round": median,
        "last": {"weighted": rows[-1][COL_LOCAL_ACC_WEIGHTED], "mean": rows[-1][COL_LOCAL_ACC_MEAN]},
        "rounds": len(rows),
        "wall_seconds": round(wall, 1),
        "per_round": list(per_round.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--methods", default="fedse-la,fedala")
    parser.add_argument("--target", type=float, default=0.95, help="accuracy to reach, in [0, 1]")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not 0 < args.target <= 1:
        parser.error(f"--target {args.target}: allowed a number in (0, 1]")
    rows = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    done = {r["method"] for r in rows if r["target"] == args.target}
    for method in args.methods.split(","):
        if method in done:
            continue
        row = one(args.config, args.overrides, method, args.target)
        print(json.dumps(row), flush=True)
        rows.append(row)
        atomic_write_json(args.out, {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
