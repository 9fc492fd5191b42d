"""Per-sample gradients: for each example of a batch, the gradient of its own loss.

DP-SGD clips each example's gradient, so it needs them one by one. Two exact ways:

* **By layer** (:func:`by_layer`), for models that declare
  ``per_sample_gradients_by_layer = True``: every parameter is used only inside the forward of
  the module that holds it, and no module mixes examples. One batched forward records each
  trained module's input; one batched backward gives the gradient of the summed loss at each
  module's output, which is each example's own gradient there (no cross-sample terms), computing
  input gradients only. Each module's rule then turns (input, output gradient) into per-sample
  parameter gradients: a convolution's by one grouped convolution backward (the batch as groups;
  a 1x1 or one-input-channel convolution's by one product with its input's windows),
  a linear layer's by one ``einsum``, a GroupNorm's by one fused GroupNorm backward (again the
  batch as groups). This costs about a
  plain step plus the per-sample weight gradients; Opacus's hooks compute the same from unfolded
  inputs, which makes a slower DP step on CPU (measured side by side in ``benchmarks/privacy.py``).
* **By torch.func** (:func:`by_vmap`), for any other model, or a trained parameter held by a
  module without a rule here: ``vmap`` over ``grad`` of a ``functional_call`` on one example.

Both give the gradient of each example's loss alone, to float rounding; which one runs depends
only on the model's declaration and its module types, never on a failure.

DP-SGD needs only each example's gradient norm and the sum of the clipped gradients
(:func:`clipped_sum`). A linear layer on one vector per example has a rank-one per-sample weight
gradient ``g_i a_i^T``: its norm is ``|g_i| |a_i|`` and the clipped sum is one matrix product
``(c * g)^T a``, so by layer it is never materialised (ghost clipping, Li et al. 2022; Bu et al.
2023's book-keeping). That matters where a wide linear layer holds most of the weights (the
reference CNN's ``fc1``: 64 examples x 524k weights each).

Both pad the batch with zero images to a multiple of :data:`PAD_MULTIPLE`. Poisson sampling gives
every step a batch of a different size, and every new size makes oneDNN (CPU) or cuDNN (CUDA) build
new convolution kernels, which costs more than the step itself; padded, a run sees a handful of
sizes. The padded rows are left out of the loss and their gradients dropped, so the real rows'
per-sample gradients, loss and logits are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

# (model output, labels) -> (mean loss, the logits that loss saw): the training objective, a mean
# of per-example terms (by_layer scales it by the batch size to get each example's own gradient).
Criterion = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# The model's declaration that makes by_layer exact for it (see the module docstring).
DECLARATION = "per_sample_gradients_by_layer"
# Batches are padded to a multiple of this many rows (see the module docstring).
PAD_MULTIPLE = 8
# Per-sample gradients of at most this many numbers are clipped side by side (clipped_sum).
SMALL = 4096

# (module, its input, the gradient at its output, {parameter short name}) -> {short name: (batch, *shape)}
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, set[str]], dict[str, torch.Tensor]]


def _conv2d(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, want: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    if "weight" in want:
        w = m.weight
        if m.groups == 1 and m.dilation == (1, 1) and (w.shape[1] == 1 or w.shape[2:] == (1, 1)):
            per_sample = _conv2d_by_windows(m, a, g)
        else:
            b = a.shape[0]
            # The batch as convolution groups: input (1, B*C_in, H, W), output gradient (1, B*C_out, H', W')
            # give the weight gradient of B independent convolutions, (B*C_out, C_in/groups, kh, kw).
            per_sample = torch.ops.aten.convolution_backward(
                g.reshape(1, b * m.out_channels, *g.shape[2:]),
                a.reshape(1, b * m.in_channels, *a.shape[2:]),
                w.new_empty(b * w.shape[0], *w.shape[1:]),  # only its shape is read
                None,
                m.stride,
                m.padding,
                m.dilation,
                False,
                [0, 0],
                b * m.groups,
                [False, True, False],
            )[1].view(b, *w.shape)
        out["weight"] = per_sample
    if "bias" in want:
        out["bias"] = g.sum((2, 3))
    return out


def _conv2d_by_windows(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients of an ungrouped, undilated convolution as one product of the
    output gradient with a strided view of the padded input's windows, ``(B, C_out, C_in, kh, kw)``.
    Used where that view is small, a 1x1 kernel or one input channel, which oneDNN's grouped
    convolution backward (the batch as groups) handles slowly."""
    b, c = a.shape[:2]
    (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
    oh, ow = g.shape[2:]
    padded = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    s_b, s_c, s_h, s_w = padded.stride()
    windows = padded.as_strided((b, c, kh, kw, oh, ow), (s_b, s_c, s_h, s_w, sh * s_h, sw * s_w))
    grads = torch.einsum("bot,bckt->bock", g.flatten(2), windows.reshape(b, c, kh * kw, oh * ow))
    return grads.reshape(b, m.out_channels, c, kh, kw)


def _linear(m: nn.Linear, a: torch.Tensor, g: torch.Tensor, want: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    if "weight" in want:
        out["weight"] = torch.einsum("b...o,b...i->boi", g, a)
    if "bias" in want:
        out["bias"] = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
    return out


def _group_norm(
    m: nn.GroupNorm,
    a: torch.Tensor,
    g: torch.Tensor,
    want: set[str],
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    # The batch as groups: input (1, B*C, S) in B*num_groups groups normalises each example's groups
    # as the module did, and the affine gradients of that one "example" are (B*C,), each example's
    # own, from GroupNorm's fused backward kernel (one pass over input and output gradient).
    # ``stats``: the forward's group means and inverse deviations, (B, num_groups) each, else
    # computed again here.
    b, c = a.shape[:2]
    size = a[0, 0].numel()
    flat = a.reshape(1, b * c, size)
    if stats is None:
        _, mean, rstd = torch.ops.aten.native_group_norm(flat, None, None, 1, b * c, size, b * m.num_groups, m.eps)
    else:
        mean, rstd = (t.reshape(1, b * m.num_groups) for t in stats)
    _, weight, bias = torch.ops.aten.native_group_norm_backward(
        g.reshape(1, b * c, size),
        flat,
        mean,
        rstd,
        a.new_ones(b * c),  # only read for the input gradient, which is not asked for
        1,
        b * c,
        size,
        b * m.num_groups,
        [False, "weight" in want, "bias" in want],
    )
    out = {}
    if "weight" in want:
        out["weight"] = weight.view(b, c)
    if "bias" in want:
        out["bias"] = bias.view(b, c)
    return out


def _saved_group_norm_stats(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The group means and inverse deviations GroupNorm's forward computed and autograd saved for
    its backward (``native_group_norm``'s), or None where the output came from another op."""
    node = output.grad_fn
    if type(node).__name__ != "NativeGroupNormBackward0":
        return None
    return node._saved_result1.detach(), node._saved_result2.detach()


def _conv2d_ok(m: nn.Module) -> bool:
    return m.padding_mode == "zeros" and not isinstance(m.padding, str)


# Exact module types (a subclass may change forward); each with the condition its rule needs.
RULES: dict[type[nn.Module], tuple[Rule, Callable[[nn.Module], bool]]] = {
    nn.Conv2d: (_conv2d, _conv2d_ok),
    nn.Linear: (_linear, lambda m: True),
    nn.GroupNorm: (_group_norm, lambda m: True),
}


def layer_plan(model: nn.Module, names: Sequence[str]) -> dict[nn.Module, dict[str, str]] | None:
    """``{module: {short name: full name}}`` for the parameters ``names`` when :func:`by_layer`
    applies to ``model`` (it declares :data:`DECLARATION` and every module holding one of them has
    a rule), else None."""
    if not getattr(model, DECLARATION, False):
        return None
    wanted, plan = set(names), {}
    for prefix, module in model.named_modules():
        for short, _ in module.named_parameters(recurse=False):
            full = f"{prefix}.{short}" if prefix else short
            if full not in wanted:
                continue
            rule = RULES.get(type(module))
            if rule is None or not rule[1](module):
                return None
            plan.setdefault(module, {})[short] = full
    return plan


def per_sample_gradients(
    model: nn.Module, names: Sequence[str], x: torch.Tensor, y: torch.Tensor, criterion: Criterion
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-sample gradients of the parameters ``names``: for each example ``i``, the gradient of
    ``criterion(model(x[i:i+1]), y[i:i+1])``; every other parameter and buffer is held fixed, and
    no ``.grad`` is touched. Returns ``({name: (batch, *shape)}, mean loss, logits)``, the last two
    detached. The model must have no cross-sample statistics (no BatchNorm in training mode), so
    each example's forward is the batch's row for it. :func:`by_layer` where :func:`layer_plan`
    allows, else :func:`by_vmap`."""
    plan = layer_plan(model, names)
    if plan is None:
        return by_vmap(model, names, x, y, criterion)
    return by_layer(model, plan, names, x, y, criterion)


class Ghost(NamedTuple):
    """A linear layer's per-sample weight gradients ``g_i a_i^T``, kept as their two factors."""

    a: torch.Tensor  # (batch, in)
    g: torch.Tensor  # (batch, out)

    def full(self) -> torch.Tensor:
        return torch.einsum("bo,bi->boi", self.g, self.a)


@dataclass(frozen=True)
class ClippedSum:
    """One DP-SGD batch before the noise: ``grads``, per parameter, the sum over examples of each
    example's gradient times its clip factor; ``norms``, each example's gradient norm over every
    trained parameter, before clipping; the mean ``loss`` and the ``logits`` (detached)."""

    grads: dict[str, torch.Tensor]
    norms: torch.Tensor
    loss: torch.Tensor
    logits: torch.Tensor


def clipped_sum(
    model: nn.Module,
    names: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: Criterion,
    max_grad_norm: float,
) -> ClippedSum:
    """DP-SGD's clipping of the parameters ``names`` on a non-empty batch, as Opacus's
    ``DPOptimizer`` clips: each example's gradient over all of them jointly is scaled by
    ``min(1, max_grad_norm / (norm + 1e-6))``, then summed over the examples. The per-sample
    gradients are :func:`per_sample_gradients`', except that a linear layer's is kept as its two
    factors where it is rank one (by layer, one call): same norms and sums, exactly."""
    plan = layer_plan(model, names)
    if plan is None:
        parts, loss, logits = by_vmap(model, names, x, y, criterion)
    else:
        parts, loss, logits = by_layer(model, plan, names, x, y, criterion, ghost=True)
    # Each parameter's per-sample norms, then their norm over parameters, as Opacus computes them;
    # the small parameters (norms, biases) side by side in one row per example, one call for all.
    rows = {name: p.reshape(len(p), -1) for name, p in parts.items() if not isinstance(p, Ghost)}
    small = [name for name, r in rows.items() if r.shape[1] <= SMALL]
    joined = torch.cat([rows[name] for name in small], 1) if small else None
    per_param = [p.a.norm(dim=1) * p.g.norm(dim=1) for p in parts.values() if isinstance(p, Ghost)]
    per_param += [r.norm(dim=1) for name, r in rows.items() if r.shape[1] > SMALL]
    if joined is not None:
        per_param.append(joined.norm(dim=1))
    norms = torch.stack(per_param, 1).norm(dim=1)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    grads = {name: (p.g * factor[:, None]).T @ p.a for name, p in parts.items() if isinstance(p, Ghost)}
    grads |= {name: (factor @ r).view(parts[name].shape[1:]) for name, r in rows.items() if r.shape[1] > SMALL}
    if joined is not None:
        sums = (factor @ joined).split([rows[name].shape[1] for name in small])
        grads |= {name: t.view(parts[name].shape[1:]) for name, t in zip(small, sums, strict=True)}
    grads = {name: grads[name] for name in parts}  # the parameters' order
    return ClippedSum(grads, norms, loss, logits)


def _padded(x: torch.Tensor) -> torch.Tensor:
    """``x`` followed by zero rows up to a multiple of :data:`PAD_MULTIPLE` rows."""
    pad = -len(x) % PAD_MULTIPLE
    return torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x


def by_vmap(
    model: nn.Module, names: Sequence[str], x: torch.Tensor, y: torch.Tensor, criterion: Criterion
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """``vmap`` over ``grad`` of a ``functional_call`` on one example: any model."""
    params = dict(model.named_parameters())
    trained = {n: params[n].detach() for n in names}

    def sample_loss(
        trained: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        loss, logits = criterion(functional_call(model, trained, (xi.unsqueeze(0),)), yi.unsqueeze(0))
        return loss, (loss.detach(), logits.detach().squeeze(0))

    n = len(y)
    grads, (losses, logits) = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0))(
        trained, _padded(x), _padded(y)
    )
    return {k: g[:n] for k, g in grads.items()}, losses[:n].mean(), logits[:n]


def by_layer(
    model: nn.Module,
    plan: Mapping[nn.Module, Mapping[str, str]],
    names: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: Criterion,
    *,
    ghost: bool = False,
) -> tuple[dict[str, torch.Tensor | Ghost], torch.Tensor, torch.Tensor]:
    """One batched forward and backward; each module's rule runs in the backward as soon as the
    gradient at its output is known, while it is in cache (see the module docstring). ``plan`` is
    :func:`layer_plan`'s. The forward runs on detached parameters and an input that requires grad,
    so autograd computes input gradients only; a module called more than once adds up its calls.
    With ``ghost``, a linear layer's weight on one vector per example, called once, is a
    :class:`Ghost`."""
    n = len(y)
    grads: dict[str, torch.Tensor | Ghost] = {}

    def add(name: str, t: torch.Tensor | Ghost) -> None:
        if name in grads:  # a second call: the sum of two rank-one gradients is not rank one
            before = grads[name]
            grads[name] = (before.full() if isinstance(before, Ghost) else before) + (
                t.full() if isinstance(t, Ghost) else t
            )
        else:
            grads[name] = t

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        a, version = args[0].detach(), args[0]._version
        rule_of, extra = RULES[type(module)][0], {}
        if rule_of is _group_norm and (stats := _saved_group_norm_stats(output)) is not None:
            extra["stats"] = stats

        def rule(g: torch.Tensor) -> None:
            if a._version != version:
                raise RuntimeError(
                    f"{type(module).__name__}'s input was changed in place after the call, so its per-sample "
                    f"gradients cannot be computed by layer; remove {DECLARATION} from {type(model).__name__}"
                )
            shorts, want = plan[module], set(plan[module])
            if ghost and type(module) is nn.Linear and a.dim() == 2 and "weight" in want:
                add(shorts["weight"], Ghost(a[:n], g[:n]))
                want.discard("weight")
            for short, t in rule_of(module, a, g, want, **extra).items():
                add(shorts[short], t[:n])

        # Registered now, the hook sees the gradient at this output even if it is changed in place later.
        output.register_hook(rule)

    handles = [module.register_forward_hook(record) for module in plan]
    try:
        detached = {k: p.detach() for k, p in model.named_parameters()}
        xg = _padded(x.detach()).requires_grad_(True)
        loss, logits = criterion(functional_call(model, detached, (xg,))[:n], y)
        # The mean loss times the batch size: the gradient at each output row is that example's own
        # (zero at the padded rows, which the loss leaves out).
        torch.autograd.grad(loss * n, xg)
    finally:
        for handle in handles:
            handle.remove()
    params = dict(model.named_parameters())
    for name in names:  # a trained parameter whose module never reached the loss: zero for every example
        if name not in grads:
            grads[name] = params[name].new_zeros((n, *params[name].shape))
    return grads, loss.detach(), logits.detach()
