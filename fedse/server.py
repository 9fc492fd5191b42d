"""The server's run: initial shared weights, Flower strategy behind the guard, the report.

:func:`run_server` is the body of the ServerApp (``server/app.py`` for
``flwr run``; :mod:`fedse.simulation` for ``fedse simulate``). The server sends
the run's configuration with every message, so clients need nothing but their
data and a partition id.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from .client import CONFIG_JSON, build_model
from .config import Config, config_to_dict
from .federated import FederatedData
from .records import from_arrays, to_arrays
from .report import client_rows, client_summary_rows, format_table, write_run
from .split import split_model
from .strategy import GuardedStrategy, RunLog, create_strategy

__all__ = ["ServerOutcome", "run_server"]

log = logging.getLogger("fedse")


@dataclass(frozen=True)
class ServerOutcome:
    log: RunLog
    shared_state: dict[str, torch.Tensor]
    summary: dict[str, Any]


def run_server(
    grid: Grid,
    cfg: Config,
    fed: FederatedData,
    run_dir: Path | None,
    on_round: Callable[[int, RunLog], None] | None = None,
) -> ServerOutcome:
    """Run ``cfg.server.rounds`` rounds on ``grid``; write the run folder when ``run_dir`` is set."""
    ds = fed.dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    split = split_model(model, cfg.personalization.policy)
    log.info("%s", split.describe(model))
    shared = split.shared_state(model)
    strategy = GuardedStrategy(
        create_strategy(cfg),
        {k: tuple(v.shape) for k, v in shared.items()},
        num_rounds=cfg.server.rounds,
        pooled_every=cfg.evaluate.pooled_every,
        on_round=on_round,
    )
    payload = json.dumps(config_to_dict(cfg))
    started = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=to_arrays(shared),
        num_rounds=cfg.server.rounds,
        timeout=cfg.server.round_timeout,
        train_config=ConfigRecord({CONFIG_JSON: payload}),
        evaluate_config=ConfigRecord({CONFIG_JSON: payload}),
    )
    final = from_arrays(result.arrays) if len(result.arrays) else shared
    summary: dict[str, Any] = {}
    if run_dir is not None:
        summary = write_run(
            run_dir,
            config=config_to_dict(cfg),
            log=strategy.log,
            split_summary=split.summary(model),
            shared_state=final,
            extra={"wall_seconds": time.perf_counter() - started},
        )
    return ServerOutcome(strategy.log, final, summary)


def final_tables(outcome_log: RunLog) -> str:
    """The per-client table and its summary lines, as printed at the end of a run."""
    clients = client_rows(outcome_log)
    cols = ["client", "train_samples", "local_acc", "pooled_acc"]
    return format_table(clients, cols) + "\n\n" + format_table(client_summary_rows(clients))
