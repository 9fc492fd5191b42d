"""Client-level DP under faults: the noise is sized for the replies averaged or the round is
refused; the server sets the weights; the epsilon is Flower's accountant over the releases made
(pinned by hand, cross-checked against Opacus), per round, and survives a resume."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from fedse.analysis.report import RunLog
from fedse.federation.strategy import GuardedStrategy, create_strategy
from fedse.privacy import client_level_epsilon, client_noise_multiplier, make_client_dp
from fedse.records import evaluate_schema, train_schema

DIM = 20_000
SHARED = {"w": torch.zeros(DIM)}


class _Nodes:
    """Only what Flower's FedAvg.configure_train asks of a Grid: the connected node ids."""

    def __init__(self, n: int) -> None:
        self.ids = list(range(100, 100 + n))

    def get_node_ids(self):
        return self.ids


def _cfg(clipping="fixed", sigma=1.0, num_clients=10):
    extra = {"clipped_count_stddev": 10.0} if clipping == "adaptive" else {}
    return tiny_config(
        partition={"num_clients": num_clients},
        server={"rounds": 20},
        privacy={"mode": "client", "noise_multiplier": sigma, "clipping": clipping, "clipping_norm": 1.0, **extra},
    )


def _guard(cfg, dp, n_nodes=10):
    guard = GuardedStrategy(
        create_strategy(cfg, dp),
        train_schema(SHARED, dp_sample=False, digests=False, max_examples=1000),
        lambda pooled: evaluate_schema(pooled=pooled, max_examples=1000, max_train=1000),
        dp=dp,
        expected_nodes=n_nodes,
    )
    zeros = ArrayRecord({"w": Array(np.zeros(DIM, np.float32))})
    messages = list(guard.configure_train(1, zeros, ConfigRecord({}), _Nodes(n_nodes)))
    return guard, messages


def _reply(to: Message, value: float, pid: int, metrics=None) -> Message:
    metrics = metrics or {"num-examples": 5, "train-loss": 0.1, "train-acc": 0.5}
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.full(DIM, value, np.float32))}),
            "metrics": MetricRecord(metrics),
            "client": ConfigRecord({"client-id": pid}),
        }
    )
    return Message(content, reply_to=to)


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_ten_configured_three_replies_is_refused(task_identity, clipping):
    cfg = _cfg(clipping)
    dp = make_client_dp(cfg, 10, 10)
    guard, sent = _guard(cfg, dp)
    assert len(sent) == 10
    arrays, _ = guard.aggregate_train(1, [_reply(m, 0.001, i) for i, m in enumerate(sent[:3])])
    assert arrays is None  # averaging 3 with noise for 10 would be sigma_eff = 0.3
    assert guard.last.refused == "3 usable replies, the noise is sized for 10: no release and no update this round"
    assert dp.releases == 0 and dp.epsilon() == 0.0


def test_a_dropped_reply_counts_as_missing(task_identity):
    cfg = _cfg()
    dp = make_client_dp(cfg, 10, 10)
    guard, sent = _guard(cfg, dp)
    replies = [_reply(m, 0.001, i) for i, m in enumerate(sent)]
    replies[0] = _reply(
        sent[0], 0.001, 0, {"num-examples": 5, "train-loss": 0.1, "train-acc": 0.5, "unit-weight": -1.99}
    )  # a client trying to set its own weight
    assert guard.aggregate_train(1, replies)[0] is None
    assert "unit-weight" in guard.last.dropped[0]["problems"][0] and dp.releases == 0


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_full_round_noise_on_the_mean_is_sigma_c_over_n_and_weights_are_equal(task_identity, clipping):
    cfg = _cfg(clipping, sigma=2.0)
    dp = make_client_dp(cfg, 10, 10)
    guard, sent = _guard(cfg, dp)
    # Updates far inside the clipping bound (norm 0.001 * sqrt(DIM) = 0.14 < 1); num-examples differ
    # (1..10), but under client-level DP the server weighs every client equally.
    values = [0.001 * (i + 1) for i in range(10)]
    replies = [
        _reply(m, v, i, {"num-examples": i + 1, "train-loss": 0.1, "train-acc": 0.5})
        for i, (m, v) in enumerate(zip(sent, values, strict=True))
    ]
    np.random.seed(1)
    arrays, _ = guard.aggregate_train(1, replies)
    noise = arrays["w"].numpy().astype(np.float64) - np.mean(values)
    # sigma * C / n, with C the bound the updates were clipped to (1.0). Under adaptive clipping Flower
    # splits sigma between the update (sigma_u, larger) and the clipped-count query.
    sigma_u = 2.0 if clipping == "fixed" else guard.inner.noise_multiplier
    assert sigma_u == pytest.approx(2.0 if clipping == "fixed" else (2.0**-2 - 10.0**-2) ** -0.5)
    expected_std = sigma_u * 1.0 / 10
    assert abs(noise.mean()) < 5 * expected_std / math.sqrt(DIM)  # centred on the unweighted mean
    assert noise.std() == pytest.approx(expected_std, rel=0.03)
    assert dp.releases == 1
    assert dp.epsilon() == pytest.approx(client_level_epsilon(dp.noise_multiplier, 1, cfg.privacy.delta))


def test_pinned_and_hand_computed_client_level_epsilon():
    sigma, rounds, delta = 1.0, 20, 1e-5
    eps = client_level_epsilon(sigma, rounds, delta)
    assert eps == pytest.approx(30.1266311039, abs=1e-8)  # pinned (dp-accounting 0.6, Flower's RDP accountant)
    # By hand: the Gaussian mechanism's RDP is alpha / (2 sigma^2) per release; the accountant
    # converts with eps = rdp + log((a-1)/a) - (log(delta) + log(a)) / (a-1), minimised over its orders.
    alphas = np.linspace(1.01, 64, 200_000)
    by_hand = np.min(
        rounds * alphas / (2 * sigma**2)
        + np.log((alphas - 1) / alphas)
        - (np.log(delta) + np.log(alphas)) / (alphas - 1)
    )
    assert by_hand <= eps <= by_hand * 1.001  # the accountant's order grid is coarser than this one
    # Opacus's RDP accountant on the same releases (sample rate 1): the same figure within 1%.
    opacus = RDPAccountant()
    opacus.history = [(sigma, 1.0, rounds)]
    assert opacus.get_epsilon(delta) == pytest.approx(eps, rel=0.01)


def test_target_epsilon_is_met_by_the_accountant_that_reports_it():
    cfg = tiny_config(server={"rounds": 20}, privacy={"mode": "client", "target_epsilon": 8.0})
    sigma = client_noise_multiplier(cfg)
    assert client_level_epsilon(sigma, 20, cfg.privacy.delta) == pytest.approx(8.0, rel=1e-4)
    assert client_level_epsilon(sigma, 20, cfg.privacy.delta) <= 8.0 + 1e-6


def test_resumed_epsilon_equals_one_accountant_over_all_rounds(tmp_path):
    from fedse.checkpoint import load_checkpoint, save_checkpoint

    cfg = _cfg(sigma=1.3)
    dp = make_client_dp(cfg, 10, 10)
    for _ in range(3):
        dp.release()
    save_checkpoint(tmp_path, cfg, 3, ArrayRecord({"w": Array(np.zeros(DIM, np.float32))}), RunLog(), dp)
    ckpt = load_checkpoint(tmp_path, cfg, SHARED)
    ledger = ckpt.accountant
    assert ckpt.round == 3
    resumed = make_client_dp(_cfg(sigma=2.0), 10, 10)  # the rest of the run with another sigma
    resumed.load_state(ledger)
    resumed.release()
    resumed.release()
    # One accountant that saw all five releases.
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    from fedse.privacy import _accountant

    single = _accountant(cfg.privacy.delta, 10)
    single.compose(GaussianPrivacyEvent(1.3, 10, 10), 3)
    single.compose(GaussianPrivacyEvent(2.0, 10, 10), 2)
    assert resumed.releases == 5
    assert resumed.epsilon() == pytest.approx(single.get_epsilon(cfg.privacy.delta), rel=1e-12)
    assert resumed.epsilon() > client_level_epsilon(2.0, 5, cfg.privacy.delta)  # the history counts


def test_adaptive_noise_uses_the_bound_the_updates_were_clipped_to(task_identity):
    # Every update is far outside the bound, so every one is clipped and the bound shrinks before
    # the noise is drawn; Flower 1.42 would scale the noise to the shrunk bound.
    cfg = _cfg("adaptive", sigma=2.0)
    dp = make_client_dp(cfg, 10, 10)
    guard, sent = _guard(cfg, dp)
    np.random.seed(3)
    arrays, _ = guard.aggregate_train(1, [_reply(m, 0.1 * (i + 1), i) for i, m in enumerate(sent)])
    assert guard.inner.clipping_norm < 0.95  # the bound moved
    noise = arrays["w"].numpy().astype(np.float64) - 1.0 / math.sqrt(DIM)  # each clipped update: norm 1
    assert noise.std() == pytest.approx(guard.inner.noise_multiplier * 1.0 / 10, rel=0.03)


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_a_zero_update_does_not_stop_the_server(task_identity, clipping):
    """A reply equal to the weights sent (a zero update) passes the schema; Flower's clipping divides
    by its norm. The round is refused with the reason, and the next round runs."""
    cfg = _cfg(clipping)
    dp = make_client_dp(cfg, 10, 10)
    guard, sent = _guard(cfg, dp)
    replies = [_reply(m, 0.001, m.metadata.dst_node_id - 100) for m in sent[:9]]
    replies.append(_reply(sent[9], 0.0, sent[9].metadata.dst_node_id - 100))
    arrays, _ = guard.aggregate_train(1, replies)
    assert arrays is None and "ZeroDivisionError" in guard.last.refused and "no update" in guard.last.refused
    zeros = ArrayRecord({"w": Array(np.zeros(DIM, np.float32))})
    again = list(guard.configure_train(2, zeros, ConfigRecord({}), _Nodes(10)))
    arrays, _ = guard.aggregate_train(2, [_reply(m, 0.001, m.metadata.dst_node_id - 100) for m in again])
    assert arrays is not None and guard.last.refused is None, guard.last.refused


def test_client_level_dp_with_nothing_shared_is_refused_before_the_first_round():
    from fedse.config import ConfigError
    from fedse.federation.server import _start

    cfg = tiny_config(personalization={"policy": "local"}, privacy={"mode": "client", "noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="policy 'local' shares none"):
        _start(cfg, None, cfg.partition.num_clients)


def test_adaptive_clipping_releases_exactly_the_configured_noise_multiplier():
    """Sigma 1, 10 clients, count noise std 2 (the audit's case). The release is the clipped sum
    (sensitivity C, noise std sigma_u * C) and the raw clipped count (sensitivity 1: one client's bit,
    noise std 2); its noise multiplier is (sigma_u^-2 + 2^-2)^-1/2. fedse's split makes it 1, the
    configured sigma, so the accountant's epsilon is the release's; Flower's split (for a count of
    sensitivity 1/2) leaves 0.918, whose epsilon after 20 rounds is 33.9, not the 30.1 reported."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg

    from fedse.federation.strategy import AdaptiveClipping

    z, s, rounds, delta = 1.0, 2.0, 20, 1e-5
    released = lambda sigma_u: (sigma_u**-2 + s**-2) ** -0.5  # noqa: E731
    ours = AdaptiveClipping(FedAvg(), z, 10, clipped_count_stddev=s).noise_multiplier
    flowers = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), z, 10, clipped_count_stddev=s).noise_multiplier
    assert released(ours) == pytest.approx(z, abs=1e-12)
    assert released(flowers) == pytest.approx(0.918, abs=5e-4)
    cfg = _cfg("adaptive", sigma=z)
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, clipped_count_stddev=s, delta=delta))
    dp = make_client_dp(cfg, 10, 10)
    for _ in range(rounds):
        dp.release()
    # An independent accountant (Opacus's RDP) on the noise the release actually carries.
    for sigma_u, reported in ((ours, dp.epsilon()), (flowers, 30.1)):
        opacus = RDPAccountant()
        opacus.history = [(released(sigma_u), 1.0, rounds)]
        actual = opacus.get_epsilon(delta)
        if sigma_u == ours:
            assert actual == pytest.approx(reported, rel=0.01)
        else:
            assert actual == pytest.approx(33.9, abs=0.2) and actual > reported + 3
    with pytest.raises(ValueError, match="must exceed the noise multiplier"):
        AdaptiveClipping(FedAvg(), 2.0, 10, clipped_count_stddev=2.0)


def test_a_second_reply_from_a_node_is_dropped_and_never_decoded(task_identity):
    """Two replies from one node (Flower's SuperLink refuses the second today): the recorder reads the
    clipped update of the reply the guard kept, never the dropped one, whatever it holds."""
    from fedse.federation.server import RunRecorder

    cfg = _cfg("fixed")
    dp = make_client_dp(cfg, 10, 10)
    guard, _ = _guard(cfg, dp)
    recorder = RunRecorder(guard, RunLog(), num_rounds=3)
    zeros = ArrayRecord({"w": Array(np.zeros(DIM, np.float32))})
    sent = list(recorder.configure_train(2, zeros, ConfigRecord({}), _Nodes(10)))  # (_guard configured round 1)
    replies = [_reply(m, 0.001, m.metadata.dst_node_id - 100) for m in sent]
    garbage = Message(RecordDict({"arrays": ConfigRecord({"w": "x"})}), reply_to=sent[0])
    arrays, _ = recorder.aggregate_train(2, [*replies, garbage])
    assert arrays is not None and len(recorder.log.dropped) == 1
    assert recorder.log.dropped[0]["node-id"] == sent[0].metadata.dst_node_id
    rows = recorder.log.train[2]
    assert len(rows) == 10 and all(r["update-norm-aggregated"] <= 1.0 + 1e-6 for r in rows.values())
