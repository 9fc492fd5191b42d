"""Ditto (Li, Hu, Beirami, Smith, ICML 2021): a personal model beside the global one.

The global model trains and is averaged as in FedAvg. Each client also keeps a whole personal model
``v`` (extra state ``personal.<key>``, never sent), trained after the shared update on its own data
with ``personalization.ditto_lambda / 2 ||v - w||^2`` toward the global model ``w`` it received this
round (Algorithm 1), and evaluated in the global model's place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config, ConfigError
from .base import Policy, with_state
from .run import ClientRun

__all__ = ["PERSONAL", "Ditto", "personal_model"]

PERSONAL = "personal."  # prefix of the personal model's tensors in a client's private state


def personal_model(model: nn.Module, extra: dict[str, torch.Tensor], prefix: str = PERSONAL) -> nn.Module:
    """A copy of ``model``'s architecture holding the client's personal model, whose tensors are
    ``extra``'s ``<prefix><key>`` entries."""
    state = {k.removeprefix(prefix): v for k, v in extra.items() if k.startswith(prefix)}
    return with_state(model, state, "the stored personal model")


@dataclass(frozen=True)
class Ditto(Policy):
    settings = ("ditto_lambda",)

    def validate(self, cfg: Config) -> None:
        lam, lr = cfg.personalization.ditto_lambda, cfg.train.lr
        if lam * lr >= 1:
            raise ConfigError(
                f"config key 'personalization.ditto_lambda': {lam} x train.lr {lr} = {lam * lr:g}; the proximal "
                f"step overshoots the global model at 1 and diverges at 2; allowed: ditto_lambda < 1 / train.lr = "
                f"{1 / lr:g}"
            )

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{PERSONAL}{k}": v.detach().clone() for k, v in model.state_dict().items()}

    def after_update(
        self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor], received: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        personal = personal_model(model, extra)
        run.train(
            personal,
            epochs=run.cfg.train.local_epochs,
            trainable=None,
            seed=run.seed_of("personal"),
            proximal_mu=run.cfg.personalization.ditto_lambda,
            anchor=received,
        )
        personal.cpu()
        return {f"{PERSONAL}{k}": v.detach().clone() for k, v in personal.state_dict().items()}

    def evaluated_model(self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
        return personal_model(model, extra)
