"""The one training loop and the one evaluation loop.

Every policy, client and baseline trains through :func:`train` and measures
through :func:`evaluate`; what varies is which parameters train (``trainable``)
and the optional FedProx anchor, never the loop.

Data are in-memory uint8 image tensors; a client's are moved to the device
once per call (on a GPU they stay there for the round, and batches are cut on
the device), and normalisation (and light augmentation) happen per batch on the
device, so nothing float-sized is kept per client. Loss and accuracy are summed
on the device and read once at the end: no host synchronisation per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .data.transforms import augment as augment_batch
from .data.transforms import normalize
from .models import NORM_TYPES

if TYPE_CHECKING:  # the loop runs without Opacus and Flower installed (a bare GPU machine) unless dp is used
    from .privacy import SampleDP

__all__ = ["EvalResult", "TrainResult", "TrainSpec", "batches", "default_device", "evaluate", "predict", "train"]


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class TrainResult:
    loss: float
    accuracy: float
    num_examples: int
    steps: int


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Index batches over ``range(n)``: shuffled when a generator is given.

    A trailing batch of one sample is dropped in training (BatchNorm cannot
    normalise a single sample); evaluation (no generator) keeps every sample.
    """
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        if generator is not None and len(index) == 1 and n > 1:
            return
        yield index


@contextlib.contextmanager
def _deterministic_convolutions(device: torch.device) -> Iterator[None]:
    """cuDNN's deterministic algorithms while training on CUDA (restored after): some of its
    convolution backward passes otherwise accumulate in a varying order, so the same seed would
    not give the same weights twice, and two policies that must update alike (FedRoD's shared
    update and fedavg-la's, Ditto's global one and FedAvg's) would differ in the last bits."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = before


def _freeze_untrained_norms(model: nn.Module, trainable: set[str]) -> None:
    """Keep norm layers whose parameters do not train in eval mode, so their running
    statistics do not move either (a partial step must not drift what it does not train)."""
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            if own and not any(p in trainable for p in own):
                module.eval()


@dataclass(frozen=True)
class TrainSpec:
    """How :func:`train` trains: the normalisation of the data (``mean``, ``std``), ``epochs`` of
    shuffled batches of ``batch_size`` (drawn from ``seed``), SGD at ``lr`` with ``momentum`` and
    ``weight_decay``; ``augment``: a random crop of every training batch, and with ``hflip`` a random
    horizontal flip; ``proximal_mu``: the FedProx term ``mu/2 * ||w - w_anchor||^2`` (with
    :func:`train`'s ``anchor``); ``bf16``: forward pass and loss under bfloat16 autocast (mixed
    precision, meant for CUDA; the weights, their gradients and the optimizer stay float32; not with
    DP)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    augment: bool = False
    hflip: bool = False
    proximal_mu: float = 0.0
    bf16: bool = False


def _optimizer(
    model: nn.Module, spec: TrainSpec, trainable: set[str], lr_scale: dict[str, float] | None
) -> torch.optim.Optimizer:
    """SGD over the trainable parameters, one group per learning rate (``lr_scale``: per-parameter
    multipliers of ``spec.lr``; absent names use ``spec.lr``); the others stop requiring gradients."""
    scale = lr_scale or {}
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
        if n in trainable:
            groups.setdefault(spec.lr * scale.get(n, 1.0), []).append(p)
    return torch.optim.SGD(
        [{"params": ps, "lr": group_lr} for group_lr, ps in groups.items()],
        lr=spec.lr,
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
    )


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: TrainSpec,
    *,
    trainable: set[str] | None = None,
    lr_scale: dict[str, float] | None = None,
    anchor: dict[str, torch.Tensor] | None = None,
    dp: SampleDP | None = None,
    logit_bias: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """SGD on (images, labels) as ``spec`` says; returns mean loss and accuracy.

    ``trainable``: parameter names that train (None: all). Frozen norm layers keep their running
    statistics. ``lr_scale``: per-parameter multipliers of the learning rate (e.g. a faster private
    part). ``anchor``: the weights FedProx's term pulls toward (with ``spec.proximal_mu``).
    ``dp``: train with DP-SGD (Poisson sampling, per-sample clipping of every trainable parameter's
    gradient, Gaussian noise), one :meth:`SampleDP.phase`: its batches and its step replace the plain
    ones, and ``dp``'s accountant counts every step. ``logit_bias``: a fixed per-class offset added
    to the logits (the client's log label prior, :mod:`fedse.prior`); loss and accuracy use the
    offset logits.
    """
    if spec.bf16 and dp is not None:
        raise ValueError("bf16 autocast cannot be combined with sample-level DP (per-sample clipping in float32)")
    device = device or default_device()
    model.to(device).train()
    names = {n for n, _ in model.named_parameters()}
    trainable = names if trainable is None else set(trainable)
    if unknown := trainable - names:
        raise ValueError(f"trainable names not in the model: {sorted(unknown)[:5]}")
    _freeze_untrained_norms(model, trainable)
    optimizer = _optimizer(model, spec, trainable, lr_scale)
    anchored = []
    if spec.proximal_mu > 0 and anchor:
        anchored = [(p, anchor[n].to(device)) for n, p in model.named_parameters() if n in anchor and n in trainable]
    if dp is not None and anchored:
        raise ValueError(
            "FedProx's proximal term cannot be combined with sample-level DP "
            "(its gradient is not per-sample); use server.strategy=fedavg"
        )
    bias = None if logit_bias is None else logit_bias.to(device)

    def criterion(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = out if bias is None else out + bias
        return F.cross_entropy(logits, y), logits

    def plain_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16):
            loss, logits = criterion(model(x), y)
        objective = loss
        if anchored:
            objective = loss + spec.proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in anchored)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        return loss.detach(), logits.detach()

    # What DP changes is the step (per-sample clipping and noise) and the batches (Poisson).
    phase = (
        dp.phase(model, optimizer, images, labels, spec.batch_size, criterion)
        if dp is not None
        else contextlib.nullcontext((plain_step, None))
    )
    with phase as (step, loader), _deterministic_convolutions(device):
        result = _epochs(step, loader, images, labels, spec, device)
    for p in model.parameters():
        p.requires_grad_(True)
    return result


def _epochs(
    step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    loader: Iterable | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: TrainSpec,
    device: torch.device,
) -> TrainResult:
    """``spec.epochs`` passes of ``step`` over the batches: DP's Poisson ``loader`` (from the host),
    else the client's data on the device for the whole call, batches cut there."""
    generator = torch.Generator().manual_seed(spec.seed)
    if loader is not None:
        epoch_batches = lambda: iter(loader)  # noqa: E731
    else:
        x_all, y_all = images.to(device), labels.to(device)
        epoch_batches = lambda: (  # noqa: E731
            (x_all[i], y_all[i]) for i in (j.to(device) for j in batches(len(labels), spec.batch_size, generator))
        )
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, steps = 0, 0
    for _ in range(spec.epochs):
        for xb, yb in epoch_batches():
            x = normalize(xb.to(device), spec.mean, spec.std)
            if spec.augment:
                x = augment_batch(x, generator, flip=spec.hflip)
            y = yb.to(device)
            loss, logits = step(x, y)
            steps += 1
            if len(y) == 0:  # an empty Poisson batch (probability (1 - q)^n): a noise-only DP step
                continue
            total_loss += loss.double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
    return TrainResult(total_loss.item() / max(seen, 1), correct.item() / max(seen, 1), seen, steps)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 256,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Logits of ``model`` in eval mode for every image, on the CPU."""
    device = device or default_device()
    model.to(device).eval()
    on_device = images.to(device)
    out = [
        model(normalize(on_device[index.to(device)], mean, std)).float()
        for index in batches(len(images), batch_size, None)
    ]
    return torch.cat(out).cpu() if out else torch.empty(0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 256,
    device: torch.device | None = None,
    logit_bias: torch.Tensor | None = None,
) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (logits offset by
    ``logit_bias`` when given)."""
    n = len(labels)
    if n == 0:
        return EvalResult(0.0, 0.0, 0)
    logits = predict(model, images, mean=mean, std=std, batch_size=batch_size, device=device)
    if logit_bias is not None:
        logits = logits + logit_bias.cpu()
    y = labels.long().cpu()
    loss = F.cross_entropy(logits, y, reduction="sum").item()
    correct = (logits.argmax(1) == y).sum().item()
    return EvalResult(loss / n, correct / n, n)
