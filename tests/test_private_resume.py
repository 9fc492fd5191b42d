"""A resumed simulation restores every client's private state exactly, or refuses to resume.

Flower's ``context.state`` lives in the simulation's process; a resumed run is a new process.
Each simulated client therefore also keeps its private state in the run folder, one file per
round (:class:`fedse.state.RoundStore`), and each checkpoint names those files with their
SHA-256 (:func:`fedse.state.private_manifest`)."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedse.analysis.report import RunLog
from fedse.checkpoint import CheckpointError, save_checkpoint
from fedse.config import config_to_dict
from fedse.data.federated import build_federated_data
from fedse.federation.client import make_client_app
from fedse.federation.server import check_resume
from fedse.federation.strategy import load_strategy_state, strategy_state
from fedse.models import build_model
from fedse.policies import create_policy
from fedse.records import CONFIG_JSON, to_arrays
from fedse.state import RoundStore, digest, private_manifest


def _message(cfg, arrays, server_round, message_type=MessageType.TRAIN):
    record = ConfigRecord({CONFIG_JSON: json.dumps(config_to_dict(cfg)), "server-round": server_round})
    return Message(RecordDict({"arrays": arrays, "config": record}), dst_node_id=7, message_type=message_type)


def _context(pid=0):
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid}, state=RecordDict(), run_config={})


def test_round_store_reads_what_the_client_kept_before_the_round_and_keeps_the_two_newest(tmp_path):
    for r in (1, 2, 4):
        RoundStore(tmp_path, 3, r, inclusive=False).save({"x": torch.full((2,), float(r))})
    assert sorted(p.name for p in (tmp_path / "client-3").iterdir()) == ["r000002.bin", "r000004.bin"]
    assert RoundStore(tmp_path, 3, 4, inclusive=False).load()[0]["x"].tolist() == [2.0, 2.0]  # train round 4
    assert RoundStore(tmp_path, 3, 4, inclusive=True).load()[0]["x"].tolist() == [4.0, 4.0]  # evaluate round 4
    assert RoundStore(tmp_path, 3, 2, inclusive=False).load() is None  # nothing before round 2 is kept now
    assert RoundStore(tmp_path, 5, 9, inclusive=False).load() is None  # a client that never trained
    manifest = private_manifest(tmp_path, 3)
    assert list(manifest) == ["3"] and manifest["3"]["round"] == 2 and len(manifest["3"]["sha256"]) == 64


def test_the_manifest_names_a_file_whatever_the_length_of_its_header(tmp_path):
    """The header carries the DP-SGD accountant's history, which grows with the rounds: a long header
    is still recorded by its SHA-256, and a changed file is still caught."""
    history = [[1.0, 0.01, 7]] * 2_000  # about 30 KB of JSON
    RoundStore(tmp_path, 0, 1, inclusive=False).save({"p": torch.ones(3)}, {"accountant": {"history": history}})
    manifest = private_manifest(tmp_path, 1)
    assert len(manifest["0"]["sha256"]) == 64
    from fedse.state import verify_manifest

    assert verify_manifest(tmp_path, manifest) == []
    RoundStore(tmp_path, 0, 1, inclusive=False).save({"p": torch.zeros(3)}, {"accountant": {"history": history}})
    assert "not the file the checkpoint recorded" in verify_manifest(tmp_path, manifest)[0]


def test_a_new_process_continues_each_client_from_its_own_private_state(tmp_path, task_identity):
    """Rounds 1-2 in one client app, round 3 in a fresh one (a resumed run: empty context.state): the
    fresh one starts round 3 from the private state round 2 ended with, not the initialisation."""
    cfg = tiny_config()
    ds = build_federated_data(cfg).dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    split = create_policy(cfg.personalization.policy).split(model)
    arrays = to_arrays(split.shared_state(model))
    app, context = make_client_app(state_root=tmp_path), _context()
    out = []
    for server_round in (1, 2):
        reply = app(_message(cfg, arrays, server_round), context)
        assert not reply.has_error(), reply.error
        out.append(reply.content["client"])
    # round 2 run again (the run stopped mid-round 2): it starts from what round 1 left, as before
    again = make_client_app(state_root=tmp_path)(_message(cfg, arrays, 2), _context())
    assert again.content["client"]["private-digest-in"] == out[0]["private-digest-out"]
    assert again.content["client"]["private-digest-out"] == out[1]["private-digest-out"]
    resumed = make_client_app(state_root=tmp_path)(_message(cfg, arrays, 3), _context())
    assert not resumed.has_error(), resumed.error
    assert resumed.content["client"]["private-digest-in"] == out[1]["private-digest-out"]
    assert out[0]["private-digest-in"] == digest(split.private_state(model)) != out[1]["private-digest-out"]


def test_a_client_that_trained_before_a_resume_refuses_to_start_without_its_state(tmp_path, task_identity):
    """Under flwr run or in a deployment the server cannot see the clients' files: it names the clients
    that trained before the resume, and such a client without its state fails its reply (the server
    records the reason)."""
    cfg = tiny_config()
    ds = build_federated_data(cfg).dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    arrays = to_arrays(create_policy(cfg.personalization.policy).split(model).shared_state(model))
    msg = _message(cfg, arrays, 3)
    msg.content["config"]["trained-before"] = [0, 2]
    with pytest.raises(ValueError, match="client 0 trained in this run before the server resumed it"):
        make_client_app()(msg, _context(0))  # Flower's engine turns this into an error reply
    msg = _message(cfg, arrays, 3)
    msg.content["config"]["trained-before"] = [2]  # client 0 never trained: it starts from the initialisation
    assert not make_client_app()(msg, _context(0)).has_error()


def _stopped_run(tmp_path, manifest="scan"):
    """A run folder stopped after round 2 whose clients 0 and 1 trained, as a simulation leaves it."""
    from fedse.federation.server import _start

    cfg = tiny_config()
    _, _, shared, _ = _start(cfg, build_federated_data(cfg), cfg.partition.num_clients)
    root = tmp_path / "private"
    for cid in (0, 1):
        for r in (1, 2):
            RoundStore(root, cid, r, inclusive=False).save({"p": torch.full((3,), cid + r / 10)})
    log = RunLog(train={r: {0: {"train-loss": 1.0}, 1: {"train-loss": 1.0}} for r in (1, 2)})
    private = private_manifest(root, 2) if manifest == "scan" else manifest
    save_checkpoint(tmp_path, cfg, 2, to_arrays(shared), log, private=private)
    return cfg, root


def test_resume_restores_intact_private_state(tmp_path):
    cfg, root = _stopped_run(tmp_path)
    assert check_resume(tmp_path, cfg, build_federated_data(cfg), private_root=root).round == 2


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("missing", r"client 1: .*r000002\.bin is missing"),
        ("changed", r"client 1: .*r000002\.bin is not the file the checkpoint recorded"),
        ("corrupt", r"client 1: .*r000002\.bin is corrupt"),
        ("unnamed", r"client 1: it trained, but the checkpoint names no state of it"),
        ("no-manifest", r"names no private state of its clients, and clients \[0, 1\] trained"),
    ],
)
def test_resume_refuses_private_state_it_cannot_restore_exactly(tmp_path, damage, needle):
    cfg, root = _stopped_run(tmp_path, manifest=None if damage == "no-manifest" else "scan")
    path = root / "client-1" / "r000002.bin"
    if damage == "missing":
        path.unlink()
    elif damage == "changed":  # a whole, valid file, but not the one the checkpoint names
        RoundStore(root, 1, 2, inclusive=False).save({"p": torch.zeros(3)})
    elif damage == "corrupt":
        path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    elif damage == "unnamed":
        manifest = private_manifest(root, 2)
        del manifest["1"]
        _stopped_run(tmp_path, manifest=manifest)
    with pytest.raises(CheckpointError, match=needle) as err:
        check_resume(tmp_path, cfg, build_federated_data(cfg), private_root=root)
    assert "restart" in str(err.value) and "common initialisation" in str(err.value)


def _reply(node, values, n=10):
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(np.asarray(values, np.float32))}), "metrics": MetricRecord({"n": n})}
    )
    msg = Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def test_fedadam_continues_from_its_checkpointed_moments_bit_for_bit(task_identity):
    from flwr.serverapp.strategy import FedAdam

    def adam():
        return FedAdam(weighted_by_key="n", eta=0.1)

    start = ArrayRecord({"w": Array(np.array([0.5, -0.25], np.float32))})
    replies = [[[0.6, -0.2], [0.4, -0.3]], [[0.7, 0.1], [0.2, -0.1]], [[0.9, 0.0], [0.3, 0.3]]]

    def round_(strategy, server_round, arrays):
        strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid())
        return strategy.aggregate_train(
            server_round, [_reply(i + 1, v) for i, v in enumerate(replies[server_round - 1])]
        )[0]

    whole, arrays = adam(), start
    for r in (1, 2, 3):
        arrays = round_(whole, r, arrays)
    first = adam()
    after2 = round_(first, 2, round_(first, 1, start))
    state = strategy_state(first)
    assert set(state) == {"m_t", "v_t"}
    resumed = adam()
    load_strategy_state(resumed, state)
    resumed_arrays = round_(resumed, 3, after2)
    assert np.array_equal(resumed_arrays["w"].numpy(), arrays["w"].numpy())
    fresh = round_(adam(), 3, after2)  # without the moments, round 3 is another update
    assert not np.array_equal(fresh["w"].numpy(), arrays["w"].numpy())
    with pytest.raises(ValueError, match=r"strategy state \['clipping_norm'\]"):
        load_strategy_state(adam(), {"clipping_norm": 1.0})


class _Grid:
    def get_node_ids(self):
        return [1, 2]

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)
