"""Differential privacy: accuracy against epsilon, and the cost of a DP-SGD step.

1. Accuracy vs epsilon: ``fedse`` and ``fedavg`` on the quickstart federation
   (digits, 10 clients, Dirichlet 0.5, se_resnet8) with GroupNorm (Opacus
   cannot train BatchNorm), sample-level DP at target epsilon 1, 3, 8 over the
   whole run (delta 1e-5) and without DP. Personalized accuracy is the mean
   over clients of the accuracy on their own test part after the last round.
2. Step time: the same model and batch, one plain SGD step against one DP-SGD
   step (fedse's DP phase: per-sample gradients by layer, :mod:`fedse.per_sample`;
   Opacus's clipping, noise, Poisson sampling and accountant) and, for
   reference, the same DP step with per-sample gradients by torch.func's vmap
   (what any other model gets) and with Opacus's hooks (Opacus's own
   GradSampleModule), interleaved, median of repeats; se_resnet8 at 28x28
   (batch 64) and at the quickstart's scale (8x8, batch 32), and se_cnn at
   28x28 (batch 64), side by side. Results keep the ratios to the plain step only.

    python benchmarks/privacy.py                     # both, writes benchmarks/results/privacy.*
    python benchmarks/privacy.py --only steps        # just the step-time ratios (keeps the accuracy table)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedse.analysis.report import format_table, summarize  # noqa: E402
from fedse.config import load_config  # noqa: E402
from fedse.io import atomic_save, atomic_write_json, atomic_write_text  # noqa: E402
from fedse.models import create_model  # noqa: E402
from fedse.privacy import Criterion, SampleDP, Step  # noqa: E402
from fedse.records import LOCAL_ACC  # noqa: E402
from fedse.simulation import simulate  # noqa: E402
from fedse.train import TrainSpec, train  # noqa: E402

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
                local = [c[LOCAL_ACC] for c in result.outcome.log.evaluate[max(result.outcome.log.evaluate)].values()]
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


# The two step-time configurations, measured side by side in one run: this benchmark's own
# (28x28, Fashion-MNIST-sized) and the quickstart's (digits 8x8, batch 32, a typical
# 160-image client: 5 steps per epoch).
STEP_SCALES = {
    "28x28": {"model": "se_resnet8", "image": 28, "batch": 64, "steps": 10},
    "quickstart": {"model": "se_resnet8", "image": 8, "batch": 32, "steps": 5},
    "28x28 se_cnn": {"model": "se_cnn", "image": 28, "batch": 64, "steps": 10},
}
MODEL_NAMES = {
    "se_resnet8": "se_resnet8 width 16 (GroupNorm)",
    "se_cnn": "se_cnn width 32 (no norm layers)",
}


class OpacusHooksDP(SampleDP):
    """For reference only: a DP phase through Opacus's ``make_private``, whose
    GradSampleModule computes per-sample gradients with hooks, layer by layer. Same Poisson loader,
    optimizer, clipping, noise and accountant as :class:`SampleDP`; only the per-sample gradients
    differ in how they are computed."""

    @contextlib.contextmanager
    def phase(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        criterion: Criterion,
    ) -> Iterator[tuple[Step, DataLoader]]:
        engine = PrivacyEngine(accountant=self.accountant.mechanism())
        engine.accountant = self.accountant
        generator = torch.Generator().manual_seed(0)
        loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, generator=generator)
        dp_model, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            poisson_sampling=True,
            noise_generator=generator,
        )

        def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            if len(y) == 0:  # skipped, as fedse did then
                return None, None
            loss, logits = criterion(dp_model(x), y)
            dp_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dp_optimizer.step()
            return loss.detach(), logits.detach()

        try:
            yield step, dp_loader
        finally:
            dp_model.remove_hooks()
            dp_model.del_grad_sample()


# kind: (its DP, per-sample gradients by layer where the model allows)
STEP_KINDS = {
    "plain": (lambda: None, True),
    "dp": (lambda: SampleDP(noise_multiplier=1.0, max_grad_norm=1.0), True),
    "dp_vmap": (lambda: SampleDP(noise_multiplier=1.0, max_grad_norm=1.0), False),
    "dp_opacus_hooks": (lambda: OpacusHooksDP(noise_multiplier=1.0, max_grad_norm=1.0), True),
}


def step_times(repeats: int = 10) -> dict:
    """Seconds per optimizer step over one epoch of :func:`fedse.train.train`: plain SGD, fedse's
    DP-SGD and, for reference, the same with per-sample gradients by torch.func's vmap and by
    Opacus's hooks (:class:`OpacusHooksDP`), at every
    :data:`STEP_SCALES` entry; every scale and kind interleaved, median of ``repeats`` after two
    warm-ups. The DP sides include the DP phase's set-up (Poisson loader, DP optimizer), amortized
    over the epoch, as every client round pays it. The ratios to the plain step are the figures
    to compare across machines; the milliseconds (printed, not kept) are this machine's."""
    torch.manual_seed(0)
    data = {}
    for scale, c in STEP_SCALES.items():
        n = c["batch"] * c["steps"]
        x = torch.randint(0, 256, (n, 1, c["image"], c["image"]), dtype=torch.uint8)
        data[scale] = (x, torch.randint(0, 10, (n,)))
    times: dict[tuple[str, str], list[float]] = {(s, k): [] for s in STEP_SCALES for k in STEP_KINDS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's secure-RNG and backward-hook warnings (reference path)
        for i in range(repeats + 2):
            for scale, c in STEP_SCALES.items():
                x, y = data[scale]
                for kind, (make_dp, by_layer) in STEP_KINDS.items():
                    norm = {"norm": "groupnorm"} if c["model"] == "se_resnet8" else {"image_size": c["image"]}
                    model = create_model(c["model"], num_classes=10, in_channels=1, **norm)
                    # The instance's own declaration: False sends this model to torch.func's vmap.
                    model.per_sample_gradients_by_layer = by_layer
                    dp = make_dp()
                    start = time.perf_counter()
                    result = train(
                        model,
                        x,
                        y,
                        TrainSpec(mean=(0.5,), std=(0.25,), epochs=1, batch_size=c["batch"], lr=0.05, seed=i),
                        dp=dp,
                    )
                    if i >= 2:  # warm-up
                        times[scale, kind].append((time.perf_counter() - start) / result.steps)
    out: dict = {"repeats": repeats, "torch_threads": torch.get_num_threads(), "scales": {}}
    for scale, c in STEP_SCALES.items():
        ms = {kind: 1000 * statistics.median(times[scale, kind]) for kind in STEP_KINDS}
        out["scales"][scale] = {
            "model": f"{MODEL_NAMES[c['model']]}, 1x{c['image']}x{c['image']}, batch {c['batch']}, "
            f"{c['steps']} steps per epoch",
            "ratio": round(ms["dp"] / ms["plain"], 3),
            "ratio_vmap": round(ms["dp_vmap"] / ms["plain"], 3),
            "ratio_opacus_hooks": round(ms["dp_opacus_hooks"] / ms["plain"], 3),
            "ms": {kind: round(v, 2) for kind, v in ms.items()},
        }
    return out


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


def markdown(results: dict) -> str:
    """privacy.md: the step-time ratios and the accuracy table, each with its command."""
    parts = []
    if steps := results.get("step_time"):
        scales = steps["scales"].items()
        rows = [
            {
                "scale": k,
                "model": v["model"],
                "dp_step / plain_step": v["ratio"],
                "by torch.func vmap": v["ratio_vmap"],
                "by Opacus hooks": v["ratio_opacus_hooks"],
            }
            for k, v in scales
        ]
        parts.append(
            f"## DP-SGD step time\n\n`{steps['command']}` (median of {steps['repeats']}, "
            f"{steps['torch_threads']} torch threads; ratios only: absolute times are the machine's)\n\n"
            + format_table(rows)
        )
    if acc := results.get("accuracy_vs_epsilon"):
        parts.append(
            f"## Accuracy against epsilon\n\n`{acc.get('command', 'python benchmarks/privacy.py')}`\n\n"
            + format_table(acc["rows"])
        )
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--only", choices=["accuracy", "steps"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    command = "python " + " ".join(["benchmarks/privacy.py", *sys.argv[1:]])
    # One part measured (--only) updates that part of privacy.json / privacy.md and keeps the other.
    path = args.out / "privacy.json"
    results: dict = json.loads(path.read_text()) if path.exists() else {}
    if args.only != "accuracy":
        results["step_time"] = {"command": command, **step_times()}
        print(json.dumps(results["step_time"]), flush=True)
        for scale in results["step_time"]["scales"].values():  # keep only the ratios
            del scale["ms"]
    if args.only != "steps":
        rows = accuracy_vs_epsilon(args.config, args.overrides)
        results["accuracy_vs_epsilon"] = {
            "command": command,
            "config": args.config,
            "overrides": args.overrides,
            "rows": rows,
        }
        plot(rows, args.out / "privacy.png")
    atomic_write_json(path, results)
    atomic_write_text(args.out / "privacy.md", markdown(results))


if __name__ == "__main__":
    main()
