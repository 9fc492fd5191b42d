"""``fedse monitor RUN_DIR``: each client watches its own inputs with its gate fingerprint.

For every client of a finished simulation run, its personalized model (the run
folder's ``clients/``, :mod:`fedse.personal`) scores:

* its own test part (normal: the client's own data, never used to fit anything
  but the threshold);
* other clients' test parts (up to ``max_other`` images, seeded): another
  site's data;
* its own test part under each corruption of :data:`fedse.fingerprint.CORRUPTIONS`
  at strengths 1 and 2 (a new camera, a failing sensor).

Three label-free scores on the same model: the gate monitor (the client's gate
statistics, fitted on its train part at the end of the run), the maximum softmax
probability (Hendrycks & Gimpel 2017, with the client's prior offset), and
Mahalanobis on the penultimate features (Lee et al. 2018, class means and tied
covariance fitted on the client's train part). Per client and scenario: the ROC
AUC of each score (own test images against the others), the false-alarm rate
of the stored gate threshold on the own test part, and a batch drift test: the
MMD between the gate vectors of 200 of the client's own train images and 200 of
the scenario's, with a permutation p-value (flagged below 0.05; the client's
own test images are the false-alarm check); and each score's distribution per
client and scenario (10th, 50th, 90th percentiles). Written to ``OUT``:
``monitor.json`` (every figure), ``table.md`` (mean and std over clients),
``gate_heatmaps.png`` (each client's mean gate per channel against the mean over
clients), ``similarity.png`` (gate fingerprints beside label distributions),
``scores.png`` (every client's gate scores per scenario, against its threshold).
A progress bar (clients x scenarios) shows on the terminal unless ``quiet``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedse.analysis.report import describe_split
from fedse.config import RECORD, SEED_MAX, ConfigError, load_config, short_repr
from fedse.data.federated import build_federated_data
from fedse.fingerprint import CORRUPTIONS, FeatureGaussian, auroc, corrupt, mmd_test, msp_score, probe
from fedse.io import atomic_save, atomic_write_json, atomic_write_text, check_output_dir
from fedse.personal import PersonalizedModel, load_personalized

__all__ = ["METHODS", "monitor"]

METHODS = ("gates", "msp", "features")
MMD_SAMPLES = 200  # images per batch in the drift test
PERMUTATIONS = 100
DRIFT_LEVEL = 0.05
MAX_OTHER = 1_000_000  # other clients' images per client: each is scored, so this bounds memory and time


def _scores(loaded: PersonalizedModel, features: FeatureGaussian, images: torch.Tensor) -> dict[str, Any]:
    p = probe(loaded.model, images, mean=loaded.mean, std=loaded.std, logit_bias=loaded.offset)
    assert loaded.gates is not None
    return {
        "gates": loaded.gates.score(p.gates),
        "msp": msp_score(p.logits),
        "features": features.score(p.features),
        "_gate_vectors": torch.cat(p.gates, dim=1),
    }


def _quantiles(scores: dict[str, Any]) -> dict[str, list[float]]:
    """Each method's score distribution in brief: its 10th, 50th and 90th percentiles."""
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    return {m: [round(float(v), 4) for v in torch.quantile(scores[m].double(), q)] for m in METHODS}


def _drift(reference: torch.Tensor, vectors: torch.Tensor, rng: torch.Generator, seed: int) -> dict[str, Any]:
    """The batch drift test: MMD of up to MMD_SAMPLES of ``vectors`` against the reference gates;
    ``images``: how many images each side had (reference, batch)."""
    batch = vectors[torch.randperm(len(vectors), generator=rng)[:MMD_SAMPLES]]
    stat, p = mmd_test(reference, batch, permutations=PERMUTATIONS, seed=seed)
    return {"mmd2": stat, "p": p, "flagged": p < DRIFT_LEVEL, "images": [len(reference), len(batch)]}


class _Progress:
    """A rich progress bar over clients x scenarios (as fedse.simulation's over rounds), on stderr;
    nothing when quiet. Without a terminal (a log file) rich draws it once, when it stops."""

    def __init__(self, clients: int, scenarios: int, quiet: bool) -> None:
        self.bar, self.clients = None, clients
        if not quiet:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("monitor {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=Console(stderr=True),  # on stderr: the table printed afterwards is stdout's alone
            )
            self.task = self.bar.add_task("", total=clients * scenarios)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def step(self, client: int, scenario: str, done: bool = False) -> None:
        """Now scoring ``scenario`` for ``client`` (``done``: one more step finished)."""
        if self.bar is not None:
            self.bar.update(self.task, advance=int(done), description=f"client {client + 1}/{self.clients}: {scenario}")


def _scenarios(fed, client: int, own: torch.Tensor, max_other: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed * 1_000 + client)
    others = torch.cat([fed.shard(c).test_images for c in range(fed.num_clients) if c != client])
    pick = torch.from_numpy(np.sort(rng.permutation(len(others))[:max_other]))
    out = {"other clients": others[pick]}
    for kind in CORRUPTIONS:
        for strength in (1, 2):
            out[f"{kind} {strength}"] = corrupt(own, kind, strength, seed=seed * 1_000 + client)
    return out


def monitor(run_dir: Path, out: Path, *, max_other: int = 1000, seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """Score every client of ``run_dir`` (see the module docstring); write ``out``; return the figures.
    An ``out`` no folder can be written at, or ``max_other`` or ``seed`` out of range, is a ConfigError
    before any work. ``quiet``: no progress bar."""
    for name, value, lo, hi in (("--max-other", max_other, 1, MAX_OTHER), ("--seed", seed, 0, SEED_MAX)):
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ConfigError(f"{name} {short_repr(value)}: out of range; allowed: an integer in [{lo}, {hi}]")
    check_output_dir(out, "--out")
    cfg = load_config(run_dir / RECORD, record=True)
    fed = build_federated_data(cfg)
    per_client: list[dict[str, Any]] = []
    fingerprints: list[list[np.ndarray]] = []
    relative: dict[str, list[np.ndarray]] = {}  # scenario -> per client: gate score / the client's threshold
    false_alarm = None
    steps = 2 + 2 * len(CORRUPTIONS)  # own test, other clients, each corruption at two strengths
    with _Progress(fed.num_clients, steps, quiet) as progress:
        for client in range(fed.num_clients):
            progress.step(client, "own test")
            loaded = load_personalized(run_dir, client)
            if loaded.gates is None:
                raise ValueError(f"client {client}'s model file has no gate statistics (a model without SE blocks?)")
            shard = fed.shard(client)
            train = probe(loaded.model, shard.train_images, mean=loaded.mean, std=loaded.std)
            features = FeatureGaussian.fit(train.features, shard.train_labels)
            normal = _scores(loaded, features, shard.test_images)
            threshold = float(loaded.header["gate_threshold"]["value"])
            false_alarm = loaded.header["gate_threshold"].get("false_alarm", false_alarm)
            row: dict[str, Any] = {
                "client": client,
                "test_samples": len(shard.test_labels),
                "false_alarm_own_test": float((normal["gates"] > threshold).float().mean()),
                "auroc": {},
                "drift": {},
            }
            rng = torch.Generator().manual_seed(seed * 1_000 + client)
            reference = torch.cat(train.gates, dim=1)
            reference = reference[torch.randperm(len(reference), generator=rng)[:MMD_SAMPLES]]

            row["drift"]["own test"] = _drift(reference, normal["_gate_vectors"], rng, seed)
            row["score_quantiles"] = {"own test": _quantiles(normal)}
            relative.setdefault("own test", []).append(_relative(normal["gates"], threshold))
            progress.step(client, "own test", done=True)
            for name, images in _scenarios(fed, client, shard.test_images, max_other, seed).items():
                progress.step(client, name)
                unusual = _scores(loaded, features, images)
                row["auroc"][name] = {m: auroc(normal[m], unusual[m]) for m in METHODS}
                row["score_quantiles"][name] = _quantiles(unusual)
                row["drift"][name] = _drift(reference, unusual["_gate_vectors"], rng, seed)
                relative.setdefault(name, []).append(_relative(unusual["gates"], threshold))
                progress.step(client, name, done=True)
            per_client.append(row)
            fingerprints.append([m.numpy() for m in loaded.gates.mean])
    scenarios = list(per_client[0]["auroc"])
    summary = {
        s: {
            m: {
                "mean": statistics.fmean(r["auroc"][s][m] for r in per_client),
                "std": statistics.pstdev(r["auroc"][s][m] for r in per_client),
            }
            for m in METHODS
        }
        for s in scenarios
    }
    flagged = {s: statistics.fmean(r["drift"][s]["flagged"] for r in per_client) for s in per_client[0]["drift"]}
    result = {
        "run": str(run_dir),
        "drift_flagged_fraction": flagged,
        "clients": len(per_client),
        "max_other": max_other,
        "seed": seed,
        "summary_auroc": summary,
        "false_alarm_own_test_mean": statistics.fmean(r["false_alarm_own_test"] for r in per_client),
        "per_client": per_client,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "monitor.json", result)
    atomic_write_text(out / "table.md", monitor_table(summary, flagged, len(per_client), per_client))
    setting = f"{describe_split(cfg)}: {cfg.personalization.policy}"
    figures = _figures(fingerprints, fed.label_counts("train"), relative, setting=setting, false_alarm=false_alarm)
    _save(out, figures)
    return result


def _relative(scores: torch.Tensor, threshold: float) -> np.ndarray:
    """Gate scores over the client's alarm threshold: above 1, the client's monitor raises an alarm."""
    return scores.double().numpy() / max(threshold, 1e-12)


def _span(values: list[int]) -> str:
    """``28-81`` (or ``200`` when every value is the same)."""
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _drift_images(per_client: list[dict[str, Any]] | None) -> str:
    """What each client's batch drift test compared, from what ``per_client`` recorded: the test's own
    counts where monitor.json has them, else the clients' test sizes."""
    rows = per_client or []
    up_to = f"up to {MMD_SAMPLES}"
    if rows and all(r.get("drift") and all("images" in d for d in r["drift"].values()) for r in rows):
        train = _span([r["drift"]["own test"]["images"][0] for r in rows])
        own = _span([d["images"][1] for r in rows for s, d in r["drift"].items() if s != "other clients"])
        other = [r["drift"]["other clients"]["images"][1] for r in rows if "other clients" in r["drift"]]
        others = _span(other) if other else None
    elif rows and all(isinstance(r.get("test_samples"), int) for r in rows):  # written before the counts were
        train, others = up_to, up_to
        own = _span([min(r["test_samples"], MMD_SAMPLES) for r in rows])
    else:
        return f"{up_to} of the client's own train images against {up_to} of the scenario's"
    return (
        f"{train} of the client's own train images against {own} images of its own test part (plain or corrupted)"
        + (f" or {others} of other clients' test images" if others else "")
    )


def monitor_table(
    summary: dict[str, Any], flagged: dict[str, float], clients: int, per_client: list[dict[str, Any]] | None = None
) -> str:
    """The Markdown table ``fedse monitor`` writes and prints: ROC AUC per scenario and score (mean ±
    std over clients) and the share of clients whose batch drift test flagged the scenario. ``per_client``
    (monitor.json's rows): the caption names the images each drift test really compared."""
    lines = [
        f"ROC AUC of telling the client's own test part from each scenario: mean ± std over {clients} clients.",
        f"Batch drift flagged: the share of clients whose gate MMD test has p < {DRIFT_LEVEL}; each test compares "
        f"{_drift_images(per_client)}.",
        "",
        "| scenario | gate monitor | max softmax prob. | feature Mahalanobis | best | batch drift flagged |",
        "|---|---|---|---|---|---|",
        f"| own test (false alarms) | | | | | {flagged['own test']:.2f} |",
    ]
    for scenario, by_method in summary.items():
        cells = [f"{by_method[m]['mean']:.3f} ± {by_method[m]['std']:.3f}" for m in METHODS]
        best = max(METHODS, key=lambda m: by_method[m]["mean"])
        lines.append(f"| {scenario} | {' | '.join(cells)} | {best} | {flagged[scenario]:.2f} |")
    return "\n".join(lines) + "\n"


def _figures(
    fingerprints: list[list[np.ndarray]],
    label_counts: np.ndarray,
    relative: dict[str, list[np.ndarray]],
    *,
    setting: str = "",
    false_alarm: float | None = None,
) -> dict[str, Any]:
    """The monitor's figures, by file name, as matplotlib Figures (not saved, not closed):
    ``fingerprints``, per client the mean gate of each SE block's channels; ``relative``, per scenario
    and client the gate scores over the client's threshold; ``setting``, the dataset, split and method."""
    import matplotlib

    matplotlib.use("Agg")
    flat = np.stack([np.concatenate(f) for f in fingerprints])  # (clients, channels)
    return {
        "gate_heatmaps.png": _heatmap_figure(flat, [len(b) for b in fingerprints[0]], setting),
        "similarity.png": _similarity_figure(flat, label_counts, setting),
        "scores.png": _scores_figure(relative, setting, false_alarm),
    }


def _heatmap_figure(flat: np.ndarray, blocks: list[int], setting: str) -> Any:
    """gate_heatmaps.png: one row per client, one column per channel (SE blocks side by side).

    On a 0-1 scale every client looks the same: the gates' common level, set by the architecture and
    the shared weights, is the same in every client and dwarfs what sets clients apart (a few
    hundredths). So the top strip shows that common level (the mean over clients, 0-1), and the client
    rows show each client's difference from it on a diverging scale centred at 0, with the same limits
    for every client (not normalised per row, which would make a client that barely differs look as
    different as the one that differs most): red, the client's gate is more open than the federation's
    mean; blue, more closed."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    common = flat.mean(0, keepdims=True)
    deviation = flat - common
    limit = float(np.percentile(np.abs(deviation), 99)) or 1e-6
    edges = np.cumsum(blocks)[:-1] - 0.5
    clients = len(flat)
    fig, (top, main) = plt.subplots(
        2,
        1,
        figsize=(9, 1.6 + 0.22 * min(clients, 60) + 0.8),
        gridspec_kw={"height_ratios": [1, max(2.0, 0.22 * min(clients, 60) / 0.35)]},
        sharex=True,
    )
    strip = top.imshow(common, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    top.set_yticks([])
    top.set_ylabel("mean over\nclients", fontsize=8, rotation=0, ha="right", va="center")
    fig.colorbar(strip, ax=top, label="gate (0-1)", fraction=0.04, pad=0.01)
    image = main.imshow(deviation, aspect="auto", vmin=-limit, vmax=limit, cmap="RdBu_r", interpolation="nearest")
    fig.colorbar(image, ax=main, label="client's mean gate\nminus the mean over clients", fraction=0.04, pad=0.01)
    for ax in (top, main):
        for edge in edges:
            ax.axvline(edge, color="black", linewidth=0.8)
    main.set_ylabel("client")
    main.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(clients, 20)))
    starts = np.concatenate([[0], np.cumsum(blocks)[:-1]])
    main.set_xticks(starts + np.array(blocks) / 2 - 0.5)
    main.set_xticklabels([f"SE block {b + 1}\n({n} channels)" for b, n in enumerate(blocks)], fontsize=8)
    main.set_xlabel("channel, SE blocks left to right (black lines between blocks)")
    title = f"{setting}\n" if setting else ""
    top.set_title(f"{title}gate fingerprints: each client's mean gate per channel on its own train part", fontsize=9)
    fig.tight_layout()
    return fig


def _similarity_figure(flat: np.ndarray, label_counts: np.ndarray, setting: str) -> Any:
    """similarity.png: client-by-client cosine similarity of the gate fingerprints (minus their mean
    over clients: the clients' differences, not the common gate level) beside that of the label counts."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def cosine(x: np.ndarray) -> np.ndarray:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x @ x.T

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    for ax, matrix, name in (
        (axes[0], cosine(flat - flat.mean(0, keepdims=True)), "gate fingerprints (minus the mean over clients)"),
        (axes[1], cosine(label_counts.astype(float)), "label distributions (train part)"),
    ):
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm", interpolation="nearest")
        ax.set_title(f"{name}:\ncosine similarity between clients", fontsize=9)
        ax.set_xlabel("client")
        ax.set_ylabel("client")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True, nbins=min(len(matrix), 20)))
        fig.colorbar(image, ax=ax, fraction=0.046, label="cosine similarity")
    if setting:
        fig.suptitle(setting, fontsize=9.5)
    fig.tight_layout()
    return fig


def _scores_figure(relative: dict[str, list[np.ndarray]], setting: str, false_alarm: float | None) -> Any:
    """scores.png: one panel per scenario, one box per client (quartiles, median, whiskers at the 10th
    and 90th percentiles) of its gate scores divided by its own alarm threshold, so that every client's
    threshold is the line at 1."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    names = list(relative)
    cols = min(5, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 2.5 * rows + 0.9), squeeze=False, sharey=True)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        per = [np.maximum(v, 1e-3) for v in relative[name]]  # a log scale: no score of 0
        ax.boxplot(
            per,
            positions=range(len(per)),
            whis=(10, 90),
            showfliers=False,
            widths=0.6,
            manage_ticks=False,
            medianprops={"color": "black"},
        )
        ax.set_xlim(-0.7, len(per) - 0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(len(per), 10)))
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1.0, color="red", linestyle="--", linewidth=1, label="the client's alarm threshold")
        share = float(np.mean([float(np.mean(v > 1)) for v in relative[name]]))
        ax.set_title(f"{name}: {100 * share:.0f}% flagged", fontsize=8.5)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    for ax in axes[:, 0]:
        ax.set_ylabel("gate score / threshold\n(above 1: alarm)", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("client", fontsize=8)
    rate = f" (set to flag {100 * false_alarm:g}% of its held-out images)" if false_alarm is not None else ""
    title = f"{setting}\n" if setting else ""
    fig.suptitle(
        f"{title}each client's gate scores per scenario over its own alarm threshold{rate}\n"
        "box: quartiles and median; whiskers: 10th and 90th percentiles; title: share of images flagged "
        "(mean over clients)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _save(out: Path, figures: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    for name, fig in figures.items():
        atomic_save(out / name, lambda f, fig=fig: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
