"""Building blocks shared by the velocity networks: time features, RMSNorm, adaptive modulation."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_time_features(t: Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> Tensor:
    """Sine-cosine features of t in [0, 1] (pi0's periods). (b,) -> (b, dim)

    Periods are spaced geometrically from `min_period` to `max_period`, so that both the coarse
    position in [0, 1] and fine differences between integration steps are visible to the network.
    """
    half = dim // 2
    fraction = torch.linspace(0.0, 1.0, half, device=t.device, dtype=torch.float32)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.float()[:, None] * (2.0 * math.pi / period)[None, :]  # (b, half)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1).to(t.dtype if t.is_floating_point() else torch.float32)


class TimeEmbedding(nn.Module):
    """t (b,) -> (b, width): sinusoidal features (`raw=False`) or t itself, one input (`raw=True`: the
    embedding is then a smooth function of t), through a two-layer SiLU MLP."""

    def __init__(self, feature_dim: int, width: int, min_period: float = 4e-3, max_period: float = 4.0,
                 raw: bool = False):
        super().__init__()
        self.raw = raw
        self.feature_dim = 1 if raw else feature_dim
        self.periods = (min_period, max_period)
        self.mlp = nn.Sequential(nn.Linear(self.feature_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        dtype = self.mlp[0].weight.dtype
        feats = t.to(dtype)[:, None] if self.raw else sinusoidal_time_features(t, self.feature_dim, *self.periods).to(dtype)
        return self.mlp(feats)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, with an optional learned gain."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        x = x.to(dtype)
        return x * self.weight if self.weight is not None else x


class AdaptiveModulation(nn.Module):
    """Per-block (shift, scale, gate) triples from the time embedding, zero-initialised (adaLN-Zero).

    At initialisation every gate is 0, so each residual block starts as the identity: time enters
    every layer (pi0.5's adaRMSNorm) without disturbing the start of training.
    """

    def __init__(self, width: int, n_triples: int):
        super().__init__()
        self.n_triples = n_triples
        self.proj = nn.Linear(width, 3 * n_triples * width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, temb: Tensor) -> tuple[Tensor, ...]:
        """(b, d) -> 3 * n_triples tensors of shape (b, 1, d), ordered (shift, scale, gate) per triple."""
        return self.proj(nn.functional.silu(temb))[:, None, :].chunk(3 * self.n_triples, dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive norm output: `x * (1 + scale) + shift` (x already RMS-normalised)."""
    return x * (1.0 + scale) + shift


class FeedForward(nn.Module):
    """Gated (SwiGLU) feed-forward layer, as in Gemma / LLaMA-style experts."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden)
        self.down = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.dropout(nn.functional.silu(gate) * up))
