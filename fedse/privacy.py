"""Differential privacy for what is shared: sample level (Opacus) and client level (Flower).

Sample level (``privacy.mode: sample``): each client trains with DP-SGD
(Opacus ``PrivacyEngine``: Poisson sampling, per-sample clipping of the
gradient of *every* parameter that trains, private excitation included,
Gaussian noise). The accountant's state is kept per client across rounds, so
the epsilon a client reports covers every DP step it ever took.

Client level (``privacy.mode: client``): Flower's own wrappers around the
strategy clip each client's update to the shared weights and add Gaussian
noise to the aggregate (DP-FedAvg, McMahan et al. 2018). The epsilon is
Flower's RDP accountant (``flwr[dp]``, Google's ``dp-accounting``) over the
releases actually made, with *no* amplification by client sampling: Flower
samples a fixed number of clients per round, not Poisson, so no sampling rate
below 1 is claimed. The noise is sized for exactly ``sampled`` clients, so a
round with any other number of usable replies is refused (no release, no
update): averaging fewer replies would shrink the noise below what the
accountant assumes. The accountant's ledger is checkpointed, so a resumed run
reports the epsilon of every release since round 1.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from .config import Config, ConfigError

__all__ = [
    "ClientDP",
    "SampleDP",
    "check_dp_model",
    "client_level_epsilon",
    "client_noise_multiplier",
    "make_client_dp",
    "epsilon_of",
    "poisson_rate",
    "sample_noise_multiplier",
]


class SampleDP:
    """DP-SGD for one client: its settings and its accountant, which every DP phase of every round
    adds its steps to (:meth:`phase`). The accountant's own ``state_dict()`` carries it across rounds
    and restarts (:meth:`state`, ``state=``), so the epsilon a client reports covers every DP step
    it ever took."""

    def __init__(
        self,
        noise_multiplier: float,
        max_grad_norm: float,
        accountant: str = "rdp",
        *,
        state: Mapping[str, Any] | None = None,
        secure_mode: bool = False,
    ) -> None:
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.secure_mode = secure_mode  # Opacus's cryptographically secure generator (torchcsprng; config-checked)
        self.accountant = create_accountant(accountant)
        if state:
            self.accountant.load_state_dict(
                {"history": [tuple(h) for h in state["history"]], "mechanism": state["mechanism"]}
            )

    def state(self) -> dict[str, Any]:
        """The accountant's ``state_dict()`` as plain JSON-able data."""
        sd = self.accountant.state_dict()
        return {"history": [list(h) for h in sd["history"]], "mechanism": sd["mechanism"]}

    def epsilon(self, delta: float) -> float:
        """Epsilon of every DP step so far (0 before the first)."""
        return float(self.accountant.get_epsilon(delta=delta)) if self.accountant.history else 0.0

    @contextlib.contextmanager
    def phase(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
    ) -> Iterator[tuple[nn.Module, torch.optim.Optimizer, DataLoader]]:
        """One DP-SGD phase: (model, optimizer, Poisson loader) wrapped by Opacus, with this client's
        accountant counting the steps; Opacus's hooks are removed from the model on exit.

        Poisson sampling and noise draw from a generator seeded from ``os.urandom``, never from the
        run's seed: noise or batches predictable from the configuration would void the guarantee
        (and the subsampling amplification). DP runs are therefore not bit-reproducible. With
        ``secure_mode`` Opacus draws both from its cryptographically secure generator instead."""
        engine = PrivacyEngine(accountant=self.accountant.mechanism(), secure_mode=self.secure_mode)
        engine.accountant = self.accountant  # the steps of this phase go to this client's accountant
        generator = None if self.secure_mode else torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, generator=generator)
        dp_model, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            poisson_sampling=True,
            noise_generator=generator,
        )
        try:
            yield dp_model, dp_optimizer, dp_loader
        finally:
            dp_model.remove_hooks()
            dp_model.del_grad_sample()


def check_dp_model(model: nn.Module) -> None:
    """Opacus can only train modules without cross-sample statistics (no BatchNorm): Opacus's
    ModuleValidator, plus a type check that also catches BatchNorm subclasses."""
    errors = [str(e) for e in ModuleValidator.validate(model, strict=False)]
    errors += [
        f"{name or type(model).__name__} is a {type(m).__name__} (BatchNorm)"
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
    ][:1]
    if errors:
        raise ConfigError(
            f"privacy.mode=sample needs a model Opacus can privatize, but this one has "
            f"{errors[0][:160]}; use --set model.norm=groupnorm"
        )


def sample_noise_multiplier(cfg: Config, num_train: int, private_first: bool) -> float:
    """The configured noise multiplier, or the one that reaches ``target_epsilon`` after every
    round's DP steps (``rounds x local steps``, counted as if the client took part in every round;
    ``private_first``: the policy trains its private part in a phase of its own first)."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    sample_rate, steps_per_epoch = poisson_rate(num_train, cfg.train.batch_size)
    epochs = cfg.train.local_epochs + (cfg.train.private_epochs if private_first else 0)
    steps = cfg.server.rounds * epochs * steps_per_epoch
    return get_noise_multiplier(
        target_epsilon=p.target_epsilon,
        target_delta=p.delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=p.accountant,
    )


def poisson_rate(num_train: int, batch_size: int) -> tuple[float, int]:
    """Opacus's Poisson sampling of a loader with ``ceil(n / batch)`` batches: each example
    joins each step with probability ``1 / ceil(n / batch)``; that many steps per epoch."""
    steps = max(1, math.ceil(num_train / batch_size))
    return 1.0 / steps, steps


def epsilon_of(history: list[tuple[float, float, int]] | None, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of an accountant history (0 when no DP step was taken)."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def _accountant(delta: float, population: int) -> RdpAccountant:
    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


def client_level_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of ``releases`` Gaussian releases of the clipped sum (noise multiplier sigma, no
    amplification), by Flower's RDP accountant."""
    if releases == 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    acc = _accountant(delta, 1)
    acc.compose(GaussianPrivacyEvent(noise_multiplier, 1, 1), releases)
    return float(acc.get_epsilon(delta))


def client_noise_multiplier(cfg: Config) -> float:
    """sigma for client-level DP: configured, or the smallest that keeps ``server.rounds`` releases
    (no amplification) within ``target_epsilon`` by the same accountant (dp-accounting's calibration)."""
    pr = cfg.privacy
    if pr.noise_multiplier is not None:
        return pr.noise_multiplier
    from dp_accounting import dp_event, mechanism_calibration, rdp

    rounds = cfg.server.rounds
    return float(
        mechanism_calibration.calibrate_dp_mechanism(
            rdp.RdpAccountant,
            lambda sigma: dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(sigma), rounds),
            pr.target_epsilon,
            pr.delta,
            mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0),
        )
    )


@dataclass
class ClientDP:
    """Client-level DP of one run: the noise multiplier, how many clients every release averages,
    and Flower's accountant of the releases made so far.

    Under fixed clipping Flower's wrapper composes each release itself (its accounted mode also
    refuses a wrong reply count and unequal weights); under adaptive clipping, which Flower's
    wrapper cannot account, the guard refuses a wrong count and calls :meth:`release`."""

    noise_multiplier: float
    sampled: int
    population: int
    accountant: RdpAccountant
    wrapper_composes: bool

    def release(self) -> None:
        self.accountant.compose(GaussianPrivacyEvent(self.noise_multiplier, self.sampled, self.population))

    @property
    def releases(self) -> int:
        return self.accountant.num_releases

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(self.accountant.config.target_delta)) if self.releases else 0.0

    def state(self) -> str:
        """The accountant's ledger as JSON (for checkpoints)."""
        return json.dumps(self.accountant.state_dict())

    def load_state(self, text: str) -> None:
        """Restore a ledger from :meth:`state`; a ledger of another delta or population is an error."""
        try:
            self.accountant.load_state_dict(json.loads(text))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"the checkpoint's privacy accountant cannot be restored: {err}") from None


def make_client_dp(cfg: Config, num_clients: int, sampled: int) -> ClientDP:
    """The run's client-level DP: ``sampled`` of ``num_clients`` clients averaged per round."""
    return ClientDP(
        client_noise_multiplier(cfg),
        sampled,
        num_clients,
        _accountant(cfg.privacy.delta, num_clients),
        wrapper_composes=cfg.privacy.clipping == "fixed",
    )
