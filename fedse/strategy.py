"""Server side: Flower's own strategies over the shared keys, behind a guard.

:func:`create_strategy` picks a strategy from Flower (FedAvg, FedProx, FedAdam);
:class:`GuardedStrategy` wraps any Flower strategy and, before it aggregates,
refuses (logs and drops) every reply whose arrays carry a key outside the shared
set, miss a shared key, have a wrong shape or hold non-finite values. It also
records each client's metrics per round for the report.
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
from .records import ARRAYS, CLIENT, METRICS, UNIT_WEIGHT, check_arrays

__all__ = ["STRATEGIES", "GuardedStrategy", "RunLog", "client_noise_multiplier", "clients_per_round",
           "create_strategy"]

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


def create_strategy(cfg: Config, num_clients: int | None = None) -> Strategy:
    """The configured Flower strategy; under client-level DP wrapped in Flower's server-side
    DP wrapper (fixed or adaptive clipping of each client's update, Gaussian noise on the mean)."""
    name = cfg.server.strategy
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid strategies: {sorted(STRATEGIES)}")
    strategy = STRATEGIES[name](cfg)
    pr = cfg.privacy
    if pr.mode == "client":
        sampled = clients_per_round(cfg, num_clients or cfg.partition.num_clients)
        sigma = client_noise_multiplier(cfg, num_clients or cfg.partition.num_clients)
        if pr.clipping == "fixed":
            return DifferentialPrivacyServerSideFixedClipping(strategy, sigma, pr.clipping_norm, sampled)
        try:
            return DifferentialPrivacyServerSideAdaptiveClipping(
                strategy, sigma, sampled, initial_clipping_norm=pr.clipping_norm,
                clipped_count_stddev=pr.clipped_count_stddev,
            )
        except ValueError as err:  # Flower's own rule, e.g. clipped_count_stddev too low for sigma
            raise ConfigError(f"config key 'privacy.clipped_count_stddev' / 'privacy.noise_multiplier': {err}") from None
    return strategy


def clients_per_round(cfg: Config, num_clients: int) -> int:
    """How many clients Flower's FedAvg samples per round (its own rule)."""
    return max(int(num_clients * cfg.server.fraction_train), cfg.server.min_train_clients)


def client_noise_multiplier(cfg: Config, num_clients: int) -> float:
    """sigma for client-level DP: configured, or derived from target_epsilon over the rounds."""
    pr = cfg.privacy
    if pr.noise_multiplier is not None:
        return pr.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    q = min(1.0, clients_per_round(cfg, num_clients) / num_clients)
    return get_noise_multiplier(target_epsilon=pr.target_epsilon, target_delta=pr.delta, sample_rate=q,
                                steps=cfg.server.rounds, accountant="rdp")


@dataclass
class RunLog:
    """What the server saw, per round and per client."""

    train: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)  # round -> client -> metrics
    evaluate: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)
    dropped: list[dict[str, Any]] = field(default_factory=list)  # refused replies
    failed: list[dict[str, Any]] = field(default_factory=list)  # error replies
    round_seconds: dict[int, float] = field(default_factory=dict)


def _client_of(msg: Message) -> dict[str, Any]:
    content = msg.content
    info = dict(content[CLIENT]) if CLIENT in content.config_records else {}
    info.setdefault("node-id", msg.metadata.src_node_id)
    return info


def _order_key(msg: Message) -> tuple[int, int, int]:
    """Replies first by partition id (where the client sends one), then by node id; errors last."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return (1, node, node)
    return (0, int(_client_of(msg).get("partition-id", node)), node)


class GuardedStrategy(Strategy):
    """Wrap ``inner``; drop replies that are not exactly the shared keys, well shaped and finite."""

    def __init__(
        self,
        inner: Strategy,
        shared_shapes: Mapping[str, tuple[int, ...]],
        *,
        num_rounds: int,
        pooled_every: int = 0,
        pooled: bool = True,
        on_round: Callable[[int, RunLog], None] | None = None,
        on_aggregated: Callable[[int, ArrayRecord, RunLog], None] | None = None,
        round_offset: int = 0,
        log: RunLog | None = None,
    ) -> None:
        """``num_rounds``: the run's last round. ``round_offset``: rounds done before this start
        (a resumed run): Flower's round r is recorded as ``r + round_offset``. ``on_aggregated``
        receives each round's new shared arrays (checkpoints)."""
        self.inner = inner
        self.shared_shapes = dict(shared_shapes)
        self.num_rounds = num_rounds
        self.pooled_every = pooled_every
        self.pooled = pooled
        self.on_round = on_round
        self.on_aggregated = on_aggregated
        self.round_offset = round_offset
        self.log = log if log is not None else RunLog()
        self._round_start = time.perf_counter()
        self._sent: dict[str, np.ndarray] = {}
        self._client_of_node: dict[int, int] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_start = time.perf_counter()
        self._sent = {k: v.numpy() for k, v in arrays.items()}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def _update_norm(self, msg: Message) -> float | None:
        """L2 norm of a reply's update (its shared arrays minus what was sent), over all keys."""
        if not self._sent or msg.has_error() or ARRAYS not in msg.content.array_records:
            return None
        record = msg.content[ARRAYS]
        total = sum(float(np.sum((record[k].numpy().astype(np.float64) - self._sent[k]) ** 2))
                    for k in record.keys() if k in self._sent)
        return float(np.sqrt(total))

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Replies that pass the guard, in client order; the others are logged and recorded as dropped.

        Flower averages float32 arrays in the order the list gives, and replies arrive in
        whatever order the clients finish: sorting by client makes the aggregate (and so a
        seeded run) bit-reproducible."""
        kept = []
        for msg in replies:
            if msg.has_error():
                node = msg.metadata.src_node_id
                self.log.failed.append({"round": server_round, "node-id": node,
                                        "client": self._client_of_node.get(node), "reason": msg.error.reason})
                kept.append(msg)  # the inner strategy counts and logs failures itself
                continue
            if ARRAYS not in msg.content.array_records:
                problems = [f"no '{ARRAYS}' record"]
            else:
                problems = check_arrays(msg.content[ARRAYS], self.shared_shapes)
            if problems:
                who = _client_of(msg)
                log.warning("round %d: dropping reply from %s: %s", server_round, who, "; ".join(problems))
                self.log.dropped.append({"round": server_round, **who, "problems": problems})
                continue
            kept.append(msg)
        return sorted(kept, key=_order_key)

    def _record(self, table: dict[int, dict[int, dict[str, Any]]], server_round: int, replies: list[Message]) -> None:
        rows = table.setdefault(server_round, {})
        for msg in replies:
            if msg.has_error() or METRICS not in msg.content.metric_records:
                continue
            info = _client_of(msg)
            cid = int(info.get("partition-id", info["node-id"]))
            self._client_of_node[int(info["node-id"])] = cid
            rows[cid] = {**info, **dict(msg.content[METRICS])}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        local_round, server_round = server_round, server_round + self.round_offset
        kept = self.screen(server_round, replies)
        self._record(self.log.train, server_round, kept)
        received = {id(m): self._update_norm(m) for m in kept}
        result = self.inner.aggregate_train(local_round, kept)
        # Flower's DP wrappers clip replies in place: the norm after aggregation is the clipped one.
        rows = self.log.train.get(server_round, {})
        for msg in kept:
            if msg.has_error() or METRICS not in msg.content.metric_records:
                continue
            info = _client_of(msg)
            row = rows.get(int(info.get("partition-id", info["node-id"])))
            if row is not None:
                row["update-norm"] = received[id(msg)]
                row["update-norm-aggregated"] = self._update_norm(msg)
        if result[0] is not None and self.on_aggregated is not None:
            self.on_aggregated(server_round, result[0], self.log)
        return result

    def wants_pooled(self, server_round: int) -> bool:
        if not self.pooled:
            return False
        if server_round == self.num_rounds:
            return True
        return self.pooled_every > 0 and server_round % self.pooled_every == 0

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["pooled"] = self.wants_pooled(server_round + self.round_offset)
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        server_round += self.round_offset
        self._record(self.log.evaluate, server_round, replies)
        self.log.round_seconds[server_round] = time.perf_counter() - self._round_start
        if self.on_round is not None:
            self.on_round(server_round, self.log)
        return metrics
