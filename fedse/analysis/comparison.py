"""Comparisons: method tables, per-client gains, cold-start tables, plots, and merging folders.

A comparison runs every method under the identical partition, seeds, model and
budget (the runner is ``simulations/compare.py``); this module turns its runs
into the comparison folder: the method table (Markdown and CSV), per-client
accuracies and gains over ``fedavg`` (paired by seed: a seed is a partition),
the cold-start table, plots and ``comparison.json``.

``fedse compare --merge DIR DIR ... --out OUT`` combines comparison folders
measured separately (other methods, other seeds) into one: their
configurations must be identical but for the policy, so every seed's partition
is the same in all of them, and no (method, seed) may appear twice.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, ConfigError, config_from_record, config_to_dict, config_to_record, short_repr
from ..data.federated import build_federated_data, model_shape
from ..data.partition import plot_label_counts
from ..data.split_import import comparable_partition
from ..io import atomic_save, atomic_write_json, atomic_write_text, check_output_dir
from ..models import base_width, build_model
from ..policies import resolve, settings
from .report import (
    COL_CLIENT,
    COL_LOCAL_ACC,
    COL_LOCAL_ACC_MEAN,
    COL_POOLED_ACC,
    COL_ROUND,
    COL_SECONDS,
    COL_TEST_SAMPLES,
    COL_TRAIN_SAMPLES,
    describe_split,
    format_table,
    integer_rounds,
    summarize,
    write_csv,
)

__all__ = [
    "budget_report",
    "budget_table",
    "clients_figure",
    "comparable",
    "gain_table",
    "merge",
    "method_run_from",
    "method_table",
    "MethodRun",
    "paired_gains",
    "per_client",
    "read_comparison",
    "round_figure",
    "terminal_table",
    "write_budget",
    "write_comparison",
]


@dataclass
class MethodRun:
    method: str
    seed: int
    rounds: list[dict[str, Any]]
    clients: list[dict[str, Any]]
    holdout: list[dict[str, Any]]
    split: dict[str, Any]
    upload_bytes: int
    seconds: float


# What the comparison reads of each row of a run (a client's test size is optional: older runs lack it).
_ROWS = {
    "rounds": (COL_ROUND, COL_LOCAL_ACC_MEAN),
    "clients": (COL_CLIENT, COL_LOCAL_ACC, COL_POOLED_ACC),
    "holdout": ("global_acc", "private_acc", "full_acc"),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer past the largest float: no usable number (numpy raised TypeError on it)
        return False


def method_run_from(raw: Any, where: str) -> MethodRun:
    """A run read back from a file (a run folder's ``method_run.json``, a ``comparison.json``), with
    every field the comparison reads checked first: a damaged or foreign file is one ConfigError
    naming it and the field, never a traceback while the tables are written."""

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where}: {what}; it is not a run fedse wrote (delete it to redo that run)")

    names = [f.name for f in fields(MethodRun)]
    if not isinstance(raw, dict) or set(raw) != set(names):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise bad(f"a run holds {found}, expected the keys {sorted(names)}")
    if not isinstance(raw["method"], str) or not _is_int(raw["seed"]) or not _is_int(raw["upload_bytes"]):
        raise bad("'method' must be a string, 'seed' and 'upload_bytes' integers")
    if not _is_number(raw["seconds"]) or raw["seconds"] < 0:
        raise bad(f"'seconds' {short_repr(raw['seconds'])} is not a duration")
    split = raw["split"]
    if (
        not isinstance(split, dict)
        or not _is_int(split.get("private_params"))
        or not _is_number(split.get("private_percent"))
    ):
        raise bad("'split' must hold 'private_params' (an integer) and 'private_percent' (a number)")
    for name, keys in _ROWS.items():
        rows = raw[name]
        if not isinstance(rows, list) or not all(isinstance(r, dict) and set(keys) <= set(r) for r in rows):
            raise bad(f"'{name}' must be a list of rows, each with {list(keys)}")
        for row in rows:
            for key in keys:
                v = row[key]
                whole = key in (COL_ROUND, COL_CLIENT)
                if not (_is_int(v) if whole else v is None or (_is_number(v) and 0 <= v <= 1)):
                    allowed = "an integer" if whole else "an accuracy in [0, 1] or null"
                    raise bad(f"'{name}' row {key}={v!r}; allowed: {allowed}")
    if any(not (c.get(COL_TEST_SAMPLES) is None or _is_int(c[COL_TEST_SAMPLES])) for c in raw["clients"]):
        raise bad(f"a client's '{COL_TEST_SAMPLES}' must be an integer or null")
    return MethodRun(**raw)


def _mean_std(values: Sequence[float | None]) -> tuple[float, float] | None:
    """Mean and population standard deviation (numpy's, ``ddof=0``) of the values that were measured
    (None: not evaluated); None when none was. The spread over seeds of every table and plot."""
    vals = [v for v in values if v is not None]
    return (float(np.mean(vals)), float(np.std(vals))) if vals else None


def _pm(values: Sequence[float | None], scale: float = 100.0, digits: int = 2) -> str:
    spread = _mean_std(values)
    if spread is None:
        return "-"
    mean, std = spread[0] * scale, spread[1] * scale
    if sum(v is not None for v in values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _weighted(pairs: Sequence[tuple[float | None, int | None]]) -> float | None:
    """Accuracy over all clients' test samples pooled (each client weighted by its test size, as
    PFLlib reports); None when any evaluated client lacks its test size (older runs)."""
    pairs = [(a, n) for a, n in pairs if a is not None]
    if not pairs or any(n is None for _, n in pairs) or not sum(n for _, n in pairs):
        return None
    return sum(a * n for a, n in pairs) / sum(n for _, n in pairs)


def method_table(runs: Sequence[MethodRun]) -> list[dict[str, Any]]:
    """One row per method; accuracies in %, mean ± std over seeds where several."""
    rows = []
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        stats = [summarize([c[COL_LOCAL_ACC] for c in r.clients if c[COL_LOCAL_ACC] is not None]) for r in mine]
        best_round = [
            max((x[COL_LOCAL_ACC_MEAN] for x in r.rounds if x[COL_LOCAL_ACC_MEAN] is not None), default=None)
            for r in mine
        ]
        weighted = [_weighted([(c[COL_LOCAL_ACC], c.get(COL_TEST_SAMPLES)) for c in r.clients]) for r in mine]
        pooled = [
            summarize([c[COL_POOLED_ACC] for c in r.clients if c[COL_POOLED_ACC] is not None]).get("mean") for r in mine
        ]
        rows.append(
            {
                "method": method,
                "personalized_mean_last": _pm([s.get("mean") for s in stats]),
                "personalized_mean_best_round": _pm(best_round),
                "personalized_weighted_last": _pm(weighted),
                "std_over_clients": _pm([s.get("std") for s in stats]),
                "median": _pm([s.get("median") for s in stats]),
                "worst_10pct": _pm([s.get("worst10") for s in stats]),
                "best_client": _pm([s.get("best") for s in stats]),
                "pooled_test": _pm(pooled),
                "private_params": mine[0].split["private_params"],
                "private_pct": f"{mine[0].split['private_percent']:.2f}",
                "extra_private_values": mine[0].split.get("extra_private_values", 0),
                "upload_bytes_per_client_round": mine[0].upload_bytes,
                "seeds": len(mine),
                "wall_s_per_run": f"{np.mean([r.seconds for r in mine]):.0f}",
            }
        )
    return rows


def per_client(runs: Sequence[MethodRun]) -> list[dict[str, Any]]:
    """Per client: each method's personalized accuracy, averaged over seeds."""
    methods = list(dict.fromkeys(r.method for r in runs))
    acc: dict[str, dict[int, list[float]]] = {m: {} for m in methods}
    for r in runs:
        for c in r.clients:
            if c[COL_LOCAL_ACC] is not None:
                acc[r.method].setdefault(c[COL_CLIENT], []).append(c[COL_LOCAL_ACC])
    clients = sorted({c for m in methods for c in acc[m]})
    return [
        {COL_CLIENT: c, **{m: float(np.mean(acc[m][c])) if c in acc[m] else None for m in methods}} for c in clients
    ]


def gain_table(rows: Sequence[dict[str, Any]], reference: str = "fedavg") -> list[dict[str, Any]]:
    """Per method: mean gain over ``reference`` in points, and how many clients gain, tie, lose."""
    if not rows or reference not in rows[0]:
        return []
    out = []
    for method in [k for k in rows[0] if k not in (COL_CLIENT, reference)]:
        diffs = [r[method] - r[reference] for r in rows if r[method] is not None and r[reference] is not None]
        out.append(
            {
                "method": method,
                "mean_gain_points": 100.0 * float(np.mean(diffs)) if diffs else None,
                "clients_gain": sum(d > 1e-12 for d in diffs),
                "clients_tie": sum(abs(d) <= 1e-12 for d in diffs),
                "clients_lose": sum(d < -1e-12 for d in diffs),
            }
        )
    return out


def _points(value: float | None) -> str:
    """A gain in percentage points, signed, 2 decimals (the accuracy cells' unit and precision)."""
    return "-" if value is None else f"{value:+.2f}"


def terminal_table(summary: dict[str, Any], reference: str = "fedavg") -> str:
    """The comparison in brief, for the terminal: per method, personalized accuracy on each client's
    own test part in % (mean over clients, weighted by test samples, the worst 10% of clients; mean ±
    std over seeds where several) and the mean per-client gain over ``reference`` in points, with the
    clients that gain, tie and lose. ``summary``: what :func:`write_comparison` returns (or
    :func:`read_comparison` reads: its ``table`` and ``gains``). The full table is the folder's
    ``table.md`` and ``table.csv``."""
    gains = {g["method"]: g for g in summary.get("gains") or []}
    columns = ["method", "mean over clients", "weighted by test samples", "worst 10% of clients"]
    if gains:
        columns.append(f"gain over {reference}")
    rows = []
    for row in summary["table"]:
        cells = [row["method"], row["personalized_mean_last"], row["personalized_weighted_last"], row["worst_10pct"]]
        if gains:
            g = gains.get(row["method"])
            cells.append(
                "-"
                if g is None
                else f"{_points(g['mean_gain_points'])} ({g['clients_gain']}/{g['clients_tie']}/{g['clients_lose']})"
            )
        rows.append(cells)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(  # noqa: E731
        (c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    ).rstrip()
    seeds = max((int(row.get("seeds", 1)) for row in summary["table"]), default=1)
    note = (
        "Personalized accuracy in % on each client's own test part, after the last round: the mean over clients, "
        "the same weighted by test samples, the mean of the worst 10% of clients"
        + ("; mean ± std over seeds." if seeds > 1 else ".")
    )
    if gains:
        note += (
            f" Gain over {reference}: the mean per-client gain in points (clients gaining/tied/losing), over the "
            "seeds both were run with."
        )
    note += " Every column: table.md, table.csv."
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, rows), "", textwrap.fill(note, 100)])


def paired_gains(runs: Sequence[MethodRun], reference: str = "fedavg") -> list[dict[str, Any]]:
    """:func:`gain_table` per method over the seeds it shares with ``reference`` only: a
    seed is a partition, so client ``i`` of one seed is not client ``i`` of another."""
    ref_seeds = {r.seed for r in runs if r.method == reference}
    out = []
    for method in dict.fromkeys(r.method for r in runs if r.method != reference):
        seeds = ref_seeds & {r.seed for r in runs if r.method == method}
        if seeds:
            rows = per_client([r for r in runs if r.seed in seeds and r.method in (method, reference)])
            out += [{**g, "paired_seeds": len(seeds)} for g in gain_table(rows, reference) if g["method"] == method]
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that were measured (None: not evaluated); None when none was."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def holdout_table(runs: Sequence[MethodRun]) -> list[dict[str, Any]]:
    rows = []
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method and r.holdout]
        if mine:
            rows.append(
                {
                    "method": method,
                    "clients": len(mine[0].holdout),
                    **{
                        f"{k}_acc": _pm([_mean([h[f"{k}_acc"] for h in r.holdout]) for r in mine])
                        for k in ("global", "private", "full")
                    },
                }
            )
    return rows


def _seeds_note(runs: Sequence[MethodRun]) -> str:
    seeds = sorted({r.seed for r in runs})
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {', '.join(map(str, seeds))}"


def round_figure(runs: Sequence[MethodRun], setting: str = "") -> Any:
    """Personalized accuracy (mean over clients) per round, one curve per method (mean over its
    seeds, at the rounds every seed ran and evaluated), shaded ± 1 std over the seeds where a method
    has several (the std of the tables, :func:`_mean_std`), as a matplotlib Figure (not saved, not
    closed). ``setting``: the dataset and split (:func:`~fedse.analysis.report.describe_split`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    methods = list(dict.fromkeys(r.method for r in runs))
    seeds = {m: len([r for r in runs if r.method == m]) for m in methods}  # a (method, seed) is one run
    shaded = sorted({n for n in seeds.values() if n > 1})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        curves = [r.rounds for r in runs if r.method == method]
        shared = set.intersection(*({x[COL_ROUND] for x in c} for c in curves))  # rounds every seed ran
        points = [
            (n, *spread)
            for n in sorted(shared)
            if (spread := _mean_std([x[COL_LOCAL_ACC_MEAN] for c in curves for x in c if x[COL_ROUND] == n]))
            is not None
        ]  # a round without an evaluation is no point
        if not points:
            continue
        x, mean, std = (np.array(v) for v in zip(*points, strict=True))
        label = f"{method} ({seeds[method]} seeds)" if len(shaded) > 1 and seeds[method] > 1 else method
        (line,) = ax.plot(x, mean, marker=".", label=label)
        if seeds[method] > 1:
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(
        xlabel="round",
        ylabel="accuracy on each client's own test part\n(the method's model for it, mean over clients)",
        ylim=(0, 1),
    )
    integer_rounds(ax.xaxis)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title(f"{setting + ': ' if setting else ''}accuracy per round ({_seeds_note(runs)})", fontsize=9.5)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        title = "method"
        if shaded:  # one seed count for every shaded method: the title names it; several: each label does
            title += f"\n(shaded: ± 1 std over {shaded[0] if len(shaded) == 1 else 'its'} seeds)"
        ax.legend(fontsize=8, title=title, title_fontsize=8)
    fig.tight_layout()
    return fig


def clients_figure(runs: Sequence[MethodRun], clients: list[dict[str, Any]], setting: str = "") -> Any:
    """Each client's personalized accuracy under each method against its accuracy under FedAvg (the
    shared model), both on the client's own test part (:func:`per_client`'s rows: mean over seeds), as
    a matplotlib Figure (not saved, not closed); None without fedavg and another method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    methods = list(dict.fromkeys(r.method for r in runs))
    if "fedavg" not in methods or len(methods) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5.8, 5.8))
    values = [v for c in clients for m in methods if (v := c[m]) is not None]
    lo = max(0.0, min(values, default=0.0) - 0.03)
    for method in methods:
        if method == "fedavg":
            continue
        pts = [(c["fedavg"], c[method]) for c in clients if c["fedavg"] is not None and c[method] is not None]
        if pts:
            gain = 100 * float(np.mean([y - x for x, y in pts]))
            ax.scatter(*zip(*pts, strict=True), s=18, alpha=0.8, label=f"{method} (mean gain {gain:+.2f} points)")
    ax.plot([lo, 1], [lo, 1], color="grey", linestyle="--", linewidth=1, label="same accuracy as FedAvg")
    ax.text(
        0.04, 0.96, "above the line: better than FedAvg", transform=ax.transAxes, fontsize=8, va="top", color="dimgrey"
    )
    ax.set(
        xlabel="FedAvg's shared model: accuracy on the client's own test part",
        ylabel="personalized model: accuracy on the client's own test part",
        xlim=(lo, 1.005),
        ylim=(lo, 1.005),
    )
    others = ", ".join(m for m in methods if m != "fedavg")
    ax.set_title(
        f"{setting + ': ' if setting else ''}{others} against FedAvg\n"
        f"one point per client ({len(clients)} clients, {_seeds_note(runs)})",
        fontsize=9.5,
    )
    for axis in (ax.xaxis, ax.yaxis):  # in %, as the tables; few ticks, so that "97.5%" labels do not crowd
        axis.set_major_locator(MaxNLocator(6))
        axis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _plots(runs: Sequence[MethodRun], clients: list[dict[str, Any]], out: Path, setting: str = "") -> None:
    import matplotlib.pyplot as plt

    fig = round_figure(runs, setting)
    atomic_save(out / "accuracy_per_round.png", lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    fig = clients_figure(runs, clients, setting)
    if fig is not None:
        atomic_save(out / "personalized_vs_global.png", lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)


def write_comparison(
    cfg: Config, runs: Sequence[MethodRun], out: Path, *, holdout: int, command: str
) -> dict[str, Any]:
    """Tables, plots and ``comparison.json`` of ``runs`` into ``out``."""
    methods = list(dict.fromkeys(r.method for r in runs))
    seeds = sorted({r.seed for r in runs})
    out.mkdir(parents=True, exist_ok=True)
    fed = build_federated_data(replace(cfg, seed=seeds[0]))
    plot_label_counts(
        fed.label_counts(),
        out / "label_distribution.png",
        class_names=list(fed.dataset.classes),
        title=f"{describe_split(cfg)}, seed {seeds[0]}: samples per client and class (train + test)",
    )
    table, clients = method_table(runs), per_client(runs)
    gains, hold = paired_gains(runs), holdout_table(runs)
    for name, rows in (("table", table), ("per_client", clients), ("gains", gains), ("holdout", hold)):
        if rows:
            write_csv(out / f"{name}.csv", rows)
    md = [
        f"# Comparison: {', '.join(methods)}",
        "",
        f"`{command}`" if command else "",
        f"seeds {seeds}; accuracies in %, mean ± std over seeds; personalized = each client's own test part",
        "",
        format_table(table),
    ]
    if gains:
        shown = [{**g, "mean_gain_points": _points(g["mean_gain_points"])} for g in gains]  # the CSV keeps every digit
        md += ["", "## Gain over fedavg (per client, over the seeds both were run with)", "", format_table(shown)]
    if hold:
        md += ["", f"## Cold start: {holdout} held-out clients", "", format_table(hold)]
    atomic_write_text(out / "table.md", "\n".join(md) + "\n")
    _plots(runs, clients, out, describe_split(cfg))
    summary = {
        "config": config_to_record(cfg),
        "methods": methods,
        "seeds": seeds,
        "holdout": holdout,
        "table": table,
        "gains": gains,
        "holdout_table": hold,
        "runs": [
            {
                "method": r.method,
                "seed": r.seed,
                "seconds": r.seconds,
                "rounds": r.rounds,
                "clients": r.clients,
                "holdout": r.holdout,
                "split": r.split,
                "upload_bytes": r.upload_bytes,
            }
            for r in runs
        ],
    }
    atomic_write_json(out / "comparison.json", summary)
    return summary


def _unread(cfg: Config, methods: Sequence[str]) -> set[str]:
    """The personalization settings none of ``methods`` reads (folders whose methods never read one
    may differ in it: fedavg measured at any prior smoothing is the same)."""
    policies = [resolve(cfg, m) for m in methods]
    return settings() - set().union(*(p.reads() for p in policies))


def comparable(raw: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """A recorded configuration (:func:`~fedse.config.config_to_record`) without what may differ between
    runs that measured the same thing: seed, output, the policy, the settings none of ``methods``
    reads, and the path of an imported split whose digest is pinned. Read as the record it is, so a
    key an older record lacks has the value it had then; the model's width as built, so
    ``width: null`` and the family's default width are the same model."""
    cfg = config_from_record(raw)
    unread = _unread(cfg, methods)
    raw = config_to_dict(cfg)
    raw["model"]["width"] = base_width(cfg.model.name, cfg.model.width)
    raw["partition"] = comparable_partition(raw["partition"])  # a pinned split is its digest, wherever it lies
    raw.pop("seed", None)
    raw.pop("output", None)
    for key in ("policy", *unread):
        raw.get("personalization", {}).pop(key, None)
    return raw


class _Absent:
    """A key one configuration lacks."""

    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _differences(first: Any, other: Any, key: str = "") -> list[str]:
    """Where two configurations (nested mappings) differ: ``dotted.key: first's value vs other's``."""
    if isinstance(first, dict) and isinstance(other, dict):
        out = []
        for k in dict.fromkeys([*first, *other]):
            out += _differences(first.get(k, _ABSENT), other.get(k, _ABSENT), f"{key}.{k}" if key else str(k))
        return out
    return [] if first == other else [f"{key}: {first!r} vs {other!r}"]


def read_comparison(folder: Path) -> dict[str, Any]:
    """A folder's ``comparison.json``, checked: its configuration, methods, --holdout and runs (each
    through :func:`method_run_from`)."""
    path = Path(folder) / "comparison.json"
    if not path.is_file():
        raise ConfigError(f"{str(folder)!r} is not a comparison folder: {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # ValueError: bad JSON, or an integer past 4300 digits
        raise ConfigError(
            f"{path} is not valid JSON ({short_repr(str(err))}); was the comparison interrupted?"
        ) from None
    shape = "expected a mapping with 'config', 'methods' (names), 'holdout' (an integer), 'runs' and 'table'"
    if (
        not isinstance(data, dict)
        or not {"config", "methods", "holdout", "runs", "table"} <= set(data)
        or not isinstance(data["methods"], list)
        or not all(isinstance(m, str) for m in data["methods"])
        or not _is_int(data["holdout"])
        or not isinstance(data["runs"], list)
        or not isinstance(data["table"], list)
        or not all(isinstance(row, dict) and isinstance(row.get("method"), str) for row in data["table"])
    ):
        raise ConfigError(f"{path} is not a fedse comparison: {shape}")
    rows = {row["method"]: row for row in data["table"]}
    runs = []
    for index, r in enumerate(data["runs"]):
        where = f"{path} run {index}"
        if isinstance(r, dict) and r.get("method") in rows and ("split" not in r or "upload_bytes" not in r):
            # folders written before runs carried their split and upload: take them from the table
            row = rows[r["method"]]
            try:
                r = {
                    "split": {"private_params": row["private_params"], "private_percent": float(row["private_pct"])},
                    "upload_bytes": row["upload_bytes_per_client_round"],
                    **r,
                }
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"{where}: its method's table row lacks the split and upload bytes") from None
        runs.append(method_run_from(r, where))
    if set(data["methods"]) != {r.method for r in runs}:
        raise ConfigError(f"{path}: its methods {data['methods']} are not those of its runs; not a fedse comparison")
    return {**data, "runs": runs}


def merge(
    folders: Sequence[Path], out: Path, *, command: str = "", methods: Sequence[str] | None = None
) -> dict[str, Any]:
    """One comparison folder ``out`` from several measured under the same configuration;
    ``methods``: take only these from the folders (None: every method)."""
    if len(folders) < 2:
        raise ConfigError(f"--merge needs at least two comparison folders, got {len(folders)}")
    check_output_dir(out, "--out")
    if inputs := [str(f) for f in folders if Path(f).resolve() == Path(out).resolve()]:
        raise ConfigError(
            f"--out {str(out)!r} is the input folder {inputs[0]!r}: the merge would overwrite its comparison; "
            "allowed: a folder that is none of the folders merged"
        )
    loaded = []
    for folder in folders:
        data = read_comparison(folder)
        if methods is not None:
            data["methods"] = [m for m in data["methods"] if m in methods]
            data["runs"] = [r for r in data["runs"] if r.method in methods]
        if data["methods"]:
            loaded.append((Path(folder), data))
    if methods is not None and (missing := sorted(set(methods) - {m for _, d in loaded for m in d["methods"]})):
        raise ConfigError(f"--methods {','.join(missing)}: in none of the folders {[str(f) for f in folders]}")
    if not loaded:
        raise ConfigError(f"--methods: none of them is in the folders {[str(f) for f in folders]}")
    first_folder, first = loaded[0]
    base = comparable(first["config"], first["methods"])
    read = base.pop("personalization", {})  # the personalization settings some folder's methods read
    source = dict.fromkeys(read, first_folder)  # the folder each of them was first read from
    for folder, data in loaded[1:]:
        mine = comparable(data["config"], data["methods"])
        theirs = mine.pop("personalization", {})
        differ = _differences(base, mine)
        for k, v in theirs.items():  # a setting both folders' methods read, differing
            if k in read and read[k] != v:
                where = "" if source[k] == first_folder else f" (in {str(source[k])!r})"
                differ.append(f"personalization.{k}: {read[k]!r}{where} vs {v!r}")
        if data["holdout"] != first["holdout"]:
            differ.append(f"--holdout: {first['holdout']} vs {data['holdout']}")
        if differ:
            raise ConfigError(
                f"{str(folder)!r} was measured under another configuration or --holdout than "
                f"{str(first_folder)!r} (differing, {str(first_folder)!r} vs {str(folder)!r}: {', '.join(differ)}); "
                "only folders differing in methods, seeds and settings their methods do not read "
                f"({', '.join(f'personalization.{k}' for k in sorted(settings()))}) can be merged"
            )
        source |= {k: folder for k in theirs if k not in source}
        read |= theirs
    # The merged configuration: the first folder's, with each policy-specific setting as the folders
    # whose methods read it have it (they agree: checked above).
    config = json.loads(json.dumps(first["config"]))
    config.setdefault("personalization", {}).update({k: read[k] for k in settings() if k in read})
    runs, seen = [], {}
    for folder, data in loaded:
        for r in data["runs"]:
            key = (r.method, r.seed)
            if key in seen:
                raise ConfigError(
                    f"method {key[0]!r}, seed {key[1]} is in both {str(seen[key])!r} and "
                    f"{str(folder)!r}; merge each (method, seed) once"
                )
            seen[key] = folder
            runs.append(r)
    order = list(dict.fromkeys(r.method for r in runs))
    runs.sort(key=lambda r: (r.seed, order.index(r.method)))
    return write_comparison(config_from_record(config), runs, out, holdout=first["holdout"], command=command)


def _reached(run: MethodRun, target: float) -> tuple[int, float] | None:
    """(round, seconds since the start) at which ``run``'s mean personalized accuracy first reached
    ``target``; None if it never did (or a round's time is missing)."""
    elapsed = 0.0
    for row in run.rounds:
        if row.get(COL_SECONDS) is None:
            return None
        elapsed += row[COL_SECONDS]
        if row[COL_LOCAL_ACC_MEAN] is not None and row[COL_LOCAL_ACC_MEAN] >= target:
            return row[COL_ROUND], elapsed
    return None


def _check_budget_fields(runs: Sequence[MethodRun], path: Path) -> None:
    """What :func:`budget_table` reads of a run beyond :func:`method_run_from`'s checks, checked first:
    a round's ``seconds`` and a client's ``train_samples`` (optional both: older runs lack them)."""
    for index, run in enumerate(runs):
        where = f"{path} run {index}"
        for row in run.rounds:
            seconds = row.get(COL_SECONDS)
            if seconds is not None and not (_is_number(seconds) and seconds >= 0):
                raise ConfigError(
                    f"{where}: round {row[COL_ROUND]} '{COL_SECONDS}' is {short_repr(seconds)}; allowed: a number >= 0 "
                    "(the round's duration) or null"
                )
        for row in run.clients:
            samples = row.get(COL_TRAIN_SAMPLES)
            if samples is not None and not (_is_int(samples) and samples >= 0):
                raise ConfigError(
                    f"{where}: client {row[COL_CLIENT]} '{COL_TRAIN_SAMPLES}' is {short_repr(samples)}; allowed: an "
                    "integer >= 0 or null"
                )


def budget_table(
    folders: Sequence[Path], target: float = 0.9, methods: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One row per (folder, method): comparisons measured under other local budgets (batch size, local
    epochs, model width) side by side, with what each budget buys per round, per second and per byte
    sent: the accuracy after the last round, the round and the seconds at which the mean personalized
    accuracy first reached ``target``, and the megabytes a client had uploaded by then. SGD steps per
    round are the shared update's: local_epochs x ceil(train samples / batch size), summed over the
    clients that trained (a policy's extra epochs, such as fine-tuning, are not counted). ``methods``:
    only these (None: every method of every folder)."""
    rows = []
    for folder in folders:
        data = read_comparison(folder)
        _check_budget_fields(data["runs"], Path(folder) / "comparison.json")
        cfg = config_from_record(data["config"])
        model = build_model(cfg, *model_shape(cfg))
        params = sum(p.numel() for p in model.parameters())
        table = {row["method"]: row for row in method_table(data["runs"])}
        for method in [m for m in data["methods"] if methods is None or m in methods]:
            mine = [r for r in data["runs"] if r.method == method]
            reached = [_reached(r, target) for r in mine]
            hit = [x for x in reached if x is not None]
            samples = [c.get(COL_TRAIN_SAMPLES) for c in mine[0].clients]
            steps = (
                None
                if not samples or any(n is None for n in samples)
                else cfg.train.local_epochs * sum(-(-n // cfg.train.batch_size) for n in samples)
            )
            rounds = [r.rounds[-1][COL_ROUND] for r in mine if r.rounds]
            rows.append(
                {
                    "method": method,
                    "batch": cfg.train.batch_size,
                    "width": base_width(cfg.model.name, cfg.model.width),
                    "params": params,
                    "steps_per_round": steps,
                    "rounds": max(rounds) if rounds else None,
                    "personalized_mean_last": table[method]["personalized_mean_last"],
                    "personalized_weighted_last": table[method]["personalized_weighted_last"],
                    "worst_10pct": table[method]["worst_10pct"],
                    f"round_to_{target * 100:g}": (
                        f"{np.mean([h[0] for h in hit]):.1f}" if len(hit) == len(mine) else "not reached"
                    ),
                    f"seconds_to_{target * 100:g}": (
                        f"{np.mean([h[1] for h in hit]):.0f}" if len(hit) == len(mine) else "-"
                    ),
                    f"upload_MB_to_{target * 100:g}": (
                        f"{np.mean([h[0] for h in hit]) * mine[0].upload_bytes / 1e6:.2f}"
                        if len(hit) == len(mine)
                        else "-"
                    ),
                    "wall_s_per_run": table[method]["wall_s_per_run"],
                    "upload_bytes_per_client_round": mine[0].upload_bytes,
                    "seeds": len(mine),
                }
            )
    return rows


def budget_report(rows: Sequence[dict[str, Any]], command: str = "") -> str:
    """:func:`budget_table`'s rows as Markdown, with the command that made them."""
    return "# Budget table\n\n" + (f"`{command}`\n\n" if command else "") + format_table(rows) + "\n"


def write_budget(rows: Sequence[dict[str, Any]], command: str, out: Path) -> None:
    """``budget.md`` and ``budget.csv`` of :func:`budget_table`'s rows in ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "budget.md", budget_report(rows, command))
    write_csv(out / "budget.csv", rows)
