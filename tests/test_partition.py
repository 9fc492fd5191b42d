"""Partitioners: seeded, disjoint, covering, min size, skew vs alpha, clear errors, 10,000 clients; feature skew."""

import numpy as np
import pytest
import torch

from fedse.config import PartitionConfig
from fedse.data.feature_skew import ClientStyle, apply_style, make_client_styles
from fedse.data.partition import (
    PartitionError,
    create_partition,
    label_counts,
    partition_from_config,
    plot_label_counts,
    split_train_test,
)

LABELS = np.repeat(np.arange(10), 100)  # 10 classes x 100 samples
PARAMS = {
    "iid": {},
    "dirichlet": {"alpha": 0.5, "min_size": 10},
    "dirichlet-client": {"alpha": 0.5, "min_size": 10, "size_sigma": 0.5},
    "pathological": {"classes_per_client": 2},
    "quantity": {"alpha": 1.0, "min_size": 10},
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_seeded_disjoint_covering_min_size(name):
    a = create_partition(name, LABELS, 10, seed=1, **PARAMS[name])
    b = create_partition(name, LABELS, 10, seed=1, **PARAMS[name])
    c = create_partition(name, LABELS, 10, seed=2, **PARAMS[name])
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert len(a) == 10
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(len(LABELS)))  # disjoint and covering
    assert min(len(p) for p in a) >= PARAMS[name].get("min_size", 1)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in a)


def _skew(alpha, scheme="dirichlet", labels=LABELS, clients=10):
    """Mean total-variation distance between client label distributions and the global one."""
    values = []
    for seed in range(5):
        parts = create_partition(scheme, labels, clients, seed=seed, alpha=alpha, min_size=1)
        counts = label_counts(labels, parts, 10)
        dist = counts / counts.sum(1, keepdims=True)
        values.append(0.5 * np.abs(dist - 0.1).sum(1).mean())
    return float(np.mean(values))


def test_dirichlet_skew_grows_as_alpha_falls():
    skew = [_skew(a) for a in (100.0, 1.0, 0.1)]
    assert skew[0] < skew[1] < skew[2]
    assert skew[0] < 0.1 and skew[2] > 0.5


LABELS_10K = np.repeat(np.arange(10), 1000)  # 10 classes x 1000 samples


def test_dirichlet_client_skew_grows_as_alpha_falls():
    skew = [_skew(a, "dirichlet-client", LABELS_10K, 20) for a in (100.0, 1.0, 0.1, 0.01)]
    assert skew[0] < skew[1] < skew[2] < skew[3]
    assert skew[0] < 0.1 and skew[2] > 0.5
    held = label_counts(LABELS_10K, create_partition("dirichlet-client", LABELS_10K, 20, seed=0, alpha=0.01), 10)
    assert (held > 0).sum(1).mean() < 4  # tiny alpha: most clients hold one or a few classes


def test_dirichlet_client_sizes_equal_at_sigma_0_spread_grows_with_sigma():
    labels = np.repeat(np.arange(10), 1003)  # 10,030: not a multiple of the client count
    equal = [len(p) for p in create_partition("dirichlet-client", labels, 100, seed=0, alpha=0.3, size_sigma=0.0)]
    assert sum(equal) == len(labels) and max(equal) - min(equal) <= 1

    def spread(sigma):
        sizes = np.array(
            [len(p) for p in create_partition("dirichlet-client", labels, 100, seed=0, alpha=0.3, size_sigma=sigma)]
        )
        assert sizes.sum() == len(labels) and sizes.min() >= 10
        return sizes.std() / sizes.mean()

    assert spread(0.0) < spread(0.3) < spread(1.0) < spread(3.0)
    huge = create_partition("dirichlet-client", labels, 100, seed=0, alpha=0.3, min_size=25, size_sigma=50.0)
    assert min(len(p) for p in huge) == 25  # min_size holds however wide the spread


def test_dirichlet_client_exhausted_class_is_renormalised_over_the_rest():
    # Every client asks for about half class 0, but class 0 has 5 samples: the rest of every request is
    # drawn from the classes left, and every sample is dealt exactly once.
    labels = np.array([0] * 5 + [1] * 495 + [2] * 500)
    parts = create_partition("dirichlet-client", labels, 10, seed=3, alpha=1000.0, min_size=10)
    counts = label_counts(labels, parts, 3)
    assert counts[:, 0].sum() == 5 and (counts.sum(1) == 100).all()
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    # Tiny alpha: clients put all their mass on one class and must fall back on what is left.
    tiny = create_partition("dirichlet-client", LABELS, 50, seed=0, alpha=1e-3, min_size=20)
    assert np.array_equal(np.sort(np.concatenate(tiny)), np.arange(len(LABELS)))
    assert [len(p) for p in tiny] == [20] * 50


def test_dirichlet_client_at_10000_clients_on_70000_labels():
    # The scale of issue 15: completes quickly (vectorised; no per-sample loop), disjoint, sizes met.
    labels = np.random.default_rng(0).integers(0, 10, 70_000)
    parts = create_partition("dirichlet-client", labels, 10_000, seed=0, alpha=0.3, min_size=5, size_sigma=0.5)
    assert len(parts) == 10_000 and min(len(p) for p in parts) >= 5
    assert np.array_equal(np.bincount(np.concatenate(parts), minlength=70_000), np.ones(70_000, dtype=np.int64))
    # 1,000 clients with alpha=0.3 and min_size=10: what the global form refuses.
    parts = create_partition("dirichlet-client", labels, 1_000, seed=0, alpha=0.3, min_size=10)
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_client_reads_its_parameters_from_the_config():
    config = PartitionConfig(scheme="dirichlet-client", num_clients=20, alpha=0.2, min_size=30, size_sigma=0.7)
    parts = partition_from_config(LABELS_10K, config, seed=4)
    same = create_partition("dirichlet-client", LABELS_10K, 20, seed=4, alpha=0.2, min_size=30, size_sigma=0.7)
    assert all(np.array_equal(x, y) for x, y in zip(parts, same, strict=True))
    assert not all(
        np.array_equal(x, y)
        for x, y in zip(parts, create_partition("dirichlet-client", LABELS_10K, 20, seed=4, alpha=0.2), strict=True)
    )


def test_dirichlet_client_samples_per_client_fixes_sizes_and_leaves_the_rest_out():
    labels = np.random.default_rng(0).integers(0, 10, 70_000)
    for n in (100, 1_000):
        parts = create_partition("dirichlet-client", labels, n, seed=0, alpha=0.3, samples_per_client=60)
        assert [len(p) for p in parts] == [60] * n  # the same size at 100 clients as at 1,000
        assert np.array_equal(np.unique(np.concatenate(parts)), np.sort(np.concatenate(parts)))  # disjoint
    spread = create_partition("dirichlet-client", labels, 100, seed=0, alpha=0.3, samples_per_client=60, size_sigma=1)
    assert sum(len(p) for p in spread) == 6_000 and min(len(p) for p in spread) >= 10
    config = PartitionConfig(scheme="dirichlet-client", num_clients=100, alpha=0.3, samples_per_client=60)
    assert [len(p) for p in partition_from_config(labels, config, seed=0)] == [60] * 100


@pytest.mark.parametrize(
    "params,pattern",
    [
        ({"alpha": 0.5, "samples_per_client": 101}, "10 clients x samples_per_client 101 = 1010 samples, but the"),
        ({"alpha": 0.5, "samples_per_client": 5}, "samples_per_client=5 is below min_size=10"),
        ({"alpha": 0.0}, "dirichlet-client alpha must be a finite number > 0, got 0.0"),
        ({"alpha": 0.5, "size_sigma": -1.0}, "size_sigma must be a finite number >= 0, got -1.0"),
        ({"alpha": 0.5, "size_sigma": float("nan")}, "size_sigma must be a finite number >= 0, got nan"),
        ({"alpha": 0.5, "min_size": 101}, "10 clients x min_size 101 = 1010 samples needed, but the dataset has 1000"),
    ],
)
def test_dirichlet_client_impossible_settings(params, pattern):
    with pytest.raises(PartitionError, match=pattern):
        create_partition("dirichlet-client", LABELS, 10, seed=0, **params)


def test_pathological_gives_exactly_k_classes_per_client():
    parts = create_partition("pathological", LABELS, 10, seed=0, classes_per_client=3)
    counts = label_counts(LABELS, parts, 10)
    assert ((counts > 0).sum(1) == 3).all()


@pytest.mark.parametrize(
    "k,clients,pattern",
    [
        (0, 10, "classes_per_client must be in \\[1, 10\\].*got 0"),
        (11, 10, "got 11"),
        (2, 4, "4 clients x 2 classes each = 8 slots < 10 classes"),
    ],
)
def test_pathological_impossible_settings(k, clients, pattern):
    with pytest.raises(PartitionError, match=pattern):
        create_partition("pathological", LABELS, clients, seed=0, classes_per_client=k)


def test_impossible_min_size_is_a_clear_error():
    small = np.repeat(np.arange(10), 5)  # 50 samples
    with pytest.raises(PartitionError, match="min_size 10 = 100 samples needed, but the dataset has 50"):
        create_partition("dirichlet", small, 10, seed=0, alpha=0.1, min_size=10)
    with pytest.raises(PartitionError, match=r"after 7 retries.*min_size=30.*larger alpha.*scheme 'dirichlet-client'"):
        from fedse.data.partition import dirichlet

        dirichlet(LABELS, 20, alpha=0.01, seed=0, min_size=30, max_retries=7)
    with pytest.raises(PartitionError, match="quantity"):
        create_partition("quantity", LABELS, 20, seed=0, alpha=0.01, min_size=40)
    with pytest.raises(PartitionError, match="3 clients x min_size 1 = 3 samples needed"):
        create_partition("iid", np.array([0, 1]), 3, seed=0)


def test_registry_errors_name_the_bad_name_or_parameter():
    with pytest.raises(ValueError, match="unknown partition scheme 'shards'.*valid schemes"):
        create_partition("shards", LABELS, 10, seed=0)
    with pytest.raises(ValueError, match="'iid' takes .*not \\['alpha'\\]"):
        create_partition("iid", LABELS, 10, seed=0, alpha=0.1)


def test_split_train_test_is_stratified_hand_computed():
    labels = np.array([0] * 8 + [1] * 4)
    train, test = split_train_test([np.arange(12)], labels, test_fraction=0.25, seed=0)
    assert np.bincount(labels[test[0]], minlength=2).tolist() == [2, 1]
    assert np.bincount(labels[train[0]], minlength=2).tolist() == [6, 3]
    assert np.array_equal(np.sort(np.concatenate([train[0], test[0]])), np.arange(12))
    again = split_train_test([np.arange(12)], labels, test_fraction=0.25, seed=0)
    assert np.array_equal(again[1][0], test[0])


def test_label_counts_hand_made():
    labels = np.array([0, 0, 1, 2, 2, 2])
    counts = label_counts(labels, [np.array([0, 2, 3]), np.array([1, 4, 5])], 3)
    assert counts.tolist() == [[1, 1, 1], [1, 0, 2]]


def test_plot_is_a_png(tmp_path):
    path = tmp_path / "plot.png"
    plot_label_counts(np.array([[1, 2], [3, 0]]), path, class_names=["a", "b"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_client_styles_deterministic_distinct_and_validated():
    a = make_client_styles(4, kinds=["rotation", "noise"], strength=0.5, seed=0)
    assert a == make_client_styles(4, kinds=["rotation", "noise"], strength=0.5, seed=0)
    assert len({s.rotation for s in a}) == 4 and max(abs(s.rotation) for s in a) == pytest.approx(22.5)
    with pytest.raises(ValueError, match="unknown feature-skew kind.*'blur'"):
        make_client_styles(4, kinds=["blur"], strength=0.5, seed=0)


def test_apply_style_identity_rotation_contrast_noise():
    img = torch.arange(9, dtype=torch.uint8).view(1, 1, 3, 3) * 20
    assert torch.equal(apply_style(img, ClientStyle()), img)
    rotated = apply_style(img, ClientStyle(rotation=90.0))
    assert torch.equal(rotated, torch.rot90(img, 1, dims=(2, 3)))  # counter-clockwise
    flat = torch.full((1, 1, 2, 2), 100, dtype=torch.uint8)
    assert apply_style(flat, ClientStyle(contrast=2.0)).unique().tolist() == [100]  # constant image: mean kept
    assert apply_style(flat, ClientStyle(brightness=0.2)).unique().tolist() == [151]  # round((100/255+0.2)*255)
    noisy = apply_style(flat, ClientStyle(noise_std=0.1, seed=3))
    assert torch.equal(noisy, apply_style(flat, ClientStyle(noise_std=0.1, seed=3)))
    assert not torch.equal(noisy, apply_style(flat, ClientStyle(noise_std=0.1, seed=4)))


def test_label_plot_stays_small_at_many_clients(tmp_path):
    # The figure's height is capped: 1,000 clients give the same image size as 40.
    from PIL import Image

    rng = np.random.default_rng(0)
    plot_label_counts(rng.integers(0, 50, (40, 10)), tmp_path / "forty.png")
    plot_label_counts(rng.integers(0, 50, (1000, 10)), tmp_path / "thousand.png")
    with Image.open(tmp_path / "forty.png") as a, Image.open(tmp_path / "thousand.png") as b:
        assert a.size == b.size and a.size[1] < 2000
