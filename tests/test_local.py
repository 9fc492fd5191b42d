"""Policies' local steps: FedRep's head-first schedule, private-only adaptation, frozen statistics."""

import copy

import torch
from conftest import cpu_state, tiny_config

from fedse.data.federated import build_federated_data
from fedse.models import build_model
from fedse.policies import ClientRun, create_policy, resolve


def _setup(policy):
    cfg = tiny_config(personalization={"policy": policy})
    fed = build_federated_data(cfg)
    ds = fed.dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    return cfg, fed, model, create_policy(policy).split(model)


def test_fedrep_trains_head_first_then_body_with_head_frozen():
    cfg, fed, model, split = _setup("fedrep")
    shard, ds = fed.shard(0), fed.dataset
    head_only = copy.deepcopy(model)
    run = ClientRun(cfg, resolve(cfg), shard, ds.mean, ds.std, seed=5)
    run.adapt(head_only, split.private, epochs=cfg.train.private_epochs)
    before = copy.deepcopy(model.state_dict())
    run.local_update(model, split)
    after, head = cpu_state(model), cpu_state(head_only)
    for k in split.private:  # the head ends where the head-only phase left it: phase 2 froze it
        assert torch.equal(after[k], head[k])
    assert any(not torch.equal(after[k], before[k]) for k in split.shared)  # the body trained in phase 2


def test_private_only_adaptation_on_one_class_leaves_batchnorm_statistics_alone():
    cfg, fed, model, split = _setup("fedse")
    shard, ds = fed.shard(1), fed.dataset
    one_class = shard.train_labels == shard.train_labels[0]
    skewed = type(shard)(
        shard.client_id,
        shard.train_images[one_class],
        shard.train_labels[one_class],
        shard.test_images,
        shard.test_labels,
    )
    before = copy.deepcopy(model.state_dict())
    ClientRun(cfg, resolve(cfg), skewed, ds.mean, ds.std, seed=0).adapt(model, split.private, epochs=3)
    after = cpu_state(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= set(split.private)
    assert all(torch.equal(before[k], after[k]) for k in after if "running_" in k)


def test_policy_splits_match_their_definitions():
    # What test_split does not already check for every policy (disjoint and covering): these
    # policies' own key sets.
    _, _, model, _ = _setup("fedse")
    assert create_policy("local").split(model).private == tuple(model.state_dict())  # so nothing shared
    assert create_policy("fedavg-ft").split(model).private == ()
    assert set(create_policy("fedrep").split(model).private) == {"fc.weight", "fc.bias"}


def test_only_fine_tuning_policies_change_the_model_before_evaluation():
    # fedavg-ft adapts every key, fedbabu the head alone, fedavg nothing.
    moved = {}
    for name in ("fedavg", "fedavg-ft", "fedbabu"):
        cfg, fed, model, _ = _setup(name)
        before = copy.deepcopy(model.state_dict())
        ClientRun(cfg, resolve(cfg), fed.shard(0), fed.dataset.mean, fed.dataset.std, seed=1).finetune(model)
        moved[name] = {k for k, v in cpu_state(model).items() if not torch.equal(v, before[k])}
    assert moved["fedavg"] == set()
    assert {"fc.weight", "fc.bias"} < moved["fedavg-ft"] and any(k.startswith("layer1") for k in moved["fedavg-ft"])
    assert moved["fedbabu"] == {"fc.weight", "fc.bias"}
