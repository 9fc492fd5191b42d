"""Per-sample gradients: by layer (fedse's models) and by torch.func (any model) both equal
Opacus's GradSampleModule and a loop over the examples; which one runs, and what by layer refuses;
the clipped sum (rank-one linear gradients kept as factors) equals Opacus's DPOptimizer clipping."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from fedse.models import create_model
from fedse.per_sample import Ghost, by_layer, by_vmap, clipped_sum, layer_plan, per_sample_gradients

BIAS = torch.tensor([0.7, -1.2, 0.1])  # a fixed logit offset (a label prior) in the loss


def _criterion(out, y):
    logits = out + BIAS
    return F.cross_entropy(logits, y), logits


def _looped(model, names, x, y):
    """The definition: each example's own loss, differentiated alone."""
    params = dict(model.named_parameters())
    rows = [
        torch.autograd.grad(_criterion(model(x[i : i + 1]), y[i : i + 1])[0], [params[n] for n in names])
        for i in range(len(y))
    ]
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}


def _data(n, side, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, side, side, generator=g), torch.randint(0, 3, (n,), generator=g)


MODELS = {
    # name: (build, image side, a frozen subset)
    "se_resnet8": (
        lambda: create_model("se_resnet8", num_classes=3, in_channels=1, width=8, norm="groupnorm"),
        8,
        lambda n: n.startswith(("conv1", "bn1")) or (n.startswith("layer1.") and ".se." not in n),
    ),
    "se_cnn": (
        lambda: create_model("se_cnn", num_classes=3, in_channels=1, width=4, image_size=16),
        16,
        lambda n: n.startswith("conv1."),
    ),
    "cnn": (
        lambda: create_model("cnn", num_classes=3, in_channels=1, width=4, image_size=16),
        16,
        lambda n: n.startswith("fc."),
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("subset", ["all", "some"])
def test_by_layer_equals_opacus_hooks_vmap_and_the_loop_over_examples(name, subset):
    build, side, frozen = MODELS[name]
    torch.manual_seed(0)
    model = build()
    names = [n for n, _ in model.named_parameters() if subset == "all" or not frozen(n)]
    assert 0 < len(names) <= len(list(model.parameters()))
    assert layer_plan(model, names) is not None  # fedse's models take the layer path
    x, y = _data(12, side)
    grads, loss, logits = per_sample_gradients(model, names, x, y, _criterion)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulates in .grad
    assert sorted(grads) == sorted(names)
    vmapped, vloss, vlogits = by_vmap(model, names, x, y, _criterion)
    looped = _looped(model, names, x, y)
    for n in names:
        assert grads[n].shape == (12, *dict(model.named_parameters())[n].shape)
        torch.testing.assert_close(grads[n], looped[n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads[n], vmapped[n], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, vloss)
    torch.testing.assert_close(logits, vlogits)
    # Opacus's hooks, a third implementation (GradSampleModule, loss_reduction="mean").
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    gsm = GradSampleModule(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's full backward hook on a first layer whose input needs no grad
        _criterion(gsm(x), y)[0].backward()
    for n, p in model.named_parameters():
        if n in names:
            torch.testing.assert_close(grads[n], p.grad_sample, rtol=1e-4, atol=1e-6)
    gsm.remove_hooks()


class _Shared(nn.Module):
    """Declared for the layer path: one convolution applied twice, a GroupNorm, a head."""

    per_sample_gradients_by_layer = True

    def __init__(self, extra=None):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.norm = nn.GroupNorm(1, 2)
        self.fc = nn.Linear(2, 3)
        self.extra = extra

    def forward(self, x):
        h = self.norm(self.conv(torch.relu(self.conv(x))))
        if self.extra is not None:
            h = self.extra(h)
        return self.fc(h.mean((2, 3)))


def test_a_module_called_twice_adds_up_both_calls():
    torch.manual_seed(0)
    model = _Shared()
    names = [n for n, _ in model.named_parameters()]
    x, y = _data(6, 5, channels=2)
    assert layer_plan(model, names) is not None
    grads, _, _ = per_sample_gradients(model, names, x, y, _criterion)
    looped = _looped(model, names, x, y)
    for n in names:
        torch.testing.assert_close(grads[n], looped[n], rtol=1e-4, atol=1e-6)


class _Convs(nn.Module):
    """Every convolution shape the rules tell apart: one input channel (5x5, stride 2, uneven),
    1x1 with stride, grouped, dilated, and plain 3x3; fed a channels-last input."""

    per_sample_gradients_by_layer = True

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 5, stride=2, padding=1)
        self.point = nn.Conv2d(4, 6, 1, stride=2, bias=False)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.dilated = nn.Conv2d(6, 4, 3, padding=2, dilation=2)
        self.plain = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.point(torch.tanh(self.stem(x)))
        h = self.plain(torch.tanh(self.dilated(torch.tanh(self.grouped(h)))))
        return self.fc(h.mean((2, 3)))


def test_every_convolution_rule_equals_the_loop_over_examples():
    torch.manual_seed(0)
    model = _Convs()
    names = [n for n, _ in model.named_parameters()]
    x, y = _data(5, 13)
    grads, _, _ = per_sample_gradients(model, names, x.to(memory_format=torch.channels_last), y, _criterion)
    looped = _looped(model, names, x, y)
    for n in names:
        torch.testing.assert_close(grads[n], looped[n], rtol=1e-4, atol=1e-6)


def test_an_undeclared_model_or_a_module_without_a_rule_takes_torch_func():
    torch.manual_seed(0)
    undeclared = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(18, 3))
    names = [n for n, _ in undeclared.named_parameters()]
    assert layer_plan(undeclared, names) is None
    x, y = _data(5, 5, channels=2)
    grads, _, _ = per_sample_gradients(undeclared, names, x, y, _criterion)
    looped = _looped(undeclared, names, x, y)
    for n in names:
        torch.testing.assert_close(grads[n], looped[n], rtol=1e-4, atol=1e-6)
    with_layernorm = _Shared(extra=nn.LayerNorm([2, 5, 5]))
    all_names = [n for n, _ in with_layernorm.named_parameters()]
    assert layer_plan(with_layernorm, all_names) is None  # LayerNorm has no rule here
    assert layer_plan(with_layernorm, [n for n in all_names if not n.startswith("extra.")]) is not None  # frozen: fine
    circular = _Shared()
    circular.conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")
    assert layer_plan(circular, ["conv.weight"]) is None


def test_a_trained_parameter_off_the_loss_path_gets_zero_gradients():
    class _Unused(_Shared):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(2, 2)

    torch.manual_seed(0)
    model = _Unused()
    x, y = _data(4, 5, channels=2)
    grads, _, _ = per_sample_gradients(model, ["spare.weight", "fc.bias"], x, y, _criterion)
    assert torch.equal(grads["spare.weight"], torch.zeros(4, 2, 2))
    torch.testing.assert_close(grads["fc.bias"], _looped(model, ["fc.bias"], x, y)["fc.bias"])


def test_an_input_changed_in_place_after_the_call_is_refused():
    class _InPlace(_Shared):
        def forward(self, x):
            h = x.mean((2, 3)) * 2.0
            out = self.fc(h)  # its weight is detached: autograd saves no input, so it cannot notice
            h.add_(1.0)  # the linear layer's recorded input is no longer what it saw
            return out

    torch.manual_seed(0)
    model = _InPlace()
    x, y = _data(3, 5, channels=2)
    with pytest.raises(RuntimeError, match="Linear's input was changed in place"):
        per_sample_gradients(model, ["fc.weight"], x, y, _criterion)


class _TwiceLinear(nn.Module):
    """Declared: a linear layer applied twice on vectors (its rank-one factors cannot be kept)."""

    per_sample_gradients_by_layer = True

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.mix = nn.Linear(3, 3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.fc(self.mix(torch.relu(self.mix(h))))


@pytest.mark.parametrize("name", ["se_cnn", "se_resnet8", "twice", "undeclared"])
def test_clipped_sum_equals_opacus_dpoptimizer_clipping(name):
    # Opacus's own clipping (DPOptimizer.clip_and_accumulate) of the looped per-sample gradients
    # against fedse's clipped sum, at a bound that clips some examples and not others.
    torch.manual_seed(0)
    if name in MODELS:
        build, side, _ = MODELS[name]
        model, x_y = build(), _data(10, side)
    elif name == "twice":
        model, x_y = _TwiceLinear(), _data(10, 6)
    else:
        model, x_y = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, 3)), _data(10, 6)
    x, y = x_y
    names = [n for n, _ in model.named_parameters()]
    looped = _looped(model, names, x, y)
    norms = torch.stack([looped[n].flatten(1).norm(dim=1) for n in names], 1).norm(dim=1)
    bound = norms.median().item()  # half the examples are clipped
    result = clipped_sum(model, names, x, y, _criterion, bound)
    torch.testing.assert_close(result.norms, norms, rtol=1e-4, atol=1e-6)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=bound, expected_batch_size=10
    )
    for n, p in model.named_parameters():
        p.grad_sample = looped[n]
    optimizer.clip_and_accumulate()
    for n, p in model.named_parameters():
        torch.testing.assert_close(result.grads[n], p.summed_grad, rtol=1e-4, atol=1e-6)
    if name == "se_cnn":  # its linear layers' weights stay two factors: never (batch, out, in)
        parts, _, _ = by_layer(model, layer_plan(model, names), names, x, y, _criterion, ghost=True)
        assert isinstance(parts["fc1.0.weight"], Ghost) and isinstance(parts["fc.weight"], Ghost)
        assert not isinstance(parts["conv1.0.weight"], Ghost)


def test_group_norm_rule_reads_the_forwards_saved_statistics():
    # The rule takes GroupNorm's group means and inverse deviations from what autograd saved in
    # the forward; recomputed or saved, the same per-sample gradients.
    from fedse.per_sample import _group_norm, _saved_group_norm_stats

    torch.manual_seed(0)
    m = nn.GroupNorm(2, 4)
    a = torch.randn(3, 4, 5, 5)
    out = m(a.clone().requires_grad_(True))
    stats = _saved_group_norm_stats(out)
    assert stats is not None and stats[0].shape == stats[1].shape == (3, 2)
    _, mean, rstd = torch.ops.aten.native_group_norm(a, None, None, 3, 4, 25, 2, m.eps)
    assert torch.equal(stats[0], mean) and torch.equal(stats[1], rstd)
    with torch.no_grad():
        assert _saved_group_norm_stats(m(a)) is None
    g = torch.randn(3, 4, 5, 5)
    saved, again = _group_norm(m, a, g, {"weight", "bias"}, stats), _group_norm(m, a, g, {"weight", "bias"})
    for k in ("weight", "bias"):
        torch.testing.assert_close(saved[k], again[k])
