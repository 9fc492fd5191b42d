"""Personalization methods: the registry, and the one place that resolves a run's policy.

A method that only chooses what stays private is one row below. A method with state of its own is
a :class:`~fedse.policies.base.Policy` subclass in its own file of this package (its hooks, its
hyperparameters, its config rules), registered here by one row. :func:`resolve` applies a run's
configuration to its policy exactly once: the config's own settings (``train.private_lr_scale``,
``personalization.label_prior``, ``prior_smoothing``) win over the policy's, the DP rule turns the
label prior off under sample-level DP, and the method's own rules are checked. The client, the
server and the reports read that one object.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import Config, ConfigError
from .apfl import APFL
from .base import LABEL_PRIOR_MODES, Policy, head_keys, norm_keys
from .ditto import Ditto
from .fedala import FedALA
from .fedrod import FedRoD
from .local_norms import LocalNorms
from .run import ClientRun

__all__ = [
    "LABEL_PRIOR_MODES",
    "POLICIES",
    "ClientRun",
    "Policy",
    "create_policy",
    "head_keys",
    "norm_keys",
    "register_policy",
    "resolve",
    "settings",
]

POLICIES: dict[str, Policy] = {}


def register_policy(policy: Policy) -> Policy:
    """Add ``policy`` to the registry under its name (a name is registered once)."""
    if policy.name in POLICIES:
        raise ValueError(f"policy {policy.name!r} is registered already")
    POLICIES[policy.name] = policy
    return policy


_EXCITATION = frozenset({"excitation"})
_FEDSE = {"private_parts": _EXCITATION, "private_lr_scale": 10.0}

for _policy in (
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
    Policy("fedbabu", frozenset(), finetune=True, frozen_parts=frozenset({"head"}), finetune_parts=frozenset({"head"})),
    # Li, Hu, Beirami, Smith, ICML 2021 (Ditto): fedse/policies/ditto.py.
    Ditto("ditto", frozenset()),
    # Zhang et al., AAAI 2023 (FedALA): fedse/policies/fedala.py.
    FedALA("fedala", frozenset()),
    # FedALA + logit adjustment by the client's own label prior (as fedavg-la): the head is
    # trained, mixed (W learnt on the offset loss) and predicts with the offset.
    FedALA("fedala-la", frozenset(), label_prior="train"),
    # Chen & Chao, ICLR 2022 (FedRoD): fedse/policies/fedrod.py; the shared update is fedavg-la's.
    FedRoD("fedrod", frozenset(), label_prior="train"),
    # fedse-la + a per-client choice of private normalisation (fedse/policies/local_norms.py): each
    # client predicts with its own last-trained norms where they are more accurate on its train part.
    LocalNorms("fedse-auto", **_FEDSE, label_prior="train", choose="predict"),
    # fedse-auto, the choice made at the start of every round too: a client that chooses its own
    # norms trains from them, as under FedBN, and one that does not trains as under fedse-la.
    LocalNorms("fedse-auto-train", **_FEDSE, label_prior="train", choose="train"),
    # Deng, Kamani, Mahdavi, 2020 (APFL): fedse/policies/apfl.py.
    APFL("apfl", frozenset()),
):
    register_policy(_policy)


def settings() -> set[str]:
    """Every personalization.<key> that some method reads: prior_smoothing and the methods' own."""
    return {"prior_smoothing"} | {key for p in POLICIES.values() for key in p.settings}


def create_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ConfigError(
            f"config key 'personalization.policy': {name!r} is not a policy; allowed: {', '.join(sorted(POLICIES))}"
        )
    return POLICIES[name]


def resolve(cfg: Config, name: str | None = None) -> Policy:
    """``cfg``'s policy (or ``name``) with the config's settings applied once and its rules checked:
    the private learning-rate scale is ``train.private_lr_scale`` when set, else the policy's; the
    label prior is ``personalization.label_prior`` when set, else the policy's, and always ``off``
    under ``privacy.mode=sample`` (the prior depends on every training label of the client, outside
    DP-SGD's per-example bound; the config rejects an explicit mode there). A method that cannot
    run under sample-level DP, or whose own rules ``cfg`` breaks, is a ConfigError."""
    policy = create_policy(name or cfg.personalization.policy)
    if cfg.privacy.mode == "sample" and policy.sample_dp_refusal is not None:
        raise ConfigError(
            f"config key 'personalization.policy': {policy.name!r} cannot be combined with privacy.mode=sample "
            f"({policy.sample_dp_refusal}); allowed: another policy, or privacy.mode=client"
        )
    policy.validate(cfg)
    scale = cfg.train.private_lr_scale if cfg.train.private_lr_scale is not None else policy.private_lr_scale
    prior = cfg.personalization.label_prior if cfg.personalization.label_prior is not None else policy.label_prior
    if cfg.privacy.mode == "sample":
        prior = "off"
    return replace(
        policy, private_lr_scale=scale, label_prior=prior, prior_smoothing=cfg.personalization.prior_smoothing
    )
