"""SE-ResNet: SE block arithmetic, placement, shapes, Opacus compatibility."""

import pytest
import torch
from torch import nn

from fedse.models import MODELS, BasicBlock, SEBlock, create_model, make_divisible, se_hidden_width


@pytest.mark.parametrize(
    "channels,reduction,hidden", [(64, 16, 4), (256, 16, 16), (512, 16, 32), (16, 16, 4), (32, 4, 8)]
)
def test_se_block_parameter_count_matches_formula(channels, reduction, hidden):
    se = SEBlock(channels, reduction)
    assert se.hidden == hidden == se_hidden_width(channels, reduction)
    expected = 2 * channels * hidden + hidden + channels
    assert sum(p.numel() for p in se.parameters()) == expected
    if channels % (reduction * 4) == 0:  # h == C/r exactly: 2C^2/r plus biases
        assert expected == 2 * channels**2 // reduction + channels // reduction + channels


def test_make_divisible_keeps_a_minimum_and_rounds():
    assert make_divisible(1.0) == 4  # C=16, r=16 -> still 4 hidden units
    assert make_divisible(16.0) == 16
    assert make_divisible(18.0) == 20  # nearest multiple of 4
    assert make_divisible(9.0, 8) == 16  # 8 would lose more than 10%


def test_se_block_scales_channels_by_sigmoid_gate():
    se = SEBlock(8, reduction=2)
    x = torch.randn(2, 8, 5, 5)
    gate = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean(dim=(2, 3))))))
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])


def test_se_sits_on_residual_branch_before_skip_addition():
    block = BasicBlock(8, 8, 1, nn.BatchNorm2d, reduction=2).eval()
    x = torch.randn(2, 8, 6, 6)
    branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
    expected = torch.relu(block.se(branch) + x)  # identity path untouched
    torch.testing.assert_close(block(x), expected)
    # Zeroing the gate (sigmoid -> 0) leaves exactly relu(identity).
    nn.init.zeros_(block.se.fc2.weight)
    nn.init.constant_(block.se.fc2.bias, -1e4)
    torch.testing.assert_close(block(x), torch.relu(x))


@pytest.mark.parametrize("name", sorted(n for n in MODELS if MODELS[n].family != "cnn"))  # the cnn's own tests below
@pytest.mark.parametrize("in_channels,size", [(1, 8), (3, 32)])
def test_output_shapes(name, in_channels, size):
    model = create_model(name, num_classes=7, in_channels=in_channels, image_size=size).eval()
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    n_se = sum(isinstance(m, SEBlock) for m in model.modules())
    assert n_se == sum(MODELS[name].blocks)  # one SE block per residual block


def test_every_se_block_is_named_se_and_head_is_fc():
    model = create_model("se_resnet14", num_classes=10)
    names = [n for n, m in model.named_modules() if isinstance(m, SEBlock)]
    assert names and all(n.endswith(".se") for n in names)
    assert "layer1.0.se.fc1.weight" in model.state_dict()
    assert model.get_classifier() is model.fc


def test_reduction_changes_private_width():
    small = create_model("se_resnet20", num_classes=10, reduction=16)
    wide = create_model("se_resnet20", num_classes=10, reduction=4)
    count = lambda m: sum(p.numel() for mod in m.modules() if isinstance(mod, SEBlock) for p in mod.parameters())  # noqa: E731
    assert count(wide) > count(small)


def test_groupnorm_variant_passes_opacus_validator():
    # check_dp_model's refusal of the BatchNorm variant is tested once, in test_privacy.
    from opacus.validators import ModuleValidator

    gn = create_model("se_resnet8", num_classes=10, norm="groupnorm")
    assert ModuleValidator.validate(gn, strict=False) == []
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="se_resnet99.*valid models"):
        create_model("se_resnet99", num_classes=10)
    with pytest.raises(ValueError, match="layernorm"):
        create_model("se_resnet8", num_classes=10, norm="layernorm")


def test_the_reference_cnn_is_pfllibs_fedavgcnn_and_se_cnn_adds_one_se_block_a_stage():
    # PFLlib's FedAvgCNN(in_features=1, num_classes=10, dim=1024): conv 1->32 (5x5) 832, conv 32->64
    # 51,264, fc 1024->512 524,800, fc 512->10 5,130: 582,026; on CIFAR (dim 1600): 878,538.
    from fedse.models import CNN, SEBlock

    cnn = create_model("cnn", num_classes=10, in_channels=1, image_size=28)
    assert isinstance(cnn, CNN) and sum(p.numel() for p in cnn.parameters()) == 582_026
    assert sum(p.numel() for p in create_model("cnn", num_classes=10, in_channels=3).parameters()) == 878_538
    se = create_model("se_cnn", num_classes=10, in_channels=1, image_size=28)
    blocks = [m for m in se.modules() if isinstance(m, SEBlock)]
    assert [b.channels for b in blocks] == [32, 64]
    # SE(32): 2*32*4 + 4 + 32 = 292; SE(64): 2*64*4 + 4 + 64 = 580 (hidden width 4 at r = 16)
    assert sum(p.numel() for p in se.parameters()) - 582_026 == 292 + 580
    x = torch.randn(3, 1, 28, 28)
    assert cnn(x).shape == (3, 10) and se(x).shape == (3, 10) and se.forward_features(x).shape == (3, 512)
    assert not any(isinstance(m, SEBlock) for m in cnn.modules())


def test_fedses_split_on_se_cnn_keeps_the_two_excitation_mlps_private():
    from fedse.policies import create_policy

    se = create_model("se_cnn", num_classes=10, in_channels=1, image_size=28)
    private = create_policy("fedse").split(se).private
    assert set(private) == {f"se{i}.fc{j}.{t}" for i in (1, 2) for j in (1, 2) for t in ("weight", "bias")}
    assert create_policy("fedper").split(se).private == ("fc.weight", "fc.bias")
    with pytest.raises(ValueError, match="policy 'fedbn' keeps \\['norm'\\] private, but CNN has no such modules"):
        create_policy("fedbn").split(se)  # no normalisation layers: FedBN is undefined on it


def test_the_cnn_refuses_images_too_small_and_a_norm_it_does_not_have():
    with pytest.raises(ValueError, match="at least 16x16 pixels"):
        create_model("cnn", num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="no normalisation layers for norm 'groupnorm'"):
        create_model("cnn", num_classes=10, in_channels=1, image_size=28, norm="groupnorm")
