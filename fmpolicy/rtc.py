"""Real-time chunking (RTC) for flow policies: sample the next chunk while the robot still executes the
previous one, so that the two join smoothly (Black, Galliker, Levine, "Real-Time Execution of Action
Chunking Flow Policies", 2025; the inference-time inpainting variant).

When inference takes d control steps, the first d actions of the next chunk are executed from the
*previous* chunk while the new one is computed: they are committed. RTC integrates the flow for the
new chunk with a guidance term that pulls its first positions towards those committed actions (and,
more and more weakly, the rest of the overlap towards the previous chunk's plan), an inpainting of the
chunk's prefix. With our time convention (t = 0 noise, t = 1 action, v = action - noise):

    denoised(x_t)  = x_t + (1 - t) v(x_t, t)                         the current guess of the chunk
    e              = W * (Y - denoised(x_t))                          Y: the previous chunk's leftover
    v_guided       = v + min(beta, (t^2 + (1 - t)^2) / (t (1 - t))) * (d denoised / d x_t)^T e

W (h,) is 1 on the first `inference_delay` positions, decays to 0 over the rest of the first
`execution_horizon` positions ("exp": c (e^c - 1) / (e - 1) of a linear ramp c, the paper's choice;
or "linear"), and is 0 beyond. The guidance weight is the paper's (1 - t) / (t r_t^2) with
r_t^2 = (1 - t)^2 / (t^2 + (1 - t)^2), clipped at `max_guidance_weight` (beta). The vector-Jacobian
product costs one backward pass of the network per integration step.

Following `sampling.py`'s rule, RTC is a wrapper around the velocity callable (`PrefixGuidedVelocity`),
and `sample_chunk_rtc` is the policy-level entry point: it hands a `PrefixGuidance` to
`FlowPolicy.sample_chunk`, which after `compile_solve()` runs the guided fixed-grid solve, network,
vector-Jacobian products and all, as one compiled graph (`fmpolicy.compiled`), and otherwise wraps the
velocity and integrates with `sample_ode`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fmpolicy.config import SamplerConfig
from fmpolicy.errors import InputError
from fmpolicy.sampling import Velocity

SCHEDULES = ("exp", "linear")


def prefix_weights(inference_delay: int, execution_horizon: int, chunk_size: int, schedule: str = "exp") -> Tensor:
    """(h,) guidance weights: 1 on [0, d), decaying over [d, s), 0 on [s, h) (d = inference_delay,
    s = min(execution_horizon, h))."""
    if schedule not in SCHEDULES:
        raise InputError(f"schedule = {schedule!r}: expected one of {SCHEDULES}")
    s = min(execution_horizon, chunk_size)
    d = min(inference_delay, s)
    if d < 0:
        raise InputError(f"inference_delay = {inference_delay}: expected >= 0")
    w = torch.zeros(chunk_size)
    w[:d] = 1.0
    ramp = torch.linspace(1.0, 0.0, s - d + 2)[1:-1]  # strictly between 1 and 0
    if schedule == "exp":
        ramp = ramp * torch.expm1(ramp) / (math.e - 1.0)
    w[d:s] = ramp
    return w


def guidance_weight(t: Tensor, max_weight: float) -> Tensor:
    """min(beta, (t^2 + (1 - t)^2) / (t (1 - t))) per sample (b,); beta at t = 0 and t = 1."""
    t = t.double()
    w = (t**2 + (1 - t) ** 2) / (t * (1 - t))
    return torch.nan_to_num(w, nan=max_weight, posinf=max_weight).clamp(max=max_weight)


class PrefixGuidedVelocity:
    """Wraps a velocity callable v(x_t, t) -> (b, h, A) with RTC's inpainting guidance towards `target`
    (b, h, A) (network units) with weights `weights` (h,) or (b, h, A); see the module docstring.

    `functional`: the vector-Jacobian product through `torch.func.vjp` instead of `torch.autograd.grad`
    (the same values): what `torch.compile` can trace into one graph with the rest of the solve
    (`fmpolicy.compiled.CompiledSolver.solve_guided`); eagerly the autograd route is the faster one."""

    def __init__(self, velocity: Velocity, target: Tensor, weights: Tensor, max_guidance_weight: float = 5.0,
                 functional: bool = False):
        self.velocity, self.target, self.max_weight = velocity, target, float(max_guidance_weight)
        self.weights = weights if weights.dim() == 3 else weights[None, :, None]
        self.functional = functional

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        def denoise(x: Tensor) -> tuple[Tensor, Tensor]:
            v = self.velocity(x, t)
            return x + (1.0 - t)[:, None, None] * v, v

        if self.functional:
            denoised, pullback, v = torch.func.vjp(denoise, x_t, has_aux=True)
            (correction,) = pullback(self.weights * (self.target - denoised))
        else:
            with torch.enable_grad():
                x = x_t.detach().requires_grad_(True)
                denoised, v = denoise(x)
                (correction,) = torch.autograd.grad(denoised, x, self.weights * (self.target - denoised))
        w = guidance_weight(t, self.max_weight).to(v.dtype)[:, None, None]
        return (v + w * correction).detach()


@dataclass(frozen=True)
class PrefixGuidance:
    """RTC's guidance for one solve, as `FlowPolicy.sample_chunk(guidance=...)` takes it: the target
    chunk (b, h, A) and the weights (b, h, A), both in network units (padded, normalized), and beta."""

    target: Tensor
    weights: Tensor
    max_weight: float = 5.0

    def wrap(self, velocity: Velocity, functional: bool = False) -> PrefixGuidedVelocity:
        return PrefixGuidedVelocity(velocity, self.target, self.weights, self.max_weight, functional)


@torch.no_grad()
def sample_chunk_rtc(policy, obs: Mapping[str, Any], leftover: Tensor, inference_delay: int,
                     execution_horizon: int | None = None, max_guidance_weight: float = 5.0,
                     schedule: str = "exp", noise: Tensor | None = None, generator: torch.Generator | None = None,
                     sampler: SamplerConfig | None = None) -> Tensor:
    """The next chunk (b, h, a) in environment units, guided to continue the previous one.

    leftover: (b, n, a) in environment units, n <= h: the previous chunk's actions from the moment this
        inference started on (its first `inference_delay` are executed while this call runs); position
        j of the new chunk is aligned with leftover[:, j].
    inference_delay: d, the control steps this inference takes (the committed prefix).
    execution_horizon: how many leading positions are guided at all (default and at most n).
    """
    cache = policy.encode(obs)
    batch, h = cache.batch_size, policy.config.chunk_size
    leftover = torch.as_tensor(leftover, dtype=policy.dtype, device=policy.device)
    width = policy.embodiments.width(cache.embodiment, "action")
    if leftover.dim() != 3 or leftover.shape[0] != batch or leftover.shape[1] > h or leftover.shape[2] != width:
        raise InputError(f"leftover has shape {tuple(leftover.shape)}: expected ({batch}, n <= {h}, {width}) "
                         "(the previous chunk's unexecuted actions, environment units)")
    n = leftover.shape[1]
    horizon = n if execution_horizon is None else min(int(execution_horizon), n)
    if not 0 <= inference_delay <= horizon:
        raise InputError(f"inference_delay = {inference_delay}: expected 0 <= d <= the guided horizon {horizon}")
    # the target in network units: normalized and padded like the chunks the flow generates
    padded = torch.cat([leftover, leftover[:, -1:].expand(batch, h - n, width)], dim=1) if n < h else leftover
    target = policy.pad_action(padded, cache.embodiment)
    valid = (cache.action_valid if cache.action_valid is not None else policy.action_valid[None]).to(target)  # (b, A)
    weights = prefix_weights(inference_delay, horizon, h, schedule).to(target)[None, :, None] * valid[:, None, :]
    guidance = PrefixGuidance(target, weights, max_guidance_weight)
    result = policy.sample_chunk(obs, noise, generator, sampler, cache=cache, guidance=guidance)
    return policy.embodiments.unnormalize_action(result.x1, cache.embodiment, width)
