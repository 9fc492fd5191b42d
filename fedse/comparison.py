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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, ConfigError, config_from_dict, config_to_dict
from .federated import build_federated_data
from .io import atomic_save, atomic_write_json, atomic_write_text
from .partition import plot_label_counts
from .policies import RunPolicy, resolve
from .report import format_table, summarize, write_csv

__all__ = ["MethodRun", "gain_table", "merge", "method_table", "paired_gains", "per_client", "write_comparison"]


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


def _pm(values: Sequence[float | None], scale: float = 100.0, digits: int = 2) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    mean = float(np.mean(vals)) * scale
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(vals)) * scale:.{digits}f}"


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
        stats = [summarize([c["local_acc"] for c in r.clients if c["local_acc"] is not None]) for r in mine]
        best_round = [
            max((x["local_acc_mean"] for x in r.rounds if x["local_acc_mean"] is not None), default=None) for r in mine
        ]
        weighted = [_weighted([(c["local_acc"], c.get("test_samples")) for c in r.clients]) for r in mine]
        pooled = [
            summarize([c["pooled_acc"] for c in r.clients if c["pooled_acc"] is not None]).get("mean") for r in mine
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
            if c["local_acc"] is not None:
                acc[r.method].setdefault(c["client"], []).append(c["local_acc"])
    clients = sorted({c for m in methods for c in acc[m]})
    return [{"client": c, **{m: float(np.mean(acc[m][c])) if c in acc[m] else None for m in methods}} for c in clients]


def gain_table(rows: Sequence[dict[str, Any]], reference: str = "fedavg") -> list[dict[str, Any]]:
    """Per method: mean gain over ``reference`` in points, and how many clients gain, tie, lose."""
    if not rows or reference not in rows[0]:
        return []
    out = []
    for method in [k for k in rows[0] if k not in ("client", reference)]:
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
                        f"{k}_acc": _pm([float(np.mean([h[f"{k}_acc"] for h in r.holdout])) for r in mine])
                        for k in ("global", "private", "full")
                    },
                }
            )
    return rows


def _plots(runs: Sequence[MethodRun], clients: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r.method for r in runs))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        curves = [[x["local_acc_mean"] for x in r.rounds] for r in runs if r.method == method]
        length = min(len(c) for c in curves)
        mean = np.mean([c[:length] for c in curves], axis=0)
        ax.plot(range(1, length + 1), mean, marker=".", label=method)
    ax.set(xlabel="round", ylabel="personalized accuracy (mean over clients)", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(out / "accuracy_per_round.png", lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    if "fedavg" in methods and len(methods) > 1:
        fig, ax = plt.subplots(figsize=(5.5, 5.5))
        values = [v for c in clients for m in methods if (v := c[m]) is not None]
        lo = max(0.0, min(values, default=0.0) - 0.03)
        for method in methods:
            if method == "fedavg":
                continue
            pts = [(c["fedavg"], c[method]) for c in clients if c["fedavg"] is not None and c[method] is not None]
            if pts:
                ax.scatter(*zip(*pts, strict=True), s=18, label=method, alpha=0.8)
        ax.plot([lo, 1], [lo, 1], color="grey", linestyle="--", linewidth=1)
        ax.set(
            xlabel="global accuracy (fedavg, own test part)",
            ylabel="personalized accuracy (own test part)",
            xlim=(lo, 1.005),
            ylim=(lo, 1.005),
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
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
        title=f"{fed.dataset.name}, seed {seeds[0]}: samples per client and class",
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
        md += ["", "## Gain over fedavg (per client, over the seeds both were run with)", "", format_table(gains)]
    if hold:
        md += ["", f"## Cold start: {holdout} held-out clients", "", format_table(hold)]
    atomic_write_text(out / "table.md", "\n".join(md) + "\n")
    _plots(runs, clients, out)
    summary = {
        "config": config_to_dict(cfg),
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


# Settings only some policies read (personalization.<key>: does a resolved policy read it?). Folders
# whose methods never read one may differ in it: fedavg measured at any prior smoothing is the same.
_READ_BY: dict[str, Callable[[RunPolicy], bool]] = {
    "prior_smoothing": lambda p: p.label_prior != "off",
    "ditto_lambda": lambda p: p.personal_model,
}


def _unread(raw: dict[str, Any], methods: Sequence[str]) -> set[str]:
    cfg = config_from_dict(raw)
    try:
        policies = [resolve(cfg, m) for m in methods]
    except ValueError as err:  # a comparison.json naming a policy this fedse does not have
        raise ConfigError(str(err)) from None
    return {key for key, reads in _READ_BY.items() if not any(reads(p) for p in policies)}


def _comparable(raw: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """A comparison's configuration without what may differ between merged folders (read
    through today's config, so a key added since, at its default, is no difference): seed, output,
    the policy, and the settings none of ``methods`` reads."""
    unread = _unread(raw, methods)
    raw = config_to_dict(config_from_dict(raw))
    raw.pop("seed", None)
    raw.pop("output", None)
    for key in ("policy", *unread):
        raw.get("personalization", {}).pop(key, None)
    return raw


def merge(
    folders: Sequence[Path], out: Path, *, command: str = "", methods: Sequence[str] | None = None
) -> dict[str, Any]:
    """One comparison folder ``out`` from several measured under the same configuration;
    ``methods``: take only these from the folders (None: every method)."""
    if len(folders) < 2:
        raise ConfigError(f"--merge needs at least two comparison folders, got {len(folders)}")
    loaded = []
    for folder in folders:
        path = Path(folder) / "comparison.json"
        if not path.is_file():
            raise ConfigError(f"{str(folder)!r} is not a comparison folder: {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); was the comparison interrupted?") from None
        if methods is not None:
            data["methods"] = [m for m in data["methods"] if m in methods]
            data["runs"] = [r for r in data["runs"] if r["method"] in methods]
        if data["methods"]:
            loaded.append((Path(folder), data))
    if methods is not None and (missing := sorted(set(methods) - {m for _, d in loaded for m in d["methods"]})):
        raise ConfigError(f"--methods {','.join(missing)}: in none of the folders {[str(f) for f in folders]}")
    if not loaded:
        raise ConfigError(f"--methods: none of them is in the folders {[str(f) for f in folders]}")
    first_folder, first = loaded[0]
    base = _comparable(first["config"], first["methods"])
    read = base.pop("personalization", {})  # the personalization settings some folder's methods read
    for folder, data in loaded[1:]:
        mine = _comparable(data["config"], data["methods"])
        theirs = mine.pop("personalization", {})
        clash = any(read.get(k, v) != v for k, v in theirs.items())  # a setting both folders read, differing
        if mine != base or clash or data["holdout"] != first["holdout"]:
            raise ConfigError(
                f"{str(folder)!r} was measured under another configuration or --holdout than "
                f"{str(first_folder)!r}; only folders differing in methods, seeds and settings their "
                f"methods do not read ({', '.join(f'personalization.{k}' for k in _READ_BY)}) can be merged"
            )
        read |= theirs
    # The merged configuration: the first folder's, with each policy-specific setting as the folders
    # whose methods read it have it (they agree: checked above).
    config = json.loads(json.dumps(first["config"]))
    config.setdefault("personalization", {}).update({k: read[k] for k in _READ_BY if k in read})
    runs, seen = [], {}
    for folder, data in loaded:
        rows = {row["method"]: row for row in data["table"]}
        for r in data["runs"]:
            key = (r["method"], r["seed"])
            if key in seen:
                raise ConfigError(
                    f"method {key[0]!r}, seed {key[1]} is in both {str(seen[key])!r} and "
                    f"{str(folder)!r}; merge each (method, seed) once"
                )
            seen[key] = folder
            row = rows[r["method"]]  # folders written before runs carried their split: take it from the table
            split = r.get("split") or {
                "private_params": row["private_params"],
                "private_percent": float(row["private_pct"]),
            }
            upload = r.get("upload_bytes", row["upload_bytes_per_client_round"])
            runs.append(
                MethodRun(r["method"], r["seed"], r["rounds"], r["clients"], r["holdout"], split, upload, r["seconds"])
            )
    order = list(dict.fromkeys(r.method for r in runs))
    runs.sort(key=lambda r: (r.seed, order.index(r.method)))
    return write_comparison(config_from_dict(config), runs, out, holdout=first["holdout"], command=command)
