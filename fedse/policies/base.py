"""A personalization method: which model parts a client keeps, and what it does around the update.

:class:`Policy` is the base of every method. A method that only chooses what stays private is one
row of the registry (:mod:`fedse.policies`); a method with state of its own is a subclass in its own
file that overrides the hooks below. Every hook has the plain behaviour as its default, so a
subclass says only what its method changes:

* :meth:`Policy.extra_state`: the private state kept beyond the private keys (initialised from the
  received model on a client's first round);
* :meth:`Policy.before_update` and :meth:`Policy.after_update`: what the client does to the model
  and that state around the shared update;
* :meth:`Policy.evaluated_model` and :meth:`Policy.prediction_offset`: what it evaluates, exports
  and predicts with;
* :meth:`Policy.validate`, :attr:`Policy.settings` and :attr:`Policy.sample_dp_refusal`: the config
  rules of the method, the ``personalization`` keys it reads, and why it cannot run under
  sample-level DP (None: it can).
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..config import Config
from ..split import PARTS, Split, split_model

if TYPE_CHECKING:
    from .run import ClientRun

__all__ = ["LABEL_PRIOR_MODES", "SCHEDULES", "Policy", "head_keys", "norm_keys", "with_state"]

SCHEDULES = ("joint", "private-first")
LABEL_PRIOR_MODES = ("off", "train", "predict")


def norm_keys(model: nn.Module) -> tuple[str, ...]:
    """The normalisation layers' keys: affine weights and biases, running statistics."""
    return split_model(model, {"norm"}).private


def with_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """A copy of ``model`` holding ``state`` (a whole model's tensors, kept by a method as extra state).
    strict=False: torch re-adds BatchNorm step counters to a metadata-less dict; every real key is
    checked (a missing one is a ValueError naming ``what``)."""
    copy = deepcopy(model)
    if missing := copy.load_state_dict(state, strict=False).missing_keys:
        raise ValueError(f"{what} lacks {missing[:5]}")
    return copy


def head_keys(model: nn.Module) -> tuple[str, ...]:
    """The classifier head's keys."""
    return split_model(model, {"head"}).private


@dataclass(frozen=True)
class Policy:
    """Which parts of the model stay on the client, and how a client trains them.

    ``schedule``: ``joint`` (everything trains together) or ``private-first`` (the private part
    alone, then the shared part alone: FedRep). ``finetune``: fine-tune the received model locally
    before evaluating it. ``private_lr_scale``: learning-rate multiplier of the private part.
    ``label_prior``: how the client's own label prior offsets the logits (``off``, ``train`` or
    ``predict``; :mod:`fedse.prior`). ``frozen_parts``: parts that never train in the federated
    rounds (they keep their common initialisation: FedBABU's head). ``finetune_parts``: what
    ``finetune`` adapts before evaluation (empty: every parameter). ``prior_smoothing``: the
    pseudo-count of each class in the label prior.

    :func:`fedse.policies.resolve` returns the registry entry with a run's settings applied
    (``train.private_lr_scale``, ``personalization.label_prior`` and ``prior_smoothing``), so
    every reader sees one resolved object.
    """

    name: str
    private_parts: frozenset[str]
    schedule: str = "joint"
    finetune: bool = False
    private_lr_scale: float = 1.0
    label_prior: str = "off"
    frozen_parts: frozenset[str] = frozenset()
    finetune_parts: frozenset[str] = frozenset()
    prior_smoothing: float = 16.0

    # The personalization.<key> settings this method reads besides prior_smoothing (comparisons may
    # merge runs that differ in a key none of their methods reads).
    settings: ClassVar[tuple[str, ...]] = ()
    # Why the method cannot run under privacy.mode=sample, or None when it can.
    sample_dp_refusal: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if bad := sorted((set(self.private_parts) | self.frozen_parts | self.finetune_parts) - set(PARTS)):
            raise ValueError(f"policy {self.name!r}: unknown parts {bad}; valid parts: {PARTS}")
        if self.finetune_parts and not self.finetune:
            raise ValueError(f"policy {self.name!r}: finetune_parts without finetune")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"policy {self.name!r}: schedule {self.schedule!r}; valid: {SCHEDULES}")
        if self.label_prior not in LABEL_PRIOR_MODES:
            raise ValueError(f"policy {self.name!r}: label_prior {self.label_prior!r}; valid: {LABEL_PRIOR_MODES}")

    # The model's parts -------------------------------------------------------------------------

    def split(self, model: nn.Module) -> Split:
        return split_model(model, self.private_parts, self.name)

    def frozen_keys(self, model: nn.Module) -> tuple[str, ...]:
        """State keys of ``frozen_parts`` (empty when none)."""
        return split_model(model, self.frozen_parts).private if self.frozen_parts else ()

    def finetune_keys(self, model: nn.Module) -> tuple[str, ...] | None:
        """What fine-tuning before evaluation adapts: the keys of ``finetune_parts``; None: all."""
        return split_model(model, self.finetune_parts).private if self.finetune_parts else None

    def reads(self) -> set[str]:
        """The personalization.<key> settings this resolved policy reads."""
        return set(self.settings) | ({"prior_smoothing"} if self.label_prior != "off" else set())

    # Config rules -------------------------------------------------------------------------------

    def validate(self, cfg: Config) -> None:
        """Raise :class:`~fedse.config.ConfigError` where ``cfg`` cannot run this method."""

    # The client's hooks -------------------------------------------------------------------------

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The private state a client keeps beyond the private keys of ``model``, initialised from
        ``model`` (the received one, on a client's first round); never sent."""
        return {}

    def before_update(
        self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Before the shared update: may set where ``model`` starts; returns the extra state."""
        return extra

    def after_update(
        self,
        run: ClientRun,
        model: nn.Module,
        extra: dict[str, torch.Tensor],
        received: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """After the shared update of ``model`` (``received``: the weights the server sent): returns
        the extra state to keep."""
        return extra

    def evaluated_model(self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
        """The model the client evaluates and exports (before any fine-tuning): by default ``model``
        itself, the received weights plus the private part."""
        return model

    def prediction_offset(self, run: ClientRun, model: nn.Module) -> torch.Tensor | None:
        """What the client adds to ``model``'s logits when it predicts: the label-prior offset."""
        return run.offset(model)
