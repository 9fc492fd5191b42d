"""The client's label prior as a logit offset: its arithmetic, the fitted weight, where it
applies (training, personalized prediction) and where it must not (pooled test, sample DP)."""

import math

import pytest
import torch
from conftest import tiny_config
from torch import nn

from fedse.config import ConfigError
from fedse.data.federated import build_federated_data
from fedse.models import build_model
from fedse.policies import POLICIES, ClientRun, create_policy, resolve
from fedse.prior import fit_prior_weight, label_log_prior
from fedse.spec import resolve as resolve_run
from fedse.train import TrainSpec, evaluate, train


def _run(policy, shard, ds, seed=0):
    return ClientRun(tiny_config(), policy, shard, ds.mean, ds.std, seed)


def test_log_prior_is_the_smoothed_label_frequency():
    # counts (2, 1, 0) + 1 each = (3, 2, 1) over 6
    got = label_log_prior(torch.tensor([0, 0, 1]), 3, smoothing=1)
    assert torch.allclose(got, torch.tensor([math.log(3 / 6), math.log(2 / 6), math.log(1 / 6)]))
    assert torch.allclose(got.exp().sum(), torch.tensor(1.0))


def test_log_prior_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        label_log_prior(torch.tensor([0, 3]), 3, smoothing=1)
    with pytest.raises(ValueError, match="smoothing"):
        label_log_prior(torch.tensor([0]), 3, smoothing=0)


def test_fitted_weight_is_the_maximum_likelihood_one():
    # Uninformative logits, labels 80/20: softmax(t * log(0.8, 0.2)) matches the label
    # frequencies exactly at t = 1, the likelihood's maximum.
    labels = torch.tensor([0] * 8 + [1] * 2)
    prior = torch.tensor([0.8, 0.2]).log()
    assert fit_prior_weight(torch.zeros(10, 2), labels, prior) == 1.0
    # Logits that already put 80/20 on the classes: any further prior over-counts it.
    assert fit_prior_weight(prior.expand(10, 2).clone(), labels, prior) == 0.0
    # Logits that put only sqrt(.8/.2) on class 0 (half the log-odds): t = 0.5 completes them.
    assert fit_prior_weight(0.5 * prior.expand(10, 2), labels, prior) == 0.5


def test_evaluation_offsets_the_logits():
    class Zero(nn.Module):  # every class scores 0: the prediction is the offset's argmax
        def forward(self, x):
            return torch.zeros(len(x), 3)

    x, y = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([2, 2, 2, 0])
    plain = evaluate(Zero(), x, y, mean=(0.0,), std=(1.0,))
    offset = evaluate(Zero(), x, y, mean=(0.0,), std=(1.0,), logit_bias=torch.tensor([0.0, 0.0, 1.0]))
    assert plain.accuracy == 0.25 and offset.accuracy == 0.75  # argmax of ties is class 0
    assert plain.loss == pytest.approx(math.log(3))


def test_training_with_the_offset_leaves_the_prior_out_of_the_weights():
    # Constant inputs, labels 90% class 0: without the offset the classifier's bias learns the
    # label prior; with the prior as offset it has nothing left to learn and stays near zero.
    x = torch.zeros(200, 1, 1, 1, dtype=torch.uint8)
    y = torch.tensor([0] * 180 + [1] * 20)
    prior = label_log_prior(y, 2, smoothing=1)
    gaps = {}
    for name, bias in (("plain", None), ("adjusted", prior)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
        nn.init.zeros_(model[1].weight), nn.init.zeros_(model[1].bias)
        train(
            model,
            x,
            y,
            TrainSpec(mean=(0.0,), std=(1.0,), epochs=30, batch_size=50, lr=0.5, momentum=0.0, seed=0),
            logit_bias=bias,
            device=torch.device("cpu"),
        )
        gaps[name] = (model[1].bias[0] - model[1].bias[1]).item()
    assert gaps["plain"] == pytest.approx(math.log(181 / 21), abs=0.1)  # the log-odds of the prior
    assert abs(gaps["adjusted"]) < 0.1


def test_modes_follow_the_policy_the_override_and_sample_dp():
    assert resolve(tiny_config()).label_prior == "train"  # the default policy, fedse-la
    assert resolve(tiny_config(personalization={"policy": "fedse"})).label_prior == "off"
    assert resolve(tiny_config(personalization={"policy": "fedse-la"})).label_prior == "train"
    assert resolve(tiny_config(personalization={"policy": "fedse-pc"})).label_prior == "predict"
    assert resolve(tiny_config(personalization={"policy": "fedse-bn-la"})).label_prior == "train"
    assert resolve(tiny_config(personalization={"policy": "fedse-pc", "label_prior": "off"})).label_prior == "off"
    assert resolve(tiny_config(personalization={"policy": "fedavg", "label_prior": "train"})).label_prior == "train"
    dp = {"mode": "sample", "noise_multiplier": 1.0}
    assert (
        resolve(
            tiny_config(personalization={"policy": "fedse-la"}, model={"norm": "groupnorm"}, privacy=dp)
        ).label_prior
        == "off"
    )
    with pytest.raises(ConfigError, match="personalization.label_prior.*privacy.mode=sample"):
        resolve_run(tiny_config(personalization={"label_prior": "predict"}, model={"norm": "groupnorm"}, privacy=dp))
    with pytest.raises(ConfigError, match="personalization.label_prior"):
        tiny_config(personalization={"label_prior": "yes"})


@pytest.mark.parametrize("policy", ["fedse-la", "fedse-pc"])
def test_prior_policies_train_as_fedse_once_their_prior_is_off(policy):
    # fedse-la and fedse-pc differ from fedse in the label prior alone: with it turned off, one
    # local update keeps the same private keys and gives bit-identical weights (the same private
    # learning rate, the same split, the same schedule).
    fed = build_federated_data(tiny_config())
    shard, ds = fed.shard(1), fed.dataset
    states, privates = [], []
    for name, prior in (("fedse", None), (policy, "off")):
        cfg = tiny_config(personalization={"policy": name, "label_prior": prior})
        model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
        split = resolve(cfg).split(model)
        ClientRun(cfg, resolve(cfg), shard, ds.mean, ds.std, seed=3).local_update(model, split)
        states.append(model.state_dict())
        privates.append(split.private)
    assert privates[0] == privates[1] and privates[0]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_fedse_bn_la_keeps_fedse_bns_split_with_the_prior_in_training():
    cfg = tiny_config()
    ds = build_federated_data(cfg).dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    private = create_policy("fedse-bn-la").split(model).private
    assert private == create_policy("fedse-bn").split(model).private
    assert set(private) > set(create_policy("fedse").split(model).private)
    assert any(k.endswith("running_mean") for k in private)  # the norm layers' statistics stay too
    assert (POLICIES["fedse-bn-la"].label_prior, POLICIES["fedse-bn-la"].private_lr_scale) == ("train", 10.0)


def test_prior_smoothing_is_the_pseudo_count_of_each_class():
    """personalization.prior_smoothing a: log((n_c + a) / (n + a C)), hand-computed on a client's
    train labels; it shrinks toward uniform, and the config refuses a <= 0."""
    fed = build_federated_data(tiny_config())
    shard, ds = fed.shard(1), fed.dataset
    model = build_model(tiny_config(), ds.num_classes, ds.channels, ds.image_size)
    counts = torch.bincount(shard.train_labels.long(), minlength=ds.num_classes).double()
    for a in (1.0, 7.5):
        la = resolve(tiny_config(personalization={"policy": "fedse-la", "prior_smoothing": a}))
        expected = ((counts + a) / (counts.sum() + a * ds.num_classes)).log().float()
        assert torch.allclose(_run(la, shard, ds).train_offset(model), expected, atol=1e-6)
    spread = {
        a: _run(resolve(tiny_config(personalization={"prior_smoothing": a})), shard, ds)
        .train_offset(model)
        .std()
        .item()
        for a in (1.0, 50.0)
    }
    assert spread[50.0] < spread[1.0]
    with pytest.raises(ConfigError, match="prior_smoothing"):
        tiny_config(personalization={"prior_smoothing": 0})


def test_client_offsets_come_from_its_own_train_labels():
    fed = build_federated_data(tiny_config())
    shard, ds = fed.shard(1), fed.dataset
    model = build_model(tiny_config(), ds.num_classes, ds.channels, ds.image_size)
    prior = label_log_prior(shard.train_labels, ds.num_classes, tiny_config().personalization.prior_smoothing)
    la = resolve(tiny_config(personalization={"policy": "fedse-la"}))
    assert torch.equal(_run(la, shard, ds).train_offset(model), prior)
    assert torch.equal(_run(la, shard, ds).offset(model), prior)
    pc = resolve(tiny_config(personalization={"policy": "fedse-pc"}))
    assert _run(pc, shard, ds).train_offset(model) is None  # predict mode trains as fedse does
    # The freshly initialised model is nearly uninformative, so its best weight is 1 (see above):
    # a third of the prior already in its classifier bias moves the fit to an interior weight.
    with torch.no_grad():
        model.fc.bias += 0.3 * prior
    got = _run(pc, shard, ds).offset(model)
    # The weight by brute force: the model's logits on the client's train part (plain forward
    # pass), the cross-entropy of softmax(logits + t * prior) for t = 0, 0.1, ..., 2 in float64.
    m, s = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)
    model.cpu().eval()  # logit_bias ran it on its device
    with torch.no_grad():
        logits = model((shard.train_images.float() / 255 - m) / s).double()
    y = shard.train_labels.long()
    losses = {
        i / 10: torch.nn.functional.cross_entropy(logits + (i / 10) * prior.double(), y).item() for i in range(21)
    }
    best, runner_up = sorted(losses, key=losses.get)[:2]
    assert losses[runner_up] - losses[best] > 1e-6  # a clear maximum, not a float32 rounding tie
    assert best not in (0.0, 1.0, 2.0)  # an interior fit: no default or boundary value passes by chance
    assert torch.allclose(got, best * prior)
    fedse = resolve(tiny_config(personalization={"policy": "fedse"}))
    assert _run(fedse, shard, ds).offset(model) is None


def test_prediction_mode_trains_exactly_as_fedse():
    # fedse-pc only changes predictions: one local update gives bit-identical weights to fedse's.
    fed = build_federated_data(tiny_config())
    shard, ds = fed.shard(0), fed.dataset
    states = []
    for policy in ("fedse", "fedse-pc"):
        cfg = tiny_config(personalization={"policy": policy})
        model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
        ClientRun(cfg, resolve(cfg), shard, ds.mean, ds.std, seed=3).local_update(
            model, create_policy(policy).split(model)
        )
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
