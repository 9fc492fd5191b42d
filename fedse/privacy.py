"""Differential privacy for what is shared: sample level (Opacus) and client level (Flower).

Sample level (``privacy.mode: sample``): each client trains with DP-SGD
(Opacus ``PrivacyEngine``: Poisson sampling, per-sample clipping of the
gradient of *every* parameter that trains, private excitation included,
Gaussian noise). The accountant's state is kept per client across rounds, so
the epsilon a client reports covers every DP step it ever took.

Client level (``privacy.mode: client``): Flower's own wrappers around the
strategy clip each client's update to the shared weights and add Gaussian
noise to the aggregate (DP-FedAvg, McMahan et al. 2018); the run's epsilon is
computed with Opacus's RDP accountant from (noise multiplier, client sampling
rate, rounds).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from .config import Config, ConfigError

__all__ = [
    "SampleDP",
    "check_dp_model",
    "client_level_epsilon",
    "epsilon_of",
    "poisson_rate",
    "privatize",
    "sample_noise_multiplier",
]


@dataclass
class SampleDP:
    """DP-SGD settings for one client's local training, with its accountant history."""

    noise_multiplier: float
    max_grad_norm: float
    accountant: str = "rdp"
    history: list[tuple[float, float, int]] | None = None  # carried in, updated in place by train()


def check_dp_model(model: nn.Module) -> None:
    """Opacus can only train modules without cross-sample statistics (no BatchNorm): Opacus's
    ModuleValidator, plus a type check that also catches BatchNorm subclasses."""
    errors = [str(e) for e in ModuleValidator.validate(model, strict=False)]
    errors += [f"{name or type(model).__name__} is a {type(m).__name__} (BatchNorm)"
               for name, m in model.named_modules() if isinstance(m, _BatchNorm)][:1]
    if errors:
        raise ConfigError(
            f"privacy.mode=sample needs a model Opacus can privatize, but this one has "
            f"{errors[0][:160]}; use --set model.norm=groupnorm"
        )


def sample_noise_multiplier(cfg: Config, num_train: int) -> float:
    """The configured noise multiplier, or the one that reaches ``target_epsilon`` after every
    round's DP steps (``rounds x local steps``, counted as if the client took part in every round)."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    sample_rate, steps_per_epoch = poisson_rate(num_train, cfg.train.batch_size)
    epochs = cfg.train.local_epochs + (cfg.train.private_epochs if _private_first(cfg) else 0)
    steps = cfg.server.rounds * epochs * steps_per_epoch
    return get_noise_multiplier(target_epsilon=p.target_epsilon, target_delta=p.delta, sample_rate=sample_rate,
                                steps=steps, accountant=p.accountant)


def poisson_rate(num_train: int, batch_size: int) -> tuple[float, int]:
    """Opacus's Poisson sampling of a loader with ``ceil(n / batch)`` batches: each example
    joins each step with probability ``1 / ceil(n / batch)``; that many steps per epoch."""
    steps = max(1, math.ceil(num_train / batch_size))
    return 1.0 / steps, steps


def _private_first(cfg: Config) -> bool:
    from .split import create_policy

    return create_policy(cfg.personalization.policy).schedule == "private-first"


def privatize(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
              batch_size: int, dp: SampleDP):
    """Wrap (model, optimizer, data) with Opacus; returns (dp_model, dp_optimizer, loader, engine).

    Poisson sampling and noise draw from a generator seeded from ``os.urandom``, never
    from the run's seed: noise or batches predictable from the configuration would void
    the guarantee (and the subsampling amplification). DP runs are therefore not
    bit-reproducible. (Opacus's ``secure_mode`` would use a cryptographic generator; it
    needs torchcsprng, which is not installed here.)
    """
    engine = PrivacyEngine(accountant=dp.accountant)
    if dp.history:
        engine.accountant.history = [tuple(h) for h in dp.history]
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, generator=generator)
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm, poisson_sampling=True, noise_generator=generator,
    )
    return dp_model, dp_optimizer, dp_loader, engine


def epsilon_of(history: list[tuple[float, float, int]] | None, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of an accountant history (0 when no DP step was taken)."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def client_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """DP-FedAvg accounting: one Gaussian mechanism per round on the clipped sum of updates,
    clients sampled at ``sample_rate``; RDP accountant over ``rounds``."""
    if noise_multiplier <= 0:
        return float("inf")
    return epsilon_of([(noise_multiplier, sample_rate, rounds)], delta, "rdp")
