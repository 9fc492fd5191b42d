"""A per-client choice of private normalisation (fedse-auto): FedBN's private norms where they help.

The normalisation layers are shared and averaged as usual, and each client also keeps the ones its
last local update ended with (``localnorm.<key>``: the running statistics of its own features, and
the affine parameters it trained). ``predict``: each evaluation it predicts with whichever of the
two, the received or its own, is more accurate on its own train part (ties: the received ones),
and exports that model; what it sends is the same policy's without the choice. ``train``: the same
choice also at the start of every round, so a client that chooses its own norms trains from them
(as under FedBN, Li et al. 2021) and sends what it trained from there.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn

from .base import Policy, norm_keys
from .run import ClientRun

__all__ = ["CHOICE_SAMPLES", "LOCAL_NORM", "LocalNorms", "with_local_norms"]

LOCAL_NORM = "localnorm."  # the client's own normalisation layers, from its last local update
CHOICE_SAMPLES = 1024  # the most training images the choice scores a client's two candidates on
LOCAL_NORM_MODES = ("predict", "train")


def with_local_norms(model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose normalisation layers are the client's own (``localnorm.<key>``)."""
    own = deepcopy(model)
    norms = {k.removeprefix(LOCAL_NORM): v for k, v in extra.items() if k.startswith(LOCAL_NORM)}
    if missing := sorted(set(norm_keys(model)) - set(norms)):
        raise ValueError(f"the stored normalisation layers lack {missing[:5]}")
    own.load_state_dict(norms, strict=False)
    return own


@dataclass(frozen=True)
class LocalNorms(Policy):
    """``choose``: when the choice is made, ``predict`` (each evaluation) or ``train`` (also at the
    start of every round)."""

    choose: str = "predict"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.choose not in LOCAL_NORM_MODES:
            raise ValueError(f"policy {self.name!r}: choose {self.choose!r}; valid: {LOCAL_NORM_MODES}")

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        return {f"{LOCAL_NORM}{k}": state[k].detach().clone() for k in norm_keys(model)}

    def before_update(
        self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if self.choose == "train":
            chosen = self.choose_norms(run, model, extra)
            if chosen is not model:
                model.load_state_dict(chosen.state_dict())
            model.cpu()
        return extra

    def after_update(
        self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor], received: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        return extra | {f"{LOCAL_NORM}{k}": state[k].detach().cpu().clone() for k in norm_keys(model)}

    def evaluated_model(self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
        return self.choose_norms(run, model, extra)

    def choose_norms(self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
        """``model`` (the received normalisation layers) or a copy with the client's own, whichever
        is more accurate on the client's train part under the policy's offset; ``model`` itself on
        a tie (and before the client has trained: its own are then the received ones). A client of
        more than :data:`CHOICE_SAMPLES` training images scores both on that many of them, the same
        ones every round (a fixed draw seeded by its id), so the choice costs at most two forward
        passes over that many images."""
        own = with_local_norms(model, extra)
        shard = run.shard
        x, y = shard.train_images, shard.train_labels
        if len(y) > CHOICE_SAMPLES:
            pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(shard.client_id))[:CHOICE_SAMPLES]
            x, y = x[pick], y[pick]
        scores = [run.score(m, x, y, self.prediction_offset(run, m)) for m in (model, own)]
        return own if scores[1] > scores[0] else model
