"""Each client's personalized model as a file: written at the final evaluation, loaded anywhere."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import replace
from unittest.mock import patch

import numpy as np
import pytest
import torch
from conftest import tiny_config
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedse.config import config_to_dict
from fedse.data.federated import build_federated_data
from fedse.federation.client import make_client_app
from fedse.models import build_model
from fedse.personal import MAGIC, MODEL_FILE, client_model_path, load_personalized
from fedse.policies import create_policy
from fedse.records import CONFIG_JSON, to_arrays
from fedse.state import StateCorruptError


def _setup(policy):
    cfg = tiny_config(personalization={"policy": policy})
    ds = build_federated_data(cfg).dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    return cfg, model, create_policy(policy).split(model)


def _message(cfg, arrays, message_type, **config):
    record = ConfigRecord({CONFIG_JSON: json.dumps(config_to_dict(cfg)), "server-round": 2, **config})
    return Message(RecordDict({"arrays": arrays, "config": record}), dst_node_id=7, message_type=message_type)


def _context(pid, **node):
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid, **node}, state=RecordDict(), run_config={})


def _train_then_final_evaluate(policy, tmp_path, pid=1, **node):
    cfg, model, split = _setup(policy)
    app, ctx = make_client_app(export_dir=tmp_path), _context(pid, **node)
    sent = to_arrays(split.shared_state(model))
    trained = app(_message(cfg, sent, MessageType.TRAIN), ctx)
    final = trained.content["arrays"]  # as if the server's aggregate were this client's update
    reply = app(_message(cfg, final, MessageType.EVALUATE, final=True), ctx)
    assert not reply.has_error(), reply.error
    return cfg, final, reply


def _shared_file(run_dir, arrays):
    torch.save({k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}, run_dir / "shared_weights.pt")


@pytest.mark.parametrize(
    "policy", ["fedse-la", "fedse-pc", "fedavg-ft", "fedbn", "fedbabu", "ditto", "fedala", "fedala-la", "fedrod"]
)
def test_the_loaded_model_scores_exactly_what_the_client_reported(task_identity, tmp_path, policy):
    cfg, final, reply = _train_then_final_evaluate(policy, tmp_path)
    path = client_model_path(tmp_path, 1)
    assert path.is_file()
    _shared_file(tmp_path, final)  # what write_run puts in the run folder
    loaded = load_personalized(tmp_path, 1)
    shard = build_federated_data(cfg).shard(1)
    result = loaded.evaluate(shard.test_images, shard.test_labels)
    assert result.accuracy == reply.content["metrics"]["local-acc"]  # to the last digit
    assert result.loss == reply.content["metrics"]["local-loss"]
    header = loaded.header
    assert header["client"] == 1 and header["policy"] == policy and header["evaluated_in_final_round"]
    assert header["complete"] == (
        policy in ("fedavg-ft", "fedbabu", "ditto", "fedala", "fedala-la", "fedrod")
    )  # a whole model is stored
    assert (loaded.offset is None) == (header["prior"]["mode"] == "off")
    probs = loaded.predict(shard.test_images[:5])
    assert probs.shape == (5, header["num_classes"]) and torch.allclose(probs.sum(1), torch.ones(5))
    # predict applies the offset: its argmax is the evaluated prediction
    logits = loaded.logits(shard.test_images)
    assert (logits.argmax(1) == shard.test_labels).float().mean().item() == pytest.approx(result.accuracy)


def test_nothing_is_written_without_final_and_neither_model_nor_gate_statistics_are_sent(task_identity, tmp_path):
    cfg, model, split = _setup("fedse-la")
    app, ctx = make_client_app(export_dir=tmp_path), _context(0)
    reply = app(_message(cfg, to_arrays(split.shared_state(model)), MessageType.EVALUATE), ctx)
    assert not reply.has_error() and not (tmp_path / "clients").exists()
    _, _, final_reply = _train_then_final_evaluate("fedse-la", tmp_path, pid=0)
    assert list(final_reply.content.array_records) == []  # an evaluate reply carries no arrays
    assert set(final_reply.content["metrics"].keys()) == {"num-examples", "local-acc", "local-loss"}


def test_a_deployed_client_writes_its_complete_model_into_its_state_dir(task_identity, tmp_path):
    state = tmp_path / "state"
    cfg, final, reply = _train_then_final_evaluate("fedse-la", tmp_path / "sim", **{"state-dir": str(state)})
    assert (state / MODEL_FILE).is_file() and not (tmp_path / "sim" / "clients").exists()
    loaded = load_personalized(state)  # complete: no run folder needed
    assert loaded.header["complete"]
    shard = build_federated_data(cfg).shard(1)
    assert loaded.evaluate(shard.test_images, shard.test_labels).accuracy == reply.content["metrics"]["local-acc"]


def _rewrite(path, payload: bytes, meta=None):
    raw = path.read_bytes()
    line = json.loads(raw[len(MAGIC) :].partition(b"\n")[0])
    line |= {"sha256": hashlib.sha256(payload).hexdigest(), "length": len(payload)}
    if meta is not None:
        line["meta"] = meta
    path.write_bytes(MAGIC + json.dumps(line).encode() + b"\n" + payload)


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled: this must never run",))


def test_loading_refuses_a_bad_checksum_a_pickle_and_foreign_shared_weights(task_identity, tmp_path, capsys):
    _, final, _ = _train_then_final_evaluate("fedse-la", tmp_path)
    _shared_file(tmp_path, final)
    path = client_model_path(tmp_path, 1)
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(StateCorruptError, match="checksum mismatch"):
        load_personalized(tmp_path, 1)
    path.write_bytes(good)
    _rewrite(path, pickle.dumps({"model.x": _Boom()}))  # a valid checksum over a pickle payload
    with pytest.raises(StateCorruptError, match="not a plain mapping of tensors"):
        load_personalized(tmp_path, 1)
    assert "must never run" not in capsys.readouterr().out
    path.write_bytes(good)
    shared = torch.load(tmp_path / "shared_weights.pt", weights_only=True)
    other = {k: v.clone() for k, v in shared.items()}
    other[next(iter(other))] += 1.0  # another round's shared weights
    torch.save(other, tmp_path / "shared_weights.pt")
    with pytest.raises(StateCorruptError, match="are not the shared weights"):
        load_personalized(tmp_path, 1)
    torch.save(shared, tmp_path / "shared_weights.pt")
    with pytest.raises(FileNotFoundError, match="no personalized model for client 9"):
        load_personalized(tmp_path, 9)
    buffer = io.BytesIO()
    torch.save({"model.fc.weight": torch.zeros(3, 3)}, buffer)
    meta = json.loads(good[len(MAGIC) :].partition(b"\n")[0])["meta"] | {"complete": True}
    _rewrite(path, buffer.getvalue(), meta)
    with pytest.raises(StateCorruptError, match="do not fit the model"):
        load_personalized(tmp_path, 1)


def test_fedse_predict_on_a_folder_of_pngs_writes_the_csv(task_identity, tmp_path):
    import csv

    from PIL import Image

    from fedse.cli import main

    state = tmp_path / "state"
    cfg, _, reply = _train_then_final_evaluate("fedse-la", tmp_path / "sim", **{"state-dir": str(state)})
    shard = build_federated_data(cfg).shard(1)
    loaded = load_personalized(state)
    folder = tmp_path / "images"
    for i, (image, label) in enumerate(zip(shard.test_images, shard.test_labels, strict=True)):
        (folder / loaded.classes[int(label)]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / loaded.classes[int(label)] / f"{i:03d}.png")
    out = tmp_path / "scores.csv"
    assert main(["predict", str(state), "--images", str(folder), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(shard.test_labels)
    assert set(rows[0]) == {"name", "predicted", "label", *[f"p_{c}" for c in loaded.classes]}
    correct = sum(r["predicted"] == r["label"] for r in rows) / len(rows)
    assert correct == pytest.approx(reply.content["metrics"]["local-acc"])  # the same images, the same model
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(shard.test_images[0][0].numpy()).save(flat / "a.png")
    assert main(["predict", str(state), "--images", str(flat), "--out", str(tmp_path / "one.csv")]) == 0
    assert "label" not in next(csv.DictReader((tmp_path / "one.csv").open()))  # no labels known
    assert main(["predict", str(tmp_path / "nowhere"), "--images", str(flat), "--out", str(out)]) == 2


@pytest.mark.slow
def test_a_simulation_leaves_every_clients_model_and_the_monitor_reads_them(tmp_path):
    from fedse.fingerprint import auroc, msp_score, probe
    from fedse.simulation import simulate
    from simulations.monitor import METHODS, monitor

    cfg = tiny_config(
        partition={"num_clients": 4},
        server={"rounds": 2, "fraction_evaluate": 0.5, "min_train_clients": 2, "min_evaluate_clients": 2},
        output={"dir": str(tmp_path), "name": "run"},
    )
    run_dir = simulate(cfg, quiet=True).run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["client_models"] == {"written_at_final_evaluation": 2, "asked_after_the_run": 2, "failed": 0}
    fed = build_federated_data(cfg)
    last = json.loads((run_dir / "client_rounds.json").read_text())["evaluate"]["2"]
    for client in range(4):
        loaded = load_personalized(run_dir, client)
        shard = fed.shard(client)
        accuracy = loaded.evaluate(shard.test_images, shard.test_labels).accuracy
        assert loaded.header["evaluated_in_final_round"] == (str(client) in last)
        if str(client) in last:  # the run's figure, to the last digit
            assert accuracy == last[str(client)]["local-acc"]
        else:
            assert "latest private part" in loaded.header["note"]
    result = monitor(run_dir, tmp_path / "monitor", max_other=50)
    assert [r["client"] for r in result["per_client"]] == [0, 1, 2, 3]
    assert {p.name for p in (tmp_path / "monitor").iterdir()} >= {"monitor.json", "table.md", "scores.png"}
    # One figure recomputed by hand: client 1's MSP AUROC against its own strong Gaussian noise.
    from fedse.fingerprint import corrupt

    loaded, shard = load_personalized(run_dir, 1), fed.shard(1)
    noisy = corrupt(shard.test_images, "gaussian_noise", 2, seed=1)
    scores = [
        msp_score(probe(loaded.model, x, mean=loaded.mean, std=loaded.std, logit_bias=loaded.offset).logits)
        for x in (shard.test_images, noisy)
    ]
    assert result["per_client"][1]["auroc"]["gaussian_noise 2"]["msp"] == auroc(*scores)
    assert set(result["per_client"][1]["auroc"]["blur 1"]) == set(METHODS)
    # the stored threshold was set on the own test part at 5% false alarms
    assert all(r["false_alarm_own_test"] <= 0.05 for r in result["per_client"])


def _finished_run(tmp_path, policy="fedse-la"):
    """A run folder as a finished run leaves it for ``fedse adapt``: config.yaml and shared_weights.pt."""
    import yaml

    cfg, model, split = _setup(policy)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    shared = split.shared_state(model)
    torch.save(shared, run / "shared_weights.pt")
    return cfg, model, split, run, shared


def _digit_pngs(root, indices):
    """The bundled digits ``indices`` as 8x8 grey PNGs in ``root/<digit>/``: a new client's own data."""
    from PIL import Image

    bundled = build_federated_data(tiny_config()).dataset
    for i in indices:
        (root / str(int(bundled.labels[i]))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(bundled.images[i, 0].numpy()).save(root / str(int(bundled.labels[i])) / f"{i}.png")
    return len(indices)


def test_fedse_adapt_fits_a_new_clients_private_part_on_the_final_shared_weights(tmp_path):
    from fedse.cli import main
    from fedse.data.federated import own_data

    cfg, model, split, run, shared = _finished_run(tmp_path)
    files = _digit_pngs(tmp_path / "own", range(0, 200, 2))
    out = tmp_path / "new.fedse"
    assert main(["adapt", str(run), "--data-dir", str(tmp_path / "own"), "--out", str(out)]) == 0
    loaded = load_personalized(out)
    # fitted and evaluated on exactly the images in --data-dir, not on the bundled digits
    assert loaded.header["train_samples"] + loaded.header["test_samples"] == files == 100
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], shared[k]) for k in split.shared)  # the shared weights as received
    assert any(not torch.equal(state[k], model.state_dict()[k]) for k in split.private)  # the private part fitted
    shard = own_data(cfg, tmp_path / "own").shard(0)
    assert loaded.evaluate(shard.test_images, shard.test_labels).accuracy == loaded.header["local_acc"]
    assert loaded.header["client"] is None and "new client" in loaded.header["note"]
    assert main(["adapt", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "own"), "--out", str(out)]) == 2
    # Shared weights of another shape, or holding NaN, are refused with one line, not a traceback.
    for bad in (
        {**shared, "fc.weight": torch.zeros(3, 3)},
        {**shared, "fc.weight": torch.full_like(shared["fc.weight"], float("nan"))},
    ):
        torch.save(bad, run / "shared_weights.pt")
        with pytest.raises(StateCorruptError, match="shared tensors|NaN or inf"):
            from fedse.personal import adapt_new_client

            adapt_new_client(run, tmp_path / "own", tmp_path / "bad.fedse")
        bad_out = tmp_path / "bad.fedse"
        assert main(["adapt", str(run), "--data-dir", str(tmp_path / "own"), "--out", str(bad_out)]) == 2


@pytest.mark.parametrize("folder", ["missing", "empty", "no_image", "a_file"])
def test_fedse_adapt_refuses_a_data_dir_without_usable_images(tmp_path, capsys, folder):
    from fedse.cli import main

    _finished_run(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_image" / "4").mkdir(parents=True)
    (tmp_path / "no_image" / "4" / "readme.txt").write_text("not an image")
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "new.fedse"
    code = main(["adapt", str(tmp_path / "run"), "--data-dir", str(tmp_path / folder), "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fedse: error: "), err
    assert f"digits data folder '{tmp_path / folder}'" in lines[0] and "allowed: " in lines[0]
    assert "DIR/<0..9>/*.png" in lines[0] and "Traceback" not in err
    assert not out.exists()


def test_fedbabu_trains_the_body_with_the_head_frozen_and_fine_tunes_only_the_head(task_identity, tmp_path):
    # Oh et al. 2022: in the rounds the head keeps its common initialisation while the body learns;
    # before evaluating, each client fine-tunes the head alone.
    cfg, model, split = _setup("fedbabu")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    head = [k for k in initial if k.startswith("fc.")]
    assert head == ["fc.weight", "fc.bias"]
    app, ctx = make_client_app(export_dir=tmp_path), _context(1)
    trained = app(_message(cfg, to_arrays(split.shared_state(model)), MessageType.TRAIN), ctx)
    sent_back = {k: torch.from_numpy(v.numpy()) for k, v in trained.content["arrays"].items()}
    assert all(torch.equal(sent_back[k], initial[k]) for k in head)  # the head did not train
    assert not torch.equal(sent_back["conv1.weight"], initial["conv1.weight"])  # the body did
    reply = app(_message(cfg, trained.content["arrays"], MessageType.EVALUATE, final=True), ctx)
    assert not reply.has_error(), reply.error
    evaluated = load_personalized(client_model_path(tmp_path, 1)).model.state_dict()  # complete: fine-tuned
    assert all(not torch.equal(evaluated[k], sent_back[k]) for k in head)  # the head was fine-tuned
    body = [k for k in sent_back if not k.startswith("fc.") and "num_batches" not in k]
    assert all(torch.equal(evaluated[k], sent_back[k]) for k in body)  # the body was not


def _ditto_round(lam, pid=1):
    cfg = tiny_config(personalization={"policy": "ditto", "ditto_lambda": lam})
    ds = build_federated_data(cfg).dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    policy = create_policy("ditto")
    received = {k: v.clone() for k, v in model.state_dict().items()}
    app, ctx = make_client_app(), _context(pid)
    reply = app(_message(cfg, to_arrays(policy.split(model).shared_state(model)), MessageType.TRAIN), ctx)
    assert not reply.has_error(), reply.error
    from fedse.state import load_private

    stored = load_private(ctx, {**policy.split(model).private_state(model), **policy.extra_state(model)})
    personal = {k.removeprefix("personal."): v for k, v in stored.items()}
    distance = sum(((personal[k] - received[k]) ** 2).sum() for k in received if personal[k].is_floating_point())
    return cfg, reply, ctx, float(distance)


def test_ditto_keeps_a_personal_model_pulled_toward_the_global_one(task_identity):
    # Li et al. 2021: the global model trains as in FedAvg; the personal model v trains on the same
    # data with lambda/2 ||v - w||^2 toward the received w: the larger lambda, the closer v stays.
    _, free, _, far = _ditto_round(0.0)
    _, _, _, mid = _ditto_round(1.0)
    cfg, pulled, ctx, near = _ditto_round(10.0)  # lr x lambda = 0.5: a stable pull (far above 2, SGD overshoots)
    assert near < mid < far
    # The global update (what is sent) is FedAvg's, bit for bit: the personal step does not touch it.
    avg_cfg, avg_model, avg_split = _setup("fedavg")
    avg = make_client_app()(
        _message(avg_cfg, to_arrays(avg_split.shared_state(avg_model)), MessageType.TRAIN), _context(1)
    )
    assert all(
        np.array_equal(free.content["arrays"][k].numpy(), avg.content["arrays"][k].numpy()) for k in avg_split.shared
    )
    assert all(
        np.array_equal(pulled.content["arrays"][k].numpy(), free.content["arrays"][k].numpy()) for k in avg_split.shared
    )


def test_ditto_evaluates_and_exports_its_personal_model(task_identity, tmp_path):
    cfg, final, reply = _train_then_final_evaluate("ditto", tmp_path)
    loaded = load_personalized(client_model_path(tmp_path, 1))
    assert loaded.header["complete"]  # the personal model, whole
    shard = build_federated_data(cfg).shard(1)
    assert loaded.evaluate(shard.test_images, shard.test_labels).accuracy == reply.content["metrics"]["local-acc"]
    received = {k: torch.from_numpy(v.numpy().copy()) for k, v in final.items()}
    assert any(not torch.equal(loaded.model.state_dict()[k].cpu(), received[k]) for k in received)  # not the global one


def test_fedala_learns_element_wise_mixing_weights_and_evaluates_the_mix(task_identity, tmp_path):
    # Zhang et al. 2023: the client's head starts each round from local + (global - local) * W, with W
    # in [0, 1] learned on its own data; the layers below take the global model.
    from fedse.state import load_private

    cfg, model, split = _setup("fedala")
    policy = create_policy("fedala")
    template = {**split.private_state(model), **policy.extra_state(model)}
    app, ctx = make_client_app(export_dir=tmp_path), _context(1)
    initial = to_arrays(split.shared_state(model))
    app(_message(cfg, initial, MessageType.TRAIN), ctx)
    first = load_private(ctx, template)
    weights = {k: v for k, v in first.items() if k.startswith("mixing.")}
    assert sorted(weights) == ["mixing.fc.bias", "mixing.fc.weight"]
    assert all(bool((v == 1).all()) for v in weights.values())  # round 1: local == global, nothing to learn
    # Round 2 receives a global model unlike the client's local one (the initial weights again).
    app(_message(cfg, initial, MessageType.TRAIN), ctx)
    second = load_private(ctx, template)
    moved = {k: v for k, v in second.items() if k.startswith("mixing.")}
    assert any(not bool((v == 1).all()) for v in moved.values())  # the mixing weights moved
    assert all(bool(((v >= 0) & (v <= 1)).all()) for v in moved.values())
    reply = app(_message(cfg, initial, MessageType.EVALUATE, final=True), ctx)
    assert not reply.has_error(), reply.error
    evaluated = load_personalized(client_model_path(tmp_path, 1)).model.state_dict()
    glob = {k: torch.from_numpy(v.numpy().copy()) for k, v in initial.items()}
    for k in ("fc.weight", "fc.bias"):
        local = second[f"local.{k}"]
        torch.testing.assert_close(evaluated[k], local + (glob[k] - local) * moved[f"mixing.{k}"])
    assert all(torch.equal(evaluated[k], glob[k]) for k in glob if not k.startswith("fc."))  # the global body


def test_fedala_mixing_loss_sees_the_label_prior_when_it_is_on(task_identity):
    # Under fedala-la (or fedala with personalization.label_prior=train) the head trains and
    # predicts with the client's log prior added to its logits; W is learnt on that same loss.
    from fedse.policies import ClientRun, resolve
    from fedse.policies.fedala import LOCAL

    cfg, model, _ = _setup("fedala")
    federated = build_federated_data(cfg)
    shard, ds = federated.shard(1), federated.dataset
    extra = create_policy("fedala").extra_state(model)
    for k in extra:
        if k.startswith(LOCAL):
            extra[k] = extra[k] + 0.3 * torch.randn(extra[k].shape, generator=torch.Generator().manual_seed(0))

    def mixing(bias):
        copy = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
        copy.load_state_dict(model.state_dict())
        policy = replace(resolve(cfg), label_prior="off")
        run = ClientRun(cfg, policy, shard, ds.mean, ds.std, seed=3)  # W's draw: seed + 2
        with patch.object(ClientRun, "train_offset", lambda self, model: bias):
            out = policy.adaptive_mixing(run, copy, dict(extra))
        return {k: v for k, v in out.items() if k.startswith("mixing.")}

    plain = mixing(None)
    assert any(not bool((v == 1).all()) for v in plain.values())  # W learns from local != global
    shifted = mixing(torch.full((ds.num_classes,), 3.0))  # a constant offset leaves the loss as it is
    for k in plain:
        torch.testing.assert_close(shifted[k], plain[k])
    ruled = resolve(tiny_config(personalization={"policy": "fedala-la"}))
    override = resolve(tiny_config(personalization={"policy": "fedala", "label_prior": "train"}))
    assert (ruled.label_prior, type(ruled)) == (override.label_prior, type(override)) == ("train", type(resolve(cfg)))
    prior = ClientRun(cfg, ruled, shard, ds.mean, ds.std, seed=3).train_offset(model)
    assert prior is not None and float(prior.max() - prior.min()) > 1.0  # this client's labels are skewed
    with_prior = mixing(prior)
    assert any(not torch.equal(with_prior[k], plain[k]) for k in plain)
    # The client path passes that offset: its W is the one learnt with the prior, bit for bit.
    for run_policy, expected in ((ruled, with_prior), (resolve(cfg), plain)):
        copy = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
        copy.load_state_dict(model.state_dict())
        out = run_policy.before_update(ClientRun(cfg, run_policy, shard, ds.mean, ds.std, seed=3), copy, dict(extra))
        assert all(torch.equal(out[k], expected[k]) for k in expected)


def test_fedrod_generic_head_trains_with_balanced_softmax_and_a_personal_head_is_added(task_identity, tmp_path):
    # Chen & Chao 2022: the shared update trains body and generic head with the balanced softmax
    # (the client's log label prior added to the logits: exactly fedavg-la's update); the private
    # head is fitted on top with plain cross-entropy and added at prediction.
    from fedse.state import load_private

    cfg, model, split = _setup("fedrod")
    sent = to_arrays(split.shared_state(model))
    app, ctx = make_client_app(export_dir=tmp_path), _context(1)
    rod = app(_message(cfg, sent, MessageType.TRAIN), ctx)
    for twin, same in (("fedavg-la", True), ("fedavg", False)):
        twin_cfg, _, _ = _setup(twin)
        other = make_client_app()(_message(twin_cfg, sent, MessageType.TRAIN), _context(1))
        equal = all(np.array_equal(rod.content["arrays"][k].numpy(), other.content["arrays"][k].numpy()) for k in sent)
        assert equal == same  # balanced softmax: fedavg-la's update bit for bit, not plain fedavg's
    stored = load_private(ctx, {**split.private_state(model), **create_policy("fedrod").extra_state(model)})
    personal = {k.removeprefix("rodhead."): v for k, v in stored.items()}
    assert sorted(personal) == ["fc.bias", "fc.weight"] and all(bool(v.abs().sum() > 0) for v in personal.values())
    reply = app(_message(cfg, rod.content["arrays"], MessageType.EVALUATE, final=True), ctx)
    loaded = load_personalized(client_model_path(tmp_path, 1))
    generic = {k: torch.from_numpy(v.numpy().copy()) for k, v in rod.content["arrays"].items()}
    evaluated = loaded.model.state_dict()
    for k in ("fc.weight", "fc.bias"):
        torch.testing.assert_close(evaluated[k], generic[k] + personal[k])  # g(z) + p(z): one linear head
    assert all(torch.equal(evaluated[k], generic[k]) for k in generic if not k.startswith("fc."))
    assert loaded.offset is None and loaded.header["prior"]["mode"] == "off"  # the personal head learnt the prior
    shard = build_federated_data(cfg).shard(1)
    assert loaded.evaluate(shard.test_images, shard.test_labels).accuracy == reply.content["metrics"]["local-acc"]


def test_fedse_auto_sends_fedse_la_update_keeps_its_norms_and_predicts_with_the_better_ones(task_identity, tmp_path):
    # A per-client choice of private parts: the normalisation layers are shared (the update sent is
    # fedse-la's bit for bit) and also kept as trained; at evaluation the client predicts with its
    # own norms where they are more accurate on its own train part than the received ones.
    from fedse.policies import ClientRun, norm_keys, resolve
    from fedse.state import load_private
    from fedse.train import evaluate

    cfg, model, split = _setup("fedse-auto")
    sent = to_arrays(split.shared_state(model))
    app, ctx = make_client_app(export_dir=tmp_path), _context(1)
    auto = app(_message(cfg, sent, MessageType.TRAIN), ctx)
    la_cfg, _, _ = _setup("fedse-la")
    la = make_client_app()(_message(la_cfg, sent, MessageType.TRAIN), _context(1))
    assert all(np.array_equal(auto.content["arrays"][k].numpy(), la.content["arrays"][k].numpy()) for k in sent)
    norms = norm_keys(model)
    assert norms and set(norms) <= set(split.shared)  # shared, and kept too
    stored = load_private(ctx, {**split.private_state(model), **create_policy("fedse-auto").extra_state(model)})
    own = {k.removeprefix("localnorm."): v for k, v in stored.items() if k.startswith("localnorm.")}
    assert sorted(own) == sorted(norms)
    assert all(np.array_equal(own[k].numpy(), auto.content["arrays"][k].numpy()) for k in norms)  # as trained

    # The received norms made useless (running means shifted far off): the client's own are chosen,
    # so the model it evaluates and exports is whole, with its own norms and the received rest.
    received = {k: torch.from_numpy(v.numpy().copy()) for k, v in auto.content["arrays"].items()}
    for k in norms:
        if k.endswith("running_mean"):
            received[k] += 50.0
    reply = app(_message(cfg, to_arrays(received), MessageType.EVALUATE, final=True), ctx)
    assert not reply.has_error(), reply.error
    loaded = load_personalized(client_model_path(tmp_path, 1))
    assert loaded.header["complete"]
    evaluated = loaded.model.state_dict()
    assert all(torch.equal(evaluated[k], own[k]) for k in norms)
    assert all(torch.equal(evaluated[k], received[k]) for k in received if k not in norms)
    shard = build_federated_data(cfg).shard(1)
    assert loaded.evaluate(shard.test_images, shard.test_labels).accuracy == reply.content["metrics"]["local-acc"]

    # The choice is the more accurate of the two on the train part, computed independently here,
    # either way round; a tie (the client's own norms are the received ones) keeps the model itself.
    ds = build_federated_data(cfg).dataset
    policy, args = resolve(cfg), {"mean": ds.mean, "std": ds.std}
    run = ClientRun(cfg, policy, shard, ds.mean, ds.std, seed=0)
    private = {k: stored[k] for k in split.private}
    good = {k: torch.from_numpy(v.numpy().copy()) for k, v in auto.content["arrays"].items()}
    bad = {k: v + 50.0 if k.endswith("running_mean") else v for k, v in good.items()}

    def built(state):
        m = _setup("fedse-auto")[1]
        # strict=False: torch re-adds BatchNorm step counters to a metadata-less dict
        assert not m.load_state_dict({**state, **private}, strict=False).missing_keys
        return m

    def train_acc(m):
        bias = run.offset(m)
        return evaluate(m, shard.train_images, shard.train_labels, logit_bias=bias, **args).accuracy

    for shared, mine, own_wins in ((bad, good, True), (good, bad, False)):
        m = built(shared)
        accs = [train_acc(built(shared)), train_acc(built({**shared, **{k: mine[k] for k in norms}}))]
        assert (accs[1] > accs[0]) == own_wins  # the two candidates are what this case says
        chosen = policy.choose_norms(run, m, {f"localnorm.{k}": mine[k] for k in norms})
        assert (chosen is not m) == own_wins
        assert all(torch.equal(chosen.state_dict()[k].cpu(), mine[k] if own_wins else shared[k]) for k in norms)
    tie = built(good)
    assert policy.choose_norms(run, tie, {f"localnorm.{k}": good[k] for k in norms}) is tie


def test_fedse_auto_train_starts_each_round_from_the_norms_it_chooses(task_identity):
    # choose="train": the same choice as fedse-auto's, made before local training too. Round 1
    # (own norms = received: a tie) trains exactly as fedse-la; later, a client whose own norms are
    # more accurate on its train part starts from them, and one whose own norms are worse does not.
    from fedse.policies import ClientRun, norm_keys, resolve
    from fedse.state import load_private

    cfg, model, split = _setup("fedse-auto-train")
    sent = to_arrays(split.shared_state(model))
    app, ctx = make_client_app(), _context(1)
    auto = app(_message(cfg, sent, MessageType.TRAIN), ctx)
    la = make_client_app()(_message(_setup("fedse-la")[0], sent, MessageType.TRAIN), _context(1))
    assert all(np.array_equal(auto.content["arrays"][k].numpy(), la.content["arrays"][k].numpy()) for k in sent)
    stored = load_private(ctx, {**split.private_state(model), **create_policy("fedse-auto-train").extra_state(model)})
    norms = norm_keys(model)
    good = {k: torch.from_numpy(v.numpy().copy()) for k, v in auto.content["arrays"].items()}
    bad = {k: v + 50.0 if k.endswith("running_mean") else v for k, v in good.items()}
    fed = build_federated_data(cfg)
    shard, policy = fed.shard(1), resolve(cfg)
    run = ClientRun(cfg, policy, shard, fed.dataset.mean, fed.dataset.std, seed=0)
    for received, own, starts_from in ((bad, good, good), (good, bad, good)):
        m = _setup("fedse-auto-train")[1]
        private = {k: stored[k] for k in split.private}
        assert not m.load_state_dict({**received, **private}, strict=False).missing_keys
        extra = {f"localnorm.{k}": own[k] for k in norms}
        assert policy.before_update(run, m, extra) is extra
        state = m.state_dict()
        assert all(torch.equal(state[k], starts_from[k]) for k in norms)  # the better norms, in place
        assert all(torch.equal(state[k], received[k]) for k in received if k not in norms)


def _hostile_model_file(tmp_path):
    """A deployed client's complete model file, and its header line and payload to rewrite."""
    state = tmp_path / "state"
    _train_then_final_evaluate("fedse-la", tmp_path / "sim", **{"state-dir": str(state)})
    path = state / MODEL_FILE
    line, _, payload = path.read_bytes()[len(MAGIC) :].partition(b"\n")
    return state, path, json.loads(line), payload


@pytest.fixture(scope="module")
def hostile_model(tmp_path_factory):
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield _hostile_model_file(tmp_path_factory.mktemp("hostile"))
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("std", [0.0], r"header 'std' is \[0\.0\]; allowed: positive numbers"),
        ("std", [float("inf")], r"header 'std' is \[inf\]; allowed: a list of 1 finite numbers"),
        ("mean", "grey", r"header 'mean' is 'grey'; allowed: a list of 1 finite numbers"),
        ("mean", [float("nan")], r"header 'mean' is \[nan\]; allowed: a list of 1 finite numbers"),
        ("mean", [10**400], r"header 'mean' is \[1000.*\(403 characters\); allowed: a list of 1 finite numbers"),
        ("classes", ["a"], r"header 'classes' is \['a'\]; allowed: a list of 10 names"),
        ("model", {"name": "resnet-9000"}, r"header 'model' is \{'name': 'resnet-9000'\}; allowed: a mapping of"),
        ("num_classes", 1e8, r"header 'num_classes' is 100000000\.0; allowed: an integer in \[1, 100000\]"),
        ("num_classes", 100_000_000, r"header 'num_classes' is 100000000; allowed: an integer in \[1, 100000\]"),
        ("num_classes", -5, r"header 'num_classes' is -5; allowed: an integer in \[1, 100000\]"),
        ("num_classes", 2**200, r"header 'num_classes' is 1606938044.*allowed: an integer in \[1, 100000\]"),
        ("in_channels", 0, r"header 'in_channels' is 0; allowed: an integer in \[1, 4\]"),
        ("image_size", 10**6, r"header 'image_size' is 1000000; allowed: an integer in \[4, 1024\]"),
        ("model.width", 100_000, r"header 'model\.width' is 100000; allowed: an integer in \[1, 256\] or null"),
        ("model.reduction", "16", r"header 'model\.reduction' is '16'; allowed: an integer in \[1, 2048\] or null"),
        ("model.norm", ["batchnorm"], r"header 'model\.norm' is \['batchnorm'\]; allowed: one of"),
        ("model.name", ["se_resnet8"], r"header 'model\.name' is \['se_resnet8'\]; allowed: one of"),
        ("complete", "yes", r"header 'complete' is 'yes'; allowed: true or false"),
        ("client", "1; rm", r"header 'client' is '1; rm'; allowed: null or an integer"),
        ("gate_threshold", {"value": float("nan")}, r"header 'gate_threshold' is \{'value': nan\}; allowed: a mapping"),
        ("classes", ["x" * 5000] * 3, r"header 'classes' is \['xxx.*\.\.\. \(\d+ characters\); allowed"),
    ],
)
def test_loading_refuses_a_hostile_header(hostile_model, key, value, pattern):
    """The checksum proves the file whole, not that fedse wrote it: every field the model is built from is
    checked before anything is allocated (num_classes 1e8 would ask for 12.8 GB), naming it and its value."""
    state, path, header, payload = hostile_model
    meta = json.loads(json.dumps(header["meta"]))
    section, _, field = key.rpartition(".")
    (meta[section] if section else meta)[field] = value
    path.write_bytes(MAGIC + json.dumps({**header, "meta": meta}).encode() + b"\n" + payload)
    try:
        with pytest.raises(StateCorruptError, match=pattern) as info:
            load_personalized(state)
        assert len(str(info.value)) < 600
    finally:
        path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + payload)


def test_loading_refuses_a_nan_prior_offset_and_gate_blocks_the_model_lacks(hostile_model):
    state, path, header, payload = hostile_model
    tensors = torch.load(io.BytesIO(payload), weights_only=True)
    for changed, pattern in (
        ({"prior.offset": torch.full_like(tensors["prior.offset"], float("nan"))}, r"prior offset \[nan, .*finite"),
        ({"prior.offset": torch.zeros(3)}, r"prior offset of shape \(3,\)"),
        ({"gates.gate_mean.99999999": torch.zeros(1)}, r"gate statistics key 'gates\.gate_mean\.99999999'"),
    ):
        buffer = io.BytesIO()
        torch.save({**tensors, **changed}, buffer)
        _rewrite(path, buffer.getvalue())
        try:
            with pytest.raises(StateCorruptError, match=pattern):
                load_personalized(state)
        finally:
            path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + payload)
    assert load_personalized(state).offset is not None  # the file itself was fine


def test_predict_csv_escapes_class_names_that_a_spreadsheet_would_run(hostile_model, tmp_path):
    import csv

    from fedse.personal import predict_csv

    state, path, header, payload = hostile_model
    evil = "=cmd|' /C calc'!A0"
    classes = [evil, "+1+2", "-2+3", "@SUM(A1)", "-1", *[str(c) for c in range(5, 10)]]
    meta = {**header["meta"], "classes": classes}
    path.write_bytes(MAGIC + json.dumps({**header, "meta": meta}).encode() + b"\n" + payload)
    try:
        loaded = load_personalized(state)
    finally:
        path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + payload)
    images = torch.zeros(10, 1, 8, 8, dtype=torch.uint8)
    out = tmp_path / "scores.csv"
    predict_csv(loaded, images, ["=HYPERLINK(x)", *[f"{i}.png" for i in range(1, 10)]], out, torch.arange(10))
    rows = list(csv.reader(out.open()))
    assert rows[0][:7] == ["name", "predicted", "p_" + evil, "p_+1+2", "p_-2+3", "p_@SUM(A1)", "p_-1"]
    assert rows[1][0] == "'=HYPERLINK(x)"
    assert [row[-1] for row in rows[1:6]] == ["'" + evil, "'+1+2", "'-2+3", "'@SUM(A1)", "-1"]  # the label column
    assert all(not cell.startswith(("=", "+", "@")) for row in rows for cell in row)
    assert all(float(cell) >= 0 for row in rows[1:] for cell in row[2:12])  # probabilities stay numbers


def test_fedse_predict_refuses_a_decompression_bomb_in_one_line(hostile_model, tmp_path, capsys):
    import struct
    import zlib

    from PIL import Image

    from fedse.cli import main

    state = hostile_model[0]
    folder = tmp_path / "images"
    folder.mkdir()
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((1, 1), dtype=np.uint8)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    start = raw.index(b"IHDR")
    raw[start + 4 : start + 12] = struct.pack(">II", 20_000, 20_000)  # 400 M pixels in a 70-byte file
    raw[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(bytes(raw[start : start + 17])))
    (folder / "bomb.png").write_bytes(bytes(raw))
    assert main(["predict", str(state), "--images", str(folder), "--out", str(tmp_path / "out.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedse: error: ") and "bomb.png" in err and "allowed: at most 1048576 pixels" in err
    assert err.count("\n") == 1 and "Traceback" not in err
