"""Reports: the run log, per-round and per-client tables, summary statistics, files and plots.

The server records what its guard kept into a :class:`RunLog`; everything here
reads it. The run folder is written file by file, each atomically.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..config import RECORD, Config, config_to_record
from ..io import atomic_save, atomic_write_json, atomic_write_text, csv_cell
from ..records import DP_EPSILON, LOCAL_ACC, NUM_EXAMPLES, NUM_TRAIN, POOLED_ACC, TRAIN_ACC, TRAIN_LOSS

__all__ = [
    "CLIENT_HEADINGS",
    "client_rows",
    "client_summary_rows",
    "COL_CLIENT",
    "COL_CLIENTS",
    "COL_DROPPED",
    "COL_EPSILON",
    "COL_FAILED",
    "COL_LOCAL_ACC",
    "COL_LOCAL_ACC_MEAN",
    "COL_LOCAL_ACC_WEIGHTED",
    "COL_POOLED_ACC",
    "COL_POOLED_ACC_MEAN",
    "COL_REFUSED",
    "COL_ROUND",
    "COL_SECONDS",
    "COL_TEST_SAMPLES",
    "COL_TRAIN_ACC",
    "COL_TRAIN_LOSS",
    "COL_TRAIN_SAMPLES",
    "accuracy_figure",
    "describe_split",
    "format_cell",
    "format_table",
    "integer_rounds",
    "plot_accuracy",
    "RECORD",
    "round_rows",
    "RunLog",
    "summarize",
    "write_csv",
    "write_run",
]

# The columns of a run folder's tables: rounds.json/.csv (round_rows: one row per round) and
# clients.json/.csv (client_rows: one row per client). The comparison reads them back from run folders.
COL_ROUND, COL_CLIENTS = "round", "clients"  # the round; how many clients trained in it
COL_TRAIN_LOSS, COL_TRAIN_ACC = "train_loss", "train_acc"  # sample-weighted over the clients that trained
COL_LOCAL_ACC_MEAN = "local_acc_mean"  # personalized accuracy, mean over the clients evaluated
COL_LOCAL_ACC_WEIGHTED = "local_acc_weighted"  # the same, sample-weighted
COL_POOLED_ACC_MEAN = "pooled_acc_mean"  # pooled-test accuracy, mean over clients (where measured)
COL_SECONDS, COL_EPSILON = "seconds", "epsilon"  # the round's duration; DP epsilon spent so far (None: no DP)
COL_DROPPED, COL_FAILED, COL_REFUSED = "dropped", "failed", "refused"  # replies dropped, failed; no update?
COL_CLIENT = "client"  # the client's number (a client row; in summary rows, the statistic's name)
COL_TRAIN_SAMPLES, COL_TEST_SAMPLES = "train_samples", "test_samples"
COL_LOCAL_ACC, COL_POOLED_ACC = "local_acc", "pooled_acc"  # from the last round the client was evaluated in
# What a printed per-client table calls these columns (the README's words, "What the figures mean");
# the files keep the keys, which are the names scripts read.
CLIENT_HEADINGS = {
    COL_CLIENT: "client",
    COL_TRAIN_SAMPLES: "train samples",
    COL_LOCAL_ACC: "personalized accuracy (own test part)",
    COL_POOLED_ACC: "pooled accuracy",
}


@dataclass
class RunLog:
    """What the server saw, per round and per client (only values the guard checked)."""

    train: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)  # round -> client -> metrics
    evaluate: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)
    dropped: list[dict[str, Any]] = field(default_factory=list)  # refused replies
    failed: list[dict[str, Any]] = field(default_factory=list)  # error replies
    refused: list[dict[str, Any]] = field(default_factory=list)  # rounds without an update (client-level DP)
    round_seconds: dict[int, float] = field(default_factory=dict)
    epsilon: dict[int, float] = field(default_factory=dict)  # round -> client-level DP epsilon so far


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean, std (population), median, worst-10% (mean of the lowest ceil(10%) values), best."""
    if not values:
        return {}
    arr = np.sort(np.asarray(values, dtype=float))
    k = max(1, math.ceil(0.1 * len(arr)))
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "median": float(np.median(arr)),
        "worst10": float(arr[:k].mean()),
        "best": float(arr[-1]),
    }


def _weighted(rows: Mapping[int, Mapping[str, Any]], key: str) -> float | None:
    pairs = [(r[key], r.get(NUM_EXAMPLES, 1)) for r in rows.values() if key in r]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _epsilon(log: RunLog, rnd: int, train: Mapping[int, Mapping[str, Any]]) -> float | None:
    """The DP epsilon spent up to round ``rnd``: client level (the server's accountant), or sample
    level (the largest cumulative epsilon a client reported); None without DP."""
    if rnd in log.epsilon:
        return log.epsilon[rnd]
    eps = [r[DP_EPSILON] for r in train.values() if DP_EPSILON in r]
    return max(eps) if eps else None


def round_rows(log: RunLog) -> list[dict[str, Any]]:
    """One row per round: train loss/accuracy (sample-weighted), personalized accuracy
    (mean over clients), pooled accuracy where measured, seconds, dropped and failed replies."""
    rows = []
    for rnd in sorted(set(log.train) | set(log.evaluate)):
        train, ev = log.train.get(rnd, {}), log.evaluate.get(rnd, {})
        local = [r[LOCAL_ACC] for r in ev.values() if LOCAL_ACC in r]
        pooled = [r[POOLED_ACC] for r in ev.values() if POOLED_ACC in r]
        rows.append(
            {
                COL_ROUND: rnd,
                COL_CLIENTS: len(train),
                COL_TRAIN_LOSS: _weighted(train, TRAIN_LOSS),
                COL_TRAIN_ACC: _weighted(train, TRAIN_ACC),
                COL_LOCAL_ACC_MEAN: float(np.mean(local)) if local else None,
                COL_LOCAL_ACC_WEIGHTED: _weighted(ev, LOCAL_ACC),
                COL_POOLED_ACC_MEAN: float(np.mean(pooled)) if pooled else None,
                COL_SECONDS: log.round_seconds.get(rnd),
                COL_EPSILON: _epsilon(log, rnd, train),
                COL_DROPPED: sum(d["round"] == rnd for d in log.dropped),
                COL_FAILED: sum(f["round"] == rnd for f in log.failed),
                COL_REFUSED: any(r["round"] == rnd for r in log.refused),
            }
        )
    return rows


def client_rows(log: RunLog) -> list[dict[str, Any]]:
    """Per client, from the last round it was evaluated in: samples, personalized
    local-test accuracy, pooled-test accuracy."""
    latest: dict[int, tuple[int, dict[str, Any]]] = {}
    for rnd in sorted(log.evaluate):
        for cid, row in log.evaluate[rnd].items():
            latest[cid] = (rnd, row)
    return [
        {
            COL_CLIENT: cid,
            COL_ROUND: rnd,
            COL_TRAIN_SAMPLES: row.get(NUM_TRAIN),
            COL_TEST_SAMPLES: row.get(NUM_EXAMPLES),
            COL_LOCAL_ACC: row.get(LOCAL_ACC),
            COL_POOLED_ACC: row.get(POOLED_ACC),
        }
        for cid, (rnd, row) in sorted(latest.items())
    ]


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    headings: Mapping[str, str] | None = None,
) -> str:
    """Plain-text table (also valid GitHub Markdown); ``headings`` maps a column's key to the name its
    header prints (a key not in it prints as itself)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    header = [(headings or {}).get(c, c) for c in columns]
    cells = [[format_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def client_summary_rows(clients: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """mean / std / median / worst 10% / best over clients, for local and pooled accuracy."""
    local = summarize([c[COL_LOCAL_ACC] for c in clients if c[COL_LOCAL_ACC] is not None])
    pooled = summarize([c[COL_POOLED_ACC] for c in clients if c[COL_POOLED_ACC] is not None])
    return [
        {COL_CLIENT: name, COL_LOCAL_ACC: local.get(key), COL_POOLED_ACC: pooled.get(key)}
        for name, key in (
            ("mean", "mean"),
            ("std", "std"),
            ("median", "median"),
            ("worst 10%", "worst10"),
            ("best", "best"),
        )
    ]


# A spreadsheet runs a cell that starts with one of these as a formula ("=cmd|' /C calc'!A0" starts a program).
def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as CSV (columns: the first row's keys), every cell through :func:`csv_cell`."""
    buffer = io.StringIO()
    if rows:
        fields = list(rows[0].keys())
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writerow({f: csv_cell(f) for f in fields})
        writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    atomic_write_text(path, buffer.getvalue())


def describe_split(config: Any) -> str:
    """The dataset and split of a configuration (a :class:`~fedse.config.Config` or its record), as a
    figure's title names them: ``digits, Dirichlet(0.5), 10 clients``."""
    record = config if isinstance(config, Mapping) else config_to_record(config)
    data, part = record.get("data") or {}, record.get("partition") or {}
    scheme, alpha, clients = part.get("scheme"), part.get("alpha"), part.get("num_clients")
    split = {
        "iid": "IID",
        "dirichlet": f"Dirichlet({alpha:g})" if isinstance(alpha, int | float) else "Dirichlet",
        "dirichlet-client": f"per-client Dirichlet({alpha:g})" if isinstance(alpha, int | float) else "Dirichlet",
        "quantity": f"quantity skew Dirichlet({alpha:g})" if isinstance(alpha, int | float) else "quantity skew",
        "pathological": f"{part.get('classes_per_client')} classes per client",
        "file": "split read from files",
    }.get(scheme, str(scheme))
    parts = [str(data.get("dataset", "?")), split]
    if clients is not None:
        parts.append(f"{clients} clients")
    if part.get("feature_skew"):
        parts.append(f"feature skew ({', '.join(part['feature_skew'])})")
    return ", ".join(parts)


def integer_rounds(axis: Any) -> None:
    """Ticks at whole numbers only on ``axis`` (``ax.xaxis``): a round is never 2.5."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


# What each curve of the round plot is (the legend's words).
ROUND_CURVES = (
    (COL_LOCAL_ACC_MEAN, "personalized: own test part, mean over clients"),
    (COL_LOCAL_ACC_WEIGHTED, "personalized: own test part, weighted by test samples"),
    (COL_TRAIN_ACC, "own train part, during local training (weighted by samples)"),
)
POOLED_LABEL = "pooled test set, mean over clients"


def accuracy_figure(rows: Sequence[Mapping[str, Any]], title: str = "") -> Any:
    """The round plot of :func:`round_rows`'s ``rows`` as a matplotlib Figure (not saved, not closed):
    rounds on x (whole numbers), accuracy on y. Pooled accuracy is measured in few rounds (by default
    the last one only): a lone point of it is a large marker named after its round and labelled with
    its value, never an unexplained dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label in ROUND_CURVES:
        pts = [(r[COL_ROUND], r[key]) for r in rows if r.get(key) is not None]
        if pts:  # the two personalized curves are often close: the weighted one dashed, so both show
            style = "--" if key == COL_LOCAL_ACC_WEIGHTED else "-"
            ax.plot(*zip(*pts, strict=True), marker="o", markersize=4, linestyle=style, label=label)
    pooled = [(r[COL_ROUND], r[COL_POOLED_ACC_MEAN]) for r in rows if r.get(COL_POOLED_ACC_MEAN) is not None]
    last = max((r[COL_ROUND] for r in rows), default=None)
    if len(pooled) == 1:
        ((rnd, acc),) = pooled
        when = "last round" if rnd == last else f"round {rnd}"
        ax.plot(
            [rnd],
            [acc],
            linestyle="none",
            marker="*",
            markersize=13,
            color="black",
            label=f"{POOLED_LABEL} ({when} only)",
        )
        # its value under it, to its left: the curves come in from the left, above runs the training curve
        ax.annotate(
            f"{100 * acc:.1f}%",
            (rnd, acc),
            textcoords="offset points",
            xytext=(6, -11),
            ha="right",
            va="top",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
        )
    elif pooled:
        ax.plot(
            *zip(*pooled, strict=True),
            marker="*",
            markersize=9,
            color="black",
            linestyle=":",
            label=f"{POOLED_LABEL} (rounds measured)",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))  # as every table gives accuracies: in %
    integer_rounds(ax.xaxis)
    if last is not None:
        first = min(r[COL_ROUND] for r in rows)
        ax.set_xlim(first - 0.3, last + 0.3)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7.5)
    ax.set_title(title, fontsize=9.5)
    fig.tight_layout()
    return fig


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Any:
    """:func:`accuracy_figure` written to ``path`` as PNG (atomically); returns the (closed) Figure."""
    import matplotlib.pyplot as plt

    fig = accuracy_figure(rows, title)
    atomic_save(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return fig


def provenance() -> dict[str, Any]:
    """What produced a run: the fedse commit (``git describe`` of the source tree, with ``-dirty``
    for uncommitted changes; the package version where the source is not a git checkout), the
    torch, flwr and opacus versions, Python, and the device the driver saw."""
    import importlib.metadata
    import platform
    import subprocess

    source = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    versions = {}
    for package in ("torch", "flwr", "opacus", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    device = f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
    from .. import __version__

    return {
        "fedse": commit or __version__,
        **versions,
        "python": platform.python_version(),
        "device": device,
        "cpus": os.cpu_count(),
    }


def write_record(run_dir: Path, cfg: Config) -> None:
    """The run's configuration (:func:`fedse.config.config_to_record`), written atomically."""
    atomic_write_text(Path(run_dir) / RECORD, yaml.safe_dump(dict(config_to_record(cfg)), sort_keys=False))


def write_run(
    run_dir: Path,
    *,
    config: Mapping[str, Any],
    log: RunLog,
    split_summary: Mapping[str, Any],
    shared_state: Mapping[str, torch.Tensor] | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the run folder; returns the summary written to ``summary.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RECORD, yaml.safe_dump(dict(config), sort_keys=False))
    rounds, clients = round_rows(log), client_rows(log)
    atomic_write_json(run_dir / "rounds.json", rounds)
    write_csv(run_dir / "rounds.csv", rounds)
    atomic_write_json(run_dir / "clients.json", clients)
    write_csv(run_dir / "clients.csv", clients)
    atomic_write_json(run_dir / "client_rounds.json", {"train": log.train, "evaluate": log.evaluate})
    method = split_summary.get("policy") or (config.get("personalization") or {}).get("policy", "")
    plot_accuracy(rounds, run_dir / "accuracy.png", title=f"{describe_split(config)}: {method}, accuracy per round")
    if shared_state is not None:
        atomic_save(run_dir / "shared_weights.pt", lambda f: torch.save(dict(shared_state), f))
    summary = {
        "split": dict(split_summary),
        "clients": {
            row[COL_CLIENT]: {k: v for k, v in row.items() if k != COL_CLIENT} for row in client_summary_rows(clients)
        },
        "last_round": rounds[-1] if rounds else None,
        "best_round_local_acc_mean": max(
            (r[COL_LOCAL_ACC_MEAN] for r in rounds if r[COL_LOCAL_ACC_MEAN] is not None), default=None
        ),
        "dropped_replies": log.dropped,
        "failed_replies": log.failed,
        "refused_rounds": log.refused,
        "provenance": provenance(),
        **(extra or {}),
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
