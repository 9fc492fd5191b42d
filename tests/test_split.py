"""The shared/private split: disjoint, covering, and exactly what each policy says."""

import pytest
from torch import nn

from fedse.models import SEBlock, create_model
from fedse.policies import POLICIES, create_policy


@pytest.fixture(scope="module", params=["se_resnet8", "se_resnet18"])
def model(request):
    return create_model(request.param, num_classes=10, in_channels=3)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_split_is_disjoint_and_covers_state_dict(model, policy):
    split = create_policy(policy).split(model)
    keys = set(model.state_dict())
    assert set(split.shared).isdisjoint(split.private)
    assert set(split.shared) | set(split.private) == keys
    assert len(split.shared) + len(split.private) == len(keys)


def _module_keys(model, predicate):
    return {f"{n}.{k}" for n, m in model.named_modules() if predicate(m) for k in m.state_dict()}


def test_fedse_keeps_exactly_the_excitation_private(model):
    split = create_policy("fedse").split(model)
    assert set(split.private) == _module_keys(model, lambda m: isinstance(m, SEBlock))
    assert all(".se.fc" in k for k in split.private)


def test_fedavg_keeps_nothing_private(model):
    assert create_policy("fedavg").split(model).private == ()


def test_every_exchanged_tensor_is_floating_point(model):
    # BatchNorm's integer step counter is not in the state dict (unused with momentum set).
    assert all(t.is_floating_point() for t in model.state_dict().values())


def test_fedbn_keeps_every_norm_including_shortcut_norms_and_buffers(model):
    split = create_policy("fedbn").split(model)
    assert set(split.private) == _module_keys(model, lambda m: isinstance(m, nn.BatchNorm2d))
    assert "layer2.0.downsample.1.running_mean" in split.private  # no "bn" in that name
    assert "layer2.0.downsample.1.running_var" in split.private


def test_fedper_keeps_exactly_the_classifier(model):
    assert set(create_policy("fedper").split(model).private) == {"fc.weight", "fc.bias"}


def test_combined_policies_are_unions(model):
    se = set(create_policy("fedse").split(model).private)
    bn = set(create_policy("fedbn").split(model).private)
    head = set(create_policy("fedper").split(model).private)
    assert set(create_policy("fedse-bn").split(model).private) == se | bn
    assert set(create_policy("fedse-head").split(model).private) == se | head
    assert set(create_policy("fedse-prior").split(model).private) == se | {"fc.bias"}  # the bias only, not fc.weight


def test_private_share_is_about_one_percent_for_small_resnets():
    model = create_model("se_resnet20", num_classes=10)
    s = create_policy("fedse").split(model).summary(model)
    assert s["private_params"] == 3 * ((2 * 16 * 4 + 4 + 16) + (2 * 32 * 4 + 4 + 32) + (2 * 64 * 4 + 4 + 64))
    assert 0.5 < s["private_percent"] < 2.0


def test_unknown_policy_lists_valid_ones():
    with pytest.raises(ValueError, match="is not a policy; allowed: apfl, ditto, "):
        create_policy("fedfoo")


def test_fedse_on_a_model_without_se_is_an_error():
    model = create_model("se_resnet8", num_classes=10, reduction=None)
    with pytest.raises(ValueError, match="no such modules"):
        create_policy("fedse").split(model)
