"""The server's run: initial shared weights, Flower's strategy behind the guard, the record, the report.

:func:`run_server` is the body of the ServerApp (``server/app.py`` for
``flwr run``; :mod:`fedse.simulation` for ``fedse simulate``). The server sends
the run's configuration with every message, so clients need nothing but their
data and a partition id. Three wrappers, each with one job: Flower's strategy
(and DP wrapper) aggregates, :class:`~fedse.federation.strategy.GuardedStrategy` screens
the replies, :class:`RunRecorder` records what the guard kept into the run log,
times rounds, schedules pooled evaluation and checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..analysis.report import (
    CLIENT_HEADINGS,
    COL_CLIENT,
    COL_LOCAL_ACC,
    COL_POOLED_ACC,
    COL_TRAIN_SAMPLES,
    RunLog,
    client_rows,
    client_summary_rows,
    format_table,
    round_rows,
    write_record,
    write_run,
)
from ..analysis.tracking import TensorBoardLog
from ..checkpoint import CHECKPOINT, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from ..config import Config, ConfigError, config_to_dict, config_to_record
from ..data.federated import FederatedData, model_shape
from ..identity import read_client_keys
from ..interrupt import StoppableGrid
from ..models import build_model
from ..policies import resolve
from ..privacy import ClientDP, check_dp_model, make_client_dp, poisson_rate, sample_noise_multiplier
from ..records import (
    ARRAYS,
    CONFIG,
    CONFIG_JSON,
    DP_EPSILON,
    EXPORT_ONLY,
    FINAL,
    NUM_EXAMPLES,
    POOLED,
    SERVER_ROUND,
    TRAINED_BEFORE,
    evaluate_schema,
    from_arrays,
    to_arrays,
    train_schema,
)
from ..split import Split
from ..state import private_manifest, verify_manifest
from .strategy import (
    GuardedStrategy,
    bounds,
    clients_per_round,
    create_strategy,
    load_strategy_state,
    strategy_state,
)

__all__ = [
    "RunRecorder",
    "ServerOutcome",
    "check_resume",
    "client_dp_warning",
    "final_tables",
    "format_privacy",
    "privacy_report",
    "run_server",
    "setup_logging",
]

log = logging.getLogger("fedse")

NO_DATA_MAX_EXAMPLES = 1_000_000  # a deployed server's default cap on num-examples (server.max_num_examples)


@dataclass(frozen=True)
class ServerOutcome:
    log: RunLog
    shared_state: dict[str, torch.Tensor]
    summary: dict[str, Any]


class _Stderr(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is when a record is emitted (Flower's ServerApp
    process mirrors ``sys.stderr`` into ``flwr run --stream``; a progress display redirects it)."""

    @property
    def stream(self):  # noqa: ANN202 (a text stream)
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ sets it; the property decides
        pass


def setup_logging(default_level: int | None = None) -> None:
    """One line per event, wherever the run's server is: the ``fedse`` logger gets one handler of its
    own (on stderr, ``LEVEL fedse: message``) and no longer hands its records to the root logger's
    handlers, and Flower's ``flwr`` logger, which has its own console handler, no longer hands its
    records to them either. Without this every line of a deployed ServerApp is printed twice: Opacus
    calls ``logging.basicConfig`` when it is imported (opacus/utils/module_utils.py), which gives the
    root logger a handler of its own (:mod:`fedse.privacy` removes that one when it imports Opacus;
    a root handler the host program set up is left alone). Calling it again changes nothing.
    ``default_level``: the ``fedse`` logger's level where nothing set one (a deployed ServerApp: INFO,
    so the split, the wait for nodes and the privacy summary show; ``fedse simulate`` sets its own)."""
    logging.getLogger("flwr").propagate = False
    fedse_log = logging.getLogger("fedse")
    if not any(isinstance(h, _Stderr) for h in fedse_log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        fedse_log.addHandler(handler)
    fedse_log.propagate = False
    if default_level is not None and fedse_log.level == logging.NOTSET:
        fedse_log.setLevel(default_level)


def _sample_noise(cfg: Config, run_log: RunLog) -> dict[str, Any]:
    """Sample-level DP's noise multiplier: the configured one, or each client's, calibrated on the
    client to ``target_epsilon`` from its number of training examples (:func:`fedse.privacy.sample_noise_multiplier`,
    recomputed here from the train-sample count the client reported; a client's sampling rate and
    step count, and so its sigma, depend on that count)."""
    pr = cfg.privacy
    if pr.noise_multiplier is not None:
        return {"noise_multiplier": pr.noise_multiplier, "noise_multiplier_source": "configured"}
    private_first = resolve(cfg).schedule == "private-first"
    sizes = {cid: int(row[NUM_EXAMPLES]) for rows in run_log.train.values() for cid, row in rows.items()}
    # sigma depends on a client's size only through its steps per epoch (poisson_rate): one
    # calibration (about a second each) per distinct count of steps, not per client
    steps = {cid: poisson_rate(n, cfg.train.batch_size)[1] for cid, n in sizes.items()}
    size_of = {steps[cid]: n for cid, n in sizes.items()}
    with warnings.catch_warnings():  # the clients' own calibrations warned already (hidden in their logs)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        by_steps = {k: sample_noise_multiplier(cfg, n, private_first) for k, n in size_of.items()}
    sigmas = {str(cid): by_steps[steps[cid]] for cid in sorted(sizes)}
    return {
        "noise_multiplier": max(sigmas.values(), default=None),
        "noise_multiplier_min": min(sigmas.values(), default=None),
        "noise_multiplier_source": f"calibrated on each client to target_epsilon {pr.target_epsilon} "
        "from its train samples",
        "noise_multiplier_per_client": sigmas,
    }


def privacy_report(cfg: Config, run_log: RunLog, dp: ClientDP | None) -> dict[str, Any]:
    """What DP guarantees this run gave: mode, epsilon, delta, the noise multiplier (each client's,
    under sample-level DP calibrated to a target epsilon) and how it was obtained."""
    pr = cfg.privacy
    if pr.mode == "none":
        return {"mode": "none"}
    if pr.mode == "sample":
        eps = [r[DP_EPSILON] for rows in run_log.train.values() for r in rows.values() if DP_EPSILON in r]
        return {
            "mode": "sample",
            "level": "one training example of one client",
            "delta": pr.delta,
            "epsilon_max_over_clients": max(eps, default=0.0),
            **_sample_noise(cfg, run_log),
            "accountant": pr.accountant,
            "max_grad_norm": pr.max_grad_norm,
        }
    assert dp is not None
    return {
        "mode": "client",
        "level": "all data of one client",
        "delta": pr.delta,
        "epsilon": dp.epsilon(),
        "noise_multiplier": dp.noise_multiplier,
        "noise_multiplier_source": "configured"
        if pr.noise_multiplier is not None
        else f"calibrated to target_epsilon {pr.target_epsilon} over {cfg.server.rounds} rounds",
        "releases": dp.releases,
        "rounds_refused": [r["round"] for r in run_log.refused],
        "clients_per_release": dp.sampled,
        "population": dp.population,
        "sampling": "fixed-size sample, no amplification claimed (accounted as if every client took part)",
        "clipping": pr.clipping,
        "clipping_norm": pr.clipping_norm,
        "accountant": "rdp (Flower, dp-accounting)",
    }


def _sigma(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_privacy(privacy: Mapping[str, Any]) -> str:
    """:func:`privacy_report` as a few labelled lines (printed at the end of a run; every figure is
    in summary.json under ``privacy``). Empty without DP."""
    mode = privacy.get("mode", "none")
    if mode == "none":
        return ""
    mechanism = "DP-SGD on every client, Opacus" if mode == "sample" else "DP-FedAvg, Flower's wrappers"
    lines = [("mode", f"{mode} ({mechanism})"), ("level", f"{mode}: {privacy['level']}")]
    if mode == "sample":
        lines.append(("epsilon", f"{privacy['epsilon_max_over_clients']:.4f} (sample-level, max over clients)"))
        lines.append(("delta", f"{privacy['delta']:g}"))
        if "noise_multiplier_per_client" in privacy:
            low, high = privacy["noise_multiplier_min"], privacy["noise_multiplier"]
            count = len(privacy["noise_multiplier_per_client"])
            spread = _sigma(high) if low == high else f"{_sigma(low)} to {_sigma(high)}"
            noise = f"{spread} over {count} clients ({privacy['noise_multiplier_source']}; each in summary.json)"
        else:
            noise = f"{_sigma(privacy['noise_multiplier'])} (configured)"
        lines.append(("noise multiplier", noise))
        lines.append(("clipping", f"per-example gradient norm {privacy['max_grad_norm']:g}"))
        lines.append(("accountant", f"{privacy['accountant']} (Opacus), each client's steps over every round"))
    else:
        refused = privacy["rounds_refused"]
        lines.append(
            (
                "epsilon",
                f"{privacy['epsilon']:.4f} (client-level, {privacy['releases']} releases of "
                f"{privacy['clients_per_release']} clients each)",
            )
        )
        lines.append(("delta", f"{privacy['delta']:g}"))
        source = privacy["noise_multiplier_source"]
        lines.append(("noise multiplier", f"{_sigma(privacy['noise_multiplier'])} ({source})"))
        lines.append(("clipping", f"{privacy['clipping']}, norm {privacy['clipping_norm']:g}"))
        lines.append(("accountant", f"{privacy['accountant']}, no amplification by client sampling"))
        if refused:
            lines.append(("rounds refused", ", ".join(map(str, refused))))
    width = max(len(label) for label, _ in lines)
    return "privacy:\n" + "\n".join(f"  {label:<{width}}  {text}" for label, text in lines)


# Client-level DP adds noise of standard deviation sigma * C / m to every shared value of the mean of
# m updates clipped to norm C (Flower's compute_stdv, flwr/supercore/differential_privacy.py), so over
# d shared values the noise vector's norm is about sigma * C * sqrt(d) / m, while the mean of the
# clipped updates is at most C long. docs/results.md has no client-level DP measurement to set a
# threshold from (its DP measurements are sample-level), so the line is this bound: past 1, the noise
# on one round's mean update outweighs the largest mean update the clients can send, and the rounds'
# updates add up more slowly than their noise (accuracy near chance with 10 clients a round).
CLIENT_DP_NOISE_LIMIT = 1.0


def client_dp_warning(dp: ClientDP, shared_values: int) -> str | None:
    """A warning when client-level DP's noise on the mean update outweighs the update itself
    (:data:`CLIENT_DP_NOISE_LIMIT`), with the figures; None otherwise."""
    sigma, m = dp.noise_multiplier, dp.sampled
    ratio = sigma * math.sqrt(shared_values) / m
    if ratio <= CLIENT_DP_NOISE_LIMIT:
        return None
    needed = math.ceil(sigma * math.sqrt(shared_values) / CLIENT_DP_NOISE_LIMIT)
    return (
        f"client-level DP: the noise on the mean update is sigma/m = {sigma / m:.3g} of the clipping norm "
        f"per shared value (noise multiplier {sigma:.3g}, {m} clients a round), {ratio:.3g} times the clipping "
        f"norm over its {shared_values:,} shared values, more than the mean of clipped updates can be; "
        f"with fewer than {needed:,} clients a round expect little learning"
    )


class RunRecorder(Strategy):
    """Wrap the guard; record what it kept, dropped, failed or refused into ``log``, per round.

    Rounds are absolute: Flower's round ``r`` of this process is round ``r + round_offset`` of the
    run (a resumed run), and that is the round the strategy, the guard and the clients see (it
    seeds each client's training, and FedAdam's bias correction reads it). It also asks for pooled
    evaluation every ``pooled_every`` rounds and at the last (``None``: never), times each round,
    and hands each complete round (trained and evaluated) to ``on_round_end`` (checkpoints), but
    for the run's last, which the server checkpoints once the run is written. ``mark_final``: the
    last round's evaluate messages carry ``final`` (the clients write their personalized models).
    ``message_config``: entries every train and evaluate message carries (the run's configuration),
    added here rather than passed to ``start``, which logs the configs it is given (Flower's
    ``log_strategy_start_info``): the whole configuration JSON would be dumped into the log."""

    def __init__(
        self,
        guard: GuardedStrategy,
        log: RunLog,
        *,
        num_rounds: int,
        round_offset: int = 0,
        pooled_every: int | None = 0,
        on_round: Callable[[int, RunLog], None] | None = None,
        on_round_end: Callable[[int, ArrayRecord, RunLog], None] | None = None,
        mark_final: bool = False,
        message_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.guard = guard
        self.message_config = dict(message_config or {})
        self.mark_final = mark_final
        self.log = log
        self.num_rounds = num_rounds
        self.round_offset = round_offset
        self.pooled_every = pooled_every
        self.on_round = on_round
        self.on_round_end = on_round_end
        self._started = time.perf_counter()
        self._sent: ArrayRecord | None = None  # this round's shared arrays, as sent
        self._sent_numpy: dict[str, np.ndarray] | None = None  # the same, decoded once per round (update norms)
        self._round_arrays: ArrayRecord | None = None  # this round's result (checkpointed after its evaluation)

    def summary(self) -> None:
        self.guard.summary()

    def wants_pooled(self, server_round: int) -> bool:
        if self.pooled_every is None:
            return False
        return server_round == self.num_rounds or (self.pooled_every > 0 and server_round % self.pooled_every == 0)

    def _record(self, table: dict[int, dict[int, dict[str, Any]]], server_round: int) -> None:
        screening = self.guard.last
        rows = table.setdefault(server_round, {})
        for cid, node, checked in screening.kept:
            rows[cid] = {"node-id": node, **checked.client, **checked.metrics}
        self.log.dropped += [{"round": server_round, **d} for d in screening.dropped]
        self.log.failed += [{"round": server_round, **f} for f in screening.failed]

    def _update_norm(self, arrays: dict[str, np.ndarray]) -> float | None:
        """L2 norm of an update (shared arrays minus what was sent), over all keys."""
        sent = self._sent_numpy
        if sent is None:
            return None
        return float(np.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - sent[k]) ** 2)) for k in arrays)))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._started = time.perf_counter()
        self._sent = arrays
        self._sent_numpy = {k: v.numpy() for k, v in arrays.items()}
        config = ConfigRecord({**dict(config), **self.message_config})
        return self.guard.configure_train(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        server_round += self.round_offset
        result = self.guard.aggregate_train(server_round, replies)
        self._record(self.log.train, server_round)
        rows = self.log.train[server_round]
        # The norm as received, and after Flower's DP wrappers clipped the reply in place (without
        # client-level DP nothing clips, the two are equal and the replies are not decoded again).
        kept = {node for _, node, _ in self.guard.last.kept}
        # (the kept replies themselves: a second reply from a kept node was dropped and is never read)
        clipped = (
            {node: m.content[ARRAYS] for node, m in self.guard.last.messages.items() if node in kept}
            if self.guard.dp is not None
            else {}
        )
        for cid, node, checked in self.guard.last.kept:
            rows[cid]["update-norm"] = self._update_norm(checked.arrays)
            rows[cid]["update-norm-aggregated"] = (
                self._update_norm({k: v.numpy() for k, v in clipped[node].items()})
                if node in clipped
                else rows[cid]["update-norm"]
            )
        if self.guard.last.refused:
            self.log.refused.append({"round": server_round, "reason": self.guard.last.refused})
        if self.guard.dp is not None:
            self.log.epsilon[server_round] = self.guard.dp.epsilon()
        self._round_arrays = result[0] if result[0] is not None else self._sent
        return result

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        config = ConfigRecord({**dict(config), **self.message_config})
        config[POOLED] = self.wants_pooled(server_round)
        config[FINAL] = self.mark_final and server_round == self.num_rounds
        return self.guard.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        metrics = self.guard.aggregate_evaluate(server_round, replies)
        self._record(self.log.evaluate, server_round)
        self.log.round_seconds[server_round] = time.perf_counter() - self._started
        if self.on_round_end is not None and self._round_arrays is not None and server_round < self.num_rounds:
            self.on_round_end(server_round, self._round_arrays, self.log)
        if self.on_round is not None:
            self.on_round(server_round, self.log)
        return metrics


def _start(
    cfg: Config, fed: FederatedData | None, num_clients: int
) -> tuple[torch.nn.Module, Split, dict[str, torch.Tensor], ClientDP | None]:
    """The run's model, its split, the initial shared weights and the client-level DP state. The
    model's shape comes from the config (:func:`fedse.data.federated.model_shape`); ``fed`` (the
    simulator's data; None on a deployed server, which holds none) must agree with it."""
    model = build_model(cfg, *model_shape(cfg, fed.dataset if fed is not None else None))
    if cfg.privacy.mode == "sample":
        check_dp_model(model)
    split = resolve(cfg).split(model)
    if cfg.privacy.mode == "client" and not split.shared:
        raise ConfigError(
            f"config key 'privacy.mode': client-level DP protects the shared weights, and policy "
            f"{cfg.personalization.policy!r} shares none; allowed: a policy that shares weights, or privacy.mode=none"
        )
    dp = make_client_dp(cfg, num_clients, clients_per_round(cfg, num_clients)) if cfg.privacy.mode == "client" else None
    return model, split, split.shared_state(model), dp


def _client_keys(cfg: Config, fed: FederatedData | None) -> dict[str, int] | None:
    """The operator's key list (``server.client_keys``), read and checked; None when not set."""
    path = cfg.server.client_keys
    if path is None:
        return None
    if fed is not None:
        raise ConfigError(
            "config key 'server.client_keys': simulated nodes have no registered keys; allowed: null in simulation"
        )
    try:
        return read_client_keys(path)
    except ValueError as err:
        raise ConfigError(f"config key 'server.client_keys': {err}") from None


def _resume(
    run_dir: Path,
    cfg: Config,
    shared_like: dict[str, torch.Tensor],
    dp: ClientDP | None,
    private_root: Path | None,
) -> Checkpoint:
    """``run_dir``'s checkpoint, checked against this run: its DP ledger and, for a simulation
    (``private_root``, where its clients keep their private state), every client's private state
    file against the checkpoint's manifest. A client whose state cannot be restored exactly stops
    the resume: continuing would restart its private part from the common initialisation."""
    ckpt = load_checkpoint(run_dir, cfg, shared_like)
    if dp is not None:
        try:
            dp.load_state(ckpt.accountant)
        except ValueError as err:
            raise CheckpointError(f"cannot resume {run_dir}: {err}") from None
    if private_root is None:
        return ckpt
    trained = sorted({cid for rows in ckpt.log.train.values() for cid in rows})
    if ckpt.private is None:
        if trained:
            raise CheckpointError(
                f"cannot resume {run_dir}: its checkpoint names no private state of its clients, and clients "
                f"{trained} trained; resuming would restart their private parts from the common initialisation"
            )
        return ckpt
    problems = [
        f"client {c}: it trained, but the checkpoint names no state of it"
        for c in trained
        if str(c) not in ckpt.private
    ]
    problems += verify_manifest(private_root, ckpt.private)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(
            f"cannot resume {run_dir}: the private state of its clients cannot be restored exactly: "
            f"{'; '.join(problems[:5])}{more}; resuming would restart them from the common initialisation"
        )
    return ckpt


def check_resume(
    run_dir: Path,
    cfg: Config,
    fed: FederatedData | None,
    num_clients: int | None = None,
    private_root: Path | None = None,
) -> Checkpoint | None:
    """Everything a resume of ``run_dir`` will read, checked now (before any engine starts): the
    checkpoint against this run's model, its DP ledger, its strategy's state and its clients'
    private state. None when the run stopped before its first round completed (it starts afresh
    in its folder)."""
    if not (run_dir / CHECKPOINT).is_file():
        return None
    _, _, shared, dp = _start(cfg, fed, num_clients or cfg.partition.num_clients)
    ckpt = _resume(run_dir, cfg, shared, dp, private_root)
    try:
        load_strategy_state(create_strategy(cfg, dp), ckpt.strategy)
    except ValueError as err:
        raise CheckpointError(f"cannot resume {run_dir}: {err}") from None
    return ckpt


def _message_config(cfg: Config, run_log: RunLog | None) -> dict[str, Any]:
    """What every train and evaluate message carries: the run's configuration, and in a resumed run
    the clients that trained before (each must find its state)."""
    common: dict[str, Any] = {CONFIG_JSON: json.dumps(config_to_dict(cfg))}
    if run_log is not None and (trained := sorted({c for rows in run_log.train.values() for c in rows})):
        common[TRAINED_BEFORE] = trained
    return common


def run_server(
    grid: Grid,
    cfg: Config,
    fed: FederatedData | None,
    run_dir: Path | None,
    on_round: Callable[[int, RunLog], None] | None = None,
    num_clients: int | None = None,
    resume: bool = False,
    private_root: Path | None = None,
    show_privacy: bool = True,
) -> ServerOutcome:
    """Run ``cfg.server.rounds`` rounds on ``grid``; write the run folder when ``run_dir`` is set,
    with a checkpoint after every round. ``resume``: continue ``run_dir``'s run from its checkpoint
    (a folder without one starts afresh). ``num_clients``: clients taking part (default
    ``partition.num_clients``). ``private_root``: where simulated clients keep their private state
    (its manifest goes into each checkpoint; None on a deployed server). A run asked to stop
    (:mod:`fedse.interrupt`) raises :class:`~fedse.interrupt.RunStopped` while it waits for replies,
    its folder holding the last complete round. ``show_privacy``: log the DP summary at the end
    (:func:`format_privacy`; ``fedse simulate`` prints it after its tables instead)."""
    setup_logging(logging.INFO if fed is None else None)  # fed is None: a deployed ServerApp
    num_clients = num_clients or cfg.partition.num_clients
    model, split, shared, dp = _start(cfg, fed, num_clients)
    log.info("%s", split.describe(model))
    if dp is not None and (warning := client_dp_warning(dp, sum(v.numel() for v in shared.values()))):
        log.warning("%s", warning)
    shared_like = dict(shared)
    ckpt = _checkpoint_to_resume(run_dir, cfg, shared_like, dp, private_root) if resume else None
    done, run_log = (ckpt.round, ckpt.log) if ckpt is not None else (0, None)
    if ckpt is not None:
        shared = ckpt.shared
        log.info("resuming %s after round %d of %d", run_dir, done, cfg.server.rounds)
    if ckpt is not None and ckpt.finished and done == cfg.server.rounds:
        log.info("%s finished all %d rounds; nothing to add", run_dir, done)
        return ServerOutcome(ckpt.log, ckpt.shared, {"privacy": privacy_report(cfg, ckpt.log, dp), "unchanged": True})
    if run_dir is not None:  # the run's record, from its first round on (a resume reads it)
        write_record(run_dir, cfg)
    guard = _guard(cfg, fed, dp, shared_like, num_clients)
    if ckpt is not None:
        try:
            load_strategy_state(guard, ckpt.strategy)
        except ValueError as err:
            raise CheckpointError(f"cannot resume {run_dir}: {err}") from None

    def checkpoint(server_round: int, arrays: ArrayRecord, run_log: RunLog, finished: bool = False) -> None:
        private = private_manifest(private_root, server_round) if private_root is not None else None
        save_checkpoint(
            run_dir,
            cfg,
            server_round,
            arrays,
            run_log,
            dp,
            strategy=strategy_state(guard),
            private=private,
            finished=finished,
        )

    common = _message_config(cfg, run_log)
    board = (
        TensorBoardLog(run_dir, privacy=cfg.privacy.mode) if cfg.output.tensorboard and run_dir is not None else None
    )
    if board is not None:
        on_round = _with_board(board, on_round)
    strategy = RunRecorder(
        guard,
        run_log or RunLog(),
        num_rounds=cfg.server.rounds,
        round_offset=done,
        pooled_every=cfg.evaluate.pooled_every if cfg.evaluate.pooled else None,
        on_round=on_round,
        on_round_end=checkpoint if run_dir else None,
        mark_final=cfg.output.client_models,
        message_config=common,
    )
    started = time.perf_counter()
    grid = StoppableGrid(grid)
    result = strategy.start(
        grid=grid,
        initial_arrays=to_arrays(shared),
        num_rounds=max(cfg.server.rounds - done, 0),
        timeout=cfg.server.round_timeout,
    )
    final = from_arrays(result.arrays) if len(result.arrays) else shared
    privacy = privacy_report(cfg, strategy.log, dp)
    if show_privacy and privacy["mode"] != "none":
        log.info("%s", format_privacy(privacy))
    summary: dict[str, Any] = {"privacy": privacy}
    extra: dict[str, Any] = {"wall_seconds": time.perf_counter() - started, "privacy": privacy}
    if done:
        extra["resumed_after_round"] = done
    if cfg.output.client_models:
        extra["client_models"] = _export_rest(grid, guard, cfg, strategy.log, to_arrays(final), common[CONFIG_JSON])
    if run_dir is not None:
        summary = write_run(
            run_dir,
            config=config_to_record(cfg),
            log=strategy.log,
            split_summary=split.summary(model),
            shared_state=final,
            extra=extra,
        )
        checkpoint(cfg.server.rounds, to_arrays(final), strategy.log, finished=True)
    if board is not None:
        tables = {"clients": final_tables(strategy.log), "privacy": format_privacy(privacy)}
        board.run(cfg, {name: text for name, text in tables.items() if text})
        board.close()
    return ServerOutcome(strategy.log, final, summary)


def _with_board(board: TensorBoardLog, on_round: Callable[[int, RunLog], None] | None) -> Callable[[int, RunLog], None]:
    """``on_round`` that also writes the round's figures to TensorBoard."""

    def both(server_round: int, run_log: RunLog) -> None:
        board.round(round_rows(run_log)[-1])
        if on_round is not None:
            on_round(server_round, run_log)

    return both


def _checkpoint_to_resume(
    run_dir: Path | None,
    cfg: Config,
    shared_like: dict[str, torch.Tensor],
    dp: ClientDP | None,
    private_root: Path | None,
) -> Checkpoint | None:
    """``run_dir``'s checkpoint, checked (a folder without one starts afresh: None)."""
    if run_dir is None:
        raise ValueError("resume needs the run folder to continue")
    if not (run_dir / CHECKPOINT).is_file():
        return None
    return _resume(run_dir, cfg, shared_like, dp, private_root)


def _guard(
    cfg: Config, fed: FederatedData | None, dp: ClientDP | None, shared_like: dict[str, torch.Tensor], num_clients: int
) -> GuardedStrategy:
    """The run's strategy behind the guard: the reply schemas, the DP wrapper, the bounds, the key list.
    The cap on a reply's num-examples: the config's, else the largest part of the run's partition; a
    server without data (deployment) that was given none uses NO_DATA_MAX_EXAMPLES."""
    if cfg.server.max_num_examples:
        max_train = max_test = cfg.server.max_num_examples
    elif fed is not None:
        max_train, max_test = max(len(p) for p in fed.train_parts), max(len(p) for p in fed.test_parts)
    else:
        max_train = max_test = NO_DATA_MAX_EXAMPLES
    return GuardedStrategy(
        create_strategy(cfg, dp),
        train_schema(
            shared_like,
            dp_sample=cfg.privacy.mode == "sample",
            digests=cfg.evaluate.private_digest,
            max_examples=max_train,
        ),
        lambda pooled: evaluate_schema(pooled=pooled, max_examples=max_test, max_train=max_train),
        dp=dp,
        expected_nodes=num_clients,
        join_timeout=cfg.server.join_timeout,
        **bounds(cfg, deployed=fed is None),
        client_keys=_client_keys(cfg, fed),
    )


def _export_rest(
    grid: Grid, guard: GuardedStrategy, cfg: Config, run_log: RunLog, arrays: ArrayRecord, payload: str
) -> dict[str, int]:
    """After the last round, ask every node whose client was not evaluated in it to write its
    personalized model from the final shared weights and its latest private part (an evaluate
    message marked ``final`` and ``export-only``; the reply's content is not used)."""
    evaluated = set(run_log.evaluate.get(cfg.server.rounds, {}))
    done = {guard.node_of(cid) for cid in evaluated} - {None}
    nodes = sorted(n for n in grid.get_node_ids() if n not in done)
    counts = {"written_at_final_evaluation": len(evaluated), "asked_after_the_run": len(nodes), "failed": 0}
    if not nodes:
        return counts
    config = ConfigRecord(
        {CONFIG_JSON: payload, FINAL: True, EXPORT_ONLY: True, SERVER_ROUND: cfg.server.rounds, POOLED: False}
    )
    messages = [
        Message(RecordDict({ARRAYS: arrays, CONFIG: config}), dst_node_id=node, message_type=MessageType.EVALUATE)
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=cfg.server.round_timeout))
    counts["failed"] = len(nodes) - sum(not r.has_error() for r in replies)
    if counts["failed"]:
        log.warning("%d of %d clients did not write their personalized model", counts["failed"], len(nodes))
    return counts


def final_tables(outcome_log: RunLog, max_rows: int = 20) -> str:
    """The per-client table (up to ``max_rows`` clients; beyond that only a pointer to
    ``clients.csv``, which always holds every client) and its summary lines, as printed at the end
    of a run, then any refused or failed replies (with the first failure's reason). The headers use
    the README's words (:data:`~fedse.analysis.report.CLIENT_HEADINGS`); the files keep the keys."""
    clients = client_rows(outcome_log)
    cols = [COL_CLIENT, COL_TRAIN_SAMPLES, COL_LOCAL_ACC, COL_POOLED_ACC]
    if len(clients) <= max_rows:
        text = format_table(clients, cols, headings=CLIENT_HEADINGS) + "\n\n"
    else:
        text = f"{len(clients)} clients evaluated: every client's row is in clients.csv in the run folder\n\n"
    # a summary row's first cell names the statistic (mean, std, ...) over the clients
    text += format_table(client_summary_rows(clients), headings={**CLIENT_HEADINGS, COL_CLIENT: "over clients"})
    if outcome_log.dropped:
        text += f"\n\n{len(outcome_log.dropped)} replies refused by the guard; first: {outcome_log.dropped[0]}"
    if outcome_log.failed:
        reason = str(outcome_log.failed[0]["reason"]).replace("\\n", "\n").strip().splitlines()
        text += (
            f"\n\n{len(outcome_log.failed)} client replies failed (see rounds.json / summary.json); "
            f"first reason: {reason[-1][:300] if reason else '?'}"
        )
    return text
