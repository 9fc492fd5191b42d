"""The server's run: initial shared weights, Flower strategy behind the guard, the report.

:func:`run_server` is the body of the ServerApp (``server/app.py`` for
``flwr run``; :mod:`fedse.simulation` for ``fedse simulate``). The server sends
the run's configuration with every message, so clients need nothing but their
data and a partition id.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from .client import CONFIG_JSON, build_model
from .config import Config, config_to_dict
from .federated import FederatedData
from .io import atomic_save
from .privacy import ClientDP, check_dp_model, make_client_dp
from .records import evaluate_schema, from_arrays, to_arrays, train_schema
from .report import client_rows, client_summary_rows, format_table, write_run
from .split import split_model
from .strategy import GuardedStrategy, RunLog, clients_per_round, create_strategy

__all__ = ["CheckpointError", "ServerOutcome", "check_resume", "load_checkpoint", "run_server"]

log = logging.getLogger("fedse")


@dataclass(frozen=True)
class ServerOutcome:
    log: RunLog
    shared_state: dict[str, torch.Tensor]
    summary: dict[str, Any]


def privacy_report(cfg: Config, run_log: RunLog, dp: ClientDP | None) -> dict[str, Any]:
    """What DP guarantees this run gave: mode, epsilon, delta and how it was obtained."""
    pr = cfg.privacy
    if pr.mode == "none":
        return {"mode": "none"}
    if pr.mode == "sample":
        eps = [r["dp-epsilon"] for rows in run_log.train.values() for r in rows.values() if "dp-epsilon" in r]
        return {"mode": "sample", "level": "one training example of one client", "delta": pr.delta,
                "epsilon_max_over_clients": max(eps, default=0.0), "accountant": pr.accountant,
                "max_grad_norm": pr.max_grad_norm}
    assert dp is not None
    return {"mode": "client", "level": "all data of one client", "delta": pr.delta, "epsilon": dp.epsilon(),
            "noise_multiplier": dp.noise_multiplier, "releases": dp.releases,
            "rounds_refused": [r["round"] for r in run_log.refused],
            "clients_per_release": dp.sampled, "population": dp.population,
            "sampling": "fixed-size sample, no amplification claimed (accounted as if every client took part)",
            "clipping": pr.clipping, "clipping_norm": pr.clipping_norm,
            "accountant": "rdp (Flower, dp-accounting)"}


CHECKPOINT = "checkpoint.pt"
_CHECKPOINT_KEYS = {"round", "config", "shared", "log", "accountant"}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the run being resumed."""


def save_checkpoint(run_dir: Path, cfg: Config, server_round: int, arrays: ArrayRecord, run_log: RunLog,
                    dp: ClientDP | None = None) -> None:
    """The shared weights, the round, the run log and the DP accountant's ledger, written atomically."""
    payload = {"round": server_round, "config": config_to_dict(cfg), "shared": from_arrays(arrays),
               "log": dataclasses.asdict(run_log), "accountant": dp.state() if dp is not None else ""}
    atomic_save(run_dir / CHECKPOINT, lambda f: torch.save(payload, f))


def _run_log_from(raw: Any) -> RunLog:
    if not isinstance(raw, dict) or set(raw) - {f.name for f in dataclasses.fields(RunLog)}:
        raise TypeError("the run log has unknown fields")
    per_round = lambda v: {int(r): x for r, x in v.items()}  # noqa: E731
    return RunLog(**{k: ({int(r): {int(c): dict(row) for c, row in rows.items()} for r, rows in v.items()}
                         if k in ("train", "evaluate") else
                         per_round(v) if k in ("round_seconds", "epsilon") else list(v))
                     for k, v in raw.items()})


def load_checkpoint(run_dir: Path, cfg: Config, shared_like: dict[str, torch.Tensor] | None = None
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
        raise CheckpointError(f"cannot resume: {path} is unreadable, truncated or not a fedse checkpoint "
                              f"({type(err).__name__})") from None
    if not isinstance(payload, dict) or set(payload) != _CHECKPOINT_KEYS:
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"cannot resume: {path} holds {found}, expected the keys {sorted(_CHECKPOINT_KEYS)}")
    saved, now = payload["config"], config_to_dict(cfg)
    if not isinstance(saved, dict):
        raise CheckpointError(f"cannot resume: {path}: its config is not a mapping")
    saved, now = {k: v for k, v in saved.items() if k not in ("server", "output")}, \
        {k: v for k, v in now.items() if k not in ("server", "output")}
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise CheckpointError(f"cannot resume {run_dir}: the configuration differs from the checkpoint's in {diff} "
                              "(only server.* and output.* may change)")
    done = payload["round"]
    if not isinstance(done, int) or isinstance(done, bool) or not 1 <= done <= cfg.server.rounds:
        raise CheckpointError(f"cannot resume: {path}: round {done!r} is outside 1..server.rounds={cfg.server.rounds}")
    shared = payload["shared"]
    if not isinstance(shared, dict) or not all(isinstance(v, torch.Tensor) for v in shared.values()):
        raise CheckpointError(f"cannot resume: {path}: the shared weights are not a mapping of tensors")
    if shared_like is not None:
        problems = [f"missing {k}" for k in sorted(set(shared_like) - set(shared))][:3]
        problems += [f"unexpected {k}" for k in sorted(set(shared) - set(shared_like))][:3]
        problems += [f"{k}: {tuple(v.shape)} {v.dtype}, expected {tuple(shared_like[k].shape)} {shared_like[k].dtype}"
                     for k, v in shared.items() if k in shared_like
                     and (v.shape != shared_like[k].shape or v.dtype != shared_like[k].dtype)][:3]
        problems += [f"{k}: NaN or inf" for k, v in shared.items() if v.is_floating_point()
                     and not bool(torch.isfinite(v).all())][:3]
        if problems:
            raise CheckpointError(f"cannot resume: {path}: shared weights do not fit this model: {'; '.join(problems)}")
    try:
        run_log = _run_log_from(payload["log"])
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"cannot resume: {path}: malformed run log ({err})") from None
    if not isinstance(payload["accountant"], str) or (cfg.privacy.mode == "client") != bool(payload["accountant"]):
        raise CheckpointError(f"cannot resume: {path}: its privacy accountant does not match privacy.mode="
                              f"{cfg.privacy.mode}")
    return done, shared, run_log, payload["accountant"]


def _start(cfg: Config, fed: FederatedData, num_clients: int
           ) -> tuple[torch.nn.Module, Any, dict[str, torch.Tensor], ClientDP | None]:
    """The run's model, its split, the initial shared weights and the client-level DP state."""
    ds = fed.dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    if cfg.privacy.mode == "sample":
        check_dp_model(model)
    split = split_model(model, cfg.personalization.policy)
    dp = make_client_dp(cfg, num_clients, clients_per_round(cfg, num_clients)) if cfg.privacy.mode == "client" else None
    return model, split, split.shared_state(model), dp


def _resume(run_dir: Path, cfg: Config, shared_like: dict[str, torch.Tensor], dp: ClientDP | None
            ) -> tuple[int, dict[str, torch.Tensor], RunLog]:
    done, shared, run_log, ledger = load_checkpoint(run_dir, cfg, shared_like)
    if dp is not None:
        try:
            dp.load_state(ledger)
        except ValueError as err:
            raise CheckpointError(f"cannot resume {run_dir}: {err}") from None
    return done, shared, run_log


def check_resume(run_dir: Path, cfg: Config, fed: FederatedData, num_clients: int | None = None) -> int:
    """Everything a resume of ``run_dir`` will read, checked now (before any engine starts):
    the checkpoint against this run's model and its DP ledger. Returns the rounds done."""
    _, _, shared, dp = _start(cfg, fed, num_clients or cfg.partition.num_clients)
    return _resume(run_dir, cfg, shared, dp)[0]


def run_server(
    grid: Grid,
    cfg: Config,
    fed: FederatedData,
    run_dir: Path | None,
    on_round: Callable[[int, RunLog], None] | None = None,
    num_clients: int | None = None,
    resume: bool = False,
) -> ServerOutcome:
    """Run ``cfg.server.rounds`` rounds on ``grid``; write the run folder when ``run_dir`` is set,
    with a checkpoint after every round. ``resume``: continue ``run_dir``'s run from its checkpoint.
    ``num_clients``: clients taking part (default ``partition.num_clients``)."""
    num_clients = num_clients or cfg.partition.num_clients
    model, split, shared, dp = _start(cfg, fed, num_clients)
    log.info("%s", split.describe(model))
    shared_like = dict(shared)
    done, run_log = 0, None
    if resume:
        if run_dir is None:
            raise ValueError("resume needs the run folder to continue")
        done, shared, run_log = _resume(run_dir, cfg, shared_like, dp)
        log.info("resuming %s after round %d of %d", run_dir, done, cfg.server.rounds)
    max_train = cfg.server.max_num_examples or max(len(p) for p in fed.train_parts)
    max_test = cfg.server.max_num_examples or max(len(p) for p in fed.test_parts)
    strategy = GuardedStrategy(
        create_strategy(cfg, dp),
        train_schema(shared_like, dp_sample=cfg.privacy.mode == "sample", digests=cfg.evaluate.private_digest,
                     max_examples=max_train),
        lambda pooled: evaluate_schema(pooled=pooled, max_examples=max_test, max_train=max_train),
        num_rounds=cfg.server.rounds,
        pooled_every=cfg.evaluate.pooled_every,
        pooled=cfg.evaluate.pooled,
        dp=dp,
        expected_nodes=num_clients,
        join_timeout=cfg.server.join_timeout,
        on_round=on_round,
        on_aggregated=(lambda rnd, arrays, rl: save_checkpoint(run_dir, cfg, rnd, arrays, rl, dp)) if run_dir else None,
        round_offset=done,
        log=run_log,
    )
    payload = json.dumps(config_to_dict(cfg))
    started = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=to_arrays(shared),
        num_rounds=max(cfg.server.rounds - done, 0),
        timeout=cfg.server.round_timeout,
        train_config=ConfigRecord({CONFIG_JSON: payload}),
        evaluate_config=ConfigRecord({CONFIG_JSON: payload}),
    )
    final = from_arrays(result.arrays) if len(result.arrays) else shared
    privacy = privacy_report(cfg, strategy.log, dp)
    if privacy["mode"] != "none":
        log.info("privacy: %s", privacy)
    summary: dict[str, Any] = {"privacy": privacy}
    if run_dir is not None:
        summary = write_run(
            run_dir,
            config=config_to_dict(cfg),
            log=strategy.log,
            split_summary=split.summary(model),
            shared_state=final,
            extra={"wall_seconds": time.perf_counter() - started, "privacy": privacy},
        )
    return ServerOutcome(strategy.log, final, summary)


def final_tables(outcome_log: RunLog) -> str:
    """The per-client table and its summary lines, as printed at the end of a run, then
    any refused or failed replies (with the first failure's reason)."""
    clients = client_rows(outcome_log)
    cols = ["client", "train_samples", "local_acc", "pooled_acc"]
    text = format_table(clients, cols) + "\n\n" + format_table(client_summary_rows(clients))
    if outcome_log.dropped:
        text += f"\n\n{len(outcome_log.dropped)} replies refused by the guard; first: {outcome_log.dropped[0]}"
    if outcome_log.failed:
        reason = str(outcome_log.failed[0]["reason"]).replace("\\n", "\n").strip().splitlines()
        text += (f"\n\n{len(outcome_log.failed)} client replies failed (see rounds.json / summary.json); "
                 f"first reason: {reason[-1][:300] if reason else '?'}")
    return text
