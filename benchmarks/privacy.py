"""Differential privacy: accuracy against epsilon, and the cost of a DP-SGD step.

1. Accuracy vs epsilon: ``fedse`` and ``fedavg`` on the quickstart federation
   (digits, 10 clients, Dirichlet 0.5, se_resnet8) with GroupNorm (Opacus
   cannot train BatchNorm), sample-level DP at target epsilon 1, 3, 8 over the
   whole run (delta 1e-5) and without DP. Personalized accuracy is the mean
   over clients of the accuracy on their own test part after the last round.
2. Step time: the same model and batch, one plain SGD step against one DP-SGD
   step (Opacus, per-sample clipping and noise), interleaved, median of repeats.

    python benchmarks/privacy.py                     # both, writes benchmarks/results/privacy.*
    python benchmarks/privacy.py --only steps        # just the step-time ratio
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedse.config import load_config  # noqa: E402
from fedse.io import atomic_save, atomic_write_json, atomic_write_text  # noqa: E402
from fedse.models import create_model  # noqa: E402
from fedse.privacy import SampleDP  # noqa: E402
from fedse.report import format_table, summarize  # noqa: E402
from fedse.simulation import simulate  # noqa: E402
from fedse.train import train  # noqa: E402

EPSILONS = (1.0, 3.0, 8.0, None)
METHODS = ("fedavg", "fedse")


def accuracy_vs_epsilon(config: str, overrides: list[str]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for method in METHODS:
            for eps in EPSILONS:
                sets = [
                    f"personalization.policy={method}",
                    "model.norm=groupnorm",
                    f"output.dir={out}",
                    f"output.name={method}-{eps}",
                    *overrides,
                ]
                if eps is not None:
                    sets += ["privacy.mode=sample", f"privacy.target_epsilon={eps}"]
                cfg = load_config(config, sets)
                result = simulate(cfg, quiet=True)
                local = [c["local-acc"] for c in result.outcome.log.evaluate[max(result.outcome.log.evaluate)].values()]
                stats = summarize(local)
                privacy = result.outcome.summary["privacy"]
                rows.append(
                    {
                        "method": method,
                        "target_epsilon": eps if eps is not None else "no DP",
                        "epsilon_reported_max": privacy.get("epsilon_max_over_clients"),
                        "personalized_acc": 100 * stats["mean"],
                        "worst_10pct": 100 * stats["worst10"],
                        "seconds": round(result.wall_seconds, 1),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def step_times(repeats: int = 10, batch: int = 64, steps: int = 10) -> dict:
    """Seconds per optimizer step over one epoch of ``steps`` batches (the DP side includes
    Opacus's per-call set-up, amortized over the epoch, as every client round pays it)."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (batch * steps, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (batch * steps,))
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for i in range(repeats + 2):
        for kind in ("plain", "dp"):
            model = create_model("se_resnet8", num_classes=10, in_channels=1, norm="groupnorm")
            dp = SampleDP(noise_multiplier=1.0, max_grad_norm=1.0) if kind == "dp" else None
            start = time.perf_counter()
            result = train(model, x, y, mean=(0.5,), std=(0.25,), epochs=1, batch_size=batch, lr=0.05, seed=i, dp=dp)
            if i >= 2:  # warm-up
                times[kind].append((time.perf_counter() - start) / result.steps)
    plain, dp = statistics.median(times["plain"]), statistics.median(times["dp"])
    return {
        "model": f"se_resnet8 (GroupNorm), 1x28x28, batch {batch}, {steps} steps per epoch",
        "repeats": repeats,
        "plain_step_ms": round(1000 * plain, 2),
        "dp_step_ms": round(1000 * dp, 2),
        "ratio": round(dp / plain, 3),
        "torch_threads": torch.get_num_threads(),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        dp = [(r["target_epsilon"], r["personalized_acc"]) for r in mine if r["target_epsilon"] != "no DP"]
        line = ax.plot(*zip(*dp, strict=True), marker="o", label=method)[0]
        for r in mine:
            if r["target_epsilon"] == "no DP":
                ax.axhline(
                    r["personalized_acc"], color=line.get_color(), linestyle="--", linewidth=1, label=f"{method}, no DP"
                )
    ax.set(
        xscale="log",
        xlabel="epsilon (sample level, delta 1e-5, whole run)",
        ylabel="personalized accuracy (%)",
        ylim=(0, 100),
    )
    ax.set_xticks([1, 3, 8])
    ax.set_xticklabels(["1", "3", "8"])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--only", choices=["accuracy", "steps"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    results: dict = {}
    if args.only != "accuracy":
        results["step_time"] = step_times()
        print(json.dumps(results["step_time"]), flush=True)
    if args.only != "steps":
        rows = accuracy_vs_epsilon(args.config, args.overrides)
        results["accuracy_vs_epsilon"] = {"config": args.config, "overrides": args.overrides, "rows": rows}
        atomic_write_text(args.out / "privacy.md", format_table(rows) + "\n")
        plot(rows, args.out / "privacy.png")
    atomic_write_json(args.out / f"privacy{'-' + args.only if args.only else ''}.json", results)


if __name__ == "__main__":
    main()
