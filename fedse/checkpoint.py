"""Checkpoints: a run's state after each round, written atomically, checked before it is used.

A checkpoint holds the round, the run's configuration, the shared weights, the
run log, the client-level DP accountant's ledger, the server strategy's own
state (FedAdam's moments, adaptive clipping's bound), the manifest of every
simulated client's private state (:func:`fedse.state.private_manifest`: the
file of each client, with its SHA-256) and whether the run finished. It is a file like any
other: :func:`load_checkpoint` refuses a truncated or foreign one, another
configuration, a round out of range, weights that do not fit the model or hold
NaN/inf, a malformed run log, and a ledger that does not match the privacy mode.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from .analysis.report import RunLog
from .config import Config, ConfigError, config_from_record, config_to_dict, config_to_record
from .data.split_import import comparable_partition
from .io import atomic_save
from .privacy import ClientDP
from .records import from_arrays, non_finite

__all__ = [
    "CHECKPOINT",
    "Checkpoint",
    "CheckpointError",
    "checkpoint_status",
    "config_diff",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT = "checkpoint.pt"
_CHECKPOINT_KEYS = {"round", "config", "shared", "log", "accountant", "strategy", "private", "finished"}
# what a checkpoint written before a key existed means by its absence
_ABSENT = {"strategy": {}, "private": None, "finished": False}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the run being resumed."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a run needs to continue after ``round``: see the module's docstring."""

    round: int
    shared: dict[str, torch.Tensor]
    log: RunLog
    accountant: str
    strategy: dict[str, Any]
    private: dict[str, dict[str, Any]] | None  # None: not recorded (a deployed server's clients keep their own)
    finished: bool


def save_checkpoint(
    run_dir: Path,
    cfg: Config,
    server_round: int,
    arrays: ArrayRecord,
    run_log: RunLog,
    dp: ClientDP | None = None,
    *,
    strategy: dict[str, Any] | None = None,
    private: dict[str, dict[str, Any]] | None = None,
    finished: bool = False,
) -> None:
    """The shared weights, the round, the run log, the DP accountant's ledger, the strategy's state
    and the private-state manifest, written atomically (readable by the owner only)."""
    payload = {
        "round": server_round,
        "config": config_to_record(cfg),
        "shared": from_arrays(arrays),
        "log": dataclasses.asdict(run_log),
        "accountant": dp.state() if dp is not None else "",
        "strategy": dict(strategy or {}),
        "private": private,
        "finished": finished,
    }
    atomic_save(run_dir / CHECKPOINT, lambda f: torch.save(payload, f), private=True)


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


def load_checkpoint(run_dir: Path, cfg: Config, shared_like: dict[str, torch.Tensor] | None = None) -> Checkpoint:
    """``run_dir``'s checkpoint.

    Everything is checked before it is used: a truncated or foreign file, a configuration other
    than this run's (only server.* and output.* may change; server.rounds not under a DP target
    epsilon, which sized the noise for the configured rounds), more rounds done than server.rounds,
    or shared weights whose keys, shapes or dtypes differ from ``shared_like`` or that hold NaN or
    inf is a :class:`CheckpointError` naming the problem."""
    path = Path(run_dir) / CHECKPOINT
    payload = _read_payload(path)
    done = _check_config_and_rounds(payload, cfg, run_dir, path)
    shared = payload["shared"]
    if not isinstance(shared, dict) or not all(isinstance(v, torch.Tensor) for v in shared.values()):
        raise CheckpointError(f"cannot resume: {path}: the shared weights are not a mapping of tensors")
    if shared_like is not None and (problems := _shared_problems(shared, shared_like)):
        raise CheckpointError(f"cannot resume: {path}: shared weights do not fit this model: {'; '.join(problems)}")
    try:
        run_log = _run_log_from(payload["log"])
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"cannot resume: {path}: malformed run log ({err})") from None
    if not isinstance(payload["accountant"], str) or (cfg.privacy.mode == "client") != bool(payload["accountant"]):
        raise CheckpointError(
            f"cannot resume: {path}: its privacy accountant does not match privacy.mode={cfg.privacy.mode}"
        )
    strategy, private, finished = payload["strategy"], payload["private"], payload["finished"]
    if not isinstance(finished, bool):
        raise CheckpointError(f"cannot resume: {path}: malformed finished flag {finished!r}")
    if problem := _strategy_problem(strategy, shared_like):
        raise CheckpointError(f"cannot resume: {path}: malformed strategy state ({problem})")
    if private is not None and (
        not isinstance(private, dict)
        or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, dict) and isinstance(v.get("round"), int)
            for k, v in private.items()
        )
    ):
        raise CheckpointError(f"cannot resume: {path}: malformed private-state manifest")
    return Checkpoint(done, shared, run_log, payload["accountant"], strategy, private, finished)


def _read_payload(path: Path) -> dict[str, Any]:
    """The checkpoint file's mapping, with every key it must hold (an older file's missing ones filled)."""
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist (no round of that run completed)")
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises several types for a bad file)
        raise CheckpointError(
            f"cannot resume: {path} is unreadable, truncated or not a fedse checkpoint ({type(err).__name__})"
        ) from None
    if isinstance(payload, dict):
        payload = {**{k: v for k, v in _ABSENT.items() if k not in payload}, **payload}
    if not isinstance(payload, dict) or set(payload) != _CHECKPOINT_KEYS:
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"cannot resume: {path} holds {found}, expected the keys {sorted(_CHECKPOINT_KEYS)}")
    return payload


def _check_config_and_rounds(payload: dict[str, Any], cfg: Config, run_dir: Path, path: Path) -> int:
    """The rounds done, once the checkpoint's configuration is this run's (only server.* and output.*
    may change; server.rounds not under a DP target epsilon) and the count fits server.rounds."""
    try:  # read as the record it is: a key an older checkpoint lacks means what it meant then
        recorded = config_from_record(payload["config"])
    except ConfigError as err:
        raise CheckpointError(f"cannot resume: {path}: its config is not valid ({err})") from None
    saved, now = (
        {k: v for k, v in config_to_dict(c).items() if k not in ("server", "output")} for c in (recorded, cfg)
    )
    if saved["partition"].get("split_sha256") == now["partition"].get("split_sha256"):  # the same split, wherever
        saved["partition"], now["partition"] = (comparable_partition(c["partition"]) for c in (saved, now))
    if saved != now:
        diff = config_diff(saved, now)
        raise CheckpointError(
            f"cannot resume {run_dir}: the configuration differs from the checkpoint's in {'; '.join(diff)} "
            "(only server.* and output.* may change)"
        )
    done = payload["round"]
    if not isinstance(done, int) or isinstance(done, bool) or done < 1:
        raise CheckpointError(f"cannot resume: {path}: round {done!r} is not a round number")
    if done > cfg.server.rounds:
        raise CheckpointError(
            f"cannot resume {run_dir}: it has run {done} rounds, more than server.rounds={cfg.server.rounds}; "
            f"allowed: server.rounds >= {done}"
        )
    was_rounds = recorded.server.rounds
    if cfg.privacy.mode != "none" and cfg.privacy.target_epsilon is not None and cfg.server.rounds != was_rounds:
        raise CheckpointError(
            f"cannot resume {run_dir} with server.rounds={cfg.server.rounds}: the noise was sized to reach "
            f"privacy.target_epsilon={cfg.privacy.target_epsilon} in server.rounds={was_rounds}; allowed: "
            f"{was_rounds} (with privacy.noise_multiplier set instead, the rounds may change: the accountant "
            "counts every release)"
        )
    return done


def _shared_problems(shared: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> list[str]:
    """Up to three of each: keys missing, keys unexpected, shapes or dtypes off, NaN or inf."""
    problems = [f"missing {k}" for k in sorted(set(like) - set(shared))][:3]
    problems += [f"unexpected {k}" for k in sorted(set(shared) - set(like))][:3]
    problems += [
        f"{k}: {tuple(v.shape)} {v.dtype}, expected {tuple(like[k].shape)} {like[k].dtype}"
        for k, v in shared.items()
        if k in like and (v.shape != like[k].shape or v.dtype != like[k].dtype)
    ][:3]
    problems += [f"{k}: NaN or inf" for k in non_finite(shared)][:3]
    return problems


def _strategy_problem(state: Any, shared_like: dict[str, torch.Tensor] | None) -> str | None:
    """What is wrong with a checkpoint's strategy state (:func:`fedse.federation.strategy.strategy_state`), if
    anything: adaptive clipping's bound a finite positive number, FedAdam's moments finite tensors of
    the shared weights' keys and shapes."""
    if not isinstance(state, dict) or set(state) - {"clipping_norm", "m_t", "v_t"}:
        return f"keys {sorted(state) if isinstance(state, dict) else type(state).__name__}"
    norm = state.get("clipping_norm", 1.0)
    if not isinstance(norm, float) or not math.isfinite(norm) or norm <= 0:
        return f"clipping_norm {norm!r}"
    for name in ("m_t", "v_t"):
        moments = state.get(name, {})
        if not isinstance(moments, dict) or not all(
            isinstance(v, torch.Tensor) and bool(torch.isfinite(v).all()) for v in moments.values()
        ):
            return f"{name} is not a mapping of finite tensors"
        if (
            moments
            and shared_like is not None
            and (set(moments) != set(shared_like) or any(moments[k].shape != shared_like[k].shape for k in moments))
        ):
            return f"{name} does not fit the shared weights"
    return None


def checkpoint_status(run_dir: Path) -> tuple[int, bool] | None:
    """(rounds done, finished) of ``run_dir``'s checkpoint, for a message; None without a readable one."""
    try:
        payload = torch.load(Path(run_dir) / CHECKPOINT, weights_only=True)
        done, finished = payload["round"], bool(payload.get("finished", False))
    except Exception:  # noqa: BLE001 (a message only: load_checkpoint checks it for real)
        return None
    return (done, finished) if isinstance(done, int) else None


def config_diff(was: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two config dicts, as ``key: old -> new``."""
    out = []
    for key in sorted(set(was) | set(now)):
        a, b = was.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
