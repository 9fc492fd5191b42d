"""Tensor transforms of image batches: normalisation and the training augmentation.

Images are kept as uint8 ``(N, C, H, W)`` tensors (:mod:`fedse.data.readers`) and turned
into float inputs only batch by batch, here, by the one training and evaluation
loop (:mod:`fedse.train`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["augment", "normalize"]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def augment(x: torch.Tensor, generator: torch.Generator, *, crop_padding: int = 2, flip: bool) -> torch.Tensor:
    """Random crop after zero padding (a per-sample shift) and optional horizontal flip."""
    n, _, h, w = x.shape
    if crop_padding > 0:
        padded = F.pad(x, (crop_padding,) * 4)
        dy = torch.randint(0, 2 * crop_padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * crop_padding + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
        idx = torch.arange(n, device=x.device).view(n, 1, 1)
        x = padded.permute(0, 2, 3, 1)[idx, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
    return x.contiguous()
