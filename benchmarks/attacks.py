"""Attacks on the shared model, and what each defence keeps of the honest clients' accuracy.

The last K clients of the federation are attackers. Each trains as an honest client would, then
replaces its reply's shared weights (everything else in the reply is the honest one, so it passes
the guard's schema):

- ``target``: every shared weight 7.0, claiming the largest ``num-examples`` the server accepts;
- ``sign-flip``: the received weights minus its update;
- ``scale10``: the received weights plus ten times its update;
- ``1e30``: every shared weight 1e30 (finite in float32);
- ``label-flip``: trains honestly on its own images with every label y replaced by C-1-y.

Defences: plain FedAvg (``none``); the guard's bounds (``norm-clip``: updates clipped to 3 x the
round's median norm, weights capped at 2 x the median claim, the deployment defaults); Flower's
``fedtrimmedavg`` (beta 0.2), ``fedmedian``, ``krum`` and ``multikrum`` tolerating K attackers; and
``fedtrimmedavg`` and ``multikrum`` each behind the guard's bounds (``+norm-clip``).
Without attackers (``honest``) each defence shows its cost.

Figures, from the last round's evaluation of the honest clients only: personalized accuracy (each
honest client's own model on its own test part; mean over clients, and the worst), and pooled
accuracy (each honest client's model on the pooled test set of all clients, mean over clients).

    python benchmarks/attacks.py --config configs/quickstart.yaml --set server.rounds=10 \\
        --out benchmarks/results/attacks_quickstart.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedse.federation.client as fedse_client  # noqa: E402
from fedse.config import load_config  # noqa: E402
from fedse.io import atomic_write_json  # noqa: E402
from fedse.records import ARRAYS, LOCAL_ACC, METRICS, NODE_PARTITION_ID, NUM_EXAMPLES, POOLED_ACC  # noqa: E402
from fedse.simulation import simulate  # noqa: E402

Weights = dict[str, np.ndarray]
ATTACKS: dict[str, Callable[[Weights, Weights], Weights] | None] = {
    "honest": None,
    "target": lambda received, update: {k: np.full_like(v, 7.0) for k, v in received.items()},
    "sign-flip": lambda received, update: {k: received[k] - (update[k] - received[k]) for k in received},
    "scale10": lambda received, update: {k: received[k] + 10 * (update[k] - received[k]) for k in received},
    "1e30": lambda received, update: {k: np.full_like(v, 1e30) for k, v in received.items()},
    "label-flip": None,  # the data, not the reply (_flipped_labels)
}
DEFENCES: dict[str, Callable[[int], list[str]]] = {
    "none": lambda k: [],
    "norm-clip": lambda k: ["server.norm_bound=3", "server.weight_cap=2"],
    "fedtrimmedavg": lambda k: ["server.strategy=fedtrimmedavg", "server.trim_beta=0.2"],
    "fedmedian": lambda k: ["server.strategy=fedmedian"],
    "krum": lambda k: ["server.strategy=krum", f"server.byzantine={k}"],
    "multikrum": lambda k: ["server.strategy=multikrum", f"server.byzantine={k}"],
    "fedtrimmedavg+norm-clip": lambda k: [*DEFENCES["fedtrimmedavg"](k), *DEFENCES["norm-clip"](k)],
    "multikrum+norm-clip": lambda k: [*DEFENCES["multikrum"](k), *DEFENCES["norm-clip"](k)],
}


@contextlib.contextmanager
def _flipped_labels(num_classes: int) -> Iterator[None]:
    """Within the block, the client's shard carries labels C-1-y for training (this actor only)."""
    original = fedse_client._client_data

    def flipped(context: Context, cfg):  # noqa: ANN001, ANN202
        cid, fed, shard = original(context, cfg)
        return cid, fed, replace(shard, train_labels=num_classes - 1 - shard.train_labels)

    fedse_client._client_data = flipped
    try:
        yield
    finally:
        fedse_client._client_data = original


def attacker_factory(attack: str, attackers: set[int], cap: int, num_classes: int) -> Callable[..., ClientApp]:
    """A ClientApp factory (``fedse.simulation.simulate``'s ``client_app_factory``) whose clients in
    ``attackers`` carry out ``attack``; the others are fedse's own client."""
    change = ATTACKS[attack]

    def factory(export_dir: str | Path | None = None, state_root: str | Path | None = None) -> ClientApp:
        app = ClientApp()
        root = None if state_root is None else str(state_root)
        export = None if export_dir is None else str(export_dir)

        @app.train()
        def _train(msg: Message, context: Context) -> Message:
            bad = int(context.node_config[NODE_PARTITION_ID]) in attackers
            with _flipped_labels(num_classes) if bad and attack == "label-flip" else contextlib.nullcontext():
                reply = fedse_client.handle_train(msg, context, root)
            if bad and change is not None:
                received = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
                update = {k: v.numpy() for k, v in reply.content[ARRAYS].items()}
                sent = change(received, update)
                reply.content[ARRAYS] = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in sent.items()})
                if attack == "target":
                    reply.content[METRICS][NUM_EXAMPLES] = cap
            return reply

        @app.evaluate()
        def _evaluate(msg: Message, context: Context) -> Message:
            return fedse_client.handle_evaluate(msg, context, export, root)

        return app

    return factory


def one(config: Path | None, overrides: list[str], attack: str, k: int, defence: str) -> dict:
    from fedse.data.federated import build_federated_data

    with tempfile.TemporaryDirectory() as out:
        extra = DEFENCES[defence](max(k, 1)) + [f"output.dir={out}", "output.client_models=false"]
        cfg = load_config(config, [*overrides, *extra])
        fed = build_federated_data(cfg)
        n = cfg.partition.num_clients
        attackers = set(range(n - k, n)) if attack != "honest" else set()
        cap = max(len(p) for p in fed.train_parts)
        started = time.perf_counter()
        result = simulate(
            cfg,
            quiet=True,
            client_app_factory=attacker_factory(attack, attackers, cap, fed.dataset.num_classes),
        )
        seconds = time.perf_counter() - started
    log = result.outcome.log
    last = max(log.evaluate)
    rows = {cid: row for cid, row in log.evaluate[last].items() if cid not in attackers}
    local = [r[LOCAL_ACC] for r in rows.values()]
    pooled = [r[POOLED_ACC] for r in rows.values() if POOLED_ACC in r]
    return {
        "attack": attack,
        "seed": cfg.seed,
        "attackers": len(attackers),
        "defence": defence,
        "honest_clients_evaluated": len(rows),
        "personalized_mean": round(statistics.mean(local), 4) if local else None,
        "personalized_worst": round(min(local), 4) if local else None,
        "pooled_mean": round(statistics.mean(pooled), 4) if pooled else None,
        "rounds_refused": len(log.refused),
        "replies_dropped": len(log.dropped),
        "seconds": round(seconds, 1),
    }


def table(rows: list[dict]) -> str:
    """Markdown: one row per (attack, attackers), one column per defence; each cell the honest clients'
    personalized accuracy (mean over clients) / pooled accuracy, in %, averaged over the seeds run
    (their count after the table when more than one); '-' where, in any seed, no honest client's
    evaluation was finite (the shared model diverged)."""
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["attack"], r["attackers"], r["defence"]), []).append(r)
    keys = list(dict.fromkeys((r["attack"], r["attackers"]) for r in rows))
    keys.sort(key=lambda k: (k[0] != "honest", list(ATTACKS).index(k[0]), k[1]))

    def fmt(runs: list[dict]) -> str:
        if not runs:
            return ""
        if any(r["personalized_mean"] is None for r in runs):
            return "-"
        personalized = 100 * statistics.mean(r["personalized_mean"] for r in runs)
        pooled = [r["pooled_mean"] for r in runs]
        shown = "-" if None in pooled else f"{100 * statistics.mean(pooled):.1f}"
        return f"{personalized:.1f} / {shown}"

    lines = ["| attack | attackers | " + " | ".join(defences) + " |", "|---|---|" + "---|" * len(defences)]
    for attack, k in keys:
        lines.append(f"| {attack} | {k} | " + " | ".join(fmt(cells.get((attack, k, d), [])) for d in defences) + " |")
    seeds = sorted({r.get("seed", 0) for r in rows})
    if len(seeds) > 1:
        lines.append(f"\nMean over seeds {', '.join(map(str, seeds))}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--attackers", default="1,2", help="comma-separated numbers of attackers")
    parser.add_argument("--defences", default=",".join(DEFENCES))
    parser.add_argument("--out", type=Path, required=True, help="JSON of every row (kept when rerun: done rows skip)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())["rows"]))
        return
    logging.getLogger("fedse").setLevel(logging.WARNING)
    rows = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    seed = load_config(args.config, args.overrides).seed
    done = {(r["attack"], r["attackers"], r["defence"], r.get("seed", 0)) for r in rows}
    plan = []
    for defence in args.defences.split(","):
        plan.append(("honest", 0, defence))
        for k in (int(x) for x in args.attackers.split(",")):
            plan += [(attack, k, defence) for attack in args.attacks.split(",") if attack != "honest"]
    for attack, k, defence in plan:
        if (attack, k, defence, seed) in done:
            continue
        row = one(args.config, args.overrides, attack, k, defence)
        print(json.dumps(row), flush=True)
        rows.append(row)
        atomic_write_json(args.out, {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
