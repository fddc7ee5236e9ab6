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
    grid = fixed_grid(num_steps, x0)
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


NFE_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}  # velocity evaluations per fixed-grid step


def fixed_grid(num_steps: int, like: Tensor) -> Tensor:
    """The time grid k / num_steps, k = 0 .. num_steps (num_steps + 1,), as `sample_ode` builds it."""
    return torch.linspace(0.0, 1.0, num_steps + 1, device=like.device, dtype=like.dtype)


def stage_times(method: str, grid: Tensor) -> Tensor:
    """(num_steps * NFE_PER_STEP[method],): the times at which `solve_fixed_grid` evaluates the velocity
    on `grid`, in the order of its calls (it reads them from here), torchdiffeq's stage times."""
    if method not in NFE_PER_STEP:
        raise ValueError(f"sampler method {method!r} has no fixed grid: expected one of {list(NFE_PER_STEP)}")
    times = []
    for k in range(grid.shape[0] - 1):
        t0, t1 = grid[k], grid[k + 1]
        dt = t1 - t0
        if method == "euler":
            times.append(t0)
        elif method == "midpoint":
            times += [t0, t0 + 0.5 * dt]
        else:
            times += [t0, t0 + dt * (1 / 3), t0 + dt * (2 / 3), t1]
    return torch.stack(times)


def solve_fixed_grid(velocity: Velocity, x0: Tensor, method: str, num_steps: int,
                     grid: Tensor | None = None) -> Tensor:
    """The fixed-grid solve of `sample_ode` in plain tensor operations: -> x1 (b, ...).

    The same steps as torchdiffeq's `euler`, `midpoint` and `rk4` (its rk4 is the 3/8 rule) on the grid
    k / num_steps, without odeint's bookkeeping, which reads tensors back on the host at every step: a
    loop of device operations only, which a CUDA graph can capture (`fmpolicy.cuda_graphs`). Agrees with
    `sample_ode` to float rounding. `grid`: `fixed_grid(num_steps, x0)`, made by the caller where the
    solve is compiled (a compiled linspace may round its points otherwise, and a time feature of
    period 0.004 turns one rounding step of t into a visible change of the velocity).
    """
    if method not in NFE_PER_STEP:
        raise ValueError(f"sampler method {method!r} has no fixed grid: expected one of {list(NFE_PER_STEP)}")
    if num_steps < 1:
        raise ValueError(f"num_steps = {num_steps} is invalid: expected a positive int")
    grid = fixed_grid(num_steps, x0) if grid is None else grid
    b = x0.shape[0]

    def f(t: Tensor, x: Tensor) -> Tensor:
        return velocity(x, t.expand(b))

    times = stage_times(method, grid).view(num_steps, NFE_PER_STEP[method])  # each step's stage times
    x = x0
    for k in range(num_steps):
        dt = grid[k + 1] - grid[k]
        ts = times[k]
        if method == "euler":
            dx = dt * f(ts[0], x)
        elif method == "midpoint":
            dx = dt * f(ts[1], x + f(ts[0], x) * (0.5 * dt))
        else:  # torchdiffeq's rk4_alt_step_func, the same operations in the same order
            k1 = f(ts[0], x)
            k2 = f(ts[1], x + dt * k1 * (1 / 3))
            k3 = f(ts[2], x + dt * (k2 - k1 * (1 / 3)))
            k4 = f(ts[3], x + dt * (k1 - k2 + k3))
            dx = (k1 + 3 * (k2 + k3) + k4) * dt * 0.125
        x = x + dx
    return x


def sample_noise(shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal initial noise x0 (the flow's t = 0 end), reproducible under `generator`."""
    where = generator.device if generator is not None else device
    x0 = torch.randn(shape, generator=generator, device=where, dtype=dtype)
    return x0 if device is None else x0.to(device)


def integrate_divergence(velocity: Velocity, x0: Tensor, num_steps: int, *, valid: Tensor | None = None,
                         probe: Tensor | None = None, exact_max_dim: int = 16,
                         euler_log_det: bool = False) -> tuple[Tensor, Tensor]:
    """Euler-integrate dx/dt = velocity(x, t) from the noise `x0` (b, ...) to t = 1, differentiably,
    with the divergence integral along each path: -> (x1 (b, ...), div_integral (b,)).

    The instantaneous change of variables gives log p1(x1) = log p0(x0) - div_integral, so the entropy
    of the samples is H(p0) + E[div_integral]: differentiable in the velocity's parameters (through
    the path too), which is what an entropy bonus for a flow policy needs. The divergence is exact
    (one vector-Jacobian product per entry) when the number of entries counted is at most
    `exact_max_dim`; above that it is Hutchinson's unbiased estimate z^T J z with `probe` z (b, ...),
    which the caller draws (Rademacher +-1) and must pass. `valid` (same shape as x0, bool) marks the
    entries to count (padding entries, where the velocity is 0 anyway, are left out of the exact loop).
    Euler on the grid t_k = k / num_steps, as `sample_ode(method="euler")` samples.

    `euler_log_det` (exact mode only): sum log|det(I + dt J_k)| over the steps instead of
    sum dt tr(J_k): the exact log-volume change of the Euler map itself, so the density of the samples
    the Euler sampler really draws, at any step count. The first-order sum misses what matters when
    the flow is sharp: a last step that nearly collapses a direction (dt J ~ -I) has log det -> -inf,
    while dt tr(J) stays ~ -1 per entry.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps = {num_steps} is invalid: expected a positive int")
    b = x0.shape[0]
    flat_valid = None if valid is None else valid.expand_as(x0).reshape(b, -1)
    entries = torch.arange(x0[0].numel(), device=x0.device)
    if flat_valid is not None:
        entries = entries[flat_valid.any(0)]  # counted in at least one sample
    exact = entries.numel() <= exact_max_dim
    if not exact and probe is None:
        raise ValueError(f"{entries.numel()} entries > exact_max_dim = {exact_max_dim}: pass a probe (b, ...) "
                         "of Rademacher +-1 for Hutchinson's estimate")
    dt = 1.0 / num_steps
    x = x0 if x0.requires_grad else x0.detach().requires_grad_(True)
    total = x0.new_zeros(b)
    with torch.enable_grad():
        for k in range(num_steps):
            t = torch.full((b,), k * dt, device=x0.device, dtype=x0.dtype)
            v = velocity(x, t)
            if exact:
                flat_v = v.reshape(b, -1)
                rows = [torch.autograd.grad(flat_v[:, i].sum(), x, create_graph=True)[0].reshape(b, -1)[:, entries]
                        for i in entries.tolist()]
                jac = torch.stack(rows, dim=1)  # (b, n, n): d v_i / d x_j over the counted entries
                if flat_valid is not None:  # an entry a sample does not own: identity row and column
                    own = flat_valid[:, entries].to(x0.dtype)
                    jac = jac * own[:, :, None] * own[:, None, :]
                if euler_log_det:
                    eye = torch.eye(len(rows), device=x0.device, dtype=x0.dtype)
                    total = total + torch.linalg.slogdet(eye + dt * jac).logabsdet
                else:
                    total = total + dt * jac.diagonal(dim1=1, dim2=2).sum(-1)
            else:
                z = probe if flat_valid is None else probe * flat_valid.reshape(probe.shape)
                vjp = torch.autograd.grad(v, x, z, create_graph=True)[0]
                total = total + dt * (vjp * z).reshape(b, -1).sum(-1)
            x = x + dt * v
    return x, total
