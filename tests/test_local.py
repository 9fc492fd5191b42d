"""Policies' local steps: FedRep's head-first schedule, private-only adaptation, frozen statistics."""

import copy

import torch

from conftest import tiny_config
from fedse.client import build_model
from fedse.federated import build_federated_data
from fedse.local import adapt, local_update
from fedse.split import create_policy, split_model


def _setup(policy):
    cfg = tiny_config(personalization={"policy": policy})
    fed = build_federated_data(cfg)
    ds = fed.dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    return cfg, fed, model, split_model(model, policy)


def test_fedrep_trains_head_first_then_body_with_head_frozen():
    cfg, fed, model, split = _setup("fedrep")
    shard, ds = fed.shard(0), fed.dataset
    head_only = copy.deepcopy(model)
    adapt(head_only, split.private, shard, cfg, epochs=cfg.train.private_epochs, seed=5, mean=ds.mean, std=ds.std)
    before = copy.deepcopy(model.state_dict())
    local_update(model, split, create_policy("fedrep"), shard, cfg, seed=5, mean=ds.mean, std=ds.std)
    after = model.state_dict()
    for k in split.private:  # the head ends where the head-only phase left it: phase 2 froze it
        assert torch.equal(after[k], head_only.state_dict()[k])
    assert any(not torch.equal(after[k], before[k]) for k in split.shared)  # the body trained in phase 2


def test_private_only_adaptation_on_one_class_leaves_batchnorm_statistics_alone():
    cfg, fed, model, split = _setup("fedse")
    shard, ds = fed.shard(1), fed.dataset
    one_class = shard.train_labels == shard.train_labels[0]
    skewed = type(shard)(shard.client_id, shard.train_images[one_class], shard.train_labels[one_class],
                         shard.test_images, shard.test_labels)
    before = copy.deepcopy(model.state_dict())
    adapt(model, split.private, skewed, cfg, epochs=3, seed=0, mean=ds.mean, std=ds.std)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= set(split.private)
    assert all(torch.equal(before[k], after[k]) for k in after if "running_" in k)


def test_policy_splits_match_their_definitions():
    cfg, fed, model, _ = _setup("fedse")
    keys = set(model.state_dict())
    assert split_model(model, "local").private == tuple(model.state_dict())
    assert split_model(model, "local").shared == ()
    assert split_model(model, "fedavg-ft").private == ()
    assert set(split_model(model, "fedrep").private) == {"fc.weight", "fc.bias"}
    assert create_policy("fedrep").schedule == "private-first" and create_policy("fedavg-ft").finetune
    assert set(split_model(model, "fedse-head").shared) | set(split_model(model, "fedse-head").private) == keys
