"""Messages: the record layout both sides use, state dicts <-> records, and the check of a reply.

Message layout (both directions):

* ``"arrays"``: :class:`ArrayRecord` of the *shared* keys only;
* ``"metrics"``: :class:`MetricRecord` (``num-examples`` plus the step's numbers);
* ``"config"`` (server -> client): the run's fedse configuration as JSON and the round;
* ``"client"`` (client -> server): a :class:`ConfigRecord` naming the client.

A reply is hostile until :func:`screen_reply` has checked it against a
:class:`ReplySchema`: exactly the expected records, exactly the expected metric
and client keys (each a finite scalar in its range), exactly the shared arrays
with their shapes and dtypes, all finite. What passes is rebuilt from the
checked values only, so nothing the schema does not name reaches aggregation or
the run log. Screening never raises: a reply that cannot even be read is a
reply with a problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

__all__ = [
    "ARRAYS",
    "CLIENT",
    "CLIENT_ID",
    "CONFIG",
    "CONFIG_JSON",
    "DIGEST_IN",
    "DIGEST_OUT",
    "DP_EPSILON",
    "EXPORT_ONLY",
    "FINAL",
    "LOCAL_ACC",
    "LOCAL_LOSS",
    "METRICS",
    "NODE_CLIENT_ID",
    "NODE_DATA_DIR",
    "NODE_NUM_PARTITIONS",
    "NODE_PARTITION_ID",
    "NODE_STATE_DIR",
    "NUM_EXAMPLES",
    "NUM_TRAIN",
    "POOLED",
    "POOLED_ACC",
    "POOLED_LOSS",
    "PROXIMAL_MU",
    "SERVER_ROUND",
    "TRAINED_BEFORE",
    "TRAIN_ACC",
    "TRAIN_LOSS",
    "UNIT_WEIGHT",
    "ReplySchema",
    "Screened",
    "check_arrays",
    "evaluate_schema",
    "from_arrays",
    "non_finite",
    "screen_reply",
    "to_arrays",
    "train_schema",
]

# Records of a message.
ARRAYS, METRICS, CONFIG, CLIENT = "arrays", "metrics", "config", "client"
# Server -> client, in the "config" record.
CONFIG_JSON = "fedse-config"  # the run's configuration (JSON)
SERVER_ROUND = "server-round"  # set by Flower's strategies
POOLED = "pooled"  # evaluate on the pooled test set this round
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
FINAL = "final"  # the run's last evaluation: the client writes its personalized model (fedse.personal)
EXPORT_ONLY = "export-only"  # after the run, to a client not evaluated in the last round: write the model
TRAINED_BEFORE = "trained-before"  # a resumed run: the clients that trained before it (their state must exist)
# Client -> server: metrics, and the "client" record.
NUM_EXAMPLES = "num-examples"
UNIT_WEIGHT = "unit-weight"  # client-level DP averages updates uniformly; the server sets it, never the client
CLIENT_ID = "client-id"  # the client's number in reports, as it claims it (bound to its node by the guard)
NUM_TRAIN = "num-train"
DIGEST_IN, DIGEST_OUT = "private-digest-in", "private-digest-out"
# Client -> server: the step's numbers, in the "metrics" record (train_schema, evaluate_schema).
TRAIN_LOSS, TRAIN_ACC = "train-loss", "train-acc"  # on the client's own train part (not under sample-level DP)
DP_EPSILON = "dp-epsilon"  # sample-level DP: the client's cumulative epsilon, instead of the train numbers
LOCAL_LOSS, LOCAL_ACC = "local-loss", "local-acc"  # the personalized model on the client's own test part
# On the pooled test set (when POOLED): the received shared weights with the client's private keys, without
# its label prior (client.handle_evaluate); the global model only where nothing is private or fine-tuned.
POOLED_LOSS, POOLED_ACC = "pooled-loss", "pooled-acc"
# A SuperNode's node config (``--node-config``; the simulation engine sets the partition keys).
NODE_PARTITION_ID = "partition-id"  # which partition of the run's dataset is this client's (simulation, demos)
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_DIR = "data-dir"  # a deployed client's own data directory
NODE_CLIENT_ID = "client-id"  # a deployed client's number in reports (with data-dir; default its node id)
NODE_STATE_DIR = "state-dir"  # where a deployed client keeps its private state

_PROBABILITY = (0.0, 1.0)
_NON_NEGATIVE = (0.0, math.inf)
_CLIENT_ID_MAX = 2**63 - 1  # a deployed client without --client-id reports its node id (64-bit)
_DIGEST_MAX = 2**32 - 1


def to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """State dict (CPU copies of the given tensors) -> ArrayRecord, key order kept."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def _names(keys: list[str]) -> str:
    shown = [repr(str(k)[:60]) for k in keys[:5]]
    return "[" + ", ".join(shown) + (" ..." if len(keys) > 5 else "") + "]"


def _read_arrays(
    record: ArrayRecord, expected: Mapping[str, tuple[tuple[int, ...], np.dtype | None]], problems: list[str]
) -> dict[str, np.ndarray]:
    """The record's arrays as numpy, checked against ``expected`` (shape, dtype; a dtype of None:
    any); problems appended."""
    keys = [str(k) for k in record]
    if extra := sorted(set(keys) - set(expected)):
        problems.append(f"keys outside the shared set: {_names(extra)}")
    if missing := sorted(set(expected) - set(keys)):
        problems.append(f"missing shared keys: {_names(missing)}")
    out = {}
    # In the order of ``expected`` (the shared keys as the server sent them): Flower's DP wrappers
    # pair a reply's arrays with the sent ones by position.
    for key in [k for k in expected if k in set(keys)]:
        shape, dtype = expected[key]
        try:
            array = record[key].numpy()
        except Exception as err:  # noqa: BLE001 (hostile bytes: any decoding error is a problem)
            problems.append(f"{key}: unreadable array ({type(err).__name__})")
            continue
        if tuple(array.shape) != tuple(shape):
            problems.append(f"{key}: shape {tuple(array.shape)}, expected {tuple(shape)}")
        elif dtype is not None and array.dtype != dtype:
            problems.append(f"{key}: dtype {array.dtype}, expected {np.dtype(dtype)}")
        elif array.dtype.kind == "f" and not np.isfinite(array).all():
            problems.append(f"{key}: non-finite values (NaN or inf)")
        else:
            out[key] = array
    return out


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys, sorted, of the floating-point tensors that hold a NaN or an infinity."""
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def check_arrays(record: ArrayRecord, expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Reasons ``record`` is not a valid set of shared tensors (exact keys, shapes, finite values);
    empty when it is. The dtype is not checked here (see :func:`screen_reply`)."""
    problems: list[str] = []
    _read_arrays(record, {k: (shape, None) for k, shape in expected.items()}, problems)
    return problems


@dataclass(frozen=True)
class ReplySchema:
    """What one kind of reply must hold, exactly.

    ``metrics``: key -> (low, high) for float metrics; ``NUM_EXAMPLES`` is always required and
    checked as an integer in [1, ``max_examples``]. ``client``: key -> inclusive (low, high) for
    integer fields of the ``"client"`` record. ``arrays``: key -> (shape, dtype), or None for a
    reply that carries no arrays (evaluation)."""

    metrics: Mapping[str, tuple[float, float]]
    client: Mapping[str, tuple[int, int]]
    max_examples: int
    arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None
    records: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        names = {METRICS, CLIENT} | ({ARRAYS} if self.arrays is not None else set())
        object.__setattr__(self, "records", frozenset(names))


def _scalar(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_record_layout(content: RecordDict, schema: ReplySchema, problems: list[str]) -> None:
    kinds = {ARRAYS: content.array_records, METRICS: content.metric_records, CLIENT: content.config_records}
    names = [str(k) for k in content]
    if extra := sorted(set(names) - schema.records):
        problems.append(f"unexpected records: {_names(extra)}")
    for name in sorted(schema.records):
        if name not in kinds[name]:
            problems.append(f"no '{name}' record of the right kind")


def _check_metrics(metrics: MetricRecord, schema: ReplySchema, problems: list[str]) -> dict[str, float | int]:
    expected = {NUM_EXAMPLES, *schema.metrics}
    keys = [str(k) for k in metrics]
    if extra := sorted(set(keys) - expected):
        problems.append(f"unexpected metrics: {_names(extra)}")
    if missing := sorted(expected - set(keys)):
        problems.append(f"missing metrics: {_names(missing)}")
    out: dict[str, float | int] = {}
    n = metrics.get(NUM_EXAMPLES)
    if NUM_EXAMPLES in keys:
        if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= schema.max_examples):
            problems.append(f"{NUM_EXAMPLES} {str(n)[:40]!s}: allowed an integer in [1, {schema.max_examples}]")
        else:
            out[NUM_EXAMPLES] = int(n)
    for key, (lo, hi) in schema.metrics.items():
        if key not in keys:
            continue
        value = metrics[key]
        if not _scalar(value) or not math.isfinite(value) or not lo <= value <= hi:
            problems.append(f"metric {key} = {str(value)[:40]}: allowed a finite number in [{lo}, {hi}]")
        else:
            out[key] = float(value)
    return out


def _check_client(record: ConfigRecord, schema: ReplySchema, problems: list[str]) -> dict[str, int]:
    keys = [str(k) for k in record]
    if extra := sorted(set(keys) - set(schema.client)):
        problems.append(f"unexpected client fields: {_names(extra)}")
    if missing := sorted(set(schema.client) - set(keys)):
        problems.append(f"missing client fields: {_names(missing)}")
    out = {}
    for key, (lo, hi) in schema.client.items():
        if key not in keys:
            continue
        value = record[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
            problems.append(f"client field {key} = {str(value)[:40]!s}: allowed an integer in [{lo}, {hi}]")
        else:
            out[key] = int(value)
    return out


@dataclass(frozen=True)
class Screened:
    """A reply that passed: its checked values only."""

    metrics: dict[str, float | int]
    client: dict[str, int]
    arrays: dict[str, np.ndarray] | None

    def content(self, extra_metrics: Mapping[str, int | float] | None = None) -> RecordDict:
        """A fresh RecordDict of exactly the checked values (``extra_metrics``: set by the server)."""
        content = RecordDict(
            {METRICS: MetricRecord({**self.metrics, **(extra_metrics or {})}), CLIENT: ConfigRecord(dict(self.client))}
        )
        if self.arrays is not None:
            content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in self.arrays.items()})
        return content


def screen_reply(msg: Message, schema: ReplySchema) -> tuple[Screened | None, list[str]]:
    """(checked values, []) for a reply that matches ``schema`` exactly, else (None, reasons).
    Never raises."""
    problems: list[str] = []
    try:
        content = msg.content
        _check_record_layout(content, schema, problems)
        metrics = (
            _check_metrics(content.metric_records[METRICS], schema, problems)
            if METRICS in content.metric_records
            else {}
        )
        client = (
            _check_client(content.config_records[CLIENT], schema, problems) if CLIENT in content.config_records else {}
        )
        arrays = None
        if schema.arrays is not None and ARRAYS in content.array_records:
            arrays = _read_arrays(content.array_records[ARRAYS], schema.arrays, problems)
    except Exception as err:  # noqa: BLE001 (a reply that cannot be read is dropped, never a crash)
        problems.append(f"malformed reply ({type(err).__name__}: {str(err)[:120]})")
    if problems:
        return None, problems
    return Screened(metrics, client, arrays), []


def train_schema(
    shared: Mapping[str, torch.Tensor], *, dp_sample: bool, digests: bool, max_examples: int
) -> ReplySchema:
    """The reply to a train message: shared arrays (shape and dtype of ``shared``), the step's
    metrics (training loss and accuracy; under sample-level DP only the client's epsilon), the
    client's claimed id (and private-state digests when the run asks for them)."""
    arrays = {k: (tuple(v.shape), np.dtype(str(v.dtype).removeprefix("torch."))) for k, v in shared.items()}
    metrics = {DP_EPSILON: _NON_NEGATIVE} if dp_sample else {TRAIN_LOSS: _NON_NEGATIVE, TRAIN_ACC: _PROBABILITY}
    client = {CLIENT_ID: (0, _CLIENT_ID_MAX)}
    if digests:
        client |= {DIGEST_IN: (0, _DIGEST_MAX), DIGEST_OUT: (0, _DIGEST_MAX)}
    return ReplySchema(metrics, client, max_examples, arrays)


def evaluate_schema(*, pooled: bool, max_examples: int, max_train: int) -> ReplySchema:
    """The reply to an evaluate message: accuracy and loss on the client's own test part (and on
    the pooled test set when the server asked for it), its claimed id and its training-set size."""
    metrics = {LOCAL_ACC: _PROBABILITY, LOCAL_LOSS: _NON_NEGATIVE}
    if pooled:
        metrics |= {POOLED_ACC: _PROBABILITY, POOLED_LOSS: _NON_NEGATIVE}
    return ReplySchema(metrics, {CLIENT_ID: (0, _CLIENT_ID_MAX), NUM_TRAIN: (0, max_train)}, max_examples)
