"""The server guard around Flower's FedAvg: bad replies dropped, good ones averaged."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedse.federation.strategy import GuardedStrategy
from fedse.records import evaluate_schema, train_schema

SHARED = {"w": torch.zeros(2), "b": torch.zeros(1)}


def _msg(named: dict, n: int, pid: int) -> Message:
    instruction = Message(RecordDict({}), dst_node_id=10 + pid, message_type=MessageType.TRAIN)
    record = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in named.items()})
    content = RecordDict(
        {"arrays": record, "metrics": MetricRecord({"num-examples": n}), "client": ConfigRecord({"client-id": pid})}
    )
    content["metrics"]["train-loss"], content["metrics"]["train-acc"] = 0.1, 0.5
    return Message(content, reply_to=instruction)


def _guard(**kw):
    return GuardedStrategy(
        kw.pop("inner", FedAvg()),
        train_schema(SHARED, dp_sample=False, digests=False, max_examples=100),
        lambda pooled: evaluate_schema(pooled=pooled, max_examples=100, max_train=100),
        **kw,
    )


def test_pooled_evaluation_is_requested_on_schedule():
    from fedse.analysis.report import RunLog
    from fedse.federation.server import RunRecorder

    every_4 = RunRecorder(_guard(), RunLog(), num_rounds=6, pooled_every=4)
    assert [every_4.wants_pooled(r) for r in range(1, 7)] == [False, False, False, True, False, True]
    never = RunRecorder(_guard(), RunLog(), num_rounds=6, pooled_every=None)
    assert not any(never.wants_pooled(r) for r in range(1, 7))


@pytest.mark.parametrize("name,cls", [("fedavg", "FedAvg"), ("fedprox", "FedProx"), ("fedadam", "FedAdam")])
def test_strategy_registry_builds_flowers_own_strategies(name, cls):
    from conftest import tiny_config

    from fedse.federation.strategy import create_strategy

    strategy = create_strategy(tiny_config(server={"strategy": name, "min_train_clients": 3}))
    assert type(strategy).__name__ == cls and strategy.min_train_nodes == 3
    if name == "fedprox":
        assert strategy.proximal_mu == 0.01


def test_client_level_dp_wraps_the_strategy_with_flowers_wrapper():
    from conftest import tiny_config

    from fedse.federation.strategy import create_strategy
    from fedse.privacy import make_client_dp

    def build(**privacy):
        cfg = tiny_config(privacy={"mode": "client", "noise_multiplier": 1.0, **privacy})
        dp = make_client_dp(cfg, 3, 3)
        return create_strategy(cfg, dp), dp

    fixed, dp = build(clipping_norm=2.0)
    assert type(fixed).__name__ == "DifferentialPrivacyServerSideFixedClipping"
    assert fixed.clipping_norm == 2.0 and fixed.num_sampled_clients == 3
    assert fixed.accountant is dp.accountant  # Flower's accounted mode: count, equal weights, no amplification
    assert fixed.strategy.weighted_by_key == "unit-weight"
    adaptive, _ = build(clipping="adaptive", clipped_count_stddev=1.5)
    assert type(adaptive).__name__ == "AdaptiveClipping"
    from fedse.config import ConfigError

    with pytest.raises(ConfigError, match="clipped_count_stddev"):  # Flower's default 3/20 is too low here
        build(clipping="adaptive")


def test_aggregation_does_not_depend_on_the_order_replies_arrive(task_identity):
    # float32 sums depend on their order: Flower's FedAvg alone gives different bits
    # for these four replies forwards and backwards; the guard sorts them by client first.
    values = [0.1, 0.7, 1e-4, 3.3]
    replies = [_msg({"w": [v, v], "b": [v]}, 1, pid) for pid, v in enumerate(values)]
    plain_forward, _ = FedAvg().aggregate_train(1, replies)
    plain_backward, _ = FedAvg().aggregate_train(1, replies[::-1])
    assert plain_forward["b"].numpy().tobytes() != plain_backward["b"].numpy().tobytes()
    forward, _ = _guard().aggregate_train(1, replies)
    backward, _ = _guard().aggregate_train(1, replies[::-1])
    for key in SHARED:
        assert forward[key].numpy().tobytes() == backward[key].numpy().tobytes()
    assert forward["b"].numpy().tobytes() == plain_forward["b"].numpy().tobytes()  # client order 0, 1, 2, 3


def test_aggregated_metrics_are_the_example_weighted_means(task_identity):
    # Train: 10 and 30 examples, train-loss 0.2 and 0.6, train-acc 0.5 and 0.25.
    replies = [_msg({"w": [1.0, 1.0], "b": [1.0]}, n, pid) for pid, n in enumerate((10, 30))]
    for reply, (loss, acc) in zip(replies, ((0.2, 0.5), (0.6, 0.25)), strict=True):
        reply.content["metrics"]["train-loss"], reply.content["metrics"]["train-acc"] = loss, acc
    guard = _guard()
    _, metrics = guard.aggregate_train(1, replies)
    assert set(metrics) == {"train-loss", "train-acc"}
    assert metrics["train-loss"] == pytest.approx((10 * 0.2 + 30 * 0.6) / 40)  # 0.5
    assert metrics["train-acc"] == pytest.approx((10 * 0.5 + 30 * 0.25) / 40)  # 0.3125
    # Evaluate: 5 and 15 test examples, local-acc 0.8 and 0.4, local-loss 1.0 and 3.0.
    evaluated = []
    for pid, (n, acc, loss) in enumerate(((5, 0.8, 1.0), (15, 0.4, 3.0))):
        instruction = Message(RecordDict({}), dst_node_id=10 + pid, message_type=MessageType.EVALUATE)
        content = RecordDict(
            {
                "metrics": MetricRecord({"num-examples": n, "local-acc": acc, "local-loss": loss}),
                "client": ConfigRecord({"client-id": pid, "num-train": 50}),
            }
        )
        evaluated.append(Message(content, reply_to=instruction))
    metrics = guard.aggregate_evaluate(1, evaluated)
    assert set(metrics) == {"local-acc", "local-loss"}
    assert metrics["local-acc"] == pytest.approx((5 * 0.8 + 15 * 0.4) / 20)  # 0.5
    assert metrics["local-loss"] == pytest.approx((5 * 1.0 + 15 * 3.0) / 20)  # 2.5
    assert {cid for cid, _, _ in guard.last.kept} == {0, 1} and not guard.last.dropped
