"""The server's guard: every crafted reply is dropped with its reason, and the aggregate of the
honest replies equals Flower's FedAvg over them alone; the guard never raises."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedse.federation.strategy import GuardedStrategy
from fedse.records import evaluate_schema, train_schema
from fedse.spec import resolve

SHARED = {"w": torch.zeros(2), "b": torch.zeros(1)}
CAP = 1000


def _guard(**kw) -> GuardedStrategy:
    return GuardedStrategy(
        kw.pop("inner", FedAvg()),
        train_schema(SHARED, dp_sample=False, digests=False, max_examples=CAP),
        lambda pooled: evaluate_schema(pooled=pooled, max_examples=CAP, max_train=CAP),
        **kw,
    )


def _kept(guard: GuardedStrategy) -> set[int]:
    return {cid for cid, _, _ in guard.last.kept}


def _content(arrays=None, metrics=None, client=None, *, w=(1.0, 2.0), b=(0.0,), n=1, pid=0, dtype=np.float32):
    arrays = arrays if arrays is not None else {"w": np.asarray(w, dtype=dtype), "b": np.asarray(b, dtype=dtype)}
    metrics = metrics if metrics is not None else {"num-examples": n, "train-loss": 0.5, "train-acc": 0.75}
    client = client if client is not None else {"client-id": pid}
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord(metrics),
            "client": ConfigRecord(client),
        }
    )


def _reply(content: RecordDict, node: int, kind: str = MessageType.TRAIN) -> Message:
    instruction = Message(RecordDict({}), dst_node_id=node, message_type=kind)
    return Message(content, reply_to=instruction)


def _error(node: int) -> Message:
    instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(error=Error(code=0, reason="ClientAppException: boom"), reply_to=instruction)


def _honest():
    return [
        _reply(_content(w=(1.0, 2.0), b=(0.0,), n=1, pid=0), 100),
        _reply(_content(w=(5.0, 6.0), b=(4.0,), n=3, pid=1), 101),
    ]


def _crafted_metrics(**change):
    m = {"num-examples": 5, "train-loss": 0.5, "train-acc": 0.75}
    m.update(change)
    return {k: v for k, v in m.items() if v is not None}


# (name, content, the reason the guard must give): one crafted reply per attack seen on the old guard.
ATTACKS = [
    ("huge num-examples", _content(metrics=_crafted_metrics(**{"num-examples": 10**12}), pid=2), "num-examples"),
    ("negative num-examples", _content(metrics=_crafted_metrics(**{"num-examples": -3}), pid=3), "num-examples"),
    ("NaN num-examples", _content(metrics=_crafted_metrics(**{"num-examples": float("nan")}), pid=4), "num-examples"),
    ("inf num-examples", _content(metrics=_crafted_metrics(**{"num-examples": float("inf")}), pid=5), "num-examples"),
    ("zero num-examples", _content(metrics=_crafted_metrics(**{"num-examples": 0}), pid=6), "num-examples"),
    ("client-set unit-weight", _content(metrics=_crafted_metrics(**{"unit-weight": 10**6}), pid=7), "unit-weight"),
    ("float64 arrays", _content(dtype=np.float64, pid=8), "dtype float64"),
    ("complex arrays", _content(dtype=np.complex64, pid=9), "dtype complex64"),
    ("missing metric", _content(metrics=_crafted_metrics(**{"train-acc": None}), pid=10), "missing metrics"),
    ("extra metric", _content(metrics=_crafted_metrics(extra=1.0), pid=11), "unexpected metrics"),
    ("list-valued metric", _content(metrics=_crafted_metrics(**{"train-loss": [0.1, 0.2]}), pid=12), "train-loss"),
    ("metric out of range", _content(metrics=_crafted_metrics(**{"train-acc": 5.0}), pid=13), "train-acc"),
    ("non-integer client-id", _content(client={"client-id": "abc"}), "client-id"),
    ("bytes client-id", _content(client={"client-id": b"\x00\xff"}), "client-id"),
    ("extra client field", _content(client={"client-id": 14, "note": "x"}), "unexpected client fields"),
    (
        "private key",
        _content(
            arrays={
                "w": np.ones(2, np.float32),
                "b": np.ones(1, np.float32),
                "layer1.0.se.fc1.weight": np.ones(1, np.float32),
            },
            pid=15,
        ),
        "outside the shared",
    ),
    ("wrong shape", _content(arrays={"w": np.ones(3, np.float32), "b": np.ones(1, np.float32)}, pid=16), "shape (3,)"),
    ("NaN array", _content(w=(np.nan, 1.0), pid=17), "non-finite"),
    ("missing array key", _content(arrays={"w": np.ones(2, np.float32)}, pid=18), "missing shared keys"),
]


def _with_extra_records():
    extra_metric = _content(pid=19)
    extra_metric["more"] = MetricRecord({"x": 1.0})
    extra_arrays = _content(pid=20)
    extra_arrays["arrays2"] = ArrayRecord({"w": Array(np.ones(2, np.float32))})
    no_metrics = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.ones(2, np.float32)), "b": Array(np.ones(1, np.float32))}),
            "client": ConfigRecord({"client-id": 21}),
        }
    )
    return [
        ("extra MetricRecord", extra_metric, "unexpected records"),
        ("extra ArrayRecord", extra_arrays, "unexpected records"),
        ("no metrics", no_metrics, "no 'metrics' record"),
    ]


ALL_ATTACKS = ATTACKS + _with_extra_records()


def _fedavg_over(replies):
    arrays, _ = FedAvg().aggregate_train(1, [copy.deepcopy(r) for r in replies])
    return {k: v.numpy() for k, v in arrays.items()}


@pytest.mark.parametrize("name,content,reason", ALL_ATTACKS, ids=[a[0] for a in ALL_ATTACKS])
def test_each_crafted_reply_is_dropped_and_the_rest_is_fedavg_of_the_honest(task_identity, name, content, reason):
    expected = _fedavg_over(_honest())
    guard = _guard()
    arrays, metrics = guard.aggregate_train(1, [_reply(content, 200), *_honest()])
    assert arrays is not None and metrics is not None
    for key, value in expected.items():
        assert arrays[key].numpy().tobytes() == value.tobytes()
    assert arrays["w"].numpy().dtype == np.float32
    [dropped] = guard.last.dropped
    assert dropped["node-id"] == 200 and reason in " ".join(dropped["problems"]), dropped
    assert _kept(guard) == {0, 1}
    json.dumps(guard.last.dropped)  # whatever the client sent, the log stays JSON


def test_all_attacks_at_once_leave_exactly_fedavg_of_the_honest(task_identity):
    guard = _guard()
    crafted = [_reply(content, 300 + i) for i, (_, content, _) in enumerate(ALL_ATTACKS)]
    arrays, _ = guard.aggregate_train(1, crafted + _honest())
    expected = _fedavg_over(_honest())
    assert all(arrays[k].numpy().tobytes() == v.tobytes() for k, v in expected.items())
    assert len(guard.last.dropped) == len(ALL_ATTACKS)
    # hand-computed: weights 1 and 3
    np.testing.assert_allclose(arrays["w"].numpy(), [(1 + 15) / 4, (2 + 18) / 4])


def test_huge_num_examples_within_the_cap_is_only_the_cap(task_identity):
    # A claim of exactly CAP passes and weighs CAP; CAP + 1 and 10**12 are beyond the schema's cap and dropped.
    at_cap = _reply(_content(w=(10.0, 20.0), b=(30.0,), n=CAP, pid=2), 102)
    over = [
        _reply(_content(w=(1e6, 1e6), b=(1e6,), n=CAP + 1, pid=3), 103),
        _reply(_content(w=(-1e6, 1e6), b=(-1e6,), n=10**12, pid=4), 104),
    ]
    guard = _guard()
    arrays, _ = guard.aggregate_train(1, [*_honest(), at_cap, *over])
    assert _kept(guard) == {0, 1, 2}
    assert [d["node-id"] for d in guard.last.dropped] == [103, 104]
    assert all(f"allowed an integer in [1, {CAP}]" in d["problems"][0] for d in guard.last.dropped)
    assert [checked.metrics["num-examples"] for _, _, checked in guard.last.kept] == [1, 3, CAP]
    # hand-computed weighted mean, weights 1, 3 and CAP (w: 1, 2 | 5, 6 | 10, 20; b: 0 | 4 | 30)
    total = 1 + 3 + CAP
    np.testing.assert_allclose(
        arrays["w"].numpy(), [(1 + 15 + 10 * CAP) / total, (2 + 18 + 20 * CAP) / total], rtol=1e-6
    )
    np.testing.assert_allclose(arrays["b"].numpy(), [(12 + 30 * CAP) / total], rtol=1e-6)

    # Under the server's weight cap the claim of CAP weighs only 2 x the median claim (median of 1, 3, CAP: 3).
    guard = _guard(weight_cap=2.0)
    arrays, _ = guard.aggregate_train(1, [*_honest(), copy.deepcopy(at_cap), *copy.deepcopy(over)])
    assert guard.last.bounded == [{"client": 2, "num-examples": CAP, "weight": 6}]
    np.testing.assert_allclose(arrays["w"].numpy(), [(1 + 15 + 60) / 10, (2 + 18 + 120) / 10], rtol=1e-6)
    np.testing.assert_allclose(arrays["b"].numpy(), [(12 + 180) / 10], rtol=1e-6)


def test_an_error_reply_does_not_stop_the_round(task_identity):
    guard = _guard()
    arrays, _ = guard.aggregate_train(1, [_error(500), *_honest()])
    expected = _fedavg_over(_honest())
    assert all(arrays[k].numpy().tobytes() == v.tobytes() for k, v in expected.items())
    assert guard.last.failed[0]["node-id"] == 500 and "boom" in guard.last.failed[0]["reason"]


def test_identity_comes_from_the_node_and_a_spoofed_id_cannot_overwrite_a_row(task_identity):
    guard = _guard()
    guard.aggregate_train(1, _honest())
    # Round 2: node 666 claims client 0's id; node 101 (client 1) claims 0 as well.
    spoof = _reply(_content(w=(100.0, 100.0), b=(100.0,), n=3, pid=0), 666)
    switch = _reply(_content(w=(9.0, 9.0), b=(9.0,), n=3, pid=0), 101)
    arrays, _ = guard.aggregate_train(2, [spoof, switch, _reply(_content(n=1, pid=0), 100)])
    assert {d["node-id"] for d in guard.last.dropped} == {666, 101}
    assert "already belongs to node 100" in guard.last.dropped[0]["problems"][0]
    assert "bound to 1" in guard.last.dropped[1]["problems"][0]
    assert [(cid, node) for cid, node, _ in guard.last.kept] == [(0, 100)]
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 2.0])


def test_only_checked_fields_reach_the_run_log(task_identity):
    from fedse.analysis.report import RunLog
    from fedse.federation.server import RunRecorder

    recorder = RunRecorder(_guard(), RunLog(), num_rounds=3, round_offset=4)
    extra = _content(n=1, pid=2)
    extra["client"]["note"] = "<script>"  # an extra client field: the reply is dropped, not logged
    recorder.aggregate_train(1, [*_honest(), _reply(extra, 102)])
    assert recorder.log.train[5][0] == {
        "node-id": 100,
        "client-id": 0,
        "num-examples": 1,
        "train-loss": 0.5,
        "train-acc": 0.75,
        "update-norm": None,
        "update-norm-aggregated": None,
    }
    assert set(recorder.log.train[5]) == {0, 1}
    assert [(d["round"], d["node-id"]) for d in recorder.log.dropped] == [(5, 102)]


def _eval_reply(node, pid, acc, n=10, pooled=False, **extra):
    metrics = {"num-examples": n, "local-acc": acc, "local-loss": 0.3, **extra}
    if pooled:
        metrics |= {"pooled-acc": 0.5, "pooled-loss": 0.9}
    return _reply(
        RecordDict({"metrics": MetricRecord(metrics), "client": ConfigRecord({"client-id": pid, "num-train": 30})}),
        node,
        MessageType.EVALUATE,
    )


def test_evaluate_replies_are_screened(task_identity):
    guard = _guard()
    replies = [
        _eval_reply(100, 0, 0.5, n=10),
        _eval_reply(101, 1, 1.0, n=30),
        _eval_reply(102, 2, 7.0),
        _eval_reply(103, 3, 0.5, n=10**9),
        _eval_reply(104, 4, 0.5, pooled=True),
        _eval_reply(105, 5, float("nan")),
    ]
    metrics = guard.aggregate_evaluate(1, replies)
    assert metrics["local-acc"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)  # weighted by the honest counts
    assert {d["node-id"] for d in guard.last.dropped} == {102, 103, 104, 105}
    assert _kept(guard) == {0, 1}


# ---------------------------------------------------------------------------- properties

_names = st.sampled_from(
    [
        "arrays",
        "metrics",
        "client",
        "config",
        "w",
        "b",
        "num-examples",
        "train-loss",
        "train-acc",
        "client-id",
        "unit-weight",
        "x",
    ]
)
_scalars = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(0, 3), max_size=3),
    st.lists(st.floats(-1, 1), max_size=3),
)
_dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int8, np.complex64, np.bool_])


@st.composite
def _arrays(draw):
    out = {}
    for name in draw(st.lists(_names, max_size=4, unique=True)):
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
        values = draw(
            st.lists(
                st.floats(allow_nan=True, allow_infinity=True, width=32),
                min_size=int(np.prod(shape)),
                max_size=int(np.prod(shape)),
            )
        )
        with np.errstate(all="ignore"):  # NaN/inf cast to integer dtypes: whatever bits result are fine
            out[name] = Array(np.asarray(values, dtype=np.float64).reshape(shape).astype(draw(_dtypes)))
    return ArrayRecord(out)


def _metric_value(v):
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


@st.composite
def _records(draw):
    content = RecordDict({})
    for name in draw(st.lists(_names, max_size=4, unique=True)):
        kind = draw(st.sampled_from(["arrays", "metrics", "config"]))
        if kind == "arrays":
            content[name] = draw(_arrays())
        elif kind == "metrics":
            items = draw(st.dictionaries(_names, _scalars, max_size=4))
            content[name] = MetricRecord(
                {
                    k: v
                    for k, v in items.items()
                    if _metric_value(v) is not None or isinstance(v, list) and all(isinstance(x, int) for x in v)
                }
            )
        else:
            content[name] = ConfigRecord(draw(st.dictionaries(_names, _scalars, max_size=4)))
    return content


def _conforms(content: RecordDict) -> bool:
    """The schema, written out independently of fedse.records."""
    if set(content.keys()) != {"arrays", "metrics", "client"}:
        return False
    arrays, metrics, client = content["arrays"], content["metrics"], content["client"]
    ok_arrays = set(arrays.keys()) == {"w", "b"} and all(
        arrays[k].numpy().dtype == np.float32
        and arrays[k].numpy().shape == tuple(SHARED[k].shape)
        and np.isfinite(arrays[k].numpy()).all()
        for k in ("w", "b")
    )
    n = metrics.get("num-examples")
    ok_metrics = (
        set(metrics.keys()) == {"num-examples", "train-loss", "train-acc"}
        and type(n) is int
        and 1 <= n <= CAP
        and all(type(metrics[k]) in (int, float) and math.isfinite(metrics[k]) for k in ("train-loss", "train-acc"))
        and metrics["train-loss"] >= 0
        and 0 <= metrics["train-acc"] <= 1
    )
    pid = client.get("client-id")
    return ok_arrays and ok_metrics and set(client.keys()) == {"client-id"} and type(pid) is int and pid >= 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.lists(_records(), min_size=1, max_size=4))
def test_guard_never_raises_and_passes_only_conforming_replies(task_identity, contents):
    guard = _guard()
    replies = [_reply(c, 1000 + i) for i, c in enumerate(contents)]
    conforming = [i for i, c in enumerate(contents) if _conforms(c)]
    guard.aggregate_train(1, replies + _honest())
    assert len(guard.last.dropped) == len(contents) - len(conforming)
    assert {d["node-id"] for d in guard.last.dropped} == {1000 + i for i in range(len(contents))} - {
        1000 + i for i in conforming
    }
    json.dumps(guard.last.dropped)


_MUTATIONS = {
    "num-examples": lambda c, v: c["metrics"].__setitem__("num-examples", v),
    "train-acc": lambda c, v: c["metrics"].__setitem__("train-acc", v),
    "client-id": lambda c, v: c["client"].__setitem__("client-id", v),
    "w": lambda c, v: c["arrays"].__setitem__("w", Array(np.asarray([v, 0.0], dtype=np.float32))),
}
_BAD = {
    "num-examples": st.one_of(st.integers(max_value=0), st.integers(min_value=CAP + 1), st.floats()),
    "train-acc": st.one_of(
        st.floats(min_value=1.0, exclude_min=True), st.floats(max_value=0, exclude_max=True), st.just(float("nan"))
    ),
    "client-id": st.one_of(st.integers(max_value=-1), st.text(max_size=3), st.floats()),
    "w": st.sampled_from([float("nan"), float("inf"), -float("inf")]),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_bad_value_in_an_otherwise_valid_reply_is_dropped(task_identity, data):
    keys = data.draw(st.lists(st.sampled_from(sorted(_MUTATIONS)), min_size=1, max_size=4, unique=True))
    content = _content(n=2, pid=7)
    for key in keys:
        _MUTATIONS[key](content, data.draw(_BAD[key]))
    guard = _guard()
    arrays, _ = guard.aggregate_train(1, [_reply(content, 900), *_honest()])
    assert len(guard.last.dropped) == 1
    expected = _fedavg_over(_honest())
    assert all(arrays[k].numpy().tobytes() == v.tobytes() for k, v in expected.items())


def test_rebuilt_arrays_keep_the_shared_key_order(task_identity):
    # Flower's DP wrappers pair a reply's arrays with the sent ones by position.
    guard = _guard()
    reordered = _content(arrays={"b": np.zeros(1, np.float32), "w": np.zeros(2, np.float32)}, pid=0)
    [kept] = guard.screen(1, [_reply(reordered, 100)], guard.train_schema)
    assert list(kept.content["arrays"].keys()) == list(SHARED)


class _Nodes:
    def __init__(self, n: int) -> None:
        self.ids = list(range(100, 100 + n))

    def get_node_ids(self):
        return self.ids


_EXTREMES = st.sampled_from([0.0, 1.0, -1.0, 3.4e38, -3.4e38, 1e-45, 1e30, -1e30])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(
        ["fedavg", "fedprox", "fedadam", "fedtrimmedavg", "fedmedian", "krum", "multikrum", "bulyan"]
        + ["dp-fixed", "dp-adaptive"]
    ),
    sent=_EXTREMES,
    values=st.lists(st.one_of(_EXTREMES, st.just("sent"), st.just("opposite")), min_size=3, max_size=3),
    bounded=st.booleans(),
)
def test_a_guard_over_any_offered_strategy_never_raises_on_well_formed_replies(
    task_identity, name, sent, values, bounded
):
    """Zeros, extremes, replies equal to what was sent (zero updates), identical and opposite replies:
    the guard and the strategy behind it return an update or refuse the round, never raise, and an
    update they return is finite."""
    from conftest import tiny_config

    from fedse.federation.strategy import bounds, create_strategy
    from fedse.privacy import make_client_dp

    privacy = {}
    if name.startswith("dp-"):
        privacy = {"mode": "client", "noise_multiplier": 1.0, "clipping": name[3:], "clipped_count_stddev": 10.0}
        privacy = {k: v for k, v in privacy.items() if name == "dp-adaptive" or k != "clipped_count_stddev"}
    strategy = name if not name.startswith("dp-") else "fedavg"
    server = {"strategy": strategy, "min_train_clients": 3, "byzantine": 0}
    cfg = tiny_config(partition={"num_clients": 3}, server=server, privacy=privacy)
    dp = make_client_dp(cfg, 3, 3) if privacy else None
    guard = _guard(inner=create_strategy(cfg, dp), dp=dp, **bounds(cfg, deployed=bounded))
    start = ArrayRecord({"w": Array(np.full(2, sent, np.float32)), "b": Array(np.full(1, sent, np.float32))})
    messages = list(guard.configure_train(1, start, ConfigRecord({}), _Nodes(3)))
    replies = []
    for i, (msg, v) in enumerate(zip(messages, values, strict=True)):
        value = sent if v == "sent" else -values[0] if v == "opposite" and values[0] not in ("sent", "opposite") else v
        value = sent if value in ("sent", "opposite") else value
        content = _content(w=(value, value), b=(value,), n=i + 1, pid=i)
        replies.append(Message(content, reply_to=msg))
    arrays, _ = guard.aggregate_train(1, replies)
    if arrays is None:
        assert guard.last.refused
    else:
        assert all(np.isfinite(a.numpy()).all() for a in arrays.values())


def _bounded_round(values, claims, **bounds):
    """One round through a guard with ``bounds``: the weights sent are zeros, so each reply's value is
    its update; reply i comes from client i with num-examples claims[i]."""
    guard = _guard(**bounds)
    zeros = ArrayRecord({"w": Array(np.zeros(2, np.float32)), "b": Array(np.zeros(1, np.float32))})
    messages = list(guard.configure_train(1, zeros, ConfigRecord({}), _Nodes(len(values))))
    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies = [
        Message(_content(w=(v, v), b=(v,), n=n, pid=i), reply_to=by_node[100 + i])
        for i, (v, n) in enumerate(zip(values, claims, strict=True))
    ]
    arrays, _ = guard.aggregate_train(1, replies)
    return guard, arrays


def test_an_update_beyond_the_norm_bound_is_clipped_to_it(task_identity):
    # Updates 1, 2, 3 and an attacker's 100 (x sqrt(3) in L2): the median norm is 2.5 sqrt(3), so the
    # bound at 3x is 7.5 sqrt(3): the attacker's update is scaled to 7.5 per coordinate.
    guard, arrays = _bounded_round([1.0, 2.0, 3.0, 100.0], [1, 1, 1, 1], norm_bound=3.0)
    assert arrays["w"].numpy() == pytest.approx([(1 + 2 + 3 + 7.5) / 4] * 2)
    assert [b["client"] for b in guard.last.bounded] == [3]
    assert guard.last.bounded[0]["clipped-to"] == pytest.approx(7.5 * math.sqrt(3))
    guard, arrays = _bounded_round([1.0, 2.0, 3.0, 100.0], [1, 1, 1, 1], norm_bound=3.0, norm_action="drop")
    assert arrays["w"].numpy() == pytest.approx([2.0, 2.0]) and _kept(guard) == {0, 1, 2}
    assert (
        guard.last.dropped[0]["client"] == 3 and "beyond 3 x the round's median" in guard.last.dropped[0]["problems"][0]
    )
    guard, arrays = _bounded_round([1.0, 2.0, 3.0, 7.0], [1, 1, 1, 1], norm_bound=3.0)  # within: untouched
    assert arrays["w"].numpy() == pytest.approx([13 / 4] * 2) and not guard.last.bounded


def test_an_inflated_count_weighs_at_most_the_cap_times_the_median_claim(task_identity):
    # Nine honest clients of 300 images and one that claims 1,000 (the cap): capped at 2 x 300.
    values = [1.0] * 9 + [50.0]
    guard, arrays = _bounded_round(values, [300] * 9 + [1000], weight_cap=2.0)
    assert arrays["w"].numpy() == pytest.approx([(9 * 300 * 1.0 + 600 * 50.0) / (9 * 300 + 600)] * 2)
    assert guard.last.bounded == [{"client": 9, "num-examples": 1000, "weight": 600}]
    _, uncapped = _bounded_round(values, [300] * 9 + [1000])
    assert uncapped["w"].numpy() == pytest.approx([(2700 + 50_000) / 3700] * 2)


@pytest.mark.parametrize(
    "strategy,expected",
    [
        ("fedmedian", 3.0),  # the coordinate-wise median of 1, 2, 3, 4, 1e6
        ("fedtrimmedavg", 3.0),  # beta 0.2 of 5 values trims one at each end: the mean of 2, 3 and 4
        ("krum", None),  # one honest update, whole: 1, 2, 3 or 4
        ("multikrum", 2.5),  # the mean of the 4 (5 less byzantine) updates nearest the others: 1 to 4
    ],
)
def test_flowers_robust_aggregators_keep_an_outlier_out_of_the_aggregate(strategy, expected, task_identity):
    from conftest import tiny_config

    from fedse.federation.strategy import create_strategy

    cfg = tiny_config(partition={"num_clients": 5}, server={"strategy": strategy, "trim_beta": 0.2, "byzantine": 1})
    _, arrays = _bounded_round([1.0, 2.0, 3.0, 4.0, 1e6], [1] * 5, inner=create_strategy(cfg))
    w = arrays["w"].numpy()
    assert w[0] in (1.0, 2.0, 3.0, 4.0) if expected is None else w == pytest.approx([expected] * 2), w


def test_the_bounds_are_on_by_default_on_a_deployed_server_only():
    from conftest import tiny_config

    from fedse.federation.strategy import bounds

    cfg = tiny_config()
    assert bounds(cfg, deployed=False) == {"norm_bound": None, "norm_action": "clip", "weight_cap": None}
    assert bounds(cfg, deployed=True) == {"norm_bound": 3.0, "norm_action": "clip", "weight_cap": 2.0}
    off = tiny_config(server={"norm_bound": 0, "weight_cap": 0})
    assert bounds(off, deployed=True) == {"norm_bound": None, "norm_action": "clip", "weight_cap": None}
    # Under client-level DP the wrapper's clipping is the bound: a median-relative one would make each
    # client's clipping depend on the others, and one client could move the sum by more than C.
    dp = tiny_config(privacy={"mode": "client", "noise_multiplier": 1.0})
    assert bounds(dp, deployed=True)["norm_bound"] is None
    from fedse.config import ConfigError

    with pytest.raises(ConfigError, match=r"'server.norm_bound': 3.0 cannot be combined with privacy.mode=client"):
        resolve(tiny_config(server={"norm_bound": 3.0}, privacy={"mode": "client", "noise_multiplier": 1.0}))


class _KeyedNodes:
    """A deployed federation as the ServerApp sees it: node ids and each node's registered key (PEM)."""

    def __init__(self, keys: dict[int, bytes]) -> None:
        self.keys = keys

    def get_node_ids(self):
        return sorted(self.keys)

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=n, public_key=k) for n, k in self.keys.items()]


def _pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_node_whose_key_is_not_listed_can_neither_take_a_number_nor_be_sampled(task_identity):
    """Clients 0 and 1 are listed by key fingerprint; a squatter (node 300, a registered key nobody
    listed) claims client 0 first. It is never sent a message, its claim is dropped, and client 0's
    own node keeps its number; a listed node claiming another listed client's number is dropped too."""
    from fedse.identity import key_fingerprint

    keys = {100: _pem(), 101: _pem(), 300: _pem()}
    listed = {key_fingerprint(keys[100]): 0, key_fingerprint(keys[101]): 1}
    grid = _KeyedNodes(keys)
    guard = _guard(client_keys=listed, expected_nodes=2)
    start = ArrayRecord({"w": Array(np.zeros(2, np.float32)), "b": Array(np.zeros(1, np.float32))})
    sent = list(guard.configure_train(1, start, ConfigRecord({}), grid))
    assert sorted(m.metadata.dst_node_id for m in sent) == [100, 101]  # the squatter is not sampled
    squatter = _reply(_content(w=(9.0, 9.0), b=(9.0,), pid=0), 300)
    honest = [
        _reply(_content(w=(1.0, 1.0), b=(0.0,), pid=0), 100),
        _reply(_content(w=(3.0, 3.0), b=(0.0,), pid=1), 101),
    ]
    arrays, _ = guard.aggregate_train(1, [squatter, *honest])
    assert _kept(guard) == {0, 1} and arrays["w"].numpy() == pytest.approx([2.0, 2.0])
    assert "node 300 holds no key listed" in guard.last.dropped[0]["problems"][0]
    swapped = [_reply(_content(pid=1), 100), _reply(_content(pid=0), 101)]
    guard.aggregate_train(2, swapped)
    assert len(guard.last.dropped) == 2 and not guard.last.kept


def test_the_node_count_counts_listed_keys_and_names_the_missing_clients(task_identity):
    from fedse.federation.strategy import NodeCountError
    from fedse.identity import key_fingerprint

    keys = {100: _pem(), 300: _pem()}  # client 1's node never came; an unlisted node did
    listed = {key_fingerprint(keys[100]): 0, key_fingerprint(_pem()): 1}
    guard = _guard(client_keys=listed, expected_nodes=2, join_timeout=0.0)
    with pytest.raises(NodeCountError, match=r"clients \[1\] have no node"):
        guard.check_nodes(_KeyedNodes(keys))


def test_a_key_list_file_is_checked_line_by_line(tmp_path):
    from fedse.identity import read_client_keys

    good = tmp_path / "keys.txt"
    good.write_text("# operator's list\nSHA256:" + "A" * 43 + " 0\nSHA256:" + "B" * 43 + " 1  # the lab\n")
    assert read_client_keys(good) == {"SHA256:" + "A" * 43: 0, "SHA256:" + "B" * 43: 1}
    bad = tmp_path / "bad.txt"
    bad.write_text("SHA256:" + "A" * 43 + " zero\n")
    with pytest.raises(ValueError, match=r"line 1: .*allowed: 'SHA256:<fingerprint> <client number>'"):
        read_client_keys(bad)
    twice = tmp_path / "twice.txt"
    twice.write_text("SHA256:" + "A" * 43 + " 0\nSHA256:" + "B" * 43 + " 0\n")
    with pytest.raises(ValueError, match="client 0 is listed for two keys"):
        read_client_keys(twice)


def test_a_key_list_is_refused_in_simulation_and_checked_in_deployment(tmp_path):
    from conftest import tiny_config

    from fedse.config import ConfigError
    from fedse.data.federated import build_federated_data
    from fedse.federation.server import _client_keys

    listed = tmp_path / "keys.txt"
    listed.write_text("SHA256:" + "A" * 43 + " 0\n")
    cfg = tiny_config(server={"client_keys": str(listed)})
    with pytest.raises(ConfigError, match="simulated nodes have no registered keys"):
        _client_keys(cfg, build_federated_data(cfg))
    assert _client_keys(cfg, None) == {"SHA256:" + "A" * 43: 0}
    missing = tiny_config(server={"client_keys": str(tmp_path / "nope.txt")})
    with pytest.raises(ConfigError, match="server.client_keys.*nope.txt: cannot read the key list"):
        _client_keys(missing, None)
