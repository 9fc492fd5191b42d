"""The real ClientApp on real Messages: private keys never leave, private state persists."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedse.config import config_to_dict
from fedse.data.federated import build_federated_data
from fedse.federation.client import make_client_app
from fedse.models import build_model
from fedse.policies import create_policy
from fedse.prior import label_log_prior
from fedse.records import CONFIG_JSON, to_arrays
from fedse.state import PRIVATE_KEY, digest, load_private
from fedse.train import evaluate


def _setup(policy="fedse"):
    cfg = tiny_config(personalization={"policy": policy})
    ds = build_federated_data(cfg).dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    return cfg, model, create_policy(policy).split(model)


def _message(cfg, arrays, message_type=MessageType.TRAIN, **config):
    record = ConfigRecord({CONFIG_JSON: json.dumps(config_to_dict(cfg)), "server-round": 1, **config})
    return Message(RecordDict({"arrays": arrays, "config": record}), dst_node_id=7, message_type=message_type)


def _context(pid):
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid}, state=RecordDict(), run_config={})


def _all_keys(content: RecordDict) -> set[str]:
    keys = set()
    for record in (
        list(content.array_records.values())
        + list(content.config_records.values())
        + list(content.metric_records.values())
    ):
        keys |= set(record.keys())
    return keys


@pytest.mark.parametrize("policy", ["fedse", "fedbn", "fedse-head"])
def test_train_reply_carries_shared_keys_only(task_identity, policy):
    cfg, model, split = _setup(policy)
    app = make_client_app()
    reply = app(_message(cfg, to_arrays(split.shared_state(model))), _context(0))
    assert not reply.has_error()
    assert list(reply.content.array_records) == ["arrays"]
    assert set(reply.content["arrays"].keys()) == set(split.shared)
    assert not set(split.private) & _all_keys(reply.content)  # no private key anywhere in the reply
    assert reply.content["metrics"]["num-examples"] == len(build_federated_data(cfg).shard(0).train_labels)


def test_private_state_is_kept_and_restored_across_rounds(task_identity):
    cfg, model, split = _setup()
    app, ctx = make_client_app(), _context(1)
    initial_private = split.private_state(model)
    r1 = app(_message(cfg, to_arrays(split.shared_state(model))), ctx)
    stored = load_private(ctx, split.private_state(model))
    assert set(stored) == set(split.private) and PRIVATE_KEY in ctx.state
    assert any(not torch.equal(stored[k], initial_private[k]) for k in stored)  # it trained
    assert r1.content["client"]["private-digest-in"] == digest(initial_private)
    assert r1.content["client"]["private-digest-out"] == digest(stored)
    r2 = app(_message(cfg, r1.content["arrays"], **{"server-round": 2}), ctx)
    assert r2.content["client"]["private-digest-in"] == r1.content["client"]["private-digest-out"]


def _by_hand(model, images, labels, mean, std):
    """(accuracy, mean cross-entropy) from a plain eval-mode forward pass: no fedse code."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    model.eval()
    with torch.no_grad():
        logits = model((images.float() / 255 - m) / s)
    correct = (logits.argmax(1) == labels).sum().item()
    return correct / len(labels), torch.nn.functional.cross_entropy(logits, labels.long()).item()


def test_evaluate_reports_personalized_local_and_pooled_accuracy(task_identity):
    cfg, model, split = _setup()
    app, ctx = make_client_app(), _context(2)
    app(_message(cfg, to_arrays(split.shared_state(model))), ctx)
    reply = app(_message(cfg, to_arrays(split.shared_state(model)), MessageType.EVALUATE, pooled=True), ctx)
    m = reply.content["metrics"]
    # The personalized model is the shared weights sent plus the private weights this client kept:
    # its accuracy and loss, recomputed here, are what the client reported.
    fed = build_federated_data(cfg)
    shard, ds = fed.shard(2), fed.dataset
    personalized = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    # strict=False: torch re-adds BatchNorm step counters to a metadata-less dict; every real key is set.
    assert not personalized.load_state_dict(
        {**split.shared_state(model), **load_private(ctx, split.private_state(model))}, strict=False
    ).missing_keys
    acc, loss = _by_hand(personalized, shard.test_images, shard.test_labels, ds.mean, ds.std)
    assert m["local-acc"] == acc and m["local-loss"] == pytest.approx(loss, rel=1e-5)
    x, y = fed.pooled_test(cfg.evaluate.pooled_max_samples, cfg.seed)
    acc, loss = _by_hand(personalized, x, y, ds.mean, ds.std)
    assert m["pooled-acc"] == acc and m["pooled-loss"] == pytest.approx(loss, rel=1e-5)
    assert m["num-examples"] == len(shard.test_labels)
    assert not reply.content.array_records  # evaluation sends no weights at all
    no_pooled = app(_message(cfg, to_arrays(split.shared_state(model)), MessageType.EVALUATE, pooled=False), ctx)
    assert "pooled-acc" not in no_pooled.content["metrics"]


def test_label_prior_offsets_the_clients_own_test_only(task_identity):
    # fedse-la predicts with the client's log label prior on its own test part, but not on the
    # pooled test set, whose labels follow the federation's distribution.
    cfg, model, split = _setup("fedse-la")
    fed = build_federated_data(cfg)
    shard, ds = fed.shard(2), fed.dataset
    reply = make_client_app()(
        _message(cfg, to_arrays(split.shared_state(model)), MessageType.EVALUATE, pooled=True), _context(2)
    )
    m = reply.content["metrics"]
    prior = label_log_prior(shard.train_labels, ds.num_classes, cfg.personalization.prior_smoothing)
    own = evaluate(model, shard.test_images, shard.test_labels, mean=ds.mean, std=ds.std, logit_bias=prior)
    plain = evaluate(model, shard.test_images, shard.test_labels, mean=ds.mean, std=ds.std)
    assert m["local-loss"] == pytest.approx(own.loss) and m["local-loss"] != pytest.approx(plain.loss)
    x, y = fed.pooled_test(cfg.evaluate.pooled_max_samples, cfg.seed)
    assert m["pooled-loss"] == pytest.approx(evaluate(model, x, y, mean=ds.mean, std=ds.std).loss)


def test_evaluate_uses_the_clients_own_private_weights(task_identity):
    cfg, model, split = _setup()
    app = make_client_app()
    shared = to_arrays(split.shared_state(model))
    trained, fresh = _context(0), _context(0)
    for _ in range(3):
        app(_message(cfg, shared), trained)
    a = app(_message(cfg, shared, MessageType.EVALUATE), trained).content["metrics"]["local-loss"]
    b = app(_message(cfg, shared, MessageType.EVALUATE), fresh).content["metrics"]["local-loss"]
    assert a != b  # same shared weights, different private state, different model


def test_bad_server_message_is_refused_with_a_reason(task_identity):
    cfg, model, split = _setup()
    state = split.shared_state(model)
    app = make_client_app()
    wrong = dict(state)
    wrong["fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"fc\.weight: shape \(3, 3\)"):
        app(_message(cfg, to_arrays(wrong)), _context(0))
    with pytest.raises(ValueError, match="keys outside the shared set"):
        app(_message(cfg, to_arrays({**state, **split.private_state(model)})), _context(0))
    with pytest.raises(ValueError, match="partition-id 5 out of range"):
        app(_message(cfg, to_arrays(state)), _context(5))
    no_config = Message(RecordDict({"arrays": to_arrays(state)}), dst_node_id=7, message_type=MessageType.TRAIN)
    with pytest.raises(ValueError, match="fedse-config"):
        app(no_config, _context(0))


def test_client_with_state_dir_restarts_with_bit_identical_private_weights(task_identity, tmp_path):
    from fedse.state import StateCorruptError, StateStore

    cfg, model, split = _setup()
    app = make_client_app()
    node_config = {"partition-id": 1, "state-dir": str(tmp_path / "client1")}
    first = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    r1 = app(_message(cfg, to_arrays(split.shared_state(model))), first)
    # The process dies; a new run starts with a fresh context.state and the same state directory.
    restarted = Context(run_id=2, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    r2 = app(_message(cfg, r1.content["arrays"], **{"server-round": 2}), restarted)
    assert r2.content["client"]["private-digest-in"] == r1.content["client"]["private-digest-out"]
    tensors, _ = StateStore(tmp_path / "client1").load()
    assert digest(tensors) == r2.content["client"]["private-digest-out"]
    # A corrupt state file is an error, never a silent re-initialisation.
    path = StateStore(tmp_path / "client1").path
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    fresh = Context(run_id=3, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    with pytest.raises(StateCorruptError, match="checksum mismatch"):
        app(_message(cfg, r1.content["arrays"]), fresh)


def test_client_with_its_own_data_dir_trains_on_it(task_identity, tmp_path):
    from PIL import Image

    # The client's own data: an image folder of 8x8 grey digits-like images, 10 classes x 6.
    rng = np.random.default_rng(0)
    for c in range(10):
        (tmp_path / "data" / "train" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(
                tmp_path / "data" / "train" / f"c{c}" / f"{i}.png"
            )
    cfg = tiny_config(data={"dataset": "imagefolder", "root": str(tmp_path / "data")}, evaluate={"pooled": False})
    ds = build_federated_data(cfg).dataset  # the server side builds the model from the same format
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    split = create_policy("fedse").split(model)
    app = make_client_app()
    node = {"data-dir": str(tmp_path / "data"), "client-id": 42}
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    reply = app(_message(cfg, to_arrays(split.shared_state(model))), ctx)
    assert reply.content["client"]["client-id"] == 42
    assert reply.content["metrics"]["num-examples"] == 40  # 60 images, 25% (stratified: 2 per class) held out
    ev = app(_message(cfg, to_arrays(split.shared_state(model)), MessageType.EVALUATE), ctx)
    assert ev.content["metrics"]["num-examples"] == 20
    with pytest.raises(ValueError, match="evaluate.pooled=false"):
        app(_message(cfg, to_arrays(split.shared_state(model)), MessageType.EVALUATE, pooled=True), ctx)


@pytest.mark.parametrize("damage,message", [("nan", "non-finite values"), ("missing", "missing shared keys")])
def test_client_refuses_non_finite_or_missing_shared_weights(task_identity, damage, message):
    # (a wrong shape and a key outside the shared set: test_bad_server_message_is_refused_with_a_reason)
    cfg, model, split = _setup()
    shared = split.shared_state(model)
    key = next(k for k, v in shared.items() if v.is_floating_point())
    if damage == "nan":
        shared[key] = torch.full_like(shared[key], float("nan"))
    else:
        del shared[key]
    with pytest.raises(ValueError, match=f"server sent invalid shared weights: .*{message}"):
        make_client_app()(_message(cfg, to_arrays(shared)), _context(0))


def test_diverged_training_keeps_the_private_state_of_before_and_sends_nothing(task_identity):
    """A client whose local training goes non-finite neither keeps the NaN private part nor sends it:
    its next round starts from what it held before, and the error names the divergence and the knob."""
    cfg, model, split = _setup()
    app, ctx = make_client_app(), _context(1)
    r1 = app(_message(cfg, to_arrays(split.shared_state(model))), ctx)
    kept = load_private(ctx, split.private_state(model))
    hot = tiny_config(personalization={"policy": "fedse"}, train={"lr": 1e30})
    with pytest.raises(FloatingPointError, match=r"local training diverged in round 2 .*train\.lr \(now 1e\+30\)"):
        app(_message(hot, r1.content["arrays"], **{"server-round": 2}), ctx)  # Flower's runtime replies with it
    after = load_private(ctx, split.private_state(model))
    assert all(torch.equal(after[k], kept[k]) for k in kept)  # bit for bit what round 1 left
