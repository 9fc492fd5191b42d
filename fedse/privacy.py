"""Differential privacy for what is shared: sample level (Opacus) and client level (Flower).

Sample level (``privacy.mode: sample``): each client trains with DP-SGD:
Poisson sampling, per-sample clipping of the gradient of *every* parameter
that trains (private excitation included), Gaussian noise. The per-sample
gradients are exact autodiff of each example's own loss through the whole
model, clipped by Opacus's rule (:mod:`fedse.per_sample`: layer by layer from
one batched backward for fedse's models, ``torch.func``'s ``vmap`` for any
other); Opacus does the rest with its public pieces: the sampler of its
``DPDataLoader`` (Poisson sampling), ``DPOptimizerFastGradientClipping``
(noise, averaging) and its accountant, whose hook counts every step. No Opacus hooks sit on the
model. The accountant's state is kept per client across rounds,
so the epsilon a client reports covers every DP step it ever took.

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
import importlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import Config, ConfigError
from .per_sample import Criterion, clipped_sum

# Importing Opacus calls logging.basicConfig (opacus/utils/module_utils.py): where nothing had set up
# logging, the root logger gets a stderr handler of Opacus's format, and every line Flower's own
# handler prints (its logger propagates) is printed a second time. Only that handler is removed, by
# its format; a root handler the host program set up before is left alone (basicConfig then added none).
_OPACUS_FORMAT = ("%(asctime)s:%(levelname)s:%(message)s", "%m/%d/%Y %H:%M:%S")
for _handler in list(logging.getLogger().handlers):
    if _handler.formatter is not None and (_handler.formatter._fmt, _handler.formatter.datefmt) == _OPACUS_FORMAT:
        logging.getLogger().removeHandler(_handler)

__all__ = [
    "ClientDP",
    "Criterion",
    "SampleDP",
    "Step",
    "check_dp_model",
    "client_level_epsilon",
    "client_noise_multiplier",
    "make_client_dp",
    "epsilon_of",
    "poisson_rate",
    "sample_noise_multiplier",
]


# (inputs, labels) -> (mean loss, logits), both detached (None, None for an empty batch): one step.
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]]


def check_config(cfg: Config) -> None:
    """The privacy settings' own rules and the settings DP-SGD or the client-level wrappers cannot
    account for (each error names the key, the value and what is allowed)."""
    pr = cfg.privacy
    if pr.mode != "none" and (pr.noise_multiplier is None) == (pr.target_epsilon is None):
        raise ConfigError(
            f"config key 'privacy': mode '{pr.mode}' needs exactly one of privacy.noise_multiplier "
            f"or privacy.target_epsilon (got noise_multiplier={pr.noise_multiplier}, "
            f"target_epsilon={pr.target_epsilon})"
        )
    if pr.mode == "sample" and cfg.personalization.label_prior not in (None, "off"):
        raise ConfigError(
            f"config key 'personalization.label_prior': '{cfg.personalization.label_prior}' cannot be "
            "combined with privacy.mode=sample (the prior depends on all of a client's labels, outside "
            "DP-SGD's per-example bound); allowed: off or null (null turns it off under sample-level DP)"
        )
    if pr.mode == "sample" and cfg.train.bf16:
        raise ConfigError(
            "config key 'train.bf16': true cannot be combined with privacy.mode=sample (per-sample clipping "
            "and the accountant assume float32 gradients); allowed: false"
        )
    if pr.mode == "client" and pr.clipping == "adaptive" and pr.target_epsilon is not None:
        raise ConfigError(
            "config key 'privacy.target_epsilon': not supported with clipping=adaptive "
            "(its accounting depends on the clipped-count noise); set privacy.noise_multiplier"
        )
    if pr.secure_mode:
        try:
            importlib.import_module("torchcsprng")
        except Exception:  # noqa: BLE001 (ImportError, or a build that fails to load)
            raise ConfigError(
                "config key 'privacy.secure_mode': true needs the package torchcsprng, which does not "
                "import here (pip install torchcsprng); allowed: false, where DP noise comes from a "
                "generator seeded from os.urandom (unpredictable, not cryptographically secure)"
            ) from None


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
        criterion: Criterion,
    ) -> Iterator[tuple[Step, PoissonBatches]]:
        """One DP-SGD phase of ``model`` under ``optimizer`` (whose parameters are the ones that
        train): yields ``(step, loader)``, Opacus's Poisson batches of (images, labels)
        (:class:`PoissonBatches`) and the DP step, which takes a batch of it and returns its mean loss and logits.

        The step sets each trained parameter's ``grad`` to the sum of the batch's gradients, each
        example's clipped over all trained parameters to ``max_grad_norm`` by Opacus's rule
        (:func:`fedse.per_sample.clipped_sum` of ``criterion``), and calls Opacus's
        ``DPOptimizerFastGradientClipping`` (the optimizer of Opacus's own ghost clipping), which
        adds the noise, divides by the expected batch size and steps ``optimizer``; its step hook
        adds the step to this client's accountant. An empty Poisson batch is a noise-only step,
        counted like any other. Everything Opacus puts on the parameters is removed on exit.

        Poisson sampling (on the host) and noise (on the parameters' device) draw from generators
        seeded from ``os.urandom``, never from the run's seed: noise or batches predictable from
        the configuration would void the guarantee (and the subsampling amplification). DP runs are
        therefore not bit-reproducible. With ``secure_mode`` both draw from a cryptographically
        secure generator (torchcsprng's ``/dev/urandom`` device, as Opacus's
        ``PrivacyEngine(secure_mode=True)``) instead."""
        check_dp_model(model)
        device = next(p.device for group in optimizer.param_groups for p in group["params"])
        if self.secure_mode:
            import torchcsprng  # config-checked: privacy.secure_mode needs it

            generator = noise_generator = torchcsprng.create_random_device_generator("/dev/urandom")
        else:
            # Poisson sampling draws on the host; the noise on the parameters' device (a CUDA
            # parameter's noise needs a CUDA generator: Opacus draws it with torch.normal there).
            generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
            noise_generator = torch.Generator(device).manual_seed(int.from_bytes(os.urandom(8), "little"))
        # What PrivacyEngine.make_private sets up, without wrapping the model (no hooks): the Poisson
        # batches, the optimizer that noises and averages the clipped sum over the expected batch
        # size, the accountant.
        loader = PoissonBatches(images, labels, batch_size, generator)
        sample_rate = loader.sample_rate
        dp_optimizer = DPOptimizerFastGradientClipping(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=int(len(labels) * sample_rate),
            generator=noise_generator,
            secure_mode=self.secure_mode,
        )
        dp_optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        trained = dp_optimizer.params
        names = _names_of(model, trained)

        def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            dp_optimizer.zero_grad(set_to_none=True)
            if not len(y):
                for p in trained:
                    p.grad = torch.zeros_like(p)
                dp_optimizer.step()
                return None, None
            batch = clipped_sum(model, names, x, y, criterion, self.max_grad_norm)
            for n, p in zip(names, trained, strict=True):
                p.grad = batch.grads[n]  # what the optimizer noises (Opacus's clipped-sum slot)
            dp_optimizer.step()
            return batch.loss, batch.logits

        try:
            yield step, loader
        finally:
            for p in trained:
                p.grad = None
                if hasattr(p, "summed_grad"):
                    del p.summed_grad


class PoissonBatches:
    """Opacus's Poisson sampling over (images, labels), as its ``DPDataLoader`` samples: each of
    ``ceil(n / batch_size)`` steps an epoch takes every example with probability 1 / that, by
    Opacus's ``UniformWithReplacementSampler``. A batch is the tensors indexed at once (the
    loader collates example by example, which costs about a millisecond a step); an empty batch
    keeps the tensors' other dimensions."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.images, self.labels = images, labels
        self.sample_rate, self.steps = poisson_rate(len(labels), batch_size)
        self.sampler = UniformWithReplacementSampler(
            num_samples=len(labels), sample_rate=self.sample_rate, generator=generator, steps=self.steps
        )

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices in self.sampler:
            index = torch.tensor(indices, dtype=torch.long)
            yield self.images[index], self.labels[index]


def _names_of(model: nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    """The model's names of ``params``; every one must be a parameter of the model that trains."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    if missing := [p for p in params if id(p) not in by_id]:
        raise ValueError(f"{len(missing)} optimizer parameter(s) are not parameters of the model")
    return [by_id[id(p)] for p in params]


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
