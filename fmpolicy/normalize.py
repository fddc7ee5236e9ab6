"""Per-dimension normalization of state and action, fitted from data and saved with the policy.

Every mode is an affine map `y = (x - offset) / scale`:

| mode       | offset              | scale              | normalized range           |
| ---------- | ------------------- | ------------------ | -------------------------- |
| identity   | 0                   | 1                  | unchanged                  |
| mean_std   | mean                | std                | ~ zero mean, unit variance |
| min_max    | (min + max) / 2     | (max - min) / 2    | [-1, 1]                    |
| quantile   | (q01 + q99) / 2     | (q99 - q01) / 2    | [-1, 1] for the central 98% |

A dimension whose spread is below `min_scale` (a constant gripper, a joint that never moved) gets
scale 1: it is centred but never divided by ~0, so an unseen value cannot explode (quantile
normalization with q01 == q99 is a known way to get 1e6-sized inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fmpolicy.config import NORM_MODES


class Normalizer(nn.Module):
    """Affine per-dimension normalizer over the last axis; `offset`/`scale` are saved buffers."""

    def __init__(self, dim: int, mode: str = "mean_std", min_scale: float = 1e-4):
        super().__init__()
        if mode not in NORM_MODES:
            raise ValueError(f"normalization mode {mode!r} is unknown: expected one of {list(NORM_MODES)}")
        self.dim = dim
        self.mode = mode
        self.min_scale = min_scale
        self.register_buffer("offset", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        # 1 once fitted (a buffer, so that a loaded policy knows its stats came from data)
        self.register_buffer("fitted", torch.tensor(mode == "identity"))

    @torch.no_grad()
    def fit(self, data: Tensor) -> "Normalizer":
        """Fit from samples `(n, ..., dim)`; all leading axes are pooled."""
        if data.shape[-1] != self.dim:
            raise ValueError(f"normalizer fit data has width {data.shape[-1]}: expected {self.dim}")
        x = data.reshape(-1, self.dim).to(torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("normalizer fit data contains NaN or inf")
        if self.mode == "identity":
            offset, scale = torch.zeros(self.dim), torch.ones(self.dim)
        elif self.mode == "mean_std":
            offset, scale = x.mean(0), x.std(0, unbiased=False)
        elif self.mode == "min_max":
            lo, hi = x.min(0).values, x.max(0).values
            offset, scale = (lo + hi) / 2, (hi - lo) / 2
        else:  # quantile
            q = torch.quantile(x, torch.tensor([0.01, 0.99], dtype=x.dtype), dim=0)
            offset, scale = (q[0] + q[1]) / 2, (q[1] - q[0]) / 2
        scale = torch.where(scale < self.min_scale, torch.ones_like(scale), scale)
        self.offset.copy_(offset.to(self.offset))
        self.scale.copy_(scale.to(self.scale))
        self.fitted.fill_(True)
        return self

    def normalize(self, x: Tensor) -> Tensor:
        """Environment units -> network units. (..., dim)"""
        return (x - self.offset) / self.scale

    def unnormalize(self, y: Tensor) -> Tensor:
        """Network units -> environment units. (..., dim)"""
        return y * self.scale + self.offset

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode!r}"
