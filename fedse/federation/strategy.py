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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from ..config import Config, ConfigError, choice_error, short_repr
from ..identity import bind_node_keys
from ..privacy import ClientDP
from ..records import (
    ARRAYS,
    CLIENT_ID,
    METRICS,
    NUM_EXAMPLES,
    POOLED,
    UNIT_WEIGHT,
    ReplySchema,
    Screened,
    screen_reply,
)

__all__ = [
    "STRATEGIES",
    "AdaptiveClipping",
    "bounds",
    "GuardedStrategy",
    "NodeCountError",
    "Screening",
    "clients_per_round",
    "create_strategy",
    "load_strategy_state",
    "strategy_state",
]

log = logging.getLogger("fedse")


def _common(cfg: Config) -> dict[str, Any]:
    s = cfg.server
    return {
        "weighted_by_key": UNIT_WEIGHT if cfg.privacy.mode == "client" else NUM_EXAMPLES,
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": s.min_train_clients,
        "min_evaluate_nodes": s.min_evaluate_clients,
        "min_available_nodes": max(s.min_train_clients, s.min_evaluate_clients),
    }


def _multikrum(cfg: Config) -> Strategy:
    s = cfg.server
    select = s.krum_select or clients_per_round(cfg, cfg.partition.num_clients) - s.byzantine
    return MultiKrum(**_common(cfg), num_malicious_nodes=s.byzantine, num_nodes_to_select=select)


STRATEGIES: dict[str, Callable[[Config], Strategy]] = {
    "fedavg": lambda cfg: FedAvg(**_common(cfg)),
    "fedprox": lambda cfg: FedProx(**_common(cfg), proximal_mu=cfg.server.proximal_mu),
    "fedadam": lambda cfg: FedAdam(**_common(cfg), eta=cfg.server.server_lr),
    # Flower's robust aggregators, over the shared keys of the replies the guard kept
    "fedtrimmedavg": lambda cfg: FedTrimmedAvg(**_common(cfg), beta=cfg.server.trim_beta),
    "fedmedian": lambda cfg: FedMedian(**_common(cfg)),
    "krum": lambda cfg: Krum(**_common(cfg), num_malicious_nodes=cfg.server.byzantine),
    "multikrum": _multikrum,
    "bulyan": lambda cfg: Bulyan(**_common(cfg), num_malicious_nodes=cfg.server.byzantine),
}


ROBUST_STRATEGIES = ("fedtrimmedavg", "fedmedian", "krum", "multikrum", "bulyan")


def check_config(cfg: Config) -> None:
    """``server.strategy`` is a registered name, composed only with the privacy it is sound under,
    and a robust aggregator has the clients a round it needs."""
    s, pr = cfg.server, cfg.privacy
    if s.strategy not in STRATEGIES:
        raise choice_error("server.strategy", s.strategy, STRATEGIES)
    if pr.mode == "sample" and s.strategy == "fedprox":
        raise ConfigError(
            "config key 'server.strategy': 'fedprox' cannot be combined with privacy.mode=sample "
            "(the proximal term's gradient is not per-sample); allowed: fedavg, fedadam"
        )
    if pr.mode == "client" and s.strategy == "fedadam":
        raise ConfigError(
            "config key 'server.strategy': 'fedadam' cannot be combined with privacy.mode=client "
            "(Flower's DP wrapper adds its noise after FedAdam's server step, so the noise would not "
            "be on the clipped mean of the updates); allowed: fedavg, fedprox"
        )
    if pr.mode == "client" and s.strategy in ROBUST_STRATEGIES:
        raise ConfigError(
            f"config key 'server.strategy': {s.strategy!r} cannot be combined with privacy.mode=client: the DP "
            "noise is sized for the mean of clipped updates (sensitivity C/m), and a trimmed mean, a median or "
            "Krum's choice has another sensitivity, so the reported epsilon would not hold; allowed: fedavg, "
            "fedprox under client-level DP"
        )
    if pr.mode == "client" and s.norm_bound:
        raise ConfigError(
            f"config key 'server.norm_bound': {short_repr(s.norm_bound)} cannot be combined with privacy.mode=client: "
            "a bound relative to the round's median norm makes every client's clipping depend on the others' "
            "updates, so one client changes the clipped sum by more than the DP bound C; the DP wrapper's own "
            "clipping to privacy.clipping_norm bounds every update; allowed: null or 0"
        )
    _check_byzantine(cfg)


def _check_byzantine(cfg: Config) -> None:
    s = cfg.server
    per_round = max(int(cfg.partition.num_clients * s.fraction_train), s.min_train_clients)
    need = {"krum": 2 * s.byzantine + 3, "multikrum": 2 * s.byzantine + 3, "bulyan": 4 * s.byzantine + 3}
    if s.strategy in need and per_round < need[s.strategy]:
        raise ConfigError(
            f"config key 'server.byzantine': {s.strategy} with {s.byzantine} malicious clients needs at least "
            f"{need[s.strategy]} clients a round, the run has {per_round}; allowed: a smaller server.byzantine "
            "or more clients a round"
        )
    if s.strategy == "multikrum" and s.krum_select is not None and s.krum_select > per_round - s.byzantine:
        raise ConfigError(
            f"config key 'server.krum_select': {s.krum_select} exceeds the {per_round} clients a round less "
            f"server.byzantine={s.byzantine}; allowed: at most {per_round - s.byzantine}"
        )


DEPLOYED_NORM_BOUND = 3.0  # server.norm_bound: null on a server without data (a deployment)
DEPLOYED_WEIGHT_CAP = 2.0  # server.weight_cap: null on a server without data


def bounds(cfg: Config, deployed: bool) -> dict[str, Any]:
    """The guard's bounds on one reply's effect (:meth:`GuardedStrategy._bound`): the configured ones,
    or on a deployed server (replies from strangers) the deployment defaults, but for the norm bound
    under client-level DP; 0 turns one off."""
    s = cfg.server
    # Under client-level DP the wrapper clips every update to privacy.clipping_norm; a bound relative
    # to the other updates would change the sum's sensitivity (the config refuses one set explicitly).
    bounded = deployed and cfg.privacy.mode != "client"
    norm = s.norm_bound if s.norm_bound is not None else (DEPLOYED_NORM_BOUND if bounded else 0.0)
    cap = s.weight_cap if s.weight_cap is not None else (DEPLOYED_WEIGHT_CAP if deployed else 0.0)
    return {"norm_bound": norm or None, "norm_action": s.norm_action, "weight_cap": cap or None}


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
            return DifferentialPrivacyServerSideFixedClipping(
                strategy, dp.noise_multiplier, pr.clipping_norm, dp.sampled, accountant=dp.accountant
            )
        return AdaptiveClipping(
            strategy,
            dp.noise_multiplier,
            dp.sampled,
            initial_clipping_norm=pr.clipping_norm,
            clipped_count_stddev=pr.clipped_count_stddev,
        )
    except ValueError as err:  # Flower's own rules, e.g. clipped_count_stddev too low for sigma
        raise ConfigError(f"config key 'privacy' (client-level DP with server.strategy={name}): {err}") from None


class AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, with the noise sized for what is released.

    Two corrections to Flower 1.42, each keeping the run's noise multiplier ``z`` the exact
    multiplier of what one client can change:

    - The bound of the noise. Flower clips each update to the current bound, updates the bound from
      the noisy clipped fraction, then adds noise scaled to the *updated* bound. When most clients
      are clipped the bound shrinks first (measured: 0.75 of the clipping bound with a noisy count),
      so the noise is smaller than the sensitivity of the sum it protects. Here the noise uses the
      bound of the clipping; the bound update is unchanged.
    - The split of ``z`` between the update and the clipped count (Andrew et al. 2021). Flower sizes
      the update's noise multiplier as ``(z^-2 - (2 s)^-2)^-1/2`` for a count noised with std ``s``,
      which is the split for centred bits (``b - 1/2``, sensitivity 1/2), but it noises the raw 0/1
      count, whose sensitivity to adding or removing a client is 1. The release then has an effective
      multiplier ``(z^-2 + 3/(4 s^2))^-1/2`` (0.918 for z = 1, s = 2), below ``z``. Here the update's
      multiplier is ``(z^-2 - s^-2)^-1/2``, so the pair (update sum / C, count) has multiplier ``z``
      exactly; it needs ``s > z``."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, num_sampled_clients: int, **kwargs: Any) -> None:
        super().__init__(strategy, noise_multiplier, num_sampled_clients, **kwargs)
        if noise_multiplier > 0:
            s = self.clipped_count_stddev
            if s <= noise_multiplier:
                raise ValueError(
                    f"clipped_count_stddev {s:g} must exceed the noise multiplier {noise_multiplier:g}: the clipped "
                    "count (sensitivity 1) takes its share of the noise multiplier; allowed: a larger "
                    "privacy.clipped_count_stddev or a smaller noise multiplier"
                )
            self.noise_multiplier = (noise_multiplier**-2 - s**-2) ** -0.5

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._clipped_with = self.clipping_norm
        return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        updated, self.clipping_norm = self.clipping_norm, self._clipped_with
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = updated


def _layers(strategy: Strategy) -> Iterable[Strategy]:
    """``strategy`` and every strategy it wraps (the guard's inner one, a DP wrapper's)."""
    while strategy is not None:
        yield strategy
        strategy = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The state a strategy carries from round to round, for a checkpoint: adaptive clipping's
    current bound, FedAdam's first and second moments (as tensors, bit for bit). Empty for FedAvg
    and FedProx, which keep none."""
    state: dict[str, Any] = {}
    for layer in _layers(strategy):
        if isinstance(layer, DifferentialPrivacyServerSideAdaptiveClipping):
            state["clipping_norm"] = float(layer.clipping_norm)
        if isinstance(layer, FedAdam):
            for name in ("m_t", "v_t"):
                moments = getattr(layer, name)
                if moments:
                    state[name] = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in moments.items()}
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put back what :func:`strategy_state` took (a resumed run); a state of another strategy is a
    ValueError naming the keys."""
    allowed: set[str] = set()
    for layer in _layers(strategy):
        if isinstance(layer, DifferentialPrivacyServerSideAdaptiveClipping):
            allowed.add("clipping_norm")
            if "clipping_norm" in state:
                layer.clipping_norm = float(state["clipping_norm"])
        if isinstance(layer, FedAdam):
            allowed |= {"m_t", "v_t"}
            for name in ("m_t", "v_t"):
                if name in state:
                    setattr(layer, name, {k: v.numpy() for k, v in state[name].items()})
    if unknown := sorted(set(state) - allowed):
        raise ValueError(f"the checkpoint holds strategy state {unknown}, which this run's strategy does not keep")


class _ListedGrid:
    """A grid as the strategy sees it under ``server.client_keys``: only the nodes with a listed key."""

    def __init__(self, grid: Grid, listed: set[int]) -> None:
        self._grid, self._listed = grid, listed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        return sorted(n for n in self._grid.get_node_ids() if n in self._listed)


def clients_per_round(cfg: Config, num_clients: int) -> int:
    """How many clients Flower's FedAvg samples per round (its own rule)."""
    return max(int(num_clients * cfg.server.fraction_train), cfg.server.min_train_clients)


class NodeCountError(ConfigError):
    """The federation's nodes and the config's number of clients disagree."""


def _brief(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _error_reason(msg: Message) -> str:
    try:
        return str(msg.error.reason)[-300:]
    except Exception:  # noqa: BLE001
        return "?"


@dataclass
class Screening:
    """What the guard made of one round's replies: the kept ones (client id, node id, checked
    values, in client order), the dropped ones with their reasons, the failed ones, and why the
    round was refused (client-level DP), if it was."""

    kept: list[tuple[int, int, Screened]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    refused: str | None = None
    bounded: list[dict[str, Any]] = field(default_factory=list)  # updates clipped or weights capped
    messages: dict[int, Message] = field(default_factory=dict)  # node -> the kept reply, rebuilt (what is aggregated)


class GuardedStrategy(Strategy):
    """Wrap ``inner``; pass on only replies that match their schema exactly, in client order.

    Before its first round it checks the number of nodes. It screens every train and evaluate reply
    (:func:`fedse.records.screen_reply`), binds each node to the client id it claims on first
    contact, and hands ``inner`` fresh replies rebuilt from the checked values. Under client-level
    DP it sets every weight to 1 and refuses a round without exactly ``dp.sampled`` usable replies.
    What it decided for the last round is in :attr:`last`; it records nothing else."""

    def __init__(
        self,
        inner: Strategy,
        train_schema: ReplySchema,
        evaluate_schema: Callable[[bool], ReplySchema],
        *,
        dp: ClientDP | None = None,
        expected_nodes: int | None = None,
        join_timeout: float = 0.0,
        norm_bound: float | None = None,
        norm_action: str = "clip",
        weight_cap: float | None = None,
        client_keys: dict[str, int] | None = None,
    ) -> None:
        """``evaluate_schema(pooled)``: the schema of an evaluate reply, by whether the server asked
        for the pooled test set (``config["pooled"]``). ``expected_nodes``: the number of nodes the
        run needs; before round 1 the guard waits up to ``join_timeout`` seconds for them and stops
        the run when they differ."""
        if norm_action not in ("clip", "drop"):
            raise ValueError(f"norm_action {norm_action!r}; allowed: 'clip' or 'drop'")
        self.norm_bound, self.norm_action, self.weight_cap = norm_bound, norm_action, weight_cap
        self.client_keys = client_keys  # {key fingerprint: client}: nodes are bound by key, not first claim
        self._listed: set[int] = set()
        self._unlisted_seen: set[int] = set()
        self._sent: dict[str, np.ndarray] | None = None
        self.inner = inner
        self.train_schema = train_schema
        self.evaluate_schema = evaluate_schema
        self.dp = dp
        self.expected_nodes = expected_nodes
        self.join_timeout = join_timeout
        self.last = Screening()
        self._pooled_asked: dict[int, bool] = {}
        self._client_of_node: dict[int, int] = {}
        self._node_of_client: dict[int, int] = {}
        self._nodes_checked = False

    def summary(self) -> None:
        self.inner.summary()

    def node_of(self, client: int) -> int | None:
        """The node bound to ``client`` (None before it first replied)."""
        return self._node_of_client.get(client)

    def _bind_keys(self, grid: Grid) -> Grid:
        """With ``client_keys``: bind every connected node to the client its registered key is listed
        with, and return a view of ``grid`` that shows the strategy only those nodes (Flower samples
        from ``get_node_ids``), so an unlisted node is never sent a message nor counted. Without:
        ``grid`` as it is."""
        if self.client_keys is None:
            return grid
        bindings = bind_node_keys(grid.get_nodes(), self.client_keys)
        for node, client in bindings.clients.items():
            old = self._node_of_client.get(client)
            if old is not None and old != node:  # the key was registered again: a new node id
                self._client_of_node.pop(old, None)
            self._client_of_node[node], self._node_of_client[client] = client, node
        self._listed = set(bindings.clients)
        if new := sorted(set(bindings.unlisted) - self._unlisted_seen):
            log.warning("nodes %s hold no listed key (server.client_keys): never sent a message", new)
            self._unlisted_seen |= set(new)
        return _ListedGrid(grid, self._listed)

    def check_nodes(self, grid: Grid) -> None:
        """Wait (up to ``join_timeout``) for exactly ``expected_nodes`` nodes (with ``client_keys``:
        nodes with a listed key); raise when they differ."""
        if self.expected_nodes is None:
            return
        deadline = time.monotonic() + self.join_timeout
        waiting = False
        while True:
            found = len(list(self._bind_keys(grid).get_node_ids()))
            if found == self.expected_nodes:
                return
            if self.client_keys is not None and time.monotonic() >= deadline:
                listed = set(self._node_of_client)
                raise NodeCountError(
                    f"{found} nodes hold a key listed in server.client_keys but the run needs {self.expected_nodes}; "
                    f"clients {sorted(set(self.client_keys.values()) - listed)[:20]} have no node: start their "
                    "SuperNodes with the keys listed for them"
                )
            if self.client_keys is None and (found > self.expected_nodes or time.monotonic() >= deadline):
                raise NodeCountError(
                    f"the federation has {found} nodes (SuperNodes) but the run needs {self.expected_nodes} "
                    f"(partition.num_clients); start {self.expected_nodes} SuperNodes (flwr run's local simulation: "
                    f'flwr run . --federation-config "num-supernodes={self.expected_nodes}") '
                    f"or set partition.num_clients={found}"
                )
            if not waiting:
                log.info(
                    "waiting up to %.0f s for %d nodes (%d connected)", self.join_timeout, self.expected_nodes, found
                )
                waiting = True
            time.sleep(0.2)

    def _bind(self, node: int, claimed: int) -> str | None:
        """Bind ``node`` to the client id it claims on first contact (with ``client_keys``: check the
        claim against the client its key is listed with); a reason when that conflicts."""
        if self.client_keys is not None and node not in self._client_of_node:
            return f"node {node} holds no key listed in server.client_keys"
        bound = self._client_of_node.get(node)
        if bound is not None:
            return None if bound == claimed else f"{CLIENT_ID} {claimed} claimed by node {node}, bound to {bound}"
        owner = self._node_of_client.get(claimed)
        if owner is not None:
            return f"{CLIENT_ID} {claimed} already belongs to node {owner}"
        self._client_of_node[node], self._node_of_client[claimed] = claimed, node
        return None

    def screen(self, server_round: int, replies: Iterable[Message], schema: ReplySchema) -> list[Message]:
        """Replies that pass ``schema``, rebuilt from their checked values and sorted by client id;
        :attr:`last` says what was kept, dropped (with reasons) and failed.

        Flower averages float32 arrays in the order the list gives, and replies arrive in
        whatever order the clients finish: sorting by client makes the aggregate (and so a
        seeded run) bit-reproducible."""
        self.last = Screening()
        kept: list[tuple[int, Message]] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                self.last.failed.append(
                    {"node-id": node, "client": self._client_of_node.get(node), "reason": _error_reason(msg)}
                )
                continue
            checked, problems = screen_reply(msg, schema)
            if checked is not None:
                cid = checked.client[CLIENT_ID]
                if (conflict := self._bind(node, cid)) is not None:
                    problems = [conflict]
                elif any(c == cid for c, _ in kept):
                    problems = [f"a second reply for client {cid} this round"]
            if problems:
                log.warning("round %d: dropping reply from node %d: %s", server_round, node, "; ".join(problems))
                self.last.dropped.append(
                    {"node-id": node, "client": self._client_of_node.get(node), "problems": problems}
                )
                continue
            msg.content = checked.content({UNIT_WEIGHT: 1} if self.dp is not None else None)
            self.last.kept.append((cid, node, checked))
            self.last.messages[node] = msg
            kept.append((cid, msg))
        self.last.kept.sort(key=lambda item: item[0])
        return [m for _, m in sorted(kept, key=lambda pair: pair[0])]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self._nodes_checked:  # before this process's first round (round 1, or a resumed run's first)
            self.check_nodes(grid)
            self._nodes_checked = True
        grid = self._bind_keys(grid)
        self._sent = {k: v.numpy() for k, v in arrays.items()} if self.norm_bound is not None else None
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = self._bound(server_round, self.screen(server_round, replies, self.train_schema))
        if self.dp is not None and len(kept) != self.dp.sampled:
            self.last.refused = (
                f"{len(kept)} usable replies, the noise is sized for {self.dp.sampled}: "
                "no release and no update this round"
            )
            log.warning("round %d: client-level DP: %s", server_round, self.last.refused)
            if self.dp.wrapper_composes:  # Flower's accounted wrapper refuses too, and drops its pending event
                self.inner.aggregate_train(server_round, kept)
            return None, None
        if not kept:
            return None, None
        try:
            result = self.inner.aggregate_train(server_round, kept)
        except Exception as err:  # noqa: BLE001 (well-formed replies must never end the run)
            return self._refuse(server_round, f"the strategy failed on the round's replies ({_brief(err)})")
        if result[0] is not None and not all(np.isfinite(a.numpy()).all() for a in result[0].values()):
            return self._refuse(server_round, "the aggregate holds NaN or inf")
        if self.dp is not None and not self.dp.wrapper_composes and result[0] is not None:
            self.dp.release()
        return result

    def _bound(self, server_round: int, kept: list[Message]) -> list[Message]:
        """Bound what one reply can do to the aggregate, relative to the round's other replies.

        ``norm_bound``: an update (reply minus the weights sent) whose L2 norm exceeds ``norm_bound``
        times the round's median update norm is clipped to that norm (``norm_action='clip'``) or
        dropped (``'drop'``). ``weight_cap``: a reply's ``num-examples`` weight is capped at
        ``weight_cap`` times the round's median claim. Both read only replies that passed the schema;
        what they changed is in :attr:`last` (``bounded``, ``dropped``)."""
        if not kept:
            return kept
        cids = [cid for cid, _, _ in self.last.kept]
        if self.norm_bound is not None and self._sent is not None:
            sent = self._sent
            deltas = [{k: a.numpy().astype(np.float64) - sent[k] for k, a in m.content[ARRAYS].items()} for m in kept]
            norms = [float(np.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))) for delta in deltas]
            bound = self.norm_bound * float(np.median(norms))
            out = []
            for cid, msg, delta, norm in zip(cids, kept, deltas, norms, strict=True):
                if norm <= bound:
                    out.append(msg)
                    continue
                if self.norm_action == "drop":
                    why = f"update norm {norm:.4g} beyond {self.norm_bound:g} x the round's median ({bound:.4g})"
                    self.last.dropped.append({"node-id": msg.metadata.src_node_id, "client": cid, "problems": [why]})
                    self.last.kept = [k for k in self.last.kept if k[0] != cid]
                    continue
                scale = bound / norm
                msg.content[ARRAYS] = ArrayRecord(
                    {k: Array((sent[k] + d * scale).astype(sent[k].dtype)) for k, d in delta.items()}
                )
                self.last.bounded.append({"client": cid, "update-norm": norm, "clipped-to": bound})
                out.append(msg)
            if len(out) < len(kept):
                log.warning("round %d: dropped %d updates beyond the norm bound", server_round, len(kept) - len(out))
            kept = out
        if self.weight_cap is not None and self.dp is None:
            cids = [cid for cid, _, _ in self.last.kept]
            claims = [int(m.content[METRICS][NUM_EXAMPLES]) for m in kept]
            cap = max(1, int(self.weight_cap * float(np.median(claims))))
            for cid, msg, claim in zip(cids, kept, claims, strict=True):
                if claim > cap:
                    msg.content[METRICS][NUM_EXAMPLES] = cap
                    self.last.bounded.append({"client": cid, NUM_EXAMPLES: claim, "weight": cap})
        return kept

    def _refuse(self, server_round: int, reason: str) -> tuple[None, None]:
        """No update this round, with the reason in the log; the run goes on from the weights it had.
        Under Flower's accounted DP wrapper a release it composed before failing stays counted (the
        epsilon reported is then an upper bound)."""
        self.last.refused = f"{reason}: no update this round"
        log.warning("round %d: %s", server_round, self.last.refused)
        return None, None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._pooled_asked[server_round] = bool(config.get(POOLED, False))
        return self.inner.configure_evaluate(server_round, arrays, config, self._bind_keys(grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        kept = self.screen(server_round, replies, self.evaluate_schema(self._pooled_asked.pop(server_round, False)))
        try:
            return self.inner.aggregate_evaluate(server_round, kept) if kept else None
        except Exception as err:  # noqa: BLE001 (the run's figures come from the guard's record, not this)
            log.warning("round %d: the strategy failed on the evaluation replies (%s)", server_round, _brief(err))
            return None
