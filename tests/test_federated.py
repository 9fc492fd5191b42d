"""Config -> shards: deterministic, each client's own train/test split, pooled test, feature skew."""

import numpy as np
import torch
from conftest import tiny_config

from fedse.federated import build_federated_data


def test_shards_are_deterministic_disjoint_and_cover_the_dataset():
    cfg = tiny_config()
    fed = build_federated_data(cfg)
    assert fed is build_federated_data(tiny_config())  # cached per process: same config, same object
    everything = np.concatenate([*fed.train_parts, *fed.test_parts])
    assert np.array_equal(np.sort(everything), np.arange(len(fed.dataset.labels)))
    for train, test in zip(fed.train_parts, fed.test_parts, strict=True):
        assert 0.15 < len(test) / (len(train) + len(test)) < 0.35  # about test_fraction = 0.25


def test_each_client_test_part_follows_its_own_label_distribution():
    fed = build_federated_data(tiny_config(partition={"alpha": 0.1, "num_clients": 5, "min_size": 20}))
    train, test = fed.label_counts("train"), fed.label_counts("test")
    for tr, te in zip(train, test, strict=True):
        assert set(np.flatnonzero(te)) <= set(np.flatnonzero(tr))  # no class in test the client never trains on


def test_pooled_test_takes_the_same_share_from_every_client():
    fed = build_federated_data(tiny_config())
    total = sum(len(p) for p in fed.test_parts)
    x, y = fed.pooled_test(max_samples=total // 2, seed=0)
    assert abs(len(y) - total // 2) <= fed.num_clients
    full_x, full_y = fed.pooled_test(max_samples=10**9, seed=0)
    assert len(full_y) == total


def test_feature_skew_changes_images_per_client_not_labels():
    plain = build_federated_data(tiny_config())
    skewed = build_federated_data(
        tiny_config(partition={"feature_skew": ["rotation", "contrast"], "feature_skew_strength": 1.0})
    )
    for cid in range(3):
        a, b = plain.shard(cid), skewed.shard(cid)
        assert torch.equal(a.train_labels, b.train_labels) and not torch.equal(a.train_images, b.train_images)
    assert len({s.rotation for s in skewed.styles}) == 3
