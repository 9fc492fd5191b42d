"""One client's run of one message, and the phases of the one training loop a policy is made of.

:class:`ClientRun` is built once per message: the run's config, the resolved policy, the client's
shard with its normalisation, the message's seed and its named streams, and the device. Every
phase below takes it, so a method's hooks (:class:`fedse.policies.base.Policy`) see the same
object and never pass the same long list of arguments along.

* ``joint`` (FedAvg, FedBN, FedPer, fedse, ...): every parameter trains together for
  ``train.local_epochs``.
* ``private-first`` (FedRep, Collins et al. 2021): the private part trains alone for
  ``train.private_epochs`` (the shared body frozen, its norm statistics too), then the shared part
  alone for ``train.local_epochs``.

:meth:`ClientRun.adapt` trains only a chosen set of keys for a few epochs: the fine-tuning step of
``fedavg-ft`` before evaluation and the cold-start adaptation of a new client
(:meth:`ClientRun.adapt_and_evaluate`). Frozen norm layers keep their running statistics
(:func:`fedse.train.train`), so a few label-skewed batches cannot drag the statistics of a model
part that does not train.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import Config
from ..data.federated import ClientShard
from ..data.readers import hflip
from ..prior import fit_prior_weight, label_log_prior
from ..privacy import SampleDP
from ..split import Split
from ..train import EvalResult, TrainResult, TrainSpec, default_device, evaluate, predict, train

if TYPE_CHECKING:
    from .base import Policy

__all__ = ["SEED_STREAMS", "ClientRun"]

# The named seed streams of a message: each phase draws its batches from the message's seed plus
# its offset. Some phases share an offset: they never run in the same policy.
SEED_STREAMS = {
    "update": 0,  # the shared update (the first phase of private-first), fine-tuning before evaluation
    "shared-phase": 1,  # private-first's second phase, the shared part alone
    "personal": 1,  # a personal model's own training (Ditto, APFL)
    "mixing": 2,  # FedALA's mixing weights
    "personal-head": 3,  # FedRoD's personalized head
}


def _param_names(model: nn.Module, keys: tuple[str, ...]) -> set[str]:
    params = {n for n, _ in model.named_parameters()}
    return {k for k in keys if k in params}


@dataclass(frozen=True)
class ClientRun:
    """What one client's message runs with: built once, read by every phase and every hook."""

    cfg: Config
    policy: Policy  # resolved (fedse.policies.resolve)
    shard: ClientShard
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int  # the message's seed; phases draw from seed_of(stream)
    device: torch.device = field(default_factory=default_device)

    def seed_of(self, stream: str) -> int:
        return self.seed + SEED_STREAMS[stream]

    # Offsets -------------------------------------------------------------------------------------

    def _prior(self, model: nn.Module) -> torch.Tensor:
        return label_log_prior(
            self.shard.train_labels, model.get_classifier().out_features, self.policy.prior_smoothing
        )

    def train_offset(self, model: nn.Module) -> torch.Tensor | None:
        """The offset the training loss sees: the client's log label prior in mode ``train``."""
        return self._prior(model) if self.policy.label_prior == "train" else None

    def offset(self, model: nn.Module) -> torch.Tensor | None:
        """The label-prior offset (:mod:`fedse.prior`): the log label prior in mode ``train``; in
        mode ``predict`` the prior times the weight that fits ``model`` best on the client's train
        part; None when off."""
        mode = self.policy.label_prior
        if mode == "off":
            return None
        prior = self._prior(model)
        if mode == "train":
            return prior
        logits = predict(model, self.shard.train_images, mean=self.mean, std=self.std, device=self.device)
        return fit_prior_weight(logits, self.shard.train_labels, prior) * prior

    # Phases of the one loop ------------------------------------------------------------------------

    def train(
        self,
        model: nn.Module,
        *,
        epochs: int,
        trainable: set[str] | None,
        seed: int,
        proximal_mu: float = 0.0,
        anchor: dict[str, torch.Tensor] | None = None,
        private: tuple[str, ...] = (),
        dp: SampleDP | None = None,
        label_prior: bool = True,
        lr_factor: float = 1.0,
    ) -> TrainResult:
        """:func:`fedse.train.train` on the client's train part with the run's training settings;
        keys in ``private`` at the policy's private learning rate; ``label_prior=False``: plain
        cross-entropy, whatever the policy's offset; ``lr_factor`` scales ``train.lr``."""
        t = self.cfg.train
        scale = self.policy.private_lr_scale
        spec = TrainSpec(
            mean=self.mean,
            std=self.std,
            epochs=epochs,
            batch_size=t.batch_size,
            lr=t.lr * lr_factor,  # x 1.0 is exact: the configured rate itself
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            seed=seed,
            augment=self.cfg.data.augment,
            hflip=hflip(self.cfg.data),
            proximal_mu=proximal_mu,
            bf16=t.bf16,
        )
        return train(
            model,
            self.shard.train_images,
            self.shard.train_labels,
            spec,
            trainable=trainable,
            lr_scale={k: scale for k in private} if scale != 1.0 else None,
            anchor=anchor,
            dp=dp,
            logit_bias=self.train_offset(model) if label_prior else None,
            device=self.device,
        )

    def local_update(
        self,
        model: nn.Module,
        split: Split,
        *,
        proximal_mu: float = 0.0,
        anchor: dict[str, torch.Tensor] | None = None,
        dp: SampleDP | None = None,
    ) -> TrainResult:
        """One round of local training under the policy's schedule; returns the last phase's result.
        With ``dp`` every phase is a DP-SGD phase and ``dp.history`` accumulates all their steps."""
        t = self.cfg.train
        if self.policy.schedule == "private-first" and split.private and split.shared:
            self.train(
                model,
                epochs=t.private_epochs,
                trainable=_param_names(model, split.private),
                seed=self.seed_of("update"),
                private=split.private,
                dp=dp,
            )
            return self.train(
                model,
                epochs=t.local_epochs,
                trainable=_param_names(model, split.shared),
                seed=self.seed_of("shared-phase"),
                proximal_mu=proximal_mu,
                anchor=anchor,
                dp=dp,
            )
        frozen = self.policy.frozen_keys(model)
        return self.train(
            model,
            epochs=t.local_epochs,
            trainable=None
            if not frozen
            else _param_names(model, tuple(k for k in model.state_dict() if k not in frozen)),
            seed=self.seed_of("update"),
            proximal_mu=proximal_mu,
            anchor=anchor,
            private=split.private,
            dp=dp,
        )

    def adapt(
        self,
        model: nn.Module,
        keys: tuple[str, ...] | None,
        *,
        epochs: int,
        private: tuple[str, ...] = (),
        label_prior: bool = True,
        seed: int | None = None,
    ) -> TrainResult:
        """Train only ``keys`` (None: every parameter) for ``epochs`` on the client's train part;
        keys in ``private`` train at the policy's private learning rate."""
        trainable = None if keys is None else _param_names(model, keys)
        return self.train(
            model,
            epochs=epochs,
            trainable=trainable,
            seed=self.seed_of("update") if seed is None else seed,
            private=private,
            label_prior=label_prior,
        )

    def finetune(self, model: nn.Module) -> None:
        """The policy's fine-tuning before evaluation, in place (``fedavg-ft``: every key;
        ``fedbabu``: the head); nothing when the policy does not fine-tune."""
        if self.policy.finetune:
            self.adapt(model, self.policy.finetune_keys(model), epochs=self.cfg.personalization.finetune_epochs)

    def evaluate(self, model: nn.Module, offset: torch.Tensor | None) -> EvalResult:
        """``model`` on the client's own test part, its logits offset by ``offset``."""
        return self._evaluate(model, self.shard.test_images, self.shard.test_labels, offset)

    def score(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, offset: torch.Tensor | None) -> float:
        """``model``'s accuracy on ``images`` (the client's own), its logits offset by ``offset``."""
        return self._evaluate(model, images, labels, offset).accuracy

    def _evaluate(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, offset: torch.Tensor | None
    ) -> EvalResult:
        return evaluate(model, images, labels, mean=self.mean, std=self.std, device=self.device, logit_bias=offset)

    def adapt_and_evaluate(self, model: nn.Module, split: Split) -> dict[str, float]:
        """Cold start: a client that never trained adapts copies of the received ``model`` on its own
        train part for ``personalization.finetune_epochs`` and is evaluated on its own test part three
        ways: as received (``global_acc``), only its private keys adapted (``private_acc``), every key
        adapted (``full_acc``); each predicts as the policy does (its offset). An empty private set
        (fedavg) means no adaptation: the same as global."""
        kinds = {"global": None, "private": split.private, "full": tuple(model.state_dict())}
        out = {}
        for kind, keys in kinds.items():
            copy = deepcopy(model)
            if keys:
                self.adapt(copy, keys, epochs=self.cfg.personalization.finetune_epochs, private=split.private)
            out[f"{kind}_acc"] = self.evaluate(copy, self.policy.prediction_offset(self, copy)).accuracy
        return out
