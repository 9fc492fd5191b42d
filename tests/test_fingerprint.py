"""Gate fingerprints: probing, gate statistics, thresholds, MMD, baselines, AUROC, corruptions."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedse.data.transforms import normalize
from fedse.fingerprint import (
    CORRUPTIONS,
    FeatureGaussian,
    GateStats,
    auroc,
    corrupt,
    mmd2,
    msp_score,
    probe,
    threshold_at,
)
from fedse.models import SEBlock, create_model

MEAN, STD = (0.5,), (0.25,)


def _tiny_model():
    torch.manual_seed(0)
    model = create_model("se_resnet8", num_classes=3, in_channels=1, image_size=8, width=4)
    g = torch.Generator().manual_seed(1)
    for module in model.modules():  # non-trivial running statistics and SE weights
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.3 * torch.randn(module.num_features, generator=g))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=g))
        if isinstance(module, SEBlock):
            for p in module.parameters():
                p.data.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _images(n=10, c=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)


# --------------------------------------------------------------------------- probe


def test_probe_gates_match_hand_computed_forward_pass():
    model, images = _tiny_model(), _images()
    result = probe(model, images, mean=MEAN, std=STD, batch_size=4)  # 3 batches, last one short

    x = (images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(x)))
        block = model.layer1[0]
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem)))))
        se = block.se
        expected = torch.sigmoid(se.fc2(torch.relu(se.fc1(branch.mean(dim=(2, 3))))))
        features = model.forward_features(normalize(images, MEAN, STD))
        logits = model(normalize(images, MEAN, STD))

    n_se = sum(isinstance(m, SEBlock) for m in model.modules())
    assert n_se == 3 and len(result.gates) == n_se
    assert [tuple(g.shape) for g in result.gates] == [(10, 4), (10, 8), (10, 16)]
    torch.testing.assert_close(result.gates[0], expected)
    torch.testing.assert_close(result.features, features)
    torch.testing.assert_close(result.logits, logits)
    assert result.gates[0].dtype == torch.float32 and result.gates[0].device.type == "cpu"
    assert not expected.allclose(torch.full_like(expected, 0.5))  # the hand pass is not trivial


def test_probe_adds_logit_bias_restores_mode_and_removes_hooks():
    model = _tiny_model().train()
    images = _images(4)
    bias = torch.tensor([1.0, -2.0, 0.5])
    plain = probe(model, images, mean=MEAN, std=STD)
    biased = probe(model, images, mean=MEAN, std=STD, logit_bias=bias)
    torch.testing.assert_close(biased.logits, plain.logits + bias)
    assert model.training  # mode restored
    gates = [m.gate for m in model.modules() if isinstance(m, SEBlock)]
    assert all(not g._forward_hooks for g in gates)
    with pytest.raises(RuntimeError):  # 3 channels into a 1-channel stem fails inside the forward
        probe(model, _images(2, c=3), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert all(not g._forward_hooks for g in gates) and model.training


def test_probe_refuses_model_without_se_and_bad_inputs():
    plain = create_model("se_resnet8", num_classes=3, in_channels=1, width=4, reduction=None)
    with pytest.raises(ValueError, match="SEResNet has no SEBlock"):
        probe(plain, _images(2), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="uint8"):
        probe(_tiny_model(), _images(2).float(), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"logit_bias must have shape \(3,\)"):
        probe(_tiny_model(), _images(2), mean=MEAN, std=STD, logit_bias=torch.zeros(4))


# --------------------------------------------------------------------------- GateStats


def _gates():
    return [
        torch.tensor([[0.1, 0.9], [0.3, 0.5], [0.2, 0.7], [0.6, 0.3]]),
        torch.tensor([[0.5], [0.5], [0.5], [0.5]]),  # a constant channel: variance = eps
    ]


def test_gate_stats_fit_matches_numpy_and_scores_by_hand():
    gates, eps = _gates(), 1e-4
    stats = GateStats.fit(gates, eps=eps)
    assert stats.count == 4
    for g, m, v in zip(gates, stats.mean, stats.var, strict=True):
        np.testing.assert_allclose(m.numpy(), np.mean(g.numpy(), axis=0), rtol=1e-6)
        np.testing.assert_allclose(v.numpy(), np.var(g.numpy(), axis=0) + eps, rtol=1e-6)

    at_mean = [m[None, :] for m in stats.mean]
    assert stats.score(at_mean).tolist() == [0.0]

    # Block 0: mean (0.3, 0.6), var (0.035, 0.05) + eps; block 1: mean 0.5, var eps.
    point = [torch.tensor([[0.5, 0.4]]), torch.tensor([[0.52]])]
    by_hand = ((0.5 - 0.3) ** 2 / 0.0351 + (0.4 - 0.6) ** 2 / 0.0501 + 0.02**2 / 1e-4) / 3
    torch.testing.assert_close(stats.score(point), torch.tensor([by_hand]))
    # On the fitted data the mean score is (sum of var / (var + eps)) / channels, about 1.
    assert stats.score(gates).mean().item() == pytest.approx((0.035 / 0.0351 + 0.05 / 0.0501) / 3, rel=1e-5)


def test_gate_stats_state_round_trip_and_validation():
    stats = GateStats.fit(_gates())
    state = stats.to_state()
    assert sorted(state) == ["gate_count", "gate_mean.0", "gate_mean.1", "gate_var.0", "gate_var.1"]
    assert state["gate_count"].dtype == torch.int64 and state["gate_count"].dim() == 0
    back = GateStats.from_state(state)
    assert back.count == stats.count
    for a, b in zip(stats.mean + stats.var, back.mean + back.var, strict=True):
        assert torch.equal(a, b)

    negative = dict(state, **{"gate_var.1": torch.tensor([-1.0])})
    with pytest.raises(ValueError, match=r"gate_var\.1 must be > 0"):
        GateStats.from_state(negative)
    missing = {k: v for k, v in state.items() if k != "gate_var.0"}
    with pytest.raises(ValueError, match=r"missing key\(s\) \['gate_var\.0'\]"):
        GateStats.from_state(missing)
    mismatched = dict(state, **{"gate_mean.0": torch.zeros(3)})
    with pytest.raises(ValueError, match="equal length"):
        GateStats.from_state(mismatched)
    with pytest.raises(ValueError, match="at least 2 inputs"):
        GateStats.fit([torch.zeros(1, 4)])
    with pytest.raises(ValueError, match="expected gates of 2 SE blocks"):
        stats.score(_gates()[:1])


# --------------------------------------------------------------------------- threshold_at


def test_threshold_at_realises_the_false_alarm_rate():
    g = torch.Generator().manual_seed(0)
    held_out, fresh = torch.randn(20_000, generator=g), torch.randn(100_000, generator=g)
    t = threshold_at(held_out, 0.05)
    assert (fresh > t).double().mean().item() == pytest.approx(0.05, abs=0.01)
    assert (held_out > t).double().mean().item() <= 0.05
    assert threshold_at(torch.arange(10.0), 0.25) == 7.0  # "higher" quantile: 2 of 10 above
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"false_alarm must be in \(0, 1\)"):
            threshold_at(held_out, bad)


# --------------------------------------------------------------------------- auroc


def test_auroc_hand_computed_with_ties():
    # unusual 1 beats 0, ties 1 (1/2), loses to 2; unusual 3 beats all three: (1 + 0.5 + 3) / 6.
    assert auroc(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 3.0])) == 0.75
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5
    assert auroc(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 2.0, 2.0])) == pytest.approx((1 + 1.5 + 1.5) / 6)
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        auroc(torch.tensor([]), torch.tensor([1.0]))


def test_auroc_equals_pairwise_count():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 5, (40,), generator=g).float(), torch.randint(1, 6, (30,), generator=g).float()
    pairs = (y[:, None] > x[None, :]).double() + 0.5 * (y[:, None] == x[None, :]).double()
    assert auroc(x, y) == pytest.approx(pairs.mean().item(), abs=1e-12)


# --------------------------------------------------------------------------- mmd2


def test_mmd2_hand_computed_and_median_heuristic():
    a, b = torch.tensor([[0.0], [0.0]]), torch.tensor([[3.0], [3.0]])
    assert mmd2(a, b, bandwidth=1.0) == pytest.approx(2 - 2 * math.exp(-4.5))
    # k(0,1) = e^-1/2, k(0,2) = e^-2; the cross term averages 1, e^-2, e^-1/2, e^-1/2.
    a, b = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    by_hand = math.exp(-0.5) + math.exp(-2) - 2 * (1 + math.exp(-2) + 2 * math.exp(-0.5)) / 4
    assert mmd2(a, b, bandwidth=1.0) == pytest.approx(by_hand)
    # Pooled pairwise distances 1, 0, 2, 1, 1, 2: median 1.
    assert mmd2(a, b) == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="bandwidth must be"):
        mmd2(a, b, bandwidth=0.0)


def test_mmd2_near_zero_for_same_distribution_and_larger_for_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 5, generator=g), torch.randn(200, 5, generator=g)
    shifted = torch.randn(200, 5, generator=g) + 1.0
    same, drift = mmd2(a, b), mmd2(a, shifted)
    assert abs(same) < 0.01
    assert drift > 0.1 and drift > 10 * abs(same)


# --------------------------------------------------------------------------- baselines


def test_msp_score_on_hand_made_logits():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [100.0, 0.0], [0.0, math.log(4.0)]])
    torch.testing.assert_close(msp_score(logits), torch.tensor([0.5, 0.25, 0.0, 0.2]))


def test_feature_gaussian_on_two_classes():
    spread = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
    features = torch.cat([spread, spread + torch.tensor([10.0, 10.0])])
    labels = torch.tensor([0] * 4 + [1] * 4)
    model = FeatureGaussian.fit(features, labels)
    torch.testing.assert_close(model.means, torch.tensor([[0.0, 0.0], [10.0, 10.0]], dtype=torch.float64))
    # Tied covariance diag(0.5, 0.5), ridge 1e-3 * 0.5 + 1e-6.
    var = 0.5 + 1e-3 * 0.5 + 1e-6
    scores = model.score(torch.tensor([[0.0, 0.0], [10.0, 10.0], [3.0, 0.0], [9.0, 12.0]]))
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.0, 9 / var, 5 / var]))


# --------------------------------------------------------------------------- corrupt


def _smooth_images():
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(4, 3, 4, 4, generator=g)
    return (F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_keeps_shape_is_seeded_and_grows_with_strength(kind):
    images = _smooth_images()
    mild, strong = corrupt(images, kind, 1, seed=0), corrupt(images, kind, 2, seed=0)
    for out in (mild, strong):
        assert out.shape == images.shape and out.dtype == torch.uint8
    change = lambda out: (out.float() - images.float()).abs().mean().item()
    assert 0 < change(mild) < change(strong)
    assert torch.equal(corrupt(images, kind, 2, seed=0), strong)


def test_corrupt_noise_depends_on_seed_and_blur_keeps_constant_images():
    images = _smooth_images()
    assert not torch.equal(corrupt(images, "gaussian_noise", 1, 0), corrupt(images, "gaussian_noise", 1, 1))
    flat = torch.full((1, 1, 5, 5), 77, dtype=torch.uint8)
    assert torch.equal(corrupt(flat, "blur", 2, 0), flat)
    assert torch.equal(corrupt(flat, "contrast", 2, 0), flat)


def test_corrupt_refuses_unknown_kind_and_strength():
    with pytest.raises(ValueError, match=r"unknown corruption 'fog'; allowed: \['gaussian_noise'"):
        corrupt(_smooth_images(), "fog", 1, 0)
    with pytest.raises(ValueError, match=r"strength must be one of \[1, 2\]"):
        corrupt(_smooth_images(), "blur", 3, 0)


def test_mmd_permutation_test_flags_a_shift_and_not_a_resample():
    from fedse.fingerprint import mmd_test

    g = torch.Generator().manual_seed(3)
    own, same = torch.randn(60, 5, generator=g), torch.randn(60, 5, generator=g)
    shifted = torch.randn(60, 5, generator=g) + 0.8
    stat_same, p_same = mmd_test(own, same, permutations=99, seed=0)
    stat_shift, p_shift = mmd_test(own, shifted, permutations=99, seed=0)
    assert p_shift == 0.01 and stat_shift > stat_same  # no permutation reaches the shifted sample's MMD
    assert p_same > 0.05
    # Under the null the p-value is uniform: about 5% of resamples fall below 0.05.
    rejections = sum(
        mmd_test(torch.randn(30, 3, generator=g), torch.randn(30, 3, generator=g), permutations=39, seed=k)[1] <= 0.05
        for k in range(60)
    )
    assert rejections <= 9  # 60 x 0.05 = 3 expected; 9 or more has probability < 0.3%


# --------------------------------------------------------------------------- fedse monitor: what a reader sees


def _monitor_rows(test_sizes, train_sizes=None, other=200):
    """monitor.json's per-client rows as far as the table's caption reads them."""
    scenarios = ["own test", "other clients", "blur 1"]
    rows = []
    for i, n in enumerate(test_sizes):
        train = min(200, (train_sizes or [300] * len(test_sizes))[i])
        sizes = {"own test": min(200, n), "other clients": other, "blur 1": min(200, n)}
        drift = {s: {"mmd2": 0.0, "p": 0.5, "flagged": False, "images": [train, sizes[s]]} for s in scenarios}
        rows.append({"client": i, "test_samples": n, "drift": drift})
    return rows


def _summary():
    from simulations.monitor import METHODS

    return {s: {m: {"mean": 0.7, "std": 0.1} for m in METHODS} for s in ("other clients", "blur 1")}


def test_the_monitor_table_names_the_images_each_drift_test_really_compared():
    from simulations.monitor import monitor_table

    flagged = {"own test": 0.0, "other clients": 0.5, "blur 1": 1.0}
    caption = lambda rows: monitor_table(_summary(), flagged, 3, rows).split("\n\n")[0]  # noqa: E731
    first = caption(_monitor_rows([28, 81, 40], train_sizes=[97, 250, 300]))
    assert "200 vs 200" not in first
    assert "97-200 of the client's own train images" in first
    assert "28-81 images of its own test part" in first and " 200 of other clients' test images" in first
    # a monitor.json written before the counts were recorded: the clients' test sizes
    old = [{k: v for k, v in r.items() if k != "drift"} for r in _monitor_rows([28, 81, 40])]
    first = caption(old)
    assert "28-81 images of its own test part" in first and "200 vs 200" not in first
    # without rows (docs/build_results.py reads the table's rows only): no count it does not know
    first = caption(None)
    assert "up to 200" in first and "200 vs 200" not in first
    # the rows docs/build_results.py reads stay as they were
    rows = [line for line in monitor_table(_summary(), flagged, 3).splitlines() if line.startswith("|")]
    assert (
        rows[0] == "| scenario | gate monitor | max softmax prob. | feature Mahalanobis | best | batch drift flagged |"
    )
    assert rows[2] == "| own test (false alarms) | | | | | 0.00 |"


def _monitor_figures(clients=6):
    from simulations.monitor import _figures

    rng = np.random.default_rng(0)
    fingerprints = [[0.5 + 0.02 * rng.standard_normal(n) for n in (4, 8)] for _ in range(clients)]
    relative = {
        s: [rng.lognormal(i * 0.3 - 1, 0.5, 30) for _ in range(clients)]
        for i, s in enumerate(["own test", "other clients", "blur 1", "blur 2"])
    }
    counts = rng.integers(0, 20, (clients, 3))
    return _figures(
        fingerprints, counts, relative, setting="digits, Dirichlet(0.1), 20 clients: fedse-la", false_alarm=0.05
    )


def test_the_gate_heatmaps_have_colourbars_labelled_axes_and_a_scale_centred_on_the_clients_mean():
    import matplotlib.pyplot as plt

    figures = _monitor_figures()
    fig = figures["gate_heatmaps.png"]
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2 and all(im.colorbar is not None for im in images)
    assert all(im.colorbar.ax.get_ylabel() for im in images)  # each colour scale says what it is
    common, deviation = images
    assert common.get_clim() == (0, 1)
    lo, hi = deviation.get_clim()
    assert lo == -hi and hi < 0.2  # a diverging scale around the mean, as wide as the clients differ
    data = deviation.get_array()
    assert data.shape == (6, 12) and np.allclose(data.mean(0), 0)  # one row per client, its difference
    main = deviation.axes
    assert main.get_ylabel() == "client" and "channel" in main.get_xlabel()
    assert "digits, Dirichlet(0.1), 20 clients: fedse-la" in fig.axes[0].get_title()
    sim = figures["similarity.png"]
    panels = [ax for ax in sim.axes if ax.get_images()]
    assert len(panels) == 2
    for ax in panels:
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("client", "client")
        assert ax.get_images()[0].colorbar.ax.get_ylabel() == "cosine similarity"
    assert "fedse-la" in sim._suptitle.get_text()
    for fig in figures.values():
        plt.close(fig)


def test_the_scores_figure_shows_every_client_per_scenario_with_its_threshold():
    import matplotlib.pyplot as plt

    figures = _monitor_figures(clients=6)
    fig = figures["scores.png"]
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert [ax.get_title().split(":")[0] for ax in panels] == ["own test", "other clients", "blur 1", "blur 2"]
    for ax in panels:
        lines = [line for line in ax.get_lines() if line.get_label() == "the client's alarm threshold"]
        assert len(lines) == 1 and list(lines[0].get_ydata()) == [1.0, 1.0]  # every client's threshold is 1
        medians = [
            line
            for line in ax.get_lines()
            if line.get_color() == "black" and len(line.get_xdata()) == 2 and line.get_label().startswith("_")
        ]
        assert len(medians) >= 6  # a box (its median line) per client
        assert "flagged" in ax.get_title()
    assert "threshold" in panels[0].get_ylabel() and panels[-1].get_xlabel() == "client"
    assert "set to flag 5% of its held-out images" in fig._suptitle.get_text()
    for fig in figures.values():
        plt.close(fig)


def test_the_monitor_progress_counts_clients_times_scenarios_and_is_silent_when_quiet(capsys):
    from simulations.monitor import _Progress

    with _Progress(3, 4, quiet=True) as progress:
        assert progress.bar is None
        progress.step(0, "own test", done=True)
    assert capsys.readouterr() == ("", "")
    with _Progress(3, 4, quiet=False) as progress:
        task = progress.bar.tasks[0]
        assert task.total == 12
        progress.step(0, "own test")
        progress.step(0, "own test", done=True)
        progress.step(1, "blur 1", done=True)
        assert task.completed == 2 and task.description == "client 2/3: blur 1"
        assert progress.bar.console.stderr  # the table printed afterwards has stdout to itself
