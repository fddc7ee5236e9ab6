"""Integrate a velocity field from t = 0 (noise) to t = 1 (sample) through `torchdiffeq.odeint`.

The sampler knows nothing about networks: it takes a callable `velocity(x, t) -> v` with `x` of shape
(b, ...) and `t` of shape (b,). New behaviour (counting evaluations, guidance, caching) comes from
wrapping that callable, not from more arguments here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torchdiffeq import odeint

from fmpolicy.config import SAMPLER_METHODS

Velocity = Callable[[Tensor, Tensor], Tensor]
FIXED_GRID = ("euler", "midpoint", "rk4")
ORDER = {"euler": 1, "midpoint": 2, "rk4": 4, "dopri5": 5}


@dataclass
class SampleResult:
    """What `sample_ode` returns."""

    x1: Tensor  # (b, ...) the sample at t = 1
    nfe: int  # number of velocity evaluations
    trajectory: Tensor | None = None  # (k + 1, b, ...) states on the time grid, when asked for
    times: Tensor | None = None  # (k + 1,) the grid of `trajectory`
    embodiment: Tensor | None = None  # (b,) set by a policy: which robot each sample is


class CountingVelocity:
    """Wraps a velocity callable to count evaluations and feed it a per-sample time `(b,)`."""

    def __init__(self, velocity: Velocity):
        self.velocity = velocity
        self.nfe = 0

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:  # odeint's argument order
        self.nfe += 1
        return self.velocity(x, t.expand(x.shape[0]).to(x.dtype))


def sample_ode(
    velocity: Velocity,
    x0: Tensor,
    *,
    method: str = "euler",
    num_steps: int = 10,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    return_trajectory: bool = False,
) -> SampleResult:
    """Solve dx/dt = velocity(x, t) from t = 0 to 1, starting at the noise `x0` (b, ...).

    Fixed-grid methods (`euler`, `midpoint`, `rk4`) take `num_steps` equal steps; `dopri5` adapts its
    steps to `atol` / `rtol` (its trajectory, when asked for, is reported on `num_steps` equal
    intervals). Deterministic for a given `x0`: draw `x0` with a seeded generator (`sample_noise`).
    """
    if method not in SAMPLER_METHODS:
        raise ValueError(f"sampler method {method!r} is unknown: expected one of {list(SAMPLER_METHODS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps = {num_steps} is invalid: expected a positive int")
    func = CountingVelocity(velocity)
    grid = torch.linspace(0.0, 1.0, num_steps + 1, device=x0.device, dtype=x0.dtype)
    if method in FIXED_GRID:
        # Hand odeint our grid explicitly: a step_size of 1/num_steps can round into an extra step.
        times = grid if return_trajectory else grid[[0, -1]]
        options = {"grid_constructor": lambda _f, _y0, _t: grid}
        xs = odeint(func, x0, times, method=method, options=options)
    else:
        times = grid if return_trajectory else grid[[0, -1]]
        xs = odeint(func, x0, times, method=method, atol=atol, rtol=rtol)
    return SampleResult(x1=xs[-1], nfe=func.nfe,
                        trajectory=xs if return_trajectory else None,
                        times=times if return_trajectory else None)


def sample_noise(shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal initial noise x0 (the flow's t = 0 end), reproducible under `generator`."""
    where = generator.device if generator is not None else device
    x0 = torch.randn(shape, generator=generator, device=where, dtype=dtype)
    return x0 if device is None else x0.to(device)
