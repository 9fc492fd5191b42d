"""APFL (Deng, Kamani, Mahdavi, 2020, arXiv:2003.13461): adaptive personalized federated learning.

The global model ``w`` trains and is averaged as in FedAvg. Each client also keeps a local model
``v`` (``apfl.<key>``, the received model at first, never sent) and predicts with the mix
``alpha * v + (1 - alpha) * w`` of it and the global model it holds.

After the shared update, ``v`` takes ``train.local_epochs`` of SGD on the loss of the mix, with
``w`` the model the client just trained (Algorithm 1 interleaves the two updates step by step;
here ``w``'s update comes first, as Ditto's personal step does in fedse). The gradient of that loss
in ``v`` is ``alpha`` times its gradient in the mix, so the loop trains the mix itself at learning
rate ``alpha**2 * train.lr`` (momentum included; ``train.weight_decay`` acts on the mix) and ``v``
is read back as ``(mix - (1 - alpha) * w) / alpha``. ``alpha`` is fixed (the paper's fixed-mix
variant; 0.5 here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Policy, with_state
from .run import ClientRun

__all__ = ["APFL", "APFL_LOCAL"]

APFL_LOCAL = "apfl."  # the client's local model v


@dataclass(frozen=True)
class APFL(Policy):
    """``alpha``: the weight of the client's local model in the model it predicts with, in (0, 1]."""

    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.alpha <= 1:
            raise ValueError(f"policy {self.name!r}: alpha {self.alpha}; allowed: 0 < alpha <= 1")

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{APFL_LOCAL}{k}": v.detach().clone() for k, v in model.state_dict().items()}

    def mixed(self, model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
        """A copy of ``model`` (holding ``w``) holding ``alpha * v + (1 - alpha) * w`` in every
        floating-point tensor (integer counters are ``v``'s)."""
        a = self.alpha
        state = {}
        for k, w in model.state_dict().items():
            v = extra[f"{APFL_LOCAL}{k}"].to(w.device)
            state[k] = a * v + (1 - a) * w if w.is_floating_point() else v.clone()
        return with_state(model, state, "the mixed model")

    def after_update(
        self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor], received: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        a = self.alpha
        mix = self.mixed(model, extra)
        run.train(mix, epochs=run.cfg.train.local_epochs, trainable=None, seed=run.seed_of("personal"), lr_factor=a * a)
        mix.cpu()
        w = model.state_dict()
        out = {}
        for k, m in mix.state_dict().items():
            out[f"{APFL_LOCAL}{k}"] = ((m - (1 - a) * w[k]) / a if m.is_floating_point() else m).detach().clone()
        return extra | out

    def evaluated_model(self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
        return self.mixed(model, extra)
