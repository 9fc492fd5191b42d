"""Checkpoints: a run's state after each round, written atomically, checked before it is used.

A checkpoint holds the round, the run's configuration, the shared weights, the
run log and the client-level DP accountant's ledger. It is a file like any
other: :func:`load_checkpoint` refuses a truncated or foreign one, another
configuration, a round out of range, weights that do not fit the model or hold
NaN/inf, a malformed run log, and a ledger that does not match the privacy mode.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from .config import Config, ConfigError, config_from_record, config_to_dict, config_to_record
from .io import atomic_save
from .privacy import ClientDP
from .records import from_arrays
from .report import RunLog

__all__ = ["CHECKPOINT", "CheckpointError", "load_checkpoint", "save_checkpoint"]

CHECKPOINT = "checkpoint.pt"
_CHECKPOINT_KEYS = {"round", "config", "shared", "log", "accountant"}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the run being resumed."""


def save_checkpoint(
    run_dir: Path, cfg: Config, server_round: int, arrays: ArrayRecord, run_log: RunLog, dp: ClientDP | None = None
) -> None:
    """The shared weights, the round, the run log and the DP accountant's ledger, written atomically."""
    payload = {
        "round": server_round,
        "config": config_to_record(cfg),
        "shared": from_arrays(arrays),
        "log": dataclasses.asdict(run_log),
        "accountant": dp.state() if dp is not None else "",
    }
    atomic_save(run_dir / CHECKPOINT, lambda f: torch.save(payload, f))


def _run_log_from(raw: Any) -> RunLog:
    if not isinstance(raw, dict) or set(raw) - {f.name for f in dataclasses.fields(RunLog)}:
        raise TypeError("the run log has unknown fields")
    per_round = lambda v: {int(r): x for r, x in v.items()}  # noqa: E731
    return RunLog(
        **{
            k: (
                {int(r): {int(c): dict(row) for c, row in rows.items()} for r, rows in v.items()}
                if k in ("train", "evaluate")
                else per_round(v)
                if k in ("round_seconds", "epsilon")
                else list(v)
            )
            for k, v in raw.items()
        }
    )


def load_checkpoint(
    run_dir: Path, cfg: Config, shared_like: dict[str, torch.Tensor] | None = None
) -> tuple[int, dict[str, torch.Tensor], RunLog, str]:
    """(rounds done, shared weights, run log, accountant ledger) of ``run_dir``'s checkpoint.

    Everything is checked before it is used: a truncated or foreign file, a configuration other
    than this run's (only server.* and output.* may change), a round outside [1, server.rounds],
    or shared weights whose keys, shapes or dtypes differ from ``shared_like`` or that hold NaN or
    inf is a :class:`CheckpointError` naming the problem."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist (no round of that run completed)")
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises several types for a bad file)
        raise CheckpointError(
            f"cannot resume: {path} is unreadable, truncated or not a fedse checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(payload, dict) or set(payload) != _CHECKPOINT_KEYS:
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"cannot resume: {path} holds {found}, expected the keys {sorted(_CHECKPOINT_KEYS)}")
    try:  # read as the record it is: a key an older checkpoint lacks means what it meant then
        saved, now = config_to_dict(config_from_record(payload["config"])), config_to_dict(cfg)
    except ConfigError as err:
        raise CheckpointError(f"cannot resume: {path}: its config is not valid ({err})") from None
    saved, now = (
        {k: v for k, v in saved.items() if k not in ("server", "output")},
        {k: v for k, v in now.items() if k not in ("server", "output")},
    )
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise CheckpointError(
            f"cannot resume {run_dir}: the configuration differs from the checkpoint's in {diff} "
            "(only server.* and output.* may change)"
        )
    done = payload["round"]
    if not isinstance(done, int) or isinstance(done, bool) or not 1 <= done <= cfg.server.rounds:
        raise CheckpointError(f"cannot resume: {path}: round {done!r} is outside 1..server.rounds={cfg.server.rounds}")
    shared = payload["shared"]
    if not isinstance(shared, dict) or not all(isinstance(v, torch.Tensor) for v in shared.values()):
        raise CheckpointError(f"cannot resume: {path}: the shared weights are not a mapping of tensors")
    if shared_like is not None:
        problems = [f"missing {k}" for k in sorted(set(shared_like) - set(shared))][:3]
        problems += [f"unexpected {k}" for k in sorted(set(shared) - set(shared_like))][:3]
        problems += [
            f"{k}: {tuple(v.shape)} {v.dtype}, expected {tuple(shared_like[k].shape)} {shared_like[k].dtype}"
            for k, v in shared.items()
            if k in shared_like and (v.shape != shared_like[k].shape or v.dtype != shared_like[k].dtype)
        ][:3]
        problems += [
            f"{k}: NaN or inf" for k, v in shared.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ][:3]
        if problems:
            raise CheckpointError(f"cannot resume: {path}: shared weights do not fit this model: {'; '.join(problems)}")
    try:
        run_log = _run_log_from(payload["log"])
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"cannot resume: {path}: malformed run log ({err})") from None
    if not isinstance(payload["accountant"], str) or (cfg.privacy.mode == "client") != bool(payload["accountant"]):
        raise CheckpointError(
            f"cannot resume: {path}: its privacy accountant does not match privacy.mode={cfg.privacy.mode}"
        )
    return done, shared, run_log, payload["accountant"]
