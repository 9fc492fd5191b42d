"""The server guard around Flower's FedAvg: bad replies dropped, good ones averaged."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedse.strategy import GuardedStrategy

SHAPES = {"w": (2,), "b": (1,)}


def _msg(named: dict, n: int, pid: int) -> Message:
    instruction = Message(RecordDict({}), dst_node_id=10 + pid, message_type=MessageType.TRAIN)
    record = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in named.items()})
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": n}),
                          "client": ConfigRecord({"partition-id": pid})})
    return Message(content, reply_to=instruction)


def test_guard_drops_private_key_wrong_shape_and_nan_and_averages_the_rest(task_identity):
    guard = GuardedStrategy(FedAvg(), SHAPES, num_rounds=3)
    replies = [
        _msg({"w": [1.0, 2.0], "b": [0.0]}, 1, 0),
        _msg({"w": [5.0, 6.0], "b": [4.0]}, 3, 1),
        _msg({"w": [1.0, 1.0], "b": [1.0], "layer1.0.se.fc1.weight": [0.5]}, 100, 2),  # private key
        _msg({"w": [1.0, 1.0, 1.0], "b": [1.0]}, 100, 3),  # wrong shape
        _msg({"w": [np.nan, 1.0], "b": [1.0]}, 100, 4),  # NaN
        _msg({"w": [1.0, 1.0]}, 100, 5),  # missing key
    ]
    arrays, metrics = guard.aggregate_train(1, replies)
    # Hand-computed sample-weighted mean of the two valid replies (weights 1 and 3).
    np.testing.assert_allclose(arrays["w"].numpy(), [(1 * 1 + 3 * 5) / 4, (1 * 2 + 3 * 6) / 4])
    np.testing.assert_allclose(arrays["b"].numpy(), [3.0])
    assert metrics is not None
    dropped = {d["partition-id"]: " ".join(d["problems"]) for d in guard.log.dropped}
    assert set(dropped) == {2, 3, 4, 5}
    assert "outside the shared set" in dropped[2] and "layer1.0.se.fc1.weight" in dropped[2]
    assert "shape (3,)" in dropped[3]
    assert "non-finite" in dropped[4]
    assert "missing shared keys" in dropped[5]
    assert set(guard.log.train[1]) == {0, 1}


def test_guard_with_only_bad_replies_aggregates_nothing(task_identity):
    guard = GuardedStrategy(FedAvg(), SHAPES, num_rounds=1)
    arrays, metrics = guard.aggregate_train(1, [_msg({"w": [np.inf, 0.0], "b": [0.0]}, 5, 0)])
    assert arrays is None and metrics is None
    assert len(guard.log.dropped) == 1


def test_pooled_evaluation_is_requested_on_schedule():
    guard = GuardedStrategy(FedAvg(), SHAPES, num_rounds=6, pooled_every=4)
    assert [guard.wants_pooled(r) for r in range(1, 7)] == [False, False, False, True, False, True]


@pytest.mark.parametrize("name,cls", [("fedavg", "FedAvg"), ("fedprox", "FedProx"), ("fedadam", "FedAdam")])
def test_strategy_registry_builds_flowers_own_strategies(name, cls):
    from fedse.strategy import create_strategy
    from conftest import tiny_config

    strategy = create_strategy(tiny_config(server={"strategy": name, "min_train_clients": 3}))
    assert type(strategy).__name__ == cls and strategy.min_train_nodes == 3
    if name == "fedprox":
        assert strategy.proximal_mu == 0.01


def test_client_level_dp_wraps_the_strategy_with_flowers_wrapper():
    from fedse.strategy import create_strategy
    from conftest import tiny_config

    fixed = create_strategy(tiny_config(privacy={"mode": "client", "noise_multiplier": 1.0, "clipping_norm": 2.0}))
    assert type(fixed).__name__ == "DifferentialPrivacyServerSideFixedClipping"
    assert fixed.clipping_norm == 2.0 and fixed.num_sampled_clients == 3
    assert fixed.strategy.weighted_by_key == "unit-weight"
    adaptive = create_strategy(tiny_config(privacy={"mode": "client", "noise_multiplier": 1.0, "clipping": "adaptive",
                                                    "clipped_count_stddev": 1.0}))
    assert type(adaptive).__name__ == "DifferentialPrivacyServerSideAdaptiveClipping"
    from fedse.config import ConfigError

    with pytest.raises(ConfigError, match="clipped_count_stddev"):  # Flower's default 3/20 is too low here
        create_strategy(tiny_config(privacy={"mode": "client", "noise_multiplier": 1.0, "clipping": "adaptive"}))


def test_aggregation_does_not_depend_on_the_order_replies_arrive(task_identity):
    # float32 sums depend on their order: Flower's FedAvg alone gives different bits
    # for these four replies forwards and backwards; the guard sorts them by client first.
    values = [0.1, 0.7, 1e-4, 3.3]
    replies = [_msg({"w": [v, v], "b": [v]}, 1, pid) for pid, v in enumerate(values)]
    plain_forward, _ = FedAvg().aggregate_train(1, replies)
    plain_backward, _ = FedAvg().aggregate_train(1, replies[::-1])
    assert plain_forward["b"].numpy().tobytes() != plain_backward["b"].numpy().tobytes()
    forward, _ = GuardedStrategy(FedAvg(), SHAPES, num_rounds=1).aggregate_train(1, replies)
    backward, _ = GuardedStrategy(FedAvg(), SHAPES, num_rounds=1).aggregate_train(1, replies[::-1])
    for key in SHAPES:
        assert forward[key].numpy().tobytes() == backward[key].numpy().tobytes()
    assert forward["b"].numpy().tobytes() == plain_forward["b"].numpy().tobytes()  # client order 0, 1, 2, 3
