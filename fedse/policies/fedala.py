"""FedALA (Zhang et al., AAAI 2023): adaptive local aggregation of the received model.

Each client keeps its last local model (``local.<key>``) and element-wise mixing weights ``W`` for
the classifier head (``mixing.<head key>``, ones at first). On receiving the global model it learns
``W`` in one pass over a share of its data, starts from ``local + (global - local) * W`` in the
head (the global model below), trains from that mix, sends the result as in FedAvg, and evaluates
the mix.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn

from ..data.transforms import normalize
from ..train import batches
from .base import Policy, head_keys
from .run import ClientRun

__all__ = ["LOCAL", "MIXING", "FedALA", "mix_head"]

LOCAL = "local."  # the client's last local model
MIXING = "mixing."  # the element-wise mixing weights of the head


def mix_head(model: nn.Module, extra: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None) -> None:
    """FedALA's mix, in place: ``model`` holds the received global model; its head becomes
    ``local + (global - local) * W`` element-wise, ``local`` the client's last local head and ``W``
    its mixing weights (``weights``, else the stored ones in ``extra``)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k in head_keys(model):
            glob = params[k].detach().clone()
            local = extra[f"{LOCAL}{k}"].to(glob.device)
            w = (weights or {}).get(k, extra[f"{MIXING}{k}"]).to(glob.device)
            params[k].copy_(local + (glob - local) * w)


@dataclass(frozen=True)
class FedALA(Policy):
    """``eta``: the mixing weights' learning rate; ``sample``: the share of the train part that one
    pass of learning ``W`` sees (PFLlib's defaults, 1.0 and 80%)."""

    eta: float = 1.0
    sample: float = 0.8

    sample_dp_refusal = (
        "its mixing weights are learned on the client's data outside DP-SGD and set where the released update starts"
    )

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        local = {f"{LOCAL}{k}": v.detach().clone() for k, v in state.items()}
        return local | {f"{MIXING}{k}": torch.ones_like(state[k]) for k in head_keys(model)}

    def before_update(
        self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return self.adaptive_mixing(run, model, extra)

    def after_update(
        self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor], received: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return extra | {f"{LOCAL}{k}": v.detach().clone() for k, v in model.state_dict().items()}

    def evaluated_model(self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
        """The received head mixed with the client's own: with the W it learnt before its last training
        (``evaluate.protocol: fedse``), or with W learnt first on the model just received, as PFLlib and
        the paper evaluate (``pfllib``; one pass, as every round here: the paper's first round learns W
        until its loss settles). The W learnt to evaluate is not kept."""
        mine = deepcopy(model)
        if run.cfg.evaluate.protocol == "pfllib":
            self.adaptive_mixing(run, mine, extra)
        else:
            mix_head(mine, extra)
        return mine

    def adaptive_mixing(
        self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Adaptive local aggregation (Algorithm 1): ``W`` takes one pass of
        ``W <- clip(W - eta * dL/dhead * (global - local), 0, 1)`` over a seeded ``sample`` share of
        the client's train part, everything but the mixed head fixed (eval mode: no running
        statistic moves), then ``model``'s head is mixed with it (:func:`mix_head`). ``L`` is the
        training loss, with the label-prior offset when the policy trains with one, as the head was
        trained and will predict. Returns ``extra`` with the new ``W`` (the local model is
        unchanged)."""
        keys = head_keys(model)
        device = run.device
        model.to(device)
        params = dict(model.named_parameters())
        glob = {k: params[k].detach().clone() for k in keys}
        local = {k: extra[f"{LOCAL}{k}"].to(device) for k in keys}
        weights = {k: extra[f"{MIXING}{k}"].to(device).clone() for k in keys}
        offset = run.train_offset(model)
        bias = None if offset is None else offset.to(device)
        shard = run.shard
        if any(bool((glob[k] != local[k]).any()) for k in keys):  # else W has no gradient: nothing to learn
            model.eval()
            generator = torch.Generator().manual_seed(run.seed_of("mixing"))
            n = len(shard.train_labels)
            chosen = torch.randperm(n, generator=generator)[: max(1, int(n * self.sample))]
            for index in batches(len(chosen), run.cfg.train.batch_size, generator):
                with torch.no_grad():
                    for k in keys:
                        params[k].copy_(local[k] + (glob[k] - local[k]) * weights[k])
                pick = chosen[index]
                x = normalize(shard.train_images[pick].to(device), run.mean, run.std)
                logits = model(x) if bias is None else model(x) + bias
                loss = torch.nn.functional.cross_entropy(logits, shard.train_labels[pick].to(device))
                grads = torch.autograd.grad(loss, [params[k] for k in keys])
                for k, g in zip(keys, grads, strict=True):
                    weights[k] = (weights[k] - self.eta * g * (glob[k] - local[k])).clamp_(0.0, 1.0)
            with torch.no_grad():  # back to the received global head before the mix below
                for k in keys:
                    params[k].copy_(glob[k])
        mix_head(model, extra, weights)
        model.cpu()
        return extra | {f"{MIXING}{k}": weights[k].detach().cpu().clone() for k in keys}
