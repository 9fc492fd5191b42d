"""Config -> shards: deterministic, each client's own train/test split, pooled test, feature skew."""

import hashlib

import numpy as np
import torch
from conftest import tiny_config

from fedse.data.federated import _build, build_federated_data


def _fresh(cfg):
    """The federation of ``cfg`` built from nothing: the per-process cache cleared first."""
    _build.cache_clear()
    return build_federated_data(cfg)


def _same_shards(a, b) -> None:
    assert a is not b and a.num_clients == b.num_clients
    for which in ("train_parts", "test_parts"):
        for x, y in zip(getattr(a, which), getattr(b, which), strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    for client in range(a.num_clients):
        sa, sb = a.shard(client), b.shard(client)
        for name in ("train_images", "train_labels", "test_images", "test_labels"):
            x, y = getattr(sa, name), getattr(sb, name)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), (client, name)


def test_shards_are_deterministic_disjoint_and_cover_the_dataset():
    cfg = tiny_config()
    # Built twice from nothing (the cache cleared each time): the same indices, labels and images,
    # with and without each client's feature style.
    skewed = tiny_config(partition={"feature_skew": ["rotation", "contrast"], "feature_skew_strength": 1.0})
    for config in (cfg, skewed):
        _same_shards(_fresh(config), _fresh(config))
    fed = _fresh(cfg)
    assert fed is build_federated_data(tiny_config())  # cached per process: same config, same object
    # Pinned for seed 0, digits (1,797 images), 3 clients, Dirichlet alpha 1.0, test_fraction 0.25:
    # a change in the partition or the train/test split changes these.
    assert [len(p) for p in fed.train_parts] == [558, 449, 337]
    assert [len(p) for p in fed.test_parts] == [188, 153, 112]
    shard = fed.shard(0)
    assert np.bincount(shard.train_labels.numpy(), minlength=10).tolist() == [73, 2, 88, 52, 93, 86, 38, 4, 73, 49]
    assert np.bincount(shard.test_labels.numpy(), minlength=10).tolist() == [25, 1, 30, 17, 31, 29, 13, 2, 24, 16]
    assert fed.train_parts[0][:10].tolist() == [0, 4, 5, 6, 8, 10, 14, 16, 19, 20]
    assert shard.train_labels[:12].tolist() == [0, 4, 5, 6, 8, 0, 4, 6, 9, 0, 2, 3]
    digest = hashlib.sha256(b"".join(p.astype("<i8").tobytes() for p in (*fed.train_parts, *fed.test_parts)))
    assert digest.hexdigest() == "d7d22bbcbd06499768fb4adb8c53554d01af7532bdbc750e130a6dfa781bc7e0"
    # client 0's train labels and images, in order (each image with its own label)
    shard_digest = hashlib.sha256(
        shard.train_labels.numpy().astype("<i8").tobytes() + shard.train_images.numpy().tobytes()
    )
    assert shard_digest.hexdigest() == "a81f73b5c926f251db6448c34ae89954ff2cdd13e574e54c22f9c875115b8d47"
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
