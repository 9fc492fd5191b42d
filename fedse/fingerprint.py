"""Label-free input monitoring from private squeeze-and-excitation gates.

Every client keeps its excitation MLPs private. For an input ``x`` an SE block's gates
``g(x)`` are its sigmoid outputs, one per channel, computed from the globally pooled
feature map (Hu et al., CVPR 2018). Over all SE blocks they summarise the input's global
statistics, and on a client's own data they cluster; an input far from that cluster is
unusual for the client (a new camera, a corrupted sensor, another site's data).

* :func:`probe` runs a model once and records the gates of every SE block, the
  penultimate features and the logits.
* :class:`GateStats` fits a per-channel Gaussian to a client's gates and scores inputs by
  their diagonal Mahalanobis distance; :func:`threshold_at` turns held-out normal scores
  into an alarm threshold at a chosen false-alarm rate.
* :func:`mmd2` compares two batches (batch drift) by the unbiased squared maximum mean
  discrepancy (Gretton et al., JMLR 2012).
* Baselines: :func:`msp_score`, the maximum softmax probability (Hendrycks & Gimpel,
  ICLR 2017), and :class:`FeatureGaussian`, the class-conditional Gaussian with tied
  covariance on penultimate features (Lee et al., NeurIPS 2018).
* :func:`auroc` (Mann-Whitney) measures how well scores separate normal from unusual
  inputs; :func:`corrupt` makes unusual inputs from normal ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.feature_skew import ClientStyle, apply_style
from .data.transforms import normalize
from .models import SEBlock

__all__ = [
    "CORRUPTIONS",
    "FeatureGaussian",
    "GateStats",
    "Probe",
    "auroc",
    "corrupt",
    "mmd2",
    "mmd_test",
    "msp_score",
    "probe",
    "threshold_at",
]

CORRUPTIONS = ("gaussian_noise", "blur", "contrast", "rotation")
STRENGTHS = (1, 2)  # mild, strong

# Per corruption, the parameter at strength 1 and 2.
_NOISE_STD = {1: 0.08, 2: 0.2}  # Gaussian noise std, fraction of the [0, 255] range
_BLUR_SIGMA = {1: 0.6, 2: 1.2}  # Gaussian blur sigma, pixels
_CONTRAST = {1: 0.5, 2: 0.25}  # blend factor toward the per-image mean (1 = unchanged)
_ROTATION = {1: 15.0, 2: 45.0}  # degrees, counter-clockwise

_STATE_KEY = re.compile(r"^gate_(mean|var)\.(\d+)$")


# --------------------------------------------------------------------------- probing


@dataclass(frozen=True, eq=False)
class Probe:
    """What :func:`probe` records for N inputs, all float32 on the CPU."""

    gates: list[torch.Tensor]  # per SE block, (N, C_b), in model order
    features: torch.Tensor  # (N, F) penultimate features (SEResNet.forward_features)
    logits: torch.Tensor  # (N, classes)


def probe(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | str | None = None,
    logit_bias: torch.Tensor | None = None,
) -> Probe:
    """Run ``model`` on uint8 ``images`` (N, C, H, W) and record gates, features and logits.

    Inputs are normalised by :func:`fedse.data.transforms.normalize` with ``mean``/``std``. The
    model runs in eval mode without gradients (its previous mode is restored afterwards);
    a forward hook on every ``SEBlock.gate`` (in ``model.modules()`` order) records that
    block's sigmoid outputs. Features are ``model.forward_features(x)``, logits are the
    classifier (``model.get_classifier()``) applied to them, i.e. ``model(x)`` for an
    :class:`~fedse.models.SEResNet`, plus ``logit_bias`` (classes,) when given. ``device``
    defaults to the device of the model's parameters. Hooks are removed even on error.
    """
    se_blocks = [m for m in model.modules() if isinstance(m, SEBlock)]
    if not se_blocks:
        raise ValueError(
            f"model {type(model).__name__} has no SEBlock (built with reduction=None?); "
            "gate fingerprints need at least one squeeze-and-excitation block"
        )
    if not (hasattr(model, "forward_features") and hasattr(model, "get_classifier")):
        raise ValueError(
            f"model {type(model).__name__} must provide forward_features() and get_classifier() "
            "(as fedse.models.SEResNet does)"
        )
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"images must be a uint8 tensor (N, C, H, W), got dtype {images.dtype} with shape {tuple(images.shape)}"
        )
    if len(images) == 0:
        raise ValueError("images is empty (N = 0); need at least one image")
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")

    current: list[torch.Tensor] = []
    hook = lambda module, inputs, output: current.append(output.detach().float().cpu())
    handles = [block.gate.register_forward_hook(hook) for block in se_blocks]
    was_training = model.training
    gates: list[list[torch.Tensor]] = [[] for _ in se_blocks]
    features, logits = [], []
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = normalize(images[start : start + batch_size].to(device), mean, std)
                current.clear()
                feats = model.forward_features(x)
                out = model.get_classifier()(feats)
                if len(current) != len(se_blocks):
                    raise ValueError(
                        f"expected one gate output per SE block ({len(se_blocks)}) per batch, got {len(current)}; "
                        "is an SE block used more than once or skipped by forward_features?"
                    )
                for store, gate in zip(gates, current, strict=True):
                    store.append(gate)
                features.append(feats.detach().float().cpu())
                logits.append(out.detach().float().cpu())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    all_logits = torch.cat(logits)
    if logit_bias is not None:
        bias = torch.as_tensor(logit_bias).detach().float().cpu()
        if bias.shape != all_logits.shape[1:]:
            raise ValueError(
                f"logit_bias must have shape ({all_logits.shape[1]},) (one per class), got {tuple(bias.shape)}"
            )
        all_logits = all_logits + bias
    return Probe(gates=[torch.cat(g) for g in gates], features=torch.cat(features), logits=all_logits)


# --------------------------------------------------------------------------- gate statistics


def _check_gates(gates: Sequence[torch.Tensor], what: str = "gates") -> int:
    """Validate a list of (N, C_b) gate tensors with a common N; return N."""
    if len(gates) == 0:
        raise ValueError(f"{what} is an empty list; need one (N, C) tensor per SE block")
    sizes = set()
    for index, g in enumerate(gates):
        if g.dim() != 2:
            raise ValueError(f"{what}[{index}] must be 2-D (N, C), got shape {tuple(g.shape)}")
        sizes.add(g.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"every {what} tensor must have the same number of rows N, got {sorted(sizes)}")
    return sizes.pop()


@dataclass(frozen=True, eq=False)
class GateStats:
    """Per SE block, per channel mean and variance of a client's gates (float32, CPU)."""

    mean: list[torch.Tensor]  # per block, (C_b,)
    var: list[torch.Tensor]  # per block, (C_b,), > 0 (eps floor included)
    count: int  # number of inputs fitted on

    @classmethod
    def fit(cls, gates: Sequence[torch.Tensor], eps: float = 1e-4) -> GateStats:
        """Mean and population variance (divide by N) over the N inputs, per block and
        channel; ``eps`` is added to every variance so a constant channel scores finitely."""
        n = _check_gates(gates)
        if n < 2:
            raise ValueError(f"need at least 2 inputs to fit gate statistics, got N = {n}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        means, variances = [], []
        for g in gates:
            g64 = g.detach().cpu().double()
            means.append(g64.mean(dim=0).float())
            variances.append((g64.var(dim=0, unbiased=False) + eps).float())
        return cls(mean=means, var=variances, count=int(n))

    def score(self, gates: Sequence[torch.Tensor]) -> torch.Tensor:
        """Diagonal Mahalanobis distance, (N,) float32: the mean over all channels of all
        blocks of ``(g - mean)^2 / var``. 0 at the mean; about 1 on the fitted data; higher
        means more unusual for this client."""
        _check_gates(gates)
        if len(gates) != len(self.mean):
            raise ValueError(f"expected gates of {len(self.mean)} SE blocks, got {len(gates)}")
        total, channels = None, 0
        for index, (g, m, v) in enumerate(zip(gates, self.mean, self.var, strict=True)):
            if g.shape[1] != m.shape[0]:
                raise ValueError(f"gates[{index}] has {g.shape[1]} channels, the statistics have {m.shape[0]}")
            z = ((g.detach().cpu().double() - m.double()) ** 2 / v.double()).sum(dim=1)
            total = z if total is None else total + z
            channels += m.shape[0]
        return (total / channels).float()

    def to_state(self) -> dict[str, torch.Tensor]:
        """``gate_mean.<b>``, ``gate_var.<b>`` (float32, per block) and ``gate_count`` (0-d int64)."""
        state: dict[str, torch.Tensor] = {}
        for index, (m, v) in enumerate(zip(self.mean, self.var, strict=True)):
            state[f"gate_mean.{index}"] = m.detach().clone()
            state[f"gate_var.{index}"] = v.detach().clone()
        state["gate_count"] = torch.tensor(self.count, dtype=torch.int64)
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> GateStats:
        """Inverse of :meth:`to_state`, validated: keys ``gate_mean.0..B-1``, ``gate_var.0..B-1``
        and ``gate_count`` exactly; 1-D means and variances of equal length per block, finite,
        variances > 0; count an integer >= 2."""
        indices: set[int] = set()
        for key in state:
            if key == "gate_count":
                continue
            match = _STATE_KEY.match(key)
            if match is None:
                raise ValueError(
                    f"unexpected key {key!r} in gate statistics; allowed: gate_mean.<b>, gate_var.<b>, gate_count"
                )
            indices.add(int(match.group(2)))
        if not indices:
            raise ValueError("gate statistics hold no block (no gate_mean.<b> / gate_var.<b> keys)")
        blocks = max(indices) + 1
        expected = [f"gate_{part}.{b}" for b in range(blocks) for part in ("mean", "var")] + ["gate_count"]
        if missing := [key for key in expected if key not in state]:
            raise ValueError(f"gate statistics are missing key(s) {missing} (blocks 0..{blocks - 1})")
        means, variances = [], []
        for b in range(blocks):
            m = torch.as_tensor(state[f"gate_mean.{b}"]).detach().cpu()
            v = torch.as_tensor(state[f"gate_var.{b}"]).detach().cpu()
            if m.dim() != 1 or v.shape != m.shape:
                raise ValueError(
                    f"gate_mean.{b} and gate_var.{b} must be 1-D of equal length, "
                    f"got shapes {tuple(m.shape)} and {tuple(v.shape)}"
                )
            if not m.is_floating_point() or not v.is_floating_point():
                raise ValueError(f"gate_mean.{b} and gate_var.{b} must be float tensors, got {m.dtype} and {v.dtype}")
            if not (torch.isfinite(m).all() and torch.isfinite(v).all()):
                raise ValueError(f"gate_mean.{b} and gate_var.{b} must be finite")
            if not (v > 0).all():
                raise ValueError(f"gate_var.{b} must be > 0 everywhere, got minimum {v.min().item()}")
            means.append(m.float().clone())
            variances.append(v.float().clone())
        count = torch.as_tensor(state["gate_count"])
        if count.dim() != 0 or count.is_floating_point() or count.dtype == torch.bool or int(count) < 2:
            raise ValueError(f"gate_count must be a 0-d integer tensor >= 2, got {count!r}")
        return cls(mean=means, var=variances, count=int(count))


def threshold_at(normal_scores: torch.Tensor, false_alarm: float) -> float:
    """The score above which an input is flagged, so that at most a fraction ``false_alarm``
    of the held-out ``normal_scores`` is flagged: their (1 - false_alarm) quantile with
    "higher" interpolation (an observed score), so ``(normal_scores > t).mean() <= false_alarm``.
    On fresh normal inputs the expected rate is ``false_alarm`` up to O(1/N)."""
    if not 0 < false_alarm < 1:
        raise ValueError(f"false_alarm must be in (0, 1), got {false_alarm}")
    scores = torch.as_tensor(normal_scores).detach().cpu().double().flatten().numpy()
    if scores.size == 0:
        raise ValueError("normal_scores is empty; need held-out scores of normal inputs")
    if not np.isfinite(scores).all():
        raise ValueError("normal_scores must be finite (found NaN or inf)")
    return float(np.quantile(scores, 1.0 - false_alarm, method="higher"))


# --------------------------------------------------------------------------- batch drift


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased squared maximum mean discrepancy (Gretton et al., JMLR 2012, eq. 3) between
    the rows of ``a`` (m, D) and ``b`` (n, D), with the RBF kernel
    ``k(x, y) = exp(-|x - y|^2 / (2 bandwidth^2))``:

    ``sum_{i!=j} k(a_i, a_j) / (m(m-1)) + sum_{i!=j} k(b_i, b_j) / (n(n-1)) - 2 mean_{i,j} k(a_i, b_j)``.

    Unbiased, so it can be slightly negative when both samples come from one distribution.
    ``bandwidth=None`` is the median heuristic: the median (numpy's, averaging the two middle
    values) of all pairwise distances between distinct rows of the pooled sample (1 if that
    median is 0). For batch drift in gates pass ``torch.cat(gates, dim=1)`` of two batches.
    """
    a64 = torch.as_tensor(a).detach().cpu().double()
    b64 = torch.as_tensor(b).detach().cpu().double()
    if a64.dim() == 1:
        a64 = a64[:, None]
    if b64.dim() == 1:
        b64 = b64[:, None]
    if a64.dim() != 2 or b64.dim() != 2 or a64.shape[1] != b64.shape[1]:
        raise ValueError(
            f"a and b must be (m, D) and (n, D) with the same D, got {tuple(a64.shape)} and {tuple(b64.shape)}"
        )
    m, n = len(a64), len(b64)
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 rows in each sample, got m = {m} and n = {n}")
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        raise ValueError("a and b must be finite (found NaN or inf)")
    pooled = torch.cat([a64, b64])
    sq = torch.cdist(pooled, pooled).pow(2)
    if bandwidth is None:
        upper = torch.triu_indices(m + n, m + n, offset=1)
        median = float(np.median(sq[upper[0], upper[1]].sqrt().numpy()))
        bandwidth = median if median > 0 else 1.0
    elif not (bandwidth > 0 and math.isfinite(bandwidth)):
        raise ValueError(f"bandwidth must be a finite number > 0 or None (median heuristic), got {bandwidth}")
    k = torch.exp(-sq / (2.0 * bandwidth**2))
    kaa, kbb, kab = k[:m, :m], k[m:, m:], k[:m, m:]
    term_a = (kaa.sum() - kaa.diagonal().sum()) / (m * (m - 1))
    term_b = (kbb.sum() - kbb.diagonal().sum()) / (n * (n - 1))
    return float(term_a + term_b - 2.0 * kab.mean())


def mmd_test(a: torch.Tensor, b: torch.Tensor, *, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """(MMD^2, p-value) of a permutation test that ``a`` and ``b`` come from one distribution:
    the p-value is ``(1 + #{permuted >= observed}) / (1 + permutations)`` over random relabellings of
    the pooled rows (Gretton et al. 2012, sec. 5), the bandwidth fixed from the pooled sample by the
    median heuristic, so every permutation uses the same kernel. A batch of gate vectors whose
    p-value is below the chosen level against the client's own gates is flagged as drift."""
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    a64, b64 = torch.as_tensor(a).detach().cpu().double(), torch.as_tensor(b).detach().cpu().double()
    pooled = torch.cat([a64, b64])
    sq = torch.cdist(pooled, pooled)
    upper = torch.triu_indices(len(pooled), len(pooled), offset=1)
    median = float(np.median(sq[upper[0], upper[1]].numpy()))
    bandwidth = median if median > 0 else 1.0
    observed = mmd2(a64, b64, bandwidth)
    generator = torch.Generator().manual_seed(seed)
    m, exceed = len(a64), 0
    for _ in range(permutations):
        order = torch.randperm(len(pooled), generator=generator)
        exceed += mmd2(pooled[order[:m]], pooled[order[m:]], bandwidth) >= observed
    return observed, (1 + exceed) / (1 + permutations)


# --------------------------------------------------------------------------- baselines


def msp_score(logits: torch.Tensor) -> torch.Tensor:
    """``1 - max_k softmax(logits)_k`` per row, (N,) float32 (Hendrycks & Gimpel, ICLR 2017:
    maximum softmax probability, negated so that higher means more unusual)."""
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be 2-D (N, classes) with classes >= 1, got shape {tuple(logits.shape)}")
    probs = torch.softmax(logits.detach().cpu().double(), dim=1)
    return (1.0 - probs.max(dim=1).values).float()


@dataclass(frozen=True, eq=False)
class FeatureGaussian:
    """Class-conditional Gaussians with one tied covariance on penultimate features
    (Lee, Lee, Lee, Shin, NeurIPS 2018, "A simple unified framework for detecting
    out-of-distribution samples and adversarial attacks"), without input preprocessing
    and on the last layer only."""

    classes: torch.Tensor  # (K,) int64, the labels present at fit time
    means: torch.Tensor  # (K, F) float64 class means
    precision: torch.Tensor  # (F, F) float64 inverse of the (ridged) tied covariance

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-3) -> FeatureGaussian:
        """Class means over the classes present and the tied covariance
        ``1/N sum_i (f_i - mu_{y_i})(f_i - mu_{y_i})^T`` plus ``(ridge * mean diagonal + 1e-6) I``."""
        feats = torch.as_tensor(features).detach().cpu().double()
        labels = torch.as_tensor(labels).detach().cpu()
        if feats.dim() != 2:
            raise ValueError(f"features must be 2-D (N, F), got shape {tuple(feats.shape)}")
        if labels.dim() != 1 or len(labels) != len(feats) or labels.is_floating_point():
            raise ValueError(
                f"labels must be a 1-D integer tensor with one label per feature row ({len(feats)}), "
                f"got dtype {labels.dtype} and shape {tuple(labels.shape)}"
            )
        if len(feats) < 2:
            raise ValueError(f"need at least 2 feature rows to fit, got {len(feats)}")
        if not torch.isfinite(feats).all():
            raise ValueError("features must be finite (found NaN or inf)")
        if not ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        classes, inverse = torch.unique(labels.long(), return_inverse=True)
        means = torch.zeros(len(classes), feats.shape[1], dtype=torch.float64)
        means.index_add_(0, inverse, feats)
        means /= torch.bincount(inverse, minlength=len(classes)).double()[:, None]
        centred = feats - means[inverse]
        cov = centred.T @ centred / len(feats)
        cov += (ridge * cov.diagonal().mean() + 1e-6) * torch.eye(feats.shape[1], dtype=torch.float64)
        return cls(classes=classes, means=means, precision=torch.linalg.inv(cov))

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """``min_k (f - mu_k)^T Sigma^{-1} (f - mu_k)`` over the fitted classes, (N,) float32
        (the squared Mahalanobis distance to the nearest class mean; higher = more unusual)."""
        feats = torch.as_tensor(features).detach().cpu().double()
        if feats.dim() != 2 or feats.shape[1] != self.means.shape[1]:
            raise ValueError(f"features must be (N, {self.means.shape[1]}), got shape {tuple(feats.shape)}")
        diff = feats[:, None, :] - self.means[None, :, :]  # (N, K, F)
        dist = torch.einsum("nkf,fg,nkg->nk", diff, self.precision, diff)
        return dist.min(dim=1).values.float()


# --------------------------------------------------------------------------- metrics


def auroc(normal: torch.Tensor, unusual: torch.Tensor) -> float:
    """Area under the ROC curve for telling ``unusual`` from ``normal`` by score (higher =
    unusual), exactly: the Mann-Whitney statistic ``P(u > n) + P(u = n) / 2`` over all
    pairs, computed from mid-ranks of the pooled scores. 1 = perfect, 0.5 = chance."""
    x = torch.as_tensor(normal).detach().cpu().double().flatten().numpy()
    y = torch.as_tensor(unusual).detach().cpu().double().flatten().numpy()
    if x.size == 0 or y.size == 0:
        raise ValueError(f"auroc needs non-empty normal and unusual scores, got {x.size} and {y.size}")
    pooled = np.concatenate([x, y])
    if np.isnan(pooled).any():
        raise ValueError("scores must not be NaN")
    _, inverse, counts = np.unique(pooled, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    rank_sum = mid_rank[inverse.reshape(-1)][x.size :].sum()
    u = rank_sum - y.size * (y.size + 1) / 2.0
    return float(u / (x.size * y.size))


# --------------------------------------------------------------------------- corruptions


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius ceil(3 sigma), capped below the image size), depthwise
    conv2d with reflect padding; uint8 in, uint8 out."""
    _, c, h, w = images.shape
    radius = min(math.ceil(3 * sigma), h - 1, w - 1)
    if radius < 1:
        return images.clone()
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = images.float()
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x.clamp(0, 255).round().to(torch.uint8)


def corrupt(images: torch.Tensor, kind: str, strength: int, seed: int) -> torch.Tensor:
    """A corrupted copy of uint8 ``images`` (N, C, H, W), same shape and dtype, clamped to [0, 255]
    (in the spirit of Hendrycks & Dietterich, ICLR 2019, CIFAR-10-C), at ``strength`` 1 (mild)
    or 2 (strong):

    * ``gaussian_noise``: add N(0, s^2) noise, s = 0.08 / 0.2 of the range, seeded by ``seed``;
    * ``blur``: Gaussian blur, sigma = 0.6 / 1.2 pixels (depthwise conv2d, reflect padding);
    * ``contrast``: blend toward the per-image mean, keeping 0.5 / 0.25 of the deviation;
    * ``rotation``: rotate by 15 / 45 degrees counter-clockwise about the centre (bilinear,
      zero fill outside the original frame).

    Noise, contrast and rotation are :func:`fedse.data.feature_skew.apply_style` with one field set.
    Deterministic for a given ``seed``.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; allowed: {list(CORRUPTIONS)}")
    if isinstance(strength, bool) or strength not in STRENGTHS:
        raise ValueError(f"corruption strength must be one of {list(STRENGTHS)} (mild, strong), got {strength!r}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"images must be a uint8 tensor (N, C, H, W), got dtype {images.dtype} with shape {tuple(images.shape)}"
        )
    if kind == "blur":
        return _blur(images, _BLUR_SIGMA[strength])
    if kind == "gaussian_noise":
        style = ClientStyle(noise_std=_NOISE_STD[strength], seed=int(seed))
    elif kind == "contrast":
        style = ClientStyle(contrast=_CONTRAST[strength])
    else:
        style = ClientStyle(rotation=_ROTATION[strength])
    return apply_style(images, style)
