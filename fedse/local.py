"""What a client does locally under a policy: phases of the one training loop.

* ``joint`` (FedAvg, FedBN, FedPer, fedse, ...): every parameter trains together
  for ``train.local_epochs``.
* ``private-first`` (FedRep, Collins et al. 2021): the private part trains
  alone for ``train.private_epochs`` (the shared body frozen, its norm
  statistics too), then the shared part alone for ``train.local_epochs``.

:func:`adapt` trains only a chosen set of keys for a few epochs: the
fine-tuning step of ``fedavg-ft`` before evaluation and the cold-start
adaptation of a new client (:func:`adapt_and_evaluate`). Frozen norm layers keep their running statistics
(:func:`fedse.train.train`), so a few label-skewed batches cannot drag the
statistics of a model part that does not train.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import replace

import torch
from torch import nn

from .config import Config
from .federated import ClientShard
from .policies import LOCAL, LOCAL_NORM, MIXING, PERSONAL, ROD_HEAD, RunPolicy, mixed_keys, norm_keys
from .prior import fit_prior_weight, label_log_prior
from .privacy import SampleDP
from .split import Split
from .train import TrainResult, batches, default_device, evaluate, predict, train
from .transforms import normalize

__all__ = [
    "adapt",
    "adaptive_mixing",
    "choose_norms",
    "evaluated_model",
    "extra_after_update",
    "extra_before_update",
    "mix_head",
    "fit_personal_head",
    "adapt_and_evaluate",
    "local_update",
    "logit_bias",
    "personal_model",
    "personal_update",
    "train_logit_bias",
    "with_personal_head",
]


def _param_names(model: nn.Module, keys: tuple[str, ...]) -> set[str]:
    params = {n for n, _ in model.named_parameters()}
    return {k for k in keys if k in params}


def train_logit_bias(model: nn.Module, shard: ClientShard, policy: RunPolicy) -> torch.Tensor | None:
    """The offset the training loss sees: the client's log label prior in mode ``train``."""
    if policy.label_prior != "train":
        return None
    return label_log_prior(shard.train_labels, model.get_classifier().out_features, policy.prior_smoothing)


def logit_bias(
    model: nn.Module, shard: ClientShard, policy: RunPolicy, *, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor | None:
    """The offset the client predicts with (:mod:`fedse.prior`): the log label prior in mode
    ``train``; in mode ``predict`` the prior times the weight that fits ``model`` best on the
    client's train part; None when off."""
    mode = policy.label_prior
    if mode == "off":
        return None
    prior = label_log_prior(shard.train_labels, model.get_classifier().out_features, policy.prior_smoothing)
    if mode == "train":
        return prior
    logits = predict(model, shard.train_images, mean=mean, std=std, device=default_device())
    return fit_prior_weight(logits, shard.train_labels, prior) * prior


def _run(
    model: nn.Module,
    shard: ClientShard,
    cfg: Config,
    policy: RunPolicy,
    *,
    epochs: int,
    trainable: set[str] | None,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    proximal_mu: float = 0.0,
    anchor: dict[str, torch.Tensor] | None = None,
    private: tuple[str, ...] = (),
    dp: SampleDP | None = None,
) -> TrainResult:
    t = cfg.train
    scale = policy.private_lr_scale
    lr_scale = {k: scale for k in private} if scale != 1.0 else None
    return train(
        model,
        shard.train_images,
        shard.train_labels,
        mean=mean,
        std=std,
        epochs=epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        trainable=trainable,
        lr_scale=lr_scale,
        proximal_mu=proximal_mu,
        anchor=anchor,
        augment=cfg.data.augment,
        seed=seed,
        device=default_device(),
        dp=dp,
        logit_bias=train_logit_bias(model, shard, policy),
        bf16=t.bf16,
    )


def local_update(
    model: nn.Module,
    split: Split,
    policy: RunPolicy,
    shard: ClientShard,
    cfg: Config,
    *,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    proximal_mu: float = 0.0,
    anchor: dict[str, torch.Tensor] | None = None,
    dp: SampleDP | None = None,
) -> TrainResult:
    """One round of local training under ``policy``; returns the last phase's result.
    With ``dp`` every phase is a DP-SGD phase and ``dp.history`` accumulates all their steps."""
    if policy.schedule == "private-first" and split.private and split.shared:
        _run(
            model,
            shard,
            cfg,
            policy,
            epochs=cfg.train.private_epochs,
            trainable=_param_names(model, split.private),
            seed=seed,
            mean=mean,
            std=std,
            private=split.private,
            dp=dp,
        )
        return _run(
            model,
            shard,
            cfg,
            policy,
            epochs=cfg.train.local_epochs,
            trainable=_param_names(model, split.shared),
            seed=seed + 1,
            mean=mean,
            std=std,
            proximal_mu=proximal_mu,
            anchor=anchor,
            dp=dp,
        )
    frozen = policy.frozen_keys(model)
    return _run(
        model,
        shard,
        cfg,
        policy,
        epochs=cfg.train.local_epochs,
        trainable=None if not frozen else _param_names(model, tuple(k for k in model.state_dict() if k not in frozen)),
        seed=seed,
        mean=mean,
        std=std,
        proximal_mu=proximal_mu,
        anchor=anchor,
        private=split.private,
        dp=dp,
    )


def adapt(
    model: nn.Module,
    keys: tuple[str, ...] | None,
    shard: ClientShard,
    cfg: Config,
    policy: RunPolicy,
    *,
    epochs: int,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    private: tuple[str, ...] = (),
) -> TrainResult:
    """Train only ``keys`` (None: every parameter) for ``epochs`` on the client's train part;
    keys in ``private`` train at the policy's private learning rate."""
    trainable = None if keys is None else _param_names(model, keys)
    return _run(
        model, shard, cfg, policy, epochs=epochs, trainable=trainable, seed=seed, mean=mean, std=std, private=private
    )


def personal_model(model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model``'s architecture holding the client's personal model (Ditto's ``v_k``),
    whose tensors are ``extra``'s ``personal.<key>`` entries."""
    personal = deepcopy(model)
    state = {k.removeprefix(PERSONAL): v for k, v in extra.items() if k.startswith(PERSONAL)}
    # strict=False: torch re-adds BatchNorm step counters to a metadata-less dict; every real key is checked
    if missing := personal.load_state_dict(state, strict=False).missing_keys:
        raise ValueError(f"the stored personal model lacks {missing[:5]}")
    return personal


def personal_update(
    model: nn.Module,
    extra: dict[str, torch.Tensor],
    shard: ClientShard,
    cfg: Config,
    policy: RunPolicy,
    *,
    anchor: dict[str, torch.Tensor],
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Ditto's personal step (Li et al. 2021, Algorithm 1): the client's personal model ``v`` trains
    on its own data for ``train.local_epochs`` with ``personalization.ditto_lambda / 2 ||v - w||^2``
    toward ``anchor``, the global model it received this round. Returns the new ``extra`` state."""
    personal = personal_model(model, extra)
    result = _run(
        personal,
        shard,
        cfg,
        policy,
        epochs=cfg.train.local_epochs,
        trainable=None,
        seed=seed,
        mean=mean,
        std=std,
        proximal_mu=cfg.personalization.ditto_lambda,
        anchor=anchor,
    )
    personal.cpu()
    return {f"{PERSONAL}{k}": v.detach().clone() for k, v in personal.state_dict().items()}, result


def mix_head(model: nn.Module, extra: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None) -> None:
    """FedALA's mix, in place: ``model`` holds the received global model; its head becomes
    ``local + (global - local) * W`` element-wise, ``local`` the client's last local head and ``W``
    its mixing weights (``weights``, else the stored ones in ``extra``)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k in mixed_keys(model):
            glob = params[k].detach().clone()
            local = extra[f"{LOCAL}{k}"].to(glob.device)
            w = (weights or {}).get(k, extra[f"{MIXING}{k}"]).to(glob.device)
            params[k].copy_(local + (glob - local) * w)


def adaptive_mixing(
    model: nn.Module,
    extra: dict[str, torch.Tensor],
    shard: ClientShard,
    cfg: Config,
    *,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    eta: float = 1.0,
    sample: float = 0.8,
    logit_bias: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """FedALA's adaptive local aggregation (Zhang et al., AAAI 2023, Algorithm 1): ``W`` takes one
    pass of ``W <- clip(W - eta * dL/dhead * (global - local), 0, 1)`` over a seeded ``sample`` share
    of the client's train part, everything but the mixed head fixed (eval mode: no running statistic
    moves; PFLlib's defaults eta = 1, 80%), then ``model``'s head is mixed with it
    (:func:`mix_head`). ``L`` is the training loss: with ``logit_bias`` (the label-prior offset
    when ``personalization.label_prior`` turns it on) added to the logits, as the head was trained
    and will predict. Returns ``extra`` with the new ``W`` (the local model is unchanged)."""
    keys = mixed_keys(model)
    device = default_device()
    model.to(device)
    params = dict(model.named_parameters())
    glob = {k: params[k].detach().clone() for k in keys}
    local = {k: extra[f"{LOCAL}{k}"].to(device) for k in keys}
    weights = {k: extra[f"{MIXING}{k}"].to(device).clone() for k in keys}
    bias = None if logit_bias is None else logit_bias.to(device)
    if any(bool((glob[k] != local[k]).any()) for k in keys):  # else W has no gradient: nothing to learn
        model.eval()
        generator = torch.Generator().manual_seed(seed)
        n = len(shard.train_labels)
        chosen = torch.randperm(n, generator=generator)[: max(1, int(n * sample))]
        for index in batches(len(chosen), cfg.train.batch_size, generator):
            with torch.no_grad():
                for k in keys:
                    params[k].copy_(local[k] + (glob[k] - local[k]) * weights[k])
            pick = chosen[index]
            x = normalize(shard.train_images[pick].to(device), mean, std)
            logits = model(x) if bias is None else model(x) + bias
            loss = torch.nn.functional.cross_entropy(logits, shard.train_labels[pick].to(device))
            grads = torch.autograd.grad(loss, [params[k] for k in keys])
            for k, g in zip(keys, grads, strict=True):
                weights[k] = (weights[k] - eta * g * (glob[k] - local[k])).clamp_(0.0, 1.0)
        with torch.no_grad():  # back to the received global head before the mix below
            for k in keys:
                params[k].copy_(glob[k])
    mix_head(model, extra, weights)
    model.cpu()
    return extra | {f"{MIXING}{k}": weights[k].detach().cpu().clone() for k in keys}


def with_personal_head(model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose head is the generic head plus the client's personalized head
    (FedRoD predicts with ``g(z) + p(z)``; both are linear in the features ``z``, so the sum is one
    head of the same shape)."""
    combined = deepcopy(model)
    params = dict(combined.named_parameters())
    with torch.no_grad():
        for key, value in extra.items():
            if key.startswith(ROD_HEAD):
                params[key.removeprefix(ROD_HEAD)].add_(value.to(params[key.removeprefix(ROD_HEAD)].device))
    return combined


def fit_personal_head(
    model: nn.Module,
    extra: dict[str, torch.Tensor],
    shard: ClientShard,
    cfg: Config,
    policy: RunPolicy,
    *,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, torch.Tensor]:
    """FedRoD's personalized head (Chen & Chao 2022): ``p`` trains on the client's data for
    ``train.local_epochs`` with plain cross-entropy (no label-prior offset: the empirical risk) on
    ``g(z) + p(z)``, the body and the generic head ``g`` fixed. Returns the new ``extra``."""
    combined = with_personal_head(model, extra)
    keys = tuple(k.removeprefix(ROD_HEAD) for k in extra if k.startswith(ROD_HEAD))
    generic = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
    plain = replace(policy, label_prior="off")
    adapt(combined, keys, shard, cfg, plain, epochs=cfg.train.local_epochs, seed=seed, mean=mean, std=std)
    combined.cpu()
    state = combined.state_dict()
    return extra | {f"{ROD_HEAD}{k}": (state[k] - generic[k].to(state[k].device)).detach().clone() for k in keys}


def extra_before_update(
    model: nn.Module,
    extra: dict[str, torch.Tensor],
    shard: ClientShard,
    cfg: Config,
    policy: RunPolicy,
    *,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, torch.Tensor]:
    """The policy's extra private state before the shared update (the one place the extra-state
    policies act before it): FedALA starts ``model`` from its own mix; ``local_norms="train"``
    starts it from the client's own norms where :func:`choose_norms` picks them; the others
    change nothing."""
    if policy.adaptive_mixing:
        bias = train_logit_bias(model, shard, policy)
        return adaptive_mixing(model, extra, shard, cfg, seed=seed + 2, mean=mean, std=std, logit_bias=bias)
    if policy.local_norms == "train":
        chosen = choose_norms(model, extra, shard, policy, mean=mean, std=std)
        if chosen is not model:
            model.load_state_dict(chosen.state_dict())
        model.cpu()
    return extra


def extra_after_update(
    model: nn.Module,
    extra: dict[str, torch.Tensor],
    received: dict[str, torch.Tensor],
    shard: ClientShard,
    cfg: Config,
    policy: RunPolicy,
    *,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, torch.Tensor]:
    """The policy's extra private state after the shared update of ``model`` (``received``: the
    weights the server sent): FedALA keeps the trained model as its local one, FedRoD fits its
    personalized head, Ditto trains its personal model toward ``received``, ``local_norms`` keeps
    the trained normalisation layers as the client's own."""
    if policy.local_norms != "off":
        state = model.state_dict()
        return extra | {f"{LOCAL_NORM}{k}": state[k].detach().cpu().clone() for k in norm_keys(model)}
    if policy.adaptive_mixing:
        return extra | {f"{LOCAL}{k}": v.detach().clone() for k, v in model.state_dict().items()}
    if policy.personal_head:
        return fit_personal_head(model, extra, shard, cfg, policy, seed=seed + 3, mean=mean, std=std)
    if policy.personal_model:
        return personal_update(model, extra, shard, cfg, policy, anchor=received, seed=seed + 1, mean=mean, std=std)[0]
    return extra


CHOICE_SAMPLES = 1024  # the most training images choose_norms scores a client's two candidates on


def with_local_norms(model: nn.Module, extra: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose normalisation layers are the client's own (``localnorm.<key>``)."""
    own = deepcopy(model)
    norms = {k.removeprefix(LOCAL_NORM): v for k, v in extra.items() if k.startswith(LOCAL_NORM)}
    if missing := sorted(set(norm_keys(model)) - set(norms)):
        raise ValueError(f"the stored normalisation layers lack {missing[:5]}")
    own.load_state_dict(norms, strict=False)
    return own


def choose_norms(
    model: nn.Module,
    extra: dict[str, torch.Tensor],
    shard: ClientShard,
    policy: RunPolicy,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> nn.Module:
    """``local_norms``' per-client choice: ``model`` (the received normalisation layers) or a copy
    with the client's own, whichever is more accurate on the client's train part under the policy's
    label-prior offset; ``model`` itself on a tie (and before the client has trained: its own are
    then the received ones). A client of more than :data:`CHOICE_SAMPLES` training images scores
    both on that many of them, the same ones every round (a fixed draw seeded by its id), so the
    choice costs at most two forward passes over that many images."""
    own = with_local_norms(model, extra)
    x, y = shard.train_images, shard.train_labels
    if len(y) > CHOICE_SAMPLES:
        pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(shard.client_id))[:CHOICE_SAMPLES]
        x, y = x[pick], y[pick]
    scores = [
        evaluate(m, x, y, mean=mean, std=std, logit_bias=logit_bias(m, shard, policy, mean=mean, std=std)).accuracy
        for m in (model, own)
    ]
    return own if scores[1] > scores[0] else model


def evaluated_model(
    model: nn.Module,
    extra: dict[str, torch.Tensor],
    policy: RunPolicy,
    shard: ClientShard,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> nn.Module:
    """The model a client evaluates (before any fine-tuning): Ditto's personal model, FedALA's mix,
    FedRoD's generic plus personalized head, the chosen normalisation layers (``local_norms``);
    else ``model`` itself (received plus private part)."""
    if policy.local_norms != "off":
        return choose_norms(model, extra, shard, policy, mean=mean, std=std)
    if policy.personal_model:
        return personal_model(model, extra)
    if policy.adaptive_mixing:
        mine = deepcopy(model)
        mix_head(mine, extra)
        return mine
    if policy.personal_head:
        return with_personal_head(model, extra)
    return model


def adapt_and_evaluate(
    model: nn.Module,
    split: Split,
    shard: ClientShard,
    cfg: Config,
    policy: RunPolicy,
    *,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, float]:
    """Cold start: a client that never trained adapts copies of the received ``model`` on its own
    train part for ``personalization.finetune_epochs`` and is evaluated on its own test part three
    ways: as received (``global_acc``), only its private keys adapted (``private_acc``), every key
    adapted (``full_acc``). An empty private set (fedavg) means no adaptation: the same as global."""
    kinds = {"global": None, "private": split.private, "full": tuple(model.state_dict())}
    out = {}
    for kind, keys in kinds.items():
        copy = deepcopy(model)
        if keys:
            adapt(
                copy,
                keys,
                shard,
                cfg,
                policy,
                epochs=cfg.personalization.finetune_epochs,
                seed=seed,
                mean=mean,
                std=std,
                private=split.private,
            )
        out[f"{kind}_acc"] = evaluate(
            copy,
            shard.test_images,
            shard.test_labels,
            mean=mean,
            std=std,
            logit_bias=logit_bias(copy, shard, policy, mean=mean, std=std),
        ).accuracy
    return out
