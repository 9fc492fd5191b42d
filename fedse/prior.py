"""A client's label prior as a logit offset.

Under label skew a client's data differ from the federation's mostly in p(y).
Two ways to use the client's own label distribution ``p_k(y)`` (counted on its
training part, with a pseudo-count of ``personalization.prior_smoothing`` per class, 16 by default,
so an unseen class keeps a finite offset and a small client's prior is shrunk toward uniform:
``(n_c + 16) / (n + 160)`` trusts a client of 160 images half, one of 3,000 ninety-five percent;
add-one smoothing cost the quickstart's clients of 100-240 images 1.4 points, docs/results.md):

``train``
    Logit adjustment (Menon et al., ICLR 2021; in FL: FedLC, Zhang et al.,
    ICML 2022): train on ``logits + log p_k(y)`` and predict with the same
    offset, so the shared weights model what clients have in common instead of
    being pulled towards each client's own label distribution.
``predict``
    Train as usual; predict with ``logits + t * log p_k(y)``, the weight ``t``
    in [0, 2] fitted on the client's training part by maximum likelihood
    (Saerens et al., Neural Computation 2002: re-weighting by the class prior is
    the Bayes correction for a change of label prior; the fitted weight matches
    it to the model's logit scale, which averaging across clients shrinks).
    Near IID the offset is nearly constant across classes, ``t`` does not
    matter, and nothing changes.

The offset and ``t`` are computed on the client from its own data each time
they are needed: never stored in a model, never sent. Policies choose a mode
and :func:`fedse.policies.resolve` applies ``personalization.label_prior`` over
it. Both are off under sample-level DP: the offset depends on every training label of the
client, so one example would change the loss or the prediction for all the
others, outside what DP-SGD's per-example clipping bounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["WEIGHTS", "fit_prior_weight", "label_log_prior"]

WEIGHTS = tuple(i / 10 for i in range(21))  # candidate weights t for mode 'predict': 0, 0.1, ..., 2


def label_log_prior(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """``log((n_c + smoothing) / (n + smoothing * C))`` for each class c (``smoothing``: the
    pseudo-count of every class, ``personalization.prior_smoothing``)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    labels = labels.reshape(-1).long()
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    counts = torch.bincount(labels, minlength=num_classes).double() + smoothing
    return (counts / counts.sum()).log().float()


@torch.no_grad()
def fit_prior_weight(
    logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor, weights: tuple[float, ...] = WEIGHTS
) -> float:
    """The weight ``t`` (from ``weights``) maximising the likelihood of ``labels`` under
    ``softmax(logits + t * log_prior)``; the smallest such ``t`` on ties."""
    if len(labels) == 0:
        return 0.0
    logits, labels, log_prior = logits.float().cpu(), labels.long().cpu(), log_prior.float().cpu()
    losses = [F.cross_entropy(logits + t * log_prior, labels).item() for t in weights]
    return weights[min(range(len(weights)), key=lambda i: (losses[i], weights[i]))]
