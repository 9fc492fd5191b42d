"""The shared/private split: the one rule that decides which tensors leave a client.

A *personalization policy* names the parts of the model a client keeps to
itself. Parts are found by module type or fixed attribute name, never by a
substring of the key:

* ``excitation``: every :class:`~fedse.models.SEBlock` (``*.se.fc1``, ``*.se.fc2``);
* ``norm``: every normalisation layer (BatchNorm, GroupNorm, LayerNorm), its
  affine parameters *and* its buffers (running mean/var, batch counter),
  shortcut norms (``downsample.1``) included;
* ``head``: the classifier returned by ``model.get_classifier()`` (``fc``);
* ``head-bias``: only the classifier's bias (``fc.bias``): one number per class,
  enough to shift the shared classifier towards a client's own label prior;
* ``all``: the whole model (local-only training).

Everything not private is shared, so the two key sets are disjoint and cover
the whole state dict (parameters and buffers). Client, server, tests and
reports all call :func:`split_model`.

Where BatchNorm running statistics go: they belong to their norm layer. Under
``fedse`` (default) and ``fedavg`` they are shared and averaged by the server
with the same sample weights as the weights (what FedAvg does with every
buffer). Under ``fedbn``/``fedse-bn`` they are private with the rest of the
layer (FedBN). Training never moves statistics the current step does not
train: see :func:`fedse.train.train`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .models import SEBlock

__all__ = ["PARTS", "POLICIES", "Policy", "Split", "create_policy", "split_model"]

PARTS = ("excitation", "norm", "head", "head-bias", "all")
NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Policy:
    """Which parts of the model stay on the client, and how a client trains them.

    ``schedule``: ``joint`` (everything trains together) or ``private-first``
    (the private part alone, then the shared part alone: FedRep).
    ``finetune``: fine-tune the received model locally before evaluating it.
    ``private_lr_scale``: learning-rate multiplier of the private part (the
    config's ``train.private_lr_scale`` overrides it).
    ``label_prior``: how the client's own label prior offsets the logits: ``off``,
    ``train`` or ``predict`` (:mod:`fedse.prior`; ``personalization.label_prior``
    overrides it).
    """

    name: str
    private_parts: frozenset[str]
    reference: str
    schedule: str = "joint"
    finetune: bool = False
    private_lr_scale: float = 1.0
    label_prior: str = "off"


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("fedavg", frozenset(), "McMahan et al., AISTATS 2017 (FedAvg): one global model."),
        Policy(
            "fedavg-ft",
            frozenset(),
            "FedAvg + local fine-tuning before evaluation (e.g. Wang et al. 2019, arXiv:1910.10252).",
            finetune=True,
        ),
        Policy(
            "fedse",
            frozenset({"excitation"}),
            "fedse: excitation MLPs private, trained at 10x the shared learning rate (the gates move "
            "little at the shared rate; docs/results.md); cf. ChannelFed (GLOBECOM 2022).",
            private_lr_scale=10.0,
        ),
        Policy("fedbn", frozenset({"norm"}), "Li et al., ICLR 2021 (FedBN): normalisation layers private."),
        Policy("fedper", frozenset({"head"}), "Arivazhagan et al., 2019 (FedPer): classifier head private."),
        Policy(
            "fedrep",
            frozenset({"head"}),
            "Collins et al., ICML 2021 (FedRep): head private, trained first with the body frozen, then the body.",
            schedule="private-first",
        ),
        Policy("local", frozenset({"all"}), "Local-only training: nothing shared, each client alone."),
        Policy("fedse-bn", frozenset({"excitation", "norm"}), "fedse + FedBN: excitation and normalisation private.",
               private_lr_scale=10.0),
        Policy("fedse-head", frozenset({"excitation", "head"}), "fedse + FedPer: excitation and head private.",
               private_lr_scale=10.0),
        Policy(
            "fedse-prior",
            frozenset({"excitation", "head-bias"}),
            "fedse + a private classifier bias (a per-client label prior on the shared head; "
            "cf. FedLC, Zhang et al., ICML 2022, which corrects logits by the local label distribution).",
            private_lr_scale=10.0,
        ),
        Policy(
            "fedse-la",
            frozenset({"excitation"}),
            "fedse + logit adjustment by the client's own label prior, in training and prediction "
            "(Menon et al., ICLR 2021; in FL cf. FedLC, Zhang et al., ICML 2022): the excitation "
            "re-weights features, the prior re-weights classes, nothing more is private.",
            private_lr_scale=10.0,
            label_prior="train",
        ),
        Policy(
            "fedse-pc",
            frozenset({"excitation"}),
            "fedse + prior correction at prediction: logits offset by t * log of the client's own label "
            "prior, t fitted on its train part (Saerens et al., Neural Computation 2002: the Bayes "
            "correction for a change of label prior); training is fedse's.",
            private_lr_scale=10.0,
            label_prior="predict",
        ),
        Policy(
            "fedavg-la",
            frozenset(),
            "FedAvg + logit adjustment by the client's own label prior (Menon et al., ICLR 2021; "
            "cf. FedLC, Zhang et al., ICML 2022): the ablation of fedse-la without private excitation.",
            label_prior="train",
        ),
    )
}


def create_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown personalization policy {name!r}; valid policies: {sorted(POLICIES)}")
    return POLICIES[name]


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


def split_model(model: nn.Module, policy: str | Policy) -> Split:
    """Split ``model.state_dict()`` keys into (shared, private) under ``policy``."""
    policy = create_policy(policy) if isinstance(policy, str) else policy
    prefixes = [name for part in sorted(policy.private_parts) for name in _part_modules(model, part)]
    if policy.private_parts and not prefixes:
        raise ValueError(
            f"policy {policy.name!r} keeps {sorted(policy.private_parts)} private, "
            f"but {type(model).__name__} has no such modules (is SE disabled, reduction=None?)"
        )

    def is_private(key: str) -> bool:
        return any(p == "" or key == p or key.startswith(p + ".") for p in prefixes)

    keys = list(model.state_dict().keys())
    private = tuple(k for k in keys if is_private(k))
    shared = tuple(k for k in keys if not is_private(k))
    return Split(policy.name, shared, private)
