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

A dimension that varied, but by less than `relative_min_scale` of its offset's magnitude (the policy sets
0.05 for states, 0 for actions: `normalization.relative_min_scale`),
is divided by `relative_min_scale * |offset|` instead of its spread: a gripper held open at 1.0 that
jittered by 0.0012 in the demonstrations is scaled up 20-fold, not 800-fold, so the changes it sees at
deployment stay moderate inputs (the normaliser trap: docs/benchmarks/metaworld.md). Dimensions that move
over a good part of their own magnitude (positions, joint angles in use) are unaffected; one that
jitters around 0 is not caught by this rule (`min_scale` and the `state_z_max` warnings are there).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fmpolicy.config import NORM_MODES
from fmpolicy.errors import InputError


# |normalized state| beyond this: a state the policy never saw in its data (some entry hundreds of the data's
# standard deviations out). A dimension that barely varied in the demonstrations does this: Meta-World reach's
# gripper opening (spread 0.0012: a camera policy drifted 30-46 cm off per axis, 0 of 50 succeeded; with min_scale 0.05:
# 11 of 50; relative_min_scale's default now catches it), push's object orientation from 3 demonstrations (705: FPO's
# KL per update 80-480). Warned by RL's rollouts and by evaluations (docs/benchmarks/metaworld.md, "A normaliser trap").
STATE_Z_WARN = 100.0


def far_state_warning(z: Tensor, where: str) -> str | None:
    """A warning when some entry of `z` (per state entry: the largest |normalized state| seen) is over
    STATE_Z_WARN, naming the entries, else None. `where` says when they were seen ("at iteration 3")."""
    far = [i for i, v in enumerate(z.tolist()) if v > STATE_Z_WARN]
    if not far:
        return None
    return (f"warning: {where} observation.state entries {far} reached up to {float(z.max()):.0f} standard "
            "deviations of the imitation data (the policy's state normalizer): inputs the network never saw. "
            "A dimension that barely varied in the demonstrations (a gripper held still, an object's "
            "orientation) does this; train with a larger policy.normalization.min_scale or relative_min_scale "
            "(docs/benchmarks/metaworld.md, 'A normaliser trap')")


class Normalizer(nn.Module):
    """Affine per-dimension normalizer over the last axis; `offset`/`scale` are saved buffers."""

    def __init__(self, dim: int, mode: str = "mean_std", min_scale: float = 1e-4, relative_min_scale: float = 0.05):
        super().__init__()
        if mode not in NORM_MODES:
            raise ValueError(f"normalization mode {mode!r} is unknown: expected one of {list(NORM_MODES)}")
        self.dim = dim
        self.mode = mode
        self.min_scale = min_scale
        self.relative_min_scale = relative_min_scale
        self.floored: list[int] = []  # entries the last fit divided by relative_min_scale * |offset| (not saved)
        self.register_buffer("offset", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        # 1 once fitted (a buffer, so that a loaded policy knows its stats came from data)
        self.register_buffer("fitted", torch.tensor(mode == "identity"))

    @torch.no_grad()
    def fit(self, data: Tensor, name: str = "normalizer fit data") -> "Normalizer":
        """Fit from samples `(n, ..., dim)`, n >= 1; all leading axes are pooled. `name` labels `data` in errors."""
        if data.dim() == 0 or data.shape[-1] != self.dim:
            raise InputError(f"{name} has shape {tuple(data.shape)}: expected width {self.dim} on the last axis")
        x = data.reshape(-1, self.dim).to(torch.float64)
        if x.shape[0] == 0:
            raise InputError(f"{name} has no rows (shape {tuple(data.shape)}): expected at least one sample")
        if not torch.isfinite(x).all():
            raise InputError(f"{name} contains NaN or inf")
        q = torch.quantile(x, torch.tensor([0.01, 0.99], dtype=x.dtype), dim=0)
        stats = {"mean": x.mean(0), "std": x.std(0, unbiased=False), "min": x.min(0).values,
                 "max": x.max(0).values, "q01": q[0], "q99": q[1]}
        return self.fit_stats(stats)

    @torch.no_grad()
    def fit_stats(self, stats: dict[str, Tensor]) -> "Normalizer":
        """Set the map from precomputed statistics (a dataset's stats.json: mean/std/min/max/q01/q99)."""
        needed = {"mean_std": ("mean", "std"), "min_max": ("min", "max"), "quantile": ("q01", "q99")}.get(self.mode, ())
        for key in needed:
            if key not in stats:
                raise ValueError(f"normalization mode {self.mode!r} needs the statistic {key!r}: got {sorted(stats)}")
            if torch.as_tensor(stats[key]).shape != (self.dim,):
                raise ValueError(f"statistic {key!r} has shape {tuple(torch.as_tensor(stats[key]).shape)}: expected ({self.dim},)")
        s = {k: torch.as_tensor(stats[k], dtype=torch.float64) for k in needed}
        if self.mode == "identity":
            offset, scale = torch.zeros(self.dim, dtype=torch.float64), torch.ones(self.dim, dtype=torch.float64)
        elif self.mode == "mean_std":
            offset, scale = s["mean"], s["std"]
        elif self.mode == "min_max":
            offset, scale = (s["min"] + s["max"]) / 2, (s["max"] - s["min"]) / 2
        else:  # quantile
            offset, scale = (s["q01"] + s["q99"]) / 2, (s["q99"] - s["q01"]) / 2
        constant = scale < self.min_scale  # judged on the data's own spread: such a dimension is only centred
        floor = self.relative_min_scale * offset.abs()
        self.floored = torch.nonzero((scale < floor) & ~constant).flatten().tolist()
        scale = torch.maximum(scale, floor)
        scale = torch.where(constant, torch.ones_like(scale), scale)
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
        return f"dim={self.dim}, mode={self.mode!r}, min_scale={self.min_scale}, relative_min_scale={self.relative_min_scale}"
