"""FedALA (Zhang et al., AAAI 2023): adaptive local aggregation of the received model.

Each client keeps its last local model (``local.<key>``) and element-wise mixing weights ``W`` for
the classifier head (``mixing.<head key>``, ones at first). On receiving the global model it learns
``W`` on a share of its data, starts from ``local + (global - local) * W`` in the head (the global
model below), trains from that mix, sends the result as in FedAvg, and evaluates the mix. The first
time a client learns ``W`` it repeats its pass until the loss settles (the paper's start phase,
``personalization.ala_start_threshold``); every later round makes one pass.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.transforms import normalize
from ..train import batches
from .base import Policy, head_keys
from .run import ClientRun

__all__ = ["LOCAL", "MAX_START_PASSES", "MIXING", "STARTED", "START_WINDOW", "FedALA", "mix_head"]

LOCAL = "local."  # the client's last local model
MIXING = "mixing."  # the element-wise mixing weights of the head
STARTED = "ala.started"  # 1 once the client has learnt W (its start phase is over), else 0
START_WINDOW = 10  # the start phase ends when the last this-many pass losses settle (PFLlib's num_pre_loss)
MAX_START_PASSES = 100  # and after this many passes whether they settled or not


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

    settings = ("ala_start_threshold",)
    sample_dp_refusal = (
        "its mixing weights are learned on the client's data outside DP-SGD and set where the released update starts"
    )

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        local = {f"{LOCAL}{k}": v.detach().clone() for k, v in state.items()}
        mixing = {f"{MIXING}{k}": torch.ones_like(state[k]) for k in head_keys(model)}
        return local | mixing | {STARTED: torch.zeros((), dtype=torch.int64)}

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
        the paper evaluate (``pfllib``; with the start phase when the client has not learnt W yet, as
        its next training will). The W learnt to evaluate is not kept."""
        mine = deepcopy(model)
        if run.cfg.evaluate.protocol == "pfllib":
            self.adaptive_mixing(run, mine, extra)
        else:
            mix_head(mine, extra)
        return mine

    def adaptive_mixing(
        self, run: ClientRun, model: nn.Module, extra: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Adaptive local aggregation (Algorithm 1): ``W`` takes a pass of
        ``W <- clip(W - eta * dL/dhead * (global - local), 0, 1)`` over the batches of a seeded
        ``sample`` share of the client's train part, everything but the mixed head fixed (eval mode:
        no running statistic moves), then ``model``'s head is mixed with it (:func:`mix_head`). ``L``
        is the training loss, with the label-prior offset when the policy trains with one, as the
        head was trained and will predict.

        The first time the client learns ``W`` (``local != global``: round 1 has nothing to learn)
        is its start phase, as in the paper and PFLlib: the pass repeats over the same batches until
        the standard deviation of the last :data:`START_WINDOW` pass losses (each the mean over its
        batches) is below ``personalization.ala_start_threshold`` (0: one pass), at most
        :data:`MAX_START_PASSES` passes. Every later call makes one pass.

        Only the head changes while ``W`` is learnt, so for a model that declares its forward is
        ``get_classifier()(forward_features(x))`` (fedse's), each batch's features are computed
        once, in the first pass, and every step runs the head alone: the same numbers as the
        whole forward, for a pass or a start phase that costs about one forward.

        Returns ``extra`` with the new ``W`` and the start phase marked done (the local model is
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
        started = bool(extra[STARTED])
        head = _head_on_features(model, keys)
        if any(bool((glob[k] != local[k]).any()) for k in keys):  # else W has no gradient: nothing to learn
            model.eval()
            generator = torch.Generator().manual_seed(run.seed_of("mixing"))
            n = len(shard.train_labels)
            chosen = torch.randperm(n, generator=generator)[: max(1, int(n * self.sample))]
            picks = [chosen[index] for index in batches(len(chosen), run.cfg.train.batch_size, generator)]
            threshold = 0.0 if started else run.cfg.personalization.ala_start_threshold
            features: list[torch.Tensor] = []  # each batch's input to the head, from the first pass
            losses: list[float] = []
            while True:
                total = torch.zeros((), dtype=torch.float64, device=device)  # read once a pass, not every batch
                for j, pick in enumerate(picks):
                    with torch.no_grad():
                        for k in keys:
                            params[k].copy_(local[k] + (glob[k] - local[k]) * weights[k])
                    if head is None:
                        logits = model(normalize(shard.train_images[pick].to(device), run.mean, run.std))
                    else:
                        if j == len(features):
                            with torch.no_grad():
                                x = normalize(shard.train_images[pick].to(device), run.mean, run.std)
                                features.append(model.forward_features(x))
                        logits = head(features[j])
                    logits = logits if bias is None else logits + bias
                    loss = torch.nn.functional.cross_entropy(logits, shard.train_labels[pick].to(device))
                    grads = torch.autograd.grad(loss, [params[k] for k in keys])
                    for k, g in zip(keys, grads, strict=True):
                        weights[k] = (weights[k] - self.eta * g * (glob[k] - local[k])).clamp_(0.0, 1.0)
                    total += loss.detach()
                if threshold == 0:
                    break
                losses.append(float(total) / max(1, len(picks)))
                if len(losses) >= MAX_START_PASSES:
                    break
                if len(losses) > START_WINDOW and float(np.std(losses[-START_WINDOW:])) < threshold:
                    break
            started = True
            with torch.no_grad():  # back to the received global head before the mix below
                for k in keys:
                    params[k].copy_(glob[k])
        mix_head(model, extra, weights)
        model.cpu()
        learnt = {f"{MIXING}{k}": weights[k].detach().cpu().clone() for k in keys}
        return extra | learnt | {STARTED: torch.tensor(int(started))}


def _head_on_features(model: nn.Module, keys: tuple[str, ...]) -> nn.Module | None:
    """The classifier, where the model declares ``forward_is_classifier_on_features`` (its forward
    is ``get_classifier()(forward_features(x))``, as fedse's models) and the classifier holds exactly
    the head ``keys``; else None (the whole model runs every step)."""
    if not getattr(model, "forward_is_classifier_on_features", False):
        return None
    head = model.get_classifier()
    named = dict(model.named_parameters())
    if {id(p) for p in head.parameters()} != {id(named[k]) for k in keys}:
        return None
    return head
