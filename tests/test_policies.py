"""The policy registry's rules (resolve) and APFL's mechanism, computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cpu_state, tiny_config
from torch.func import functional_call

from fedse.config import ConfigError
from fedse.data.federated import build_federated_data
from fedse.models import build_model
from fedse.policies import POLICIES, ClientRun, resolve, settings
from fedse.policies.apfl import APFL, APFL_LOCAL


@pytest.mark.parametrize(
    "raw,pattern",
    [
        (
            {"personalization": {"policy": "ditto", "ditto_lambda": 40.0}},
            r"'personalization\.ditto_lambda': 40\.0 x train\.lr 0\.05 = 2; .* ditto_lambda < 1 / train\.lr = 20",
        ),
        (
            {"personalization": {"policy": "fedala"}, "privacy": {"mode": "sample", "noise_multiplier": 1.0}},
            r"'personalization\.policy': 'fedala' cannot be combined with privacy\.mode=sample \(its mixing weights",
        ),
        (
            {"personalization": {"policy": "fedala-la"}, "privacy": {"mode": "sample", "noise_multiplier": 1.0}},
            r"'personalization\.policy': 'fedala-la' cannot be combined with privacy\.mode=sample",
        ),
    ],
)
def test_a_methods_own_rules_are_checked_when_it_is_resolved(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        resolve(tiny_config(**raw))


def test_only_fedala_refuses_sample_level_dp():
    refusing = {name for name, p in POLICIES.items() if p.sample_dp_refusal is not None}
    assert refusing == {"fedala", "fedala-la"}
    resolve(tiny_config(personalization={"policy": "ditto"}, privacy={"mode": "sample", "noise_multiplier": 1.0}))


def test_the_settings_a_resolved_policy_reads():
    assert settings() == {"prior_smoothing", "ditto_lambda", "ala_start_threshold"}
    assert resolve(tiny_config(personalization={"policy": "fedavg"})).reads() == set()
    assert resolve(tiny_config(personalization={"policy": "fedse-la"})).reads() == {"prior_smoothing"}
    assert resolve(tiny_config(personalization={"policy": "ditto"})).reads() == {"ditto_lambda"}
    assert resolve(tiny_config(personalization={"policy": "fedala"})).reads() == {"ala_start_threshold"}
    # a setting turns the prior on: prior_smoothing is read then
    on = tiny_config(personalization={"policy": "ditto", "label_prior": "train"})
    assert resolve(on).reads() == {"ditto_lambda", "prior_smoothing"}


def _apfl_setup(alpha: float):
    cfg = tiny_config(personalization={"policy": "apfl"}, train={"momentum": 0.0, "weight_decay": 0.0})
    fed = build_federated_data(cfg)
    shard, ds = fed.shard(1), fed.dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    policy = APFL("apfl", frozenset(), alpha=alpha)
    return cfg, shard, ds, model, policy


@pytest.mark.parametrize("alpha", [0.25, 0.5])
def test_apfl_takes_one_sgd_step_on_its_local_model_through_the_mix(alpha):
    # Deng et al. 2020: v <- v - lr * d/dv L(alpha v + (1 - alpha) w). One step over the whole train
    # part (one batch, plain SGD), computed here with autograd on the mix as a function of v, equals
    # what the policy keeps after its update.
    cfg, shard, ds, model, policy = _apfl_setup(alpha)
    n = len(shard.train_labels)
    cfg = tiny_config(personalization={"policy": "apfl"}, train={"momentum": 0.0, "weight_decay": 0.0, "batch_size": n})
    torch.manual_seed(0)
    with torch.no_grad():  # w (the trained global model) and v differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    extra = {f"{APFL_LOCAL}{k}": v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}
    run = ClientRun(cfg, policy, shard, ds.mean, ds.std, seed=3)
    out = policy.after_update(run, model, dict(extra), {})

    w = cpu_state(model)
    names = [k for k, _ in model.named_parameters()]
    v = {k: extra[f"{APFL_LOCAL}{k}"].clone().requires_grad_(k in names) for k in w}
    mix = {k: alpha * v[k] + (1 - alpha) * w[k] for k in w}
    by_hand = copy.deepcopy(model).train()
    m, s = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)
    x = (shard.train_images.float() / 255 - m) / s
    loss = torch.nn.functional.cross_entropy(functional_call(by_hand, mix, (x,)), shard.train_labels.long())
    grads = dict(zip(names, torch.autograd.grad(loss, [v[k] for k in names]), strict=True))
    for k in names:
        expected = v[k].detach() - cfg.train.lr * grads[k]
        torch.testing.assert_close(out[f"{APFL_LOCAL}{k}"], expected, rtol=1e-4, atol=1e-5)
    moved = sum(float((out[f"{APFL_LOCAL}{k}"] - extra[f"{APFL_LOCAL}{k}"]).abs().sum()) for k in names)
    assert moved > 1e-3  # the step is not zero


def test_apfl_evaluates_the_mix_of_its_local_model_and_the_received_one():
    cfg, shard, ds, model, policy = _apfl_setup(0.25)
    received = cpu_state(model)
    extra = {f"{APFL_LOCAL}{k}": torch.full_like(v, 2.0) for k, v in received.items()}
    run = ClientRun(cfg, policy, shard, ds.mean, ds.std, seed=0)
    evaluated = policy.evaluated_model(run, model, extra).state_dict()
    for k, w in received.items():
        torch.testing.assert_close(evaluated[k], 0.25 * 2.0 + 0.75 * w)
    assert all(torch.equal(v, received[k]) for k, v in cpu_state(model).items())  # model itself unchanged


def test_apfl_refuses_a_mixing_weight_outside_0_1():
    with pytest.raises(ValueError, match=r"alpha 0\.0; allowed: 0 < alpha <= 1"):
        APFL("apfl", frozenset(), alpha=0.0)


def test_fedrod_predicts_without_the_prior_offset_wherever_a_model_is_evaluated():
    # FedRoD's personalized head has learnt the client's prior: no offset at evaluation, in a
    # client's round (handle_evaluate) as for a new client's cold start (adapt_and_evaluate).
    cfg = tiny_config(personalization={"policy": "fedrod"})
    fed = build_federated_data(cfg)
    shard, ds = fed.shard(1), fed.dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    rod, la = resolve(cfg), resolve(tiny_config(personalization={"policy": "fedavg-la"}))
    run = ClientRun(cfg, rod, shard, ds.mean, ds.std, seed=0)
    assert rod.prediction_offset(run, model) is None
    assert la.prediction_offset(ClientRun(cfg, la, shard, ds.mean, ds.std, seed=0), model) is not None
    got = run.adapt_and_evaluate(copy.deepcopy(model), rod.split(model))
    assert got["global_acc"] == run.evaluate(model, None).accuracy


def test_fedala_under_pfllibs_protocol_learns_w_on_the_received_model_before_evaluating():
    from fedse.policies.fedala import LOCAL, MIXING, mix_head

    results = {}
    for protocol in ("fedse", "pfllib"):
        cfg = tiny_config(personalization={"policy": "fedala"}, evaluate={"protocol": protocol})
        fed = build_federated_data(cfg)
        shard, ds = fed.shard(1), fed.dataset
        model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
        policy = resolve(cfg)
        extra = policy.extra_state(model)
        g = torch.Generator().manual_seed(0)
        extra = {k: v + 0.3 * torch.randn(v.shape, generator=g) if k.startswith(LOCAL) else v for k, v in extra.items()}
        kept = {k: v.clone() for k, v in extra.items()}
        run = ClientRun(cfg, policy, shard, ds.mean, ds.std, seed=3)
        evaluated = policy.evaluated_model(run, model, extra).state_dict()
        assert all(torch.equal(extra[k], kept[k]) for k in kept)  # the W learnt to evaluate is not kept
        expected = copy.deepcopy(model)
        if protocol == "pfllib":
            learnt = policy.adaptive_mixing(run, expected, dict(kept))
            assert any(not bool((v == 1).all()) for k, v in learnt.items() if k.startswith(MIXING))
        else:
            mix_head(expected, kept)  # the stored W (all ones here: the received head itself)
        assert all(torch.equal(evaluated[k].cpu(), v.cpu()) for k, v in expected.state_dict().items())
        results[protocol] = evaluated
    assert any(not torch.equal(results["fedse"][k], results["pfllib"][k]) for k in results["fedse"])


def _fedala_learning(threshold: float):
    """fedala's inputs for one client whose local head differs from the received one."""
    from fedse.policies.fedala import LOCAL

    cfg = tiny_config(personalization={"policy": "fedala", "ala_start_threshold": threshold})
    fed = build_federated_data(cfg)
    shard, ds = fed.shard(1), fed.dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    policy = resolve(cfg)
    g = torch.Generator().manual_seed(0)
    extra = policy.extra_state(model)
    extra = {k: v + 0.3 * torch.randn(v.shape, generator=g) if k.startswith(LOCAL) else v for k, v in extra.items()}
    return policy, ClientRun(cfg, policy, shard, ds.mean, ds.std, seed=3), model, extra


def _passes(threshold: float, extra: dict, passes: int) -> dict:
    """``extra`` after ``passes`` calls that each make one pass (threshold 0)."""
    policy, run, model, _ = _fedala_learning(threshold)
    for _ in range(passes):
        extra = policy.adaptive_mixing(run, copy.deepcopy(model), extra)
    return extra


def test_fedala_start_phase_repeats_the_first_pass_until_the_loss_settles(monkeypatch):
    # The paper's and PFLlib's start phase: the first time a client learns W, the pass over the same
    # batches repeats until the std of the last 10 pass losses is below the threshold; later rounds
    # make one pass. Each pass starts from the W the last one left, so N passes in one call equal N
    # calls of one pass each.
    from fedse.policies import fedala

    policy, run, model, extra = _fedala_learning(1e9)  # any 10 losses settle: the fewest passes, 11
    assert int(extra[fedala.STARTED]) == 0
    first = policy.adaptive_mixing(run, copy.deepcopy(model), extra)
    assert int(first[fedala.STARTED]) == 1
    eleven = _passes(0.0, extra, fedala.START_WINDOW + 1)
    ten = _passes(0.0, extra, fedala.START_WINDOW)
    mixing = [k for k in extra if k.startswith(fedala.MIXING)]
    assert all(torch.equal(first[k], eleven[k]) for k in mixing)
    assert any(not torch.equal(first[k], ten[k]) for k in mixing)
    # Once started, one pass whatever the threshold.
    second = policy.adaptive_mixing(run, copy.deepcopy(model), first)
    twelve = _passes(0.0, extra, fedala.START_WINDOW + 2)
    assert all(torch.equal(second[k], twelve[k]) for k in mixing)
    # Threshold 0: no start phase, one pass (and the start is marked done).
    _, run0, _, _ = _fedala_learning(0.0)
    one = policy.adaptive_mixing(run0, copy.deepcopy(model), extra)
    assert int(one[fedala.STARTED]) == 1
    assert all(torch.equal(one[k], _passes(0.0, extra, 1)[k]) for k in mixing)
    # Losses that never settle stop at the cap.
    monkeypatch.setattr(fedala, "MAX_START_PASSES", 3)
    policy, run, model, _ = _fedala_learning(1e-12)
    capped = policy.adaptive_mixing(run, copy.deepcopy(model), extra)
    assert all(torch.equal(capped[k], _passes(0.0, extra, 3)[k]) for k in mixing)


def test_fedala_start_phase_waits_for_a_model_to_learn_from():
    # Round 1: the client's local model is the received one, W has no gradient, the start is not spent.
    from fedse.policies import fedala

    policy, run, model, _ = _fedala_learning(0.1)
    extra = policy.extra_state(model)
    out = policy.adaptive_mixing(run, copy.deepcopy(model), extra)
    assert int(out[fedala.STARTED]) == 0
    assert all(bool((out[k] == 1).all()) for k in out if k.startswith(fedala.MIXING))


def test_fedala_learns_w_on_cached_features_exactly_as_on_the_whole_model():
    # Only the head moves while W is learnt: fedse's models declare forward = head(features), and
    # the features of each batch, computed in the first pass, serve every later one. The same W,
    # bit for bit, as the whole model run every step.
    from fedse.policies.fedala import MIXING

    policy, run, model, extra = _fedala_learning(1e9)  # the start phase: 11 passes over the same batches
    assert model.forward_is_classifier_on_features
    cached, calls = copy.deepcopy(model), []
    features = cached.forward_features
    cached.forward_features = lambda x: calls.append(len(x)) or features(x)
    fast = policy.adaptive_mixing(run, cached, extra)
    whole = copy.deepcopy(model)
    whole.forward_is_classifier_on_features = False
    slow = policy.adaptive_mixing(run, whole, extra)
    mixing = [k for k in extra if k.startswith(MIXING)]
    assert any(not bool((fast[k] == 1).all()) for k in mixing)
    assert all(torch.equal(fast[k], slow[k]) for k in mixing)
    # one forward of the body per batch of the sample, not one per pass
    assert sum(calls) == int(len(run.shard.train_labels) * policy.sample)
