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
``gate_heatmaps.png``, ``similarity.png`` (gate fingerprints beside label
distributions), ``scores.png`` (score histograms of one client).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    """The batch drift test: MMD of up to MMD_SAMPLES of ``vectors`` against the reference gates."""
    batch = vectors[torch.randperm(len(vectors), generator=rng)[:MMD_SAMPLES]]
    stat, p = mmd_test(reference, batch, permutations=PERMUTATIONS, seed=seed)
    return {"mmd2": stat, "p": p, "flagged": p < DRIFT_LEVEL}


def _scenarios(fed, client: int, own: torch.Tensor, max_other: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed * 1_000 + client)
    others = torch.cat([fed.shard(c).test_images for c in range(fed.num_clients) if c != client])
    pick = torch.from_numpy(np.sort(rng.permutation(len(others))[:max_other]))
    out = {"other clients": others[pick]}
    for kind in CORRUPTIONS:
        for strength in (1, 2):
            out[f"{kind} {strength}"] = corrupt(own, kind, strength, seed=seed * 1_000 + client)
    return out


def monitor(run_dir: Path, out: Path, *, max_other: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Score every client of ``run_dir`` (see the module docstring); write ``out``; return the figures.
    An ``out`` no folder can be written at, or ``max_other`` or ``seed`` out of range, is a ConfigError
    before any work."""
    for name, value, lo, hi in (("--max-other", max_other, 1, MAX_OTHER), ("--seed", seed, 0, SEED_MAX)):
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ConfigError(f"{name} {short_repr(value)}: out of range; allowed: an integer in [{lo}, {hi}]")
    check_output_dir(out, "--out")
    cfg = load_config(run_dir / RECORD, record=True)
    fed = build_federated_data(cfg)
    per_client: list[dict[str, Any]] = []
    fingerprints, examples = [], None
    for client in range(fed.num_clients):
        loaded = load_personalized(run_dir, client)
        if loaded.gates is None:
            raise ValueError(f"client {client}'s model file has no gate statistics (a model without SE blocks?)")
        shard = fed.shard(client)
        train = probe(loaded.model, shard.train_images, mean=loaded.mean, std=loaded.std)
        features = FeatureGaussian.fit(train.features, shard.train_labels)
        normal = _scores(loaded, features, shard.test_images)
        threshold = float(loaded.header["gate_threshold"]["value"])
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
        for name, images in _scenarios(fed, client, shard.test_images, max_other, seed).items():
            unusual = _scores(loaded, features, images)
            row["auroc"][name] = {m: auroc(normal[m], unusual[m]) for m in METHODS}
            row["score_quantiles"][name] = _quantiles(unusual)
            row["drift"][name] = _drift(reference, unusual["_gate_vectors"], rng, seed)
            if client == 0 and name in ("other clients", "gaussian_noise 2"):
                examples = (examples or {"own test": normal["gates"]}) | {name: unusual["gates"]}
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
    atomic_write_text(out / "table.md", monitor_table(summary, flagged, len(per_client)))
    _plots(out, fingerprints, fed.label_counts("train"), examples or {})
    return result


def monitor_table(summary: dict[str, Any], flagged: dict[str, float], clients: int) -> str:
    lines = [
        f"ROC AUC, own test part against each scenario: mean ± std over {clients} clients; batch drift: "
        f"share of clients whose gate MMD test (200 vs 200 images) has p < {DRIFT_LEVEL}",
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


def _plots(out: Path, fingerprints: list[list[np.ndarray]], label_counts: np.ndarray, examples: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = fingerprints[:20]  # the first 20 clients: one panel each
    cols = min(5, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 1.6 * rows + 0.6), squeeze=False)
    width = max(len(b) for b in shown[0])
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= len(shown):
            continue
        grid = np.full((len(shown[index]), width), np.nan)
        for b, means in enumerate(shown[index]):
            grid[b, : len(means)] = means
        ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="magma", interpolation="nearest")
        ax.set_title(f"client {index}", fontsize=8)
    fig.suptitle("mean gate per SE block (rows) and channel (columns)", fontsize=9)
    fig.tight_layout()
    atomic_save(out / "gate_heatmaps.png", lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)

    def cosine(x: np.ndarray) -> np.ndarray:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x @ x.T

    flat = np.stack([np.concatenate(f) for f in fingerprints])
    centred = flat - flat.mean(0, keepdims=True)  # the clients' differences, not the common gate level
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, matrix, title in (
        (axes[0], cosine(centred), "gate fingerprints (centred), cosine"),
        (axes[1], cosine(label_counts.astype(float)), "label distributions, cosine"),
    ):
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("client")
        ax.set_ylabel("client")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    atomic_save(out / "similarity.png", lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, scores in examples.items():
        ax.hist(scores.numpy(), bins=40, alpha=0.5, density=True, label=name)
    ax.set_xlabel("gate score (client 0)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(out / "scores.png", lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
