"""SE-ResNet family: ResNets whose residual blocks carry squeeze-and-excitation.

Squeeze-and-Excitation Networks, Hu, Shen, Albanie, Sun, Wu (CVPR 2018,
https://arxiv.org/abs/1709.01507). An SE block squeezes each channel of a
feature map to one number (global average pooling over H x W), passes the
vector through an excitation MLP ``C -> h -> C`` (Linear, ReLU, Linear,
sigmoid) and rescales each channel by its gate. In a residual block the SE
block sits on the residual branch, after the last convolution and norm and
before the skip addition, so the identity path stays clean.

Two families:

* CIFAR-style (He et al. 2016, section 4.2): depth ``6n + 2``, three stages of
  widths ``w, 2w, 4w``, a 3x3 stem. ``se_resnet8/14/20/32``. Small enough to
  train federated on two CPU cores.
* ImageNet-style ``se_resnet18/34``: four stages ``64..512`` (times ``width/64``).
  For small images (<= 64 px) the stem is a 3x3 convolution with no max-pool,
  as in the CIFAR ResNet-18 used across the personalized-FL literature.

Fixed attribute names make state-dict keys predictable, which is what the
shared/private split (:mod:`fedse.split`) relies on: every SE block is
``<block>.se`` (keys ``layer1.0.se.fc1.weight``), the classifier is ``fc``,
a projection shortcut is ``<block>.downsample`` (``Sequential(conv, norm)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

if TYPE_CHECKING:  # models and the training loop import with torch alone (a bare GPU machine)
    from .config import Config, ModelConfig

__all__ = [
    "MODELS",
    "NORM_TYPES",
    "base_width",
    "build_model",
    "SEBlock",
    "SEResNet",
    "BasicBlock",
    "CNN",
    "create_model",
    "make_divisible",
    "make_norm",
    "se_hidden_width",
]

NORMS = ("batchnorm", "groupnorm")


def make_divisible(value: float, divisor: int = 4, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``).

    As in timm's ``make_divisible``: rounding never goes more than 10% below
    ``value``, so a stage never loses much width.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def se_hidden_width(channels: int, reduction: int, divisor: int = 4) -> int:
    """Hidden width ``h`` of the excitation MLP: ``C / r`` rounded to a multiple of
    ``divisor`` and at least ``divisor``, so narrow stages (C=16, r=16) still get
    a 4-unit bottleneck rather than a 1-unit one."""
    return make_divisible(channels / reduction, divisor)


# Every normalisation layer: the "norm" part of the split, and what training keeps frozen.
NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm)


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose integer step counter stays out of the state dict.

    With ``momentum`` set (0.1 here) the counter is never read; an integer
    counter is nothing to average, clip or add noise to, so it is a
    non-persistent buffer: every tensor fedse exchanges is a float tensor.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        counter = self._buffers.pop("num_batches_tracked")
        self.register_buffer("num_batches_tracked", counter, persistent=False)


def make_norm(kind: str, channels: int, groups: int = 8) -> nn.Module:
    """``batchnorm`` -> :class:`BatchNorm2d`; ``groupnorm`` -> GroupNorm with ``gcd(C, groups)``
    groups (Opacus-compatible: no cross-sample statistics)."""
    if kind == "batchnorm":
        return BatchNorm2d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(math.gcd(channels, groups), channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class SEBlock(nn.Module):
    """Squeeze (GAP) -> excitation MLP ``C -> h -> C`` (ReLU, sigmoid) -> channel scale.

    Parameters: ``2*C*h + h + C`` (two weight matrices and two biases).
    """

    def __init__(self, channels: int, reduction: int = 16, divisor: int = 4) -> None:
        super().__init__()
        hidden = se_hidden_width(channels, reduction, divisor)
        self.channels, self.hidden = channels, hidden
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=(2, 3))
        weights = self.gate(self.fc2(self.act(self.fc1(squeezed))))
        return x * weights[:, :, None, None]


class BasicBlock(nn.Module):
    """conv3x3-norm-relu-conv3x3-norm-SE, plus the (projected) shortcut, then ReLU."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int,
        norm: Callable[[int], nn.Module],
        reduction: int | None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = norm(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = norm(channels)
        self.se = SEBlock(channels, reduction) if reduction else nn.Identity()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + shortcut)


class SEResNet(nn.Module):
    """Stem -> stages of :class:`BasicBlock` -> global average pool -> ``fc``."""

    # Every parameter is used only in its own module's forward and no module mixes examples
    # (GroupNorm; BatchNorm is refused under DP): per-sample gradients by layer (fedse.per_sample).
    per_sample_gradients_by_layer: ClassVar[bool] = True
    # forward(x) is get_classifier()(forward_features(x)), nothing else: a step that changes only
    # the head may reuse the features (fedse.policies.fedala).
    forward_is_classifier_on_features: ClassVar[bool] = True

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...],
        widths: tuple[int, ...],
        *,
        num_classes: int,
        in_channels: int = 3,
        reduction: int | None = 16,
        norm: str = "batchnorm",
        stem: str = "cifar",
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        norm_fn = lambda c: make_norm(norm, c, norm_groups)  # noqa: E731
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.bn1 = norm_fn(widths[0])
        self.relu = nn.ReLU()
        stages, in_ch = [], widths[0]
        for index, (count, width) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            layers = []
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(BasicBlock(in_ch, width, stride, norm_fn, reduction))
                in_ch = width
            stages.append(nn.Sequential(*layers))
        self.stages = len(stages)
        for index, stage in enumerate(stages, start=1):
            self.add_module(f"layer{index}", stage)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, self.stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The classification head (FedPer/FedRep keep it private)."""
        return self.fc


class CNN(nn.Module):
    """McMahan et al. 2017's CNN, as PFLlib builds it (``FedAvgCNN``): two stages of a 5x5
    convolution (``width``, then ``2 * width`` channels), ReLU and 2x2 max-pooling, then ``fc1``
    (512 units, ReLU) and the classifier ``fc``. 582,026 parameters at width 32 on 1x28x28 with 10
    classes. With ``reduction``, a squeeze-and-excitation block follows each stage (``se_cnn``), so
    private excitation can be measured on the reference architecture itself. It has no
    normalisation layers."""

    # Every parameter is used only in its own module's forward and no module mixes examples
    # (GroupNorm; BatchNorm is refused under DP): per-sample gradients by layer (fedse.per_sample).
    per_sample_gradients_by_layer: ClassVar[bool] = True
    # forward(x) is get_classifier()(forward_features(x)), nothing else: a step that changes only
    # the head may reuse the features (fedse.policies.fedala).
    forward_is_classifier_on_features: ClassVar[bool] = True

    def __init__(
        self, *, num_classes: int, in_channels: int, image_size: int, width: int = 32, reduction: int | None = None
    ) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(
                f"the cnn needs images of at least 16x16 pixels (two 5x5 convolutions and pools), got {image_size}"
            )
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, width, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.se1 = SEBlock(width, reduction) if reduction else nn.Identity()
        self.conv2 = nn.Sequential(nn.Conv2d(width, 2 * width, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.se2 = SEBlock(2 * width, reduction) if reduction else nn.Identity()
        self.fc1 = nn.Sequential(nn.Linear(2 * width * side * side, 512), nn.ReLU())
        self.fc = nn.Linear(512, num_classes)
        self.num_features = 512

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se2(self.conv2(self.se1(self.conv1(x))))
        return self.fc1(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


@dataclass(frozen=True)
class _Arch:
    blocks: tuple[int, ...]
    width_multipliers: tuple[int, ...]
    family: str  # "cifar" (widths w,2w,4w), "imagenet" (widths 64..512 scaled) or "cnn" (CNN, widths w,2w)
    se: bool = True  # SE blocks (the cnn is also registered without: the reference model itself)


MODELS: dict[str, _Arch] = {
    "se_resnet8": _Arch((1, 1, 1), (1, 2, 4), "cifar"),
    "se_resnet14": _Arch((2, 2, 2), (1, 2, 4), "cifar"),
    "se_resnet20": _Arch((3, 3, 3), (1, 2, 4), "cifar"),
    "se_resnet32": _Arch((5, 5, 5), (1, 2, 4), "cifar"),
    "se_resnet18": _Arch((2, 2, 2, 2), (1, 2, 4, 8), "imagenet"),
    "se_resnet34": _Arch((3, 4, 6, 3), (1, 2, 4, 8), "imagenet"),
    "cnn": _Arch((), (1, 2), "cnn", se=False),
    "se_cnn": _Arch((), (1, 2), "cnn"),
}


def base_width(name: str, width: int | None) -> int:
    """The first stage's width of model ``name`` built with ``width``: ``width`` itself, or the
    family's default when it is None (16 CIFAR-style, 64 ImageNet-style). ``width: null`` and
    ``width: 16`` build the same se_resnet8, and records compare through this."""
    if width is not None:
        return width
    return {"cifar": 16, "imagenet": 64, "cnn": 32}[MODELS[name].family]


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    width: int | None = None,
    reduction: int | None = 16,
    norm: str = "batchnorm",
    image_size: int = 32,
) -> nn.Module:
    """Build a registered model: an SE-ResNet, or the reference CNN (``cnn``, ``se_cnn``: :class:`CNN`).

    ``width`` is the first stage's width (default 16 for CIFAR-style, 64 for
    ImageNet-style). ``reduction=None`` builds the plain ResNet (no SE).
    ImageNet-style models use the 3x3 stem without max-pool for images of at
    most 64 pixels.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {sorted(MODELS)}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    arch = MODELS[name]
    base = base_width(name, width)
    if arch.family == "cnn":
        if norm != "batchnorm":
            raise ValueError(
                f"model {name!r} has no normalisation layers for norm {norm!r}; allowed: batchnorm (unused)"
            )
        se = reduction if arch.se else None
        return CNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=base, reduction=se)
    stem = "cifar" if arch.family == "cifar" or image_size <= 64 else "imagenet"
    return SEResNet(
        arch.blocks,
        tuple(base * m for m in arch.width_multipliers),
        num_classes=num_classes,
        in_channels=in_channels,
        reduction=reduction,
        norm=norm,
        stem=stem,
    )


def build_model(cfg: Config, num_classes: int, in_channels: int, image_size: int) -> SEResNet:
    """The run's model, initialised from ``cfg.seed``: the server and every client build
    the same initial weights, so a client's first private state is the common init."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    return create_model(
        m.name,
        num_classes=num_classes,
        in_channels=in_channels,
        width=m.width,
        reduction=m.reduction,
        norm=m.norm,
        image_size=image_size,
    )


def check_config(m: ModelConfig) -> None:
    """``model.name`` and ``model.norm`` are registered names."""
    from .config import ConfigError, choice_error  # here: the models import with torch alone

    if m.name not in MODELS:
        raise choice_error("model.name", m.name, MODELS)
    if m.norm not in NORMS:
        raise choice_error("model.norm", m.norm, NORMS)
    if MODELS[m.name].family == "cnn" and m.norm != "batchnorm":
        raise ConfigError(
            f"config key 'model.norm': {m.norm!r} has no layer to act on in model {m.name!r}, which has no "
            "normalisation layers; allowed: batchnorm (the default, unused there)"
        )


def check_shape(m: ModelConfig, image_size: int) -> None:
    """The model can take images of ``image_size`` pixels (the cnn's two convolutions and pools need 16)."""
    from .config import ConfigError

    if MODELS[m.name].family == "cnn" and image_size < 16:
        raise ConfigError(
            f"config key 'model.name': {m.name!r} needs images of at least 16x16 pixels (two 5x5 convolutions and "
            f"2x2 pools), the run's are {image_size}x{image_size}; allowed: an se_resnet, or larger images"
        )
