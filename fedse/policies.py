"""Personalization policies: what a client keeps to itself and how it trains, resolved once.

A :class:`Policy` is a registry entry: the model parts that stay private
(:data:`fedse.split.PARTS`), the training schedule, whether the received model
is fine-tuned before evaluation, the learning-rate scale of the private part,
and the label-prior mode (:mod:`fedse.prior`). :func:`resolve` applies a run's
configuration to its policy exactly once: the config's own settings
(``train.private_lr_scale``, ``personalization.label_prior``) win over the
policy's, and the DP rule turns the label prior off under sample-level DP.
The client, local training, the server and the reports read that one object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import Config
from .split import PARTS, Split, split_model

__all__ = [
    "LOCAL",
    "LOCAL_NORM",
    "MIXING",
    "PERSONAL",
    "POLICIES",
    "ROD_HEAD",
    "mixed_keys",
    "norm_keys",
    "Policy",
    "RunPolicy",
    "create_policy",
    "resolve",
]

SCHEDULES = ("joint", "private-first")
PERSONAL = "personal."  # prefix of a personal model's tensors in a client's private state
LOCAL = "local."  # FedALA: the client's last local model
MIXING = "mixing."  # FedALA: the element-wise mixing weights of the head
ROD_HEAD = "rodhead."  # FedRoD: the personalized head, added to the generic one
LOCAL_NORM = "localnorm."  # fedse-auto: the client's own normalisation layers, from its last local update


def _head(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: state[k] for k in split_model(model, {"head"}).private}


def norm_keys(model: nn.Module) -> tuple[str, ...]:
    """The normalisation layers' keys: affine weights and biases, running statistics."""
    return split_model(model, {"norm"}).private


def mixed_keys(model: nn.Module) -> tuple[str, ...]:
    """The keys FedALA mixes adaptively: the classifier head's (the layers below take the global model)."""
    return split_model(model, {"head"}).private


LABEL_PRIOR_MODES = ("off", "train", "predict")
LOCAL_NORM_MODES = ("off", "predict", "train")


@dataclass(frozen=True)
class Policy:
    """Which parts of the model stay on the client, and how a client trains them.

    ``schedule``: ``joint`` (everything trains together) or ``private-first``
    (the private part alone, then the shared part alone: FedRep).
    ``finetune``: fine-tune the received model locally before evaluating it.
    ``private_lr_scale``: learning-rate multiplier of the private part.
    ``label_prior``: how the client's own label prior offsets the logits
    (``off``, ``train`` or ``predict``).
    ``frozen_parts``: parts that never train in the federated rounds (they keep their common
    initialisation: FedBABU's head). ``finetune_parts``: what ``finetune`` adapts before
    evaluation (empty: every parameter).
    ``personal_model``: besides the private keys of the one model, the client keeps a whole
    model of its own, trained after the shared update with a proximal pull toward the received
    global model, and evaluated in its place (Ditto). Its tensors are the policy's *extra private
    state* (:meth:`extra_state`): kept with the private keys, never sent.
    ``personal_head``: FedRoD's personalized head, kept as extra state (``rodhead.<head key>``, zeros at
    first): after the shared update (which trains the generic head with the balanced softmax, i.e.
    the ``train`` label prior), the client fits it on its own data with plain cross-entropy on the
    sum of both heads, body and generic head fixed, and predicts with that sum (no offset).
    ``adaptive_mixing``: FedALA's adaptive local aggregation. The client keeps its last local model
    and element-wise mixing weights ``W`` for the head (extra state); on receiving the global
    model it starts from ``local + (global - local) * W`` in the head (the global model below),
    after one pass of learning ``W`` on its own data, and evaluates that mix.
    ``local_norms``: a per-client choice of private parts (``off``, ``predict``, ``train``). The
    normalisation layers are shared and averaged as usual, and the client also keeps the ones its
    last local update ended with (extra state, ``localnorm.<key>``: running statistics of its own
    features, and the affine parameters it trained). ``predict``: each evaluation it predicts with
    whichever of the two, the received or its own, is more accurate on its own train part (ties:
    the received ones), and exports that model; what it sends is the same policy's without the
    choice. ``train``: the same choice also at the start of every round, so a client that chooses
    its own norms trains from them (as under FedBN) and sends what it trained from there.
    """

    name: str
    private_parts: frozenset[str]
    schedule: str = "joint"
    finetune: bool = False
    private_lr_scale: float = 1.0
    label_prior: str = "off"
    frozen_parts: frozenset[str] = frozenset()
    finetune_parts: frozenset[str] = frozenset()
    personal_model: bool = False
    adaptive_mixing: bool = False
    personal_head: bool = False
    local_norms: str = "off"

    def __post_init__(self) -> None:
        if bad := sorted((set(self.private_parts) | self.frozen_parts | self.finetune_parts) - set(PARTS)):
            raise ValueError(f"policy {self.name!r}: unknown parts {bad}; valid parts: {PARTS}")
        if self.finetune_parts and not self.finetune:
            raise ValueError(f"policy {self.name!r}: finetune_parts without finetune")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"policy {self.name!r}: schedule {self.schedule!r}; valid: {SCHEDULES}")
        if self.label_prior not in LABEL_PRIOR_MODES:
            raise ValueError(f"policy {self.name!r}: label_prior {self.label_prior!r}; valid: {LABEL_PRIOR_MODES}")
        if self.local_norms not in LOCAL_NORM_MODES:
            raise ValueError(f"policy {self.name!r}: local_norms {self.local_norms!r}; valid: {LOCAL_NORM_MODES}")

    def split(self, model: nn.Module) -> Split:
        return split_model(model, self.private_parts, self.name)

    def frozen_keys(self, model: nn.Module) -> tuple[str, ...]:
        """State keys of ``frozen_parts`` (empty when none)."""
        return split_model(model, self.frozen_parts).private if self.frozen_parts else ()

    def finetune_keys(self, model: nn.Module) -> tuple[str, ...] | None:
        """What fine-tuning before evaluation adapts: the keys of ``finetune_parts``; None: all."""
        return split_model(model, self.finetune_parts).private if self.finetune_parts else None

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The private state a client keeps beyond the private keys of ``model``, initialised from
        ``model`` (the received one, on a client's first round): FedRoD's ``rodhead.<head key>``
        (zeros), the ``localnorm.<norm key>`` of ``local_norms``, FedALA's ``local.<key>`` and
        ``mixing.<head key>`` (ones), Ditto's ``personal.<key>`` for every key; empty otherwise."""
        if self.personal_head:
            return {f"{ROD_HEAD}{k}": torch.zeros_like(v) for k, v in _head(model).items()}
        if self.local_norms != "off":
            state = model.state_dict()
            return {f"{LOCAL_NORM}{k}": state[k].detach().clone() for k in norm_keys(model)}
        if self.adaptive_mixing:
            state = model.state_dict()
            local = {f"{LOCAL}{k}": v.detach().clone() for k, v in state.items()}
            return local | {f"{MIXING}{k}": torch.ones_like(state[k]) for k in mixed_keys(model)}
        if not self.personal_model:
            return {}
        return {f"{PERSONAL}{k}": v.detach().clone() for k, v in model.state_dict().items()}


_FEDSE = {"private_parts": frozenset({"excitation"}), "private_lr_scale": 10.0}

POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        # McMahan et al., AISTATS 2017 (FedAvg): one global model.
        Policy("fedavg", frozenset()),
        # FedAvg + local fine-tuning before evaluation (e.g. Wang et al. 2019, arXiv:1910.10252).
        Policy("fedavg-ft", frozenset(), finetune=True),
        # fedse: excitation MLPs private, trained at 10x the shared learning rate (the gates move
        # little at the shared rate; docs/results.md); cf. ChannelFed (GLOBECOM 2022).
        Policy("fedse", **_FEDSE),
        # Li et al., ICLR 2021 (FedBN): normalisation layers private.
        Policy("fedbn", frozenset({"norm"})),
        # Arivazhagan et al., 2019 (FedPer): classifier head private.
        Policy("fedper", frozenset({"head"})),
        # Collins et al., ICML 2021 (FedRep): head private, trained first with the body frozen, then the body.
        Policy("fedrep", frozenset({"head"}), schedule="private-first"),
        # Local-only training: nothing shared, each client alone.
        Policy("local", frozenset({"all"})),
        # fedse + FedBN: excitation and normalisation private.
        Policy("fedse-bn", frozenset({"excitation", "norm"}), private_lr_scale=10.0),
        # fedse + FedPer: excitation and head private.
        Policy("fedse-head", frozenset({"excitation", "head"}), private_lr_scale=10.0),
        # fedse + a private classifier bias (a per-client label prior on the shared head; cf. FedLC,
        # Zhang et al., ICML 2022, which corrects logits by the local label distribution).
        Policy("fedse-prior", frozenset({"excitation", "head-bias"}), private_lr_scale=10.0),
        # fedse + logit adjustment by the client's own label prior, in training and prediction
        # (Menon et al., ICLR 2021; in FL cf. FedLC): the excitation re-weights features, the prior
        # re-weights classes, nothing more is private. The default (docs/results.md).
        Policy("fedse-la", **_FEDSE, label_prior="train"),
        # fedse + prior correction at prediction: logits offset by t * log of the client's own label
        # prior, t fitted on its train part (Saerens et al., Neural Computation 2002); trains as fedse.
        Policy("fedse-pc", **_FEDSE, label_prior="predict"),
        # fedse-bn + logit adjustment: excitation and normalisation private (feature skew), the
        # client's label prior in training and prediction (label skew), as in fedse-la.
        Policy("fedse-bn-la", frozenset({"excitation", "norm"}), private_lr_scale=10.0, label_prior="train"),
        # FedAvg + logit adjustment (Menon et al. 2021; cf. FedLC): the ablation of fedse-la
        # without private excitation.
        Policy("fedavg-la", frozenset(), label_prior="train"),
        # Oh, Kim, Yun, ICLR 2022 (FedBABU): the body trains and is averaged with the head frozen at
        # its common random initialisation; each client fine-tunes the head before evaluating.
        Policy(
            "fedbabu",
            frozenset(),
            finetune=True,
            frozen_parts=frozenset({"head"}),
            finetune_parts=frozenset({"head"}),
        ),
        # Li, Hu, Beirami, Smith, ICML 2021 (Ditto): the global model trains and is averaged as in
        # FedAvg; each client also keeps a personal model, trained on its data with
        # personalization.ditto_lambda/2 ||v - w||^2 toward the received global model, and evaluated.
        Policy("ditto", frozenset(), personal_model=True),
        # Zhang et al., AAAI 2023 (FedALA): adaptive local aggregation. Each client mixes the received
        # global head with its own last local head element-wise, W learned on its data (in [0, 1]),
        # takes the global model below, trains from that mix and sends the result as in FedAvg.
        Policy("fedala", frozenset(), adaptive_mixing=True),
        # FedALA + logit adjustment by the client's own label prior (as fedavg-la): the head is
        # trained, mixed (W learnt on the offset loss) and predicts with the offset.
        Policy("fedala-la", frozenset(), adaptive_mixing=True, label_prior="train"),
        # Chen & Chao, ICLR 2022 (FedRoD): body and generic head shared, trained with the balanced
        # softmax (the client's log label prior added to the logits in training: fedavg-la's update);
        # a private personalized head, fitted on top with plain cross-entropy, is added at prediction.
        Policy("fedrod", frozenset(), label_prior="train", personal_head=True),
        # fedse-la + a per-client choice of private normalisation: norms shared as in fedse-la, and
        # each client predicts with its own last-trained norms instead where they are more accurate
        # on its own train part (FedBN's private norms, Li et al. 2021, where they help that client).
        Policy("fedse-auto", **_FEDSE, label_prior="train", local_norms="predict"),
        # fedse-auto, the choice made at the start of every round too: a client that chooses its own
        # norms trains from them, as under FedBN, and one that does not trains as under fedse-la.
        Policy("fedse-auto-train", **_FEDSE, label_prior="train", local_norms="train"),
    )
}


def create_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown personalization policy {name!r}; valid policies: {sorted(POLICIES)}")
    return POLICIES[name]


@dataclass(frozen=True)
class RunPolicy:
    """A policy as one run applies it: the registry entry plus the resolved settings."""

    policy: Policy
    private_lr_scale: float
    label_prior: str
    dp: str  # privacy.mode: none | sample | client
    prior_smoothing: float  # personalization.prior_smoothing: the pseudo-count of each class

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def schedule(self) -> str:
        return self.policy.schedule

    @property
    def finetune(self) -> bool:
        return self.policy.finetune

    def frozen_keys(self, model: nn.Module) -> tuple[str, ...]:
        return self.policy.frozen_keys(model)

    def finetune_keys(self, model: nn.Module) -> tuple[str, ...] | None:
        return self.policy.finetune_keys(model)

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.policy.extra_state(model)

    @property
    def personal_model(self) -> bool:
        return self.policy.personal_model

    @property
    def adaptive_mixing(self) -> bool:
        return self.policy.adaptive_mixing

    @property
    def personal_head(self) -> bool:
        return self.policy.personal_head

    @property
    def local_norms(self) -> str:
        return self.policy.local_norms

    def split(self, model: nn.Module) -> Split:
        return self.policy.split(model)


def resolve(cfg: Config, name: str | None = None) -> RunPolicy:
    """``cfg``'s policy (or ``name``) with the config's settings applied once: the private
    learning-rate scale is ``train.private_lr_scale`` when set, else the policy's; the label prior
    is ``personalization.label_prior`` when set, else the policy's, and always ``off`` under
    ``privacy.mode=sample`` (the prior depends on every training label of the client, outside
    DP-SGD's per-example bound; the config rejects an explicit mode there)."""
    policy = create_policy(name or cfg.personalization.policy)
    scale = cfg.train.private_lr_scale if cfg.train.private_lr_scale is not None else policy.private_lr_scale
    prior = cfg.personalization.label_prior if cfg.personalization.label_prior is not None else policy.label_prior
    if cfg.privacy.mode == "sample":
        prior = "off"
    return RunPolicy(policy, scale, prior, cfg.privacy.mode, cfg.personalization.prior_smoothing)
