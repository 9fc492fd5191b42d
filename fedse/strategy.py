"""Server side: Flower's own strategies over the shared keys, behind a guard.

:func:`create_strategy` picks a strategy from Flower (FedAvg, FedProx, FedAdam),
wrapped under client-level DP in Flower's DP wrapper with Flower's accountant.
:class:`GuardedStrategy` wraps it and screens every train and evaluate reply
against an exact schema (:func:`fedse.records.screen_reply`) before anything
is aggregated: a reply that fails is dropped and logged with its reason, an
error reply is recorded as failed, and the round goes on with the rest. The
client's identity in reports is its node (Flower's metadata, not the client)
bound to the id it claims on first contact; aggregation weights are checked
integers in [1, cap], and under client-level DP the server sets them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from .config import Config, ConfigError
from .privacy import ClientDP
from .records import ARRAYS, PARTITION_ID, UNIT_WEIGHT, ReplySchema, screen_reply

__all__ = ["STRATEGIES", "AdaptiveClipping", "GuardedStrategy", "NodeCountError", "RunLog", "clients_per_round", "create_strategy"]

log = logging.getLogger("fedse")


def _common(cfg: Config) -> dict[str, Any]:
    s = cfg.server
    return {
        "weighted_by_key": UNIT_WEIGHT if cfg.privacy.mode == "client" else "num-examples",
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": s.min_train_clients,
        "min_evaluate_nodes": s.min_evaluate_clients,
        "min_available_nodes": max(s.min_train_clients, s.min_evaluate_clients),
    }


STRATEGIES: dict[str, Callable[[Config], Strategy]] = {
    "fedavg": lambda cfg: FedAvg(**_common(cfg)),
    "fedprox": lambda cfg: FedProx(**_common(cfg), proximal_mu=cfg.server.proximal_mu),
    "fedadam": lambda cfg: FedAdam(**_common(cfg), eta=cfg.server.server_lr),
}


def create_strategy(cfg: Config, dp: ClientDP | None = None) -> Strategy:
    """The configured Flower strategy; under client-level DP (``dp``) wrapped in Flower's
    server-side DP wrapper (fixed or adaptive clipping of each client's update, Gaussian noise on
    the mean). Fixed clipping runs in Flower's accounted mode (``dp.accountant``)."""
    name = cfg.server.strategy
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid strategies: {sorted(STRATEGIES)}")
    strategy = STRATEGIES[name](cfg)
    pr = cfg.privacy
    if dp is None:
        return strategy
    try:
        if pr.clipping == "fixed":
            return DifferentialPrivacyServerSideFixedClipping(strategy, dp.noise_multiplier, pr.clipping_norm,
                                                              dp.sampled, accountant=dp.accountant)
        return AdaptiveClipping(
            strategy, dp.noise_multiplier, dp.sampled, initial_clipping_norm=pr.clipping_norm,
            clipped_count_stddev=pr.clipped_count_stddev,
        )
    except ValueError as err:  # Flower's own rules, e.g. clipped_count_stddev too low for sigma
        raise ConfigError(f"config key 'privacy' (client-level DP with server.strategy={name}): {err}") from None


class AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, with the noise sized for the bound the updates were
    clipped to.

    Flower 1.42 clips each update to the current bound, then updates the bound from the (noisy)
    clipped fraction, then adds noise scaled to the *updated* bound. When most clients are clipped
    the bound shrinks first (measured: 0.75 of the clipping bound with a noisy count), so the noise
    is smaller than the sensitivity of the sum it protects. Here the noise uses the bound of the
    clipping; the bound update is unchanged."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._clipped_with = self.clipping_norm
        return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        updated, self.clipping_norm = self.clipping_norm, self._clipped_with
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = updated


def clients_per_round(cfg: Config, num_clients: int) -> int:
    """How many clients Flower's FedAvg samples per round (its own rule)."""
    return max(int(num_clients * cfg.server.fraction_train), cfg.server.min_train_clients)


class NodeCountError(ConfigError):
    """The federation's nodes and the config's number of clients disagree."""


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


def _error_reason(msg: Message) -> str:
    try:
        return str(msg.error.reason)[-300:]
    except Exception:  # noqa: BLE001
        return "?"


class GuardedStrategy(Strategy):
    """Wrap ``inner``; pass on only replies that match their schema exactly, in client order."""

    def __init__(
        self,
        inner: Strategy,
        train_schema: ReplySchema,
        evaluate_schema: Callable[[bool], ReplySchema],
        *,
        num_rounds: int,
        pooled_every: int = 0,
        pooled: bool = True,
        dp: ClientDP | None = None,
        expected_nodes: int | None = None,
        join_timeout: float = 0.0,
        on_round: Callable[[int, RunLog], None] | None = None,
        on_aggregated: Callable[[int, ArrayRecord, RunLog], None] | None = None,
        round_offset: int = 0,
        log: RunLog | None = None,
    ) -> None:
        """``evaluate_schema(pooled)``: the schema of an evaluate reply. ``dp``: client-level DP (the
        guard sets every weight to 1 and refuses a round without exactly ``dp.sampled`` usable
        replies). ``expected_nodes``: the number of nodes the run needs; before round 1 the guard
        waits up to ``join_timeout`` seconds for them and stops the run when they differ.
        ``num_rounds``: the run's last round. ``round_offset``: rounds done before this start (a
        resumed run): Flower's round r is recorded as ``r + round_offset``. ``on_aggregated``
        receives each round's shared arrays (checkpoints), also for a round without an update."""
        self.inner = inner
        self.train_schema = train_schema
        self.evaluate_schema = evaluate_schema
        self.num_rounds = num_rounds
        self.pooled_every = pooled_every
        self.pooled = pooled
        self.dp = dp
        self.expected_nodes = expected_nodes
        self.join_timeout = join_timeout
        self.on_round = on_round
        self.on_aggregated = on_aggregated
        self.round_offset = round_offset
        self.log = log if log is not None else RunLog()
        self._round_start = time.perf_counter()
        self._sent_record: ArrayRecord | None = None
        self._sent: dict[str, np.ndarray] = {}
        self._pooled_asked: dict[int, bool] = {}
        self._client_of_node: dict[int, int] = {}
        self._node_of_client: dict[int, int] = {}

    def summary(self) -> None:
        self.inner.summary()

    # ------------------------------------------------------------------ nodes and identity

    def check_nodes(self, grid: Grid) -> None:
        """Wait (up to ``join_timeout``) for exactly ``expected_nodes`` nodes; raise when they differ."""
        if self.expected_nodes is None:
            return
        deadline = time.monotonic() + self.join_timeout
        waiting = False
        while True:
            found = len(list(grid.get_node_ids()))
            if found == self.expected_nodes:
                return
            if found > self.expected_nodes or time.monotonic() >= deadline:
                raise NodeCountError(
                    f"the federation has {found} nodes (SuperNodes) but the run needs {self.expected_nodes} "
                    f"(partition.num_clients); start {self.expected_nodes} SuperNodes (flwr run's local simulation: "
                    f"options.num-supernodes = {self.expected_nodes} under [superlink.local] in ~/.flwr/config.toml) "
                    f"or set partition.num_clients={found}")
            if not waiting:
                log.info("waiting up to %.0f s for %d nodes (%d connected)", self.join_timeout, self.expected_nodes,
                         found)
                waiting = True
            time.sleep(0.2)

    def _bind(self, node: int, claimed: int) -> str | None:
        """Bind ``node`` to the client id it claims on first contact; a reason when that conflicts."""
        bound = self._client_of_node.get(node)
        if bound is not None:
            return None if bound == claimed else f"{PARTITION_ID} {claimed} claimed by node {node}, bound to {bound}"
        owner = self._node_of_client.get(claimed)
        if owner is not None:
            return f"{PARTITION_ID} {claimed} already belongs to node {owner}"
        self._client_of_node[node], self._node_of_client[claimed] = claimed, node
        return None

    # ------------------------------------------------------------------ screening

    def screen(self, server_round: int, replies: Iterable[Message], schema: ReplySchema,
               table: dict[int, dict[int, dict[str, Any]]]) -> list[Message]:
        """Replies that pass ``schema`` (rebuilt from their checked values), sorted by client id;
        the rest are recorded as dropped (with reasons) or failed. Each kept reply's row goes into
        ``table[server_round]``.

        Flower averages float32 arrays in the order the list gives, and replies arrive in
        whatever order the clients finish: sorting by client makes the aggregate (and so a
        seeded run) bit-reproducible."""
        kept: list[tuple[int, Message]] = []
        rows = table.setdefault(server_round, {})
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                self.log.failed.append({"round": server_round, "node-id": node,
                                        "client": self._client_of_node.get(node), "reason": _error_reason(msg)})
                continue
            checked, problems = screen_reply(msg, schema)
            if checked is not None:
                if (conflict := self._bind(node, checked.client[PARTITION_ID])) is not None:
                    problems = [conflict]
                elif checked.client[PARTITION_ID] in rows:
                    problems = [f"a second reply for client {checked.client[PARTITION_ID]} this round"]
            if problems:
                log.warning("round %d: dropping reply from node %d: %s", server_round, node, "; ".join(problems))
                self.log.dropped.append({"round": server_round, "node-id": node,
                                         "client": self._client_of_node.get(node), "problems": problems})
                continue
            cid = checked.client[PARTITION_ID]
            msg.content = checked.content({UNIT_WEIGHT: 1} if self.dp is not None else None)
            rows[cid] = {"node-id": node, **checked.client, **checked.metrics}
            if checked.arrays is not None:
                rows[cid]["update-norm"] = self._update_norm(checked.arrays)
            kept.append((cid, msg))
        return [m for _, m in sorted(kept, key=lambda pair: pair[0])]

    def _update_norm(self, arrays: Mapping[str, np.ndarray]) -> float | None:
        """L2 norm of a reply's update (its shared arrays minus what was sent), over all keys."""
        if not self._sent:
            return None
        total = sum(float(np.sum((arrays[k].astype(np.float64) - self._sent[k]) ** 2)) for k in arrays)
        return float(np.sqrt(total))

    # ------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if server_round == 1:
            self.check_nodes(grid)
        self._round_start = time.perf_counter()
        self._sent_record = arrays
        self._sent = {k: v.numpy() for k, v in arrays.items()}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        local_round, server_round = server_round, server_round + self.round_offset
        kept = self.screen(server_round, replies, self.train_schema, self.log.train)
        result: tuple[ArrayRecord | None, MetricRecord | None] = (None, None)
        if self.dp is not None and len(kept) != self.dp.sampled:
            reason = (f"{len(kept)} usable replies, the noise is sized for {self.dp.sampled}: "
                      "no release and no update this round")
            log.warning("round %d: client-level DP: %s", server_round, reason)
            self.log.refused.append({"round": server_round, "reason": reason})
            if self.dp.wrapper_composes:  # Flower's accounted wrapper refuses too, and drops its pending event
                self.inner.aggregate_train(local_round, kept)
        elif kept:
            result = self.inner.aggregate_train(local_round, kept)
            if self.dp is not None and not self.dp.wrapper_composes and result[0] is not None:
                self.dp.release()
        if self.dp is not None:
            self.log.epsilon[server_round] = self.dp.epsilon()
        # Flower's DP wrappers clip replies in place: the norm after aggregation is the clipped one.
        rows = self.log.train.get(server_round, {})
        for msg in kept:
            if ARRAYS in msg.content.array_records:
                record = msg.content[ARRAYS]
                cid = next(c for c, r in rows.items() if r["node-id"] == int(msg.metadata.src_node_id))
                rows[cid]["update-norm-aggregated"] = self._update_norm({k: v.numpy() for k, v in record.items()})
        if self.on_aggregated is not None:
            arrays = result[0] if result[0] is not None else self._sent_record
            if arrays is not None:
                self.on_aggregated(server_round, arrays, self.log)
        return result

    # ------------------------------------------------------------------ evaluate

    def wants_pooled(self, server_round: int) -> bool:
        if not self.pooled:
            return False
        if server_round == self.num_rounds:
            return True
        return self.pooled_every > 0 and server_round % self.pooled_every == 0

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        pooled = self.wants_pooled(server_round + self.round_offset)
        self._pooled_asked[server_round] = pooled
        config["pooled"] = pooled
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        schema = self.evaluate_schema(self._pooled_asked.pop(server_round, False))
        kept = self.screen(server_round + self.round_offset, replies, schema, self.log.evaluate)
        metrics = self.inner.aggregate_evaluate(server_round, kept) if kept else None
        server_round += self.round_offset
        self.log.round_seconds[server_round] = time.perf_counter() - self._round_start
        if self.on_round is not None:
            self.on_round(server_round, self.log)
        return metrics
