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
from .records import from_arrays, to_arrays
from .report import client_rows, client_summary_rows, format_table, write_run
from .split import split_model
from .privacy import check_dp_model, client_level_epsilon
from .strategy import GuardedStrategy, RunLog, client_noise_multiplier, clients_per_round, create_strategy

__all__ = ["ServerOutcome", "run_server"]

log = logging.getLogger("fedse")


@dataclass(frozen=True)
class ServerOutcome:
    log: RunLog
    shared_state: dict[str, torch.Tensor]
    summary: dict[str, Any]


def privacy_report(cfg: Config, run_log: RunLog, num_clients: int) -> dict[str, Any]:
    """What DP guarantees this run gave: mode, epsilon, delta and how it was obtained."""
    pr = cfg.privacy
    if pr.mode == "none":
        return {"mode": "none"}
    if pr.mode == "sample":
        eps = [r["dp-epsilon"] for rows in run_log.train.values() for r in rows.values() if "dp-epsilon" in r]
        return {"mode": "sample", "level": "one training example of one client", "delta": pr.delta,
                "epsilon_max_over_clients": max(eps, default=0.0), "accountant": pr.accountant,
                "max_grad_norm": pr.max_grad_norm}
    sigma = client_noise_multiplier(cfg, num_clients)
    q = min(1.0, clients_per_round(cfg, num_clients) / num_clients)
    rounds = len(run_log.train)
    return {"mode": "client", "level": "all data of one client", "delta": pr.delta,
            "epsilon": client_level_epsilon(sigma, q, rounds, pr.delta), "noise_multiplier": sigma,
            "sample_rate": q, "rounds": rounds, "clipping": pr.clipping, "clipping_norm": pr.clipping_norm,
            "accountant": "rdp"}


CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: Path, cfg: Config, server_round: int, arrays: ArrayRecord, run_log: RunLog) -> None:
    """The shared weights, the round and the run log so far, written atomically."""
    payload = {"round": server_round, "config": config_to_dict(cfg), "shared": from_arrays(arrays),
               "log": dataclasses.asdict(run_log)}
    atomic_save(run_dir / CHECKPOINT, lambda f: torch.save(payload, f))


def load_checkpoint(run_dir: Path, cfg: Config) -> tuple[int, dict[str, torch.Tensor], RunLog]:
    """(rounds done, shared weights, run log) of ``run_dir``'s checkpoint for a resumed run."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (no round of that run completed)")
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises several types for a bad file)
        raise ValueError(f"cannot resume: {path} is unreadable ({err})") from None
    saved, now = dict(payload["config"]), config_to_dict(cfg)
    saved.pop("output", None), now.pop("output", None)
    if {k: v for k, v in saved.items() if k != "server"} != {k: v for k, v in now.items() if k != "server"}:
        raise ValueError(f"cannot resume {run_dir}: the configuration differs from the checkpoint's "
                         "(only server.* and output.* may change)")
    raw = payload["log"]
    run_log = RunLog(**{k: ({int(r): {int(c): row for c, row in rows.items()} for r, rows in v.items()}
                            if k in ("train", "evaluate") else
                            {int(r): x for r, x in v.items()} if k == "round_seconds" else v)
                        for k, v in raw.items()})
    return int(payload["round"]), payload["shared"], run_log


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
    ds = fed.dataset
    num_clients = num_clients or cfg.partition.num_clients
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    if cfg.privacy.mode == "sample":
        check_dp_model(model)
    split = split_model(model, cfg.personalization.policy)
    log.info("%s", split.describe(model))
    shared = split.shared_state(model)
    done, run_log = 0, None
    if resume:
        if run_dir is None:
            raise ValueError("resume needs the run folder to continue")
        done, shared, run_log = load_checkpoint(run_dir, cfg)
        log.info("resuming %s after round %d of %d", run_dir, done, cfg.server.rounds)
    strategy = GuardedStrategy(
        create_strategy(cfg, num_clients),
        {k: tuple(v.shape) for k, v in split.shared_state(model).items()},
        num_rounds=cfg.server.rounds,
        pooled_every=cfg.evaluate.pooled_every,
        pooled=cfg.evaluate.pooled,
        on_round=on_round,
        on_aggregated=(lambda rnd, arrays, rl: save_checkpoint(run_dir, cfg, rnd, arrays, rl)) if run_dir else None,
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
    privacy = privacy_report(cfg, strategy.log, num_clients)
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
