"""Feature skew (FedBN, Li et al., ICLR 2021): each client's images pass through its own fixed
transformation (:class:`ClientStyle`: rotation, contrast, brightness, noise, colour gain),
independent of the index partition, so it combines with any partitioning scheme. Styles are
seeded pure functions of (number of clients, kinds, strength, seed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["STYLE_KINDS", "ClientStyle", "apply_style", "make_client_styles"]

STYLE_KINDS = ("rotation", "contrast", "brightness", "noise", "color")


@dataclass(frozen=True)
class ClientStyle:
    """One client's fixed image transformation (identity: all defaults)."""

    rotation: float = 0.0  # degrees, counter-clockwise
    contrast: float = 1.0  # factor around the image's mean
    brightness: float = 0.0  # additive, in [0, 1] pixel units
    noise_std: float = 0.0  # Gaussian noise std, [0, 1] pixel units, fixed per-client seed
    channel_gain: tuple[float, ...] = ()  # per-channel factor (colour shift); () = none
    seed: int = 0


def _spread(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """n values evenly spaced over [lo, hi], in a seeded random order over clients."""
    return rng.permutation(np.linspace(lo, hi, n)) if n > 1 else np.array([(lo + hi) / 2])


def make_client_styles(num_clients: int, *, kinds: Sequence[str], strength: float, seed: int) -> list[ClientStyle]:
    """Styles spread evenly over clients. At ``strength`` s: rotation in [-45s, 45s] degrees,
    contrast in [1-0.6s, 1+0.6s], brightness in [-0.3s, 0.3s], noise std in [0, 0.3s],
    per-channel gains in [1-0.5s, 1+0.5s]."""
    if unknown := sorted(set(kinds) - set(STYLE_KINDS)):
        raise ValueError(f"unknown feature-skew kind(s) {unknown}; valid kinds: {list(STYLE_KINDS)}")
    if not 0 < strength <= 1:
        raise ValueError(f"feature-skew strength must be in (0, 1], got {strength}")
    rng = np.random.default_rng(seed)
    n = num_clients
    zeros, ones = np.zeros(n), np.ones(n)
    rotation = _spread(rng, n, -45 * strength, 45 * strength) if "rotation" in kinds else zeros
    contrast = _spread(rng, n, 1 - 0.6 * strength, 1 + 0.6 * strength) if "contrast" in kinds else ones
    brightness = _spread(rng, n, -0.3 * strength, 0.3 * strength) if "brightness" in kinds else zeros
    noise = _spread(rng, n, 0.0, 0.3 * strength) if "noise" in kinds else zeros
    gains = rng.uniform(1 - 0.5 * strength, 1 + 0.5 * strength, size=(n, 3)) if "color" in kinds else None
    return [
        ClientStyle(
            rotation=float(rotation[i]),
            contrast=float(contrast[i]),
            brightness=float(brightness[i]),
            noise_std=float(noise[i]),
            channel_gain=tuple(float(g) for g in gains[i]) if gains is not None else (),
            seed=seed * 1_000_003 + i,
        )
        for i in range(n)
    ]


def apply_style(images: torch.Tensor, style: ClientStyle) -> torch.Tensor:
    """Apply ``style`` to uint8 images (N, C, H, W); deterministic; identity returns the input."""
    if style == ClientStyle(seed=style.seed):
        return images
    x = images.float() / 255.0
    if style.rotation:
        theta = math.radians(style.rotation)
        cos, sin = math.cos(theta), math.sin(theta)
        matrix = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype).expand(len(x), 2, 3)
        grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if style.contrast != 1.0:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * style.contrast + mean
    if style.brightness:
        x = x + style.brightness
    if style.channel_gain:
        gain = torch.tensor(
            style.channel_gain[: x.shape[1]] if x.shape[1] > 1 else style.channel_gain[:1], dtype=x.dtype
        )
        x = x * gain.view(1, -1, 1, 1)
    if style.noise_std:
        g = torch.Generator().manual_seed(style.seed)
        x = x + style.noise_std * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
