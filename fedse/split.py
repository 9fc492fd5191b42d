"""The shared/private split: the one rule that decides which tensors leave a client.

A personalization policy (:mod:`fedse.policies`) names the parts of the model a
client keeps to itself. Parts are found by module type or fixed attribute name,
never by a substring of the key:

* ``excitation``: every :class:`~fedse.models.SEBlock` (``*.se.fc1``, ``*.se.fc2``);
* ``norm``: every normalisation layer (BatchNorm, GroupNorm, LayerNorm), its
  affine parameters *and* its buffers (running mean/var, ``num_batches_tracked``),
  shortcut norms (``downsample.1``) included;
* ``head``: the classifier returned by ``model.get_classifier()`` (``fc``);
* ``head-bias``: only the classifier's bias (``fc.bias``): one number per class,
  enough to shift the shared classifier towards a client's own label prior;
* ``all``: the whole model (local-only training).

Everything not private is shared, so the two key sets are disjoint and cover
the whole state dict (parameters and buffers). Client, server, tests and
reports all split through :func:`split_model` (``Policy.split``).

Where BatchNorm running statistics go: they belong to their norm layer. Under
``fedse``, ``fedse-la`` (the default) and ``fedavg`` they are shared and averaged by the server
with the same sample weights as the weights (what FedAvg does with every
buffer). Under ``fedbn``/``fedse-bn`` they are private with the rest of the
layer (FedBN). Training never moves statistics the current step does not
train: see :func:`fedse.train.train`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .models import NORM_TYPES, SEBlock

__all__ = ["PARTS", "Split", "split_model"]

PARTS = ("excitation", "norm", "head", "head-bias", "all")


@dataclass(frozen=True)
class Split:
    """Disjoint, covering key sets of one model's state dict."""

    policy: str
    shared: tuple[str, ...]
    private: tuple[str, ...]

    def shared_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Copies (not views) of the shared tensors: later training does not change them."""
        state = model.state_dict()
        return {k: state[k].detach().clone() for k in self.shared}

    def private_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Copies of the private tensors."""
        state = model.state_dict()
        return {k: state[k].detach().clone() for k in self.private}

    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        """Tensors and scalars on each side (parameters and buffers), private share in %."""
        state = model.state_dict()
        params = {n for n, _ in model.named_parameters()}
        shared_params = sum(state[k].numel() for k in self.shared if k in params)
        private_params = sum(state[k].numel() for k in self.private if k in params)
        total = shared_params + private_params
        return {
            "policy": self.policy,
            "shared_tensors": len(self.shared),
            "private_tensors": len(self.private),
            "shared_params": shared_params,
            "private_params": private_params,
            "private_percent": 100.0 * private_params / total if total else 0.0,
        }

    def describe(self, model: nn.Module) -> str:
        s = self.summary(model)
        return (
            f"split[{s['policy']}]: shared {s['shared_tensors']} tensors / {s['shared_params']:,} params, "
            f"private {s['private_tensors']} tensors / {s['private_params']:,} params "
            f"({s['private_percent']:.2f}% of parameters stay on the client)"
        )


def _part_modules(model: nn.Module, part: str) -> list[str]:
    """Names of the modules that make up ``part``."""
    if part == "all":
        return [""]
    if part == "excitation":
        return [n for n, m in model.named_modules() if isinstance(m, SEBlock)]
    if part == "norm":
        return [n for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]
    if part in ("head", "head-bias"):
        get_classifier = getattr(model, "get_classifier", None)
        if get_classifier is None:
            raise ValueError(f"{type(model).__name__} has no get_classifier(); the {part!r} part is undefined")
        head = get_classifier()
        names = [n for n, m in model.named_modules() if m is head]
        if part == "head-bias":  # a single tensor: the prefix is its full key
            return [f"{n}.bias" for n in names if getattr(head, "bias", None) is not None]
        return names
    raise ValueError(f"unknown model part {part!r}; valid parts: {PARTS}")


def split_model(model: nn.Module, private_parts: Iterable[str], name: str = "") -> Split:
    """Split ``model.state_dict()`` keys into (shared, private): the keys of ``private_parts``
    (:data:`PARTS`) are private, everything else is shared. ``name`` labels the split (the policy)."""
    parts = sorted(set(private_parts))
    if unknown := [p for p in parts if p not in PARTS]:
        raise ValueError(f"unknown model part {unknown[0]!r}; valid parts: {PARTS}")
    prefixes = [prefix for part in parts for prefix in _part_modules(model, part)]
    if parts and not prefixes:
        raise ValueError(
            f"policy {name!r} keeps {parts} private, "
            f"but {type(model).__name__} has no such modules (is SE disabled, reduction=None?)"
        )

    def is_private(key: str) -> bool:
        return any(p == "" or key == p or key.startswith(p + ".") for p in prefixes)

    keys = list(model.state_dict().keys())
    private = tuple(k for k in keys if is_private(k))
    shared = tuple(k for k in keys if not is_private(k))
    return Split(name, shared, private)
