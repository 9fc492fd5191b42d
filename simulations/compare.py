"""``fedse compare``: every method under the identical partition, seeds, model and budget.

Runs one simulation per (seed, method) that differ only in
``personalization.policy``, then writes the comparison folder
(:func:`fedse.analysis.comparison.write_comparison`). Rerun with the same ``--out``, it
survives interruption: a (method, seed) that finished is read back from its run
folder, one that was interrupted continues from its last checkpoint.

Cold start (``--holdout K``): the last K partitions never train. After
training, each adapts a copy of the final model on its own train part and is
evaluated on its own test part three ways (:meth:`fedse.policies.ClientRun.adapt_and_evaluate`):
the received model as is (``global``), only its private keys adapted
(``private``), every key adapted (``full``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fedse.analysis.comparison import MethodRun, comparable, method_run_from, write_comparison
from fedse.analysis.report import COL_CLIENT, COL_TRAIN_SAMPLES, client_rows, round_rows
from fedse.checkpoint import CHECKPOINT
from fedse.config import Config, ConfigError, config_from_record, config_to_record
from fedse.data.federated import build_federated_data, model_shape
from fedse.io import atomic_write_json
from fedse.models import build_model
from fedse.policies import POLICIES, ClientRun, resolve
from fedse.simulation import SharedProgress, progress_bar, simulate
from fedse.spec import resolve as resolve_run

__all__ = ["compare"]


def _holdout(cfg: Config, shared: dict, first: int) -> list[dict[str, Any]]:
    fed = build_federated_data(cfg)
    ds = fed.dataset
    policy = resolve(cfg)
    rows = []
    for cid in range(first, cfg.partition.num_clients):
        shard = fed.shard(cid)
        model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
        split = policy.split(model)
        model.load_state_dict(shared, strict=False)
        rows.append(
            {
                COL_CLIENT: cid,
                COL_TRAIN_SAMPLES: len(shard.train_labels),
                **ClientRun(cfg, policy, shard, ds.mean, ds.std, cfg.seed + cid).adapt_and_evaluate(model, split),
            }
        )
    return rows


RESULT = "method_run.json"  # in a finished (method, seed) run folder: what the comparison needs of it


def _split_summary(run_cfg: Config) -> tuple[dict[str, Any], int]:
    """The policy's split of the run's model (a function of the config), with the values of the extra
    private state a client keeps beyond the model's private keys (Ditto's personal model, FedALA's local
    model and mixing weights, FedRoD's personalized head); and the bytes of the shared tensors, what a
    client uploads per round."""
    model = build_model(run_cfg, *model_shape(run_cfg))
    policy = resolve(run_cfg)
    split, state = policy.split(model), model.state_dict()
    extra = sum(v.numel() for v in policy.extra_state(model).values())
    upload = sum(state[k].numel() * state[k].element_size() for k in split.shared)
    return {**split.summary(model), "extra_private_values": extra}, upload


def _run(
    cfg: Config, method: str, seed: int, out: Path, holdout: int, progress: SharedProgress | None = None
) -> MethodRun:
    """One (method, seed): taken from its run folder when it finished before (``method_run.json``),
    continued from its checkpoint when it was interrupted, else run afresh (its rounds shown in
    ``progress``, when given)."""
    run_cfg = replace(
        cfg,
        seed=seed,
        personalization=replace(cfg.personalization, policy=method),
        output=replace(cfg.output, dir=str(out / "runs"), name=f"{method}-seed{seed}"),
    )
    folder = out / "runs" / f"{method}-seed{seed}"
    expected = {"config": config_to_record(run_cfg), "holdout": holdout}
    if (folder / RESULT).is_file():
        redo = "delete that run folder to redo it"
        try:
            saved = json.loads((folder / RESULT).read_text())
            record, raw_run, saved_holdout = saved["config"], saved["run"], saved["holdout"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{folder / RESULT} is unreadable ({err}); {redo}") from None
        # read as the record it is (a key an older record lacks has the value it had then); the same run
        # if it differs only in where its folder is (moved, or named relatively) and in settings its
        # method does not read
        try:
            was = config_from_record(record)
        except ConfigError as err:
            raise ConfigError(f"{folder / RESULT}: {err}; {redo}") from None
        run = method_run_from(raw_run, str(folder / RESULT))
        same = (
            (was.seed, was.personalization.policy) == (run.seed, run.method) == (seed, method)
            and comparable(record, [method]) == comparable(expected["config"], [method])
            and saved_holdout == holdout
        )
        if not same:
            raise ConfigError(f"{folder} was run with another configuration or --holdout; compare into a new --out")
        return replace(run, split=_split_summary(run_cfg)[0])
    resume = (folder / CHECKPOINT).is_file()
    if folder.exists() and not resume:  # stopped before its first round: nothing to keep
        shutil.rmtree(folder)
    trained = cfg.partition.num_clients - holdout
    result = simulate(
        run_cfg, quiet=True, clients=trained, run_dir=folder if resume else None, resume=resume, progress=progress
    )
    split, upload = _split_summary(run_cfg)
    hold = _holdout(run_cfg, result.outcome.shared_state, trained) if holdout else []
    run = MethodRun(
        method,
        seed,
        round_rows(result.outcome.log),
        client_rows(result.outcome.log),
        hold,
        split,
        upload,
        result.wall_seconds,
    )
    atomic_write_json(folder / RESULT, {**expected, "run": asdict(run)})
    return run


def compare(
    cfg: Config,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    *,
    holdout: int = 0,
    command: str = "",
    quiet: bool = True,
) -> dict[str, Any]:
    """Run every (seed, method); write the comparison folder ``out``; return its summary. Unless
    ``quiet``, show what ``fedse simulate`` shows while it runs: a bar of the (method, seed) runs,
    one of the current run's rounds, and one line a round naming its method and seed."""
    if unknown := [m for m in methods if m not in POLICIES]:
        raise ConfigError(f"unknown method(s) {unknown}; valid methods: {sorted(POLICIES)}")
    for method in methods:
        resolve_run(cfg, method)  # every registry's rules, each method's included, before anything runs
    trained = cfg.partition.num_clients - holdout
    if holdout < 0 or trained < max(cfg.server.min_train_clients, 1):
        raise ConfigError(
            f"--holdout {holdout} leaves {trained} training clients; need at least "
            f"server.min_train_clients={cfg.server.min_train_clients}"
        )
    out.mkdir(parents=True, exist_ok=True)
    todo = [(m, s) for s in seeds for m in methods]
    if quiet:
        runs = [_run(cfg, m, s, out, holdout) for m, s in todo]
    else:
        bar = progress_bar()
        task = bar.add_task("runs (method x seed)", total=len(todo))
        runs = []
        with bar:
            for m, s in todo:
                runs.append(_run(cfg, m, s, out, holdout, SharedProgress(bar, f"{m} seed {s}")))
                bar.advance(task)
    return write_comparison(cfg, runs, out, holdout=holdout, command=command)
