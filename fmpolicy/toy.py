"""A multimodal toy: whole action chunks drawn from K separated modes, conditioned on a state.

Used by the demo and by the learning tests. Mode k is a straight reach of length `reach` in direction
`2 pi k / K` (plus a small shift by the state), so modes differ by whole chunks: a model that averages
them predicts a chunk near the origin that belongs to no mode, while a flow policy samples each mode
with its weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ToyChunks:
    """Generator of (state, chunk) pairs with `len(weights)` modes."""

    chunk_size: int = 8  # h
    action_dim: int = 2  # a (>= 2; extra dims are a copy of the first scaled by 0.5)
    state_dim: int = 2  # s
    weights: tuple[float, ...] = (0.5, 0.3, 0.2)  # mode probabilities
    reach: float = 1.5  # length of each mode's chunk
    state_gain: float = 0.2  # how much the state shifts the chunk
    noise_std: float = 0.03  # per-entry noise around the mode

    def modes(self, state: Tensor) -> Tensor:
        """The K mode chunks for each state. (b, s) -> (b, K, h, a)"""
        k = len(self.weights)
        angle = torch.arange(k, dtype=torch.float32) * (2 * math.pi / k)
        direction = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)  # (K, 2)
        progress = torch.arange(1, self.chunk_size + 1, dtype=torch.float32) / self.chunk_size  # (h,)
        xy = self.reach * progress[None, :, None] * direction[:, None, :]  # (K, h, 2)
        xy = xy[None] + self.state_gain * state[:, None, None, :2].to(xy)  # (b, K, h, 2)
        extra = [0.5 * xy[..., :1]] * (self.action_dim - 2)
        return torch.cat([xy, *extra], dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A batch with `observation.state` (n, s), `action` (n, h, a) and the true `mode` (n,)."""
        state = torch.rand(n, self.state_dim, generator=generator) * 2 - 1
        mode = torch.multinomial(torch.tensor(self.weights), n, replacement=True, generator=generator)
        chunk = self.modes(state)[torch.arange(n), mode]
        chunk = chunk + self.noise_std * torch.randn(chunk.shape, generator=generator)
        return {"observation.state": state, "action": chunk, "mode": mode}

    def nearest_mode(self, state: Tensor, chunk: Tensor) -> tuple[Tensor, Tensor]:
        """Index of the closest mode and the RMS distance to it. (b, s), (b, h, a) -> (b,), (b,)"""
        dist = (self.modes(state) - chunk[:, None]).pow(2).mean(dim=(-1, -2)).sqrt()  # (b, K)
        d, idx = dist.min(dim=1)
        return idx, d
