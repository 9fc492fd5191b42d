"""FedRoD (Chen & Chao, ICLR 2022): a generic head shared, a personalized head kept.

Body and generic head are shared and trained with the balanced softmax (the client's log label
prior added to the logits in training: fedavg-la's update). Each client keeps a personalized head
``p`` (``rodhead.<head key>``, zeros at first), fitted after the shared update on its own data
with plain cross-entropy on ``g(z) + p(z)``, body and generic head ``g`` fixed, and predicts with
that sum and no offset.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn

from .base import Policy, head_keys
from .run import ClientRun

__all__ = ["ROD_HEAD", "FedRoD", "with_personal_head"]

ROD_HEAD = "rodhead."  # the personalized head, added to the generic one


def with_personal_head(model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose head is the generic head plus the client's personalized head (both
    are linear in the features ``z``, so the sum is one head of the same shape)."""
    combined = deepcopy(model)
    params = dict(combined.named_parameters())
    with torch.no_grad():
        for key, value in extra.items():
            if key.startswith(ROD_HEAD):
                params[key.removeprefix(ROD_HEAD)].add_(value.to(params[key.removeprefix(ROD_HEAD)].device))
    return combined


@dataclass(frozen=True)
class FedRoD(Policy):
    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        return {f"{ROD_HEAD}{k}": torch.zeros_like(state[k]) for k in head_keys(model)}

    def after_update(
        self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor], received: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Fit the personalized head for ``train.local_epochs`` on the empirical risk (no offset)."""
        combined = with_personal_head(model, extra)
        keys = tuple(k.removeprefix(ROD_HEAD) for k in extra if k.startswith(ROD_HEAD))
        generic = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
        run.adapt(
            combined, keys, epochs=run.cfg.train.local_epochs, label_prior=False, seed=run.seed_of("personal-head")
        )
        combined.cpu()
        state = combined.state_dict()
        return extra | {f"{ROD_HEAD}{k}": (state[k] - generic[k].to(state[k].device)).detach().clone() for k in keys}

    def evaluated_model(self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
        return with_personal_head(model, extra)

    def prediction_offset(self, run: ClientRun, model: nn.Module) -> torch.Tensor | None:
        return None  # g(z) + p(z): the personalized head has learnt the client's own prior
