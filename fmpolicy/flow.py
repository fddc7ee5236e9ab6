"""The flow-matching math, written once.

Convention (DESIGN.md): t in [0, 1], **t = 0 is noise, t = 1 is the action**.

    x_t = t * action + (1 - t) * noise,   noise ~ N(0, I),   u = d x_t / dt = action - noise

The CFM loss is the squared error between the network's velocity and u, averaged per sample over the
*valid* entries only (the robot's own action dimensions, and chunk steps before the episode end).
"""

from __future__ import annotations

import torch
from torch import Tensor


def expand_time(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-sample time `(b,)` against `x` of shape `(b, ...)`."""
    return t.reshape(t.shape + (1,) * (x.dim() - t.dim()))


def interpolate(action: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Point of the linear path: `x_t = t * action + (1 - t) * noise`.

    action, noise: (b, h, a); t: (b,) -> (b, h, a)
    """
    t = expand_time(t, action)
    return t * action + (1.0 - t) * noise


def target_velocity(action: Tensor, noise: Tensor) -> Tensor:
    """Conditional velocity of the linear path, constant in t: `u = action - noise`. (b, h, a)"""
    return action - noise


def sample_time(
    batch_size: int,
    mode: str = "beta",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    beta_alpha: float = 1.5,
    beta_beta: float = 1.0,
    t_min: float = 0.001,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> Tensor:
    """Draw training times t of shape `(b,)` in [0, 1].

    - `uniform`: U(0, 1).
    - `beta`: pi0's schedule. s ~ Beta(alpha, beta) puts its mass near s = 1; pi0 runs time the other
      way, so in our convention t = 1 - s * (1 - t_min) puts the mass near t = 0 (the noisy end) and
      keeps t <= 1 - t_min.
    - `logit_normal`: t = sigmoid(n), n ~ N(mean, std) (SD3's schedule; mass in the middle).
    """
    # draw where the generator lives (a CPU generator can seed a CUDA run), then move
    where = generator.device if generator is not None else device
    if mode == "uniform":
        t = torch.rand(batch_size, generator=generator, device=where)
    elif mode == "beta":
        t = 1.0 - _sample_beta(batch_size, beta_alpha, beta_beta, generator, where) * (1.0 - t_min)
    elif mode == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, generator=generator, device=where))
    else:
        raise ValueError(f"time sampling mode {mode!r} is unknown: expected 'uniform', 'beta' or 'logit_normal'")
    return t if device is None else t.to(device)


def _sample_beta(n: int, alpha: float, beta: float, generator, device) -> Tensor:
    # torch.distributions.Beta takes no generator; Beta(a, b) = X / (X + Y), X ~ Gamma(a), Y ~ Gamma(b).
    # torch._standard_gamma takes no generator either, so draw through uniforms:
    # Gamma(k) for k >= 1 by Marsaglia-Tsang, and Gamma(k) = Gamma(k + 1) * U^(1/k) for k < 1.
    x = _sample_gamma(n, alpha, generator, device)
    y = _sample_gamma(n, beta, generator, device)
    return x / (x + y)


def _sample_gamma(n: int, k: float, generator, device) -> Tensor:
    boost = k < 1.0
    shape = k + 1.0 if boost else k
    d = shape - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    out = torch.empty(n, device=device)
    todo = torch.ones(n, dtype=torch.bool, device=device)
    while bool(todo.any()):  # accepts ~96% of proposals per round: two or three rounds in practice
        z = torch.randn(n, generator=generator, device=device)
        u = torch.rand(n, generator=generator, device=device)
        v = (1.0 + c * z) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-30)) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        take = ok & todo
        out = torch.where(take, d * v, out)
        todo = todo & ~take
    if boost:
        u = torch.rand(n, generator=generator, device=device)
        out = out * u.pow(1.0 / k)
    return out


def make_valid_mask(action_is_pad: Tensor | None, batch_size: int, chunk_size: int, action_dim: int | Tensor,
                    max_action_dim: int, device: torch.device | str | None = None) -> Tensor:
    """Which entries of a padded action chunk count in the loss. -> (b, h, A) bool

    Entries beyond the robot's own `action_dim` (an int, or (b,) per sample when robots of several
    widths share a batch) and chunk steps flagged in `action_is_pad` (b, h) are False.
    """
    if action_is_pad is not None:
        device = action_is_pad.device
    elif isinstance(action_dim, Tensor):
        device = action_dim.device
    dims = torch.arange(max_action_dim, device=device)
    if isinstance(action_dim, Tensor):
        dims = dims[None, None, :] < action_dim.reshape(-1, 1, 1)  # (b, 1, A)
    else:
        dims = dims < action_dim  # (A,)
    mask = dims.expand(batch_size, chunk_size, max_action_dim)
    if action_is_pad is not None:
        mask = mask & ~action_is_pad.bool()[..., None]
    return mask


def squared_error(diff: Tensor, huber_delta: float | None = None) -> Tensor:
    """diff^2 entrywise, or with `huber_delta` d the Huber error that equals it for |diff| <= d and grows
    linearly beyond (2 d |diff| - d^2: value and slope continuous; FPO++'s CFM loss, which keeps
    torch.nn.functional.huber_loss's 0.5 out so that it matches the squared error below d)."""
    if huber_delta is None:
        return diff.pow(2)
    a = diff.abs()
    return torch.where(a <= huber_delta, diff.pow(2), 2.0 * huber_delta * a - huber_delta**2)


def compute_masked_mse(v_pred: Tensor, target: Tensor, valid: Tensor | None = None,
                       huber_delta: float | None = None) -> Tensor:
    """Per-sample mean squared error over valid entries. (b, ...) x2, mask (b, ...) -> (b,)
    (`huber_delta`: the mean Huber error, `squared_error`).

    A sample with no valid entry gets 0 (and no gradient), never NaN. Masked entries may hold anything,
    NaN and inf included: the loss stays finite and their gradient is exactly 0.
    """
    if valid is None:
        return squared_error(v_pred - target, huber_delta).flatten(1).mean(1)
    # select with `where` before squaring, not multiply by the mask after: 0 * NaN is NaN, and a NaN
    # squared before the mask would send 0 * NaN back to v_pred's gradient. `where` passes a masked
    # entry exactly 0 forward and exactly 0 back.
    valid = valid.bool()
    diff = torch.where(valid, v_pred - target, torch.zeros((), dtype=v_pred.dtype, device=v_pred.device))
    total = squared_error(diff, huber_delta).flatten(1).sum(1)
    count = valid.flatten(1).sum(1).to(total.dtype)
    return total / count.clamp_min(1.0)


def compute_cfm_loss(v_pred: Tensor, action: Tensor, noise: Tensor, valid: Tensor | None = None,
                     huber_delta: float | None = None) -> Tensor:
    """CFM loss per sample: masked mean of `|v_pred - (action - noise)|^2` (or its Huber error,
    `huber_delta`). -> (b,)

    v_pred, action, noise: (b, h, a); valid: (b, h, a) bool or None.
    `v_pred` is the network's velocity at `interpolate(action, noise, t)`; the caller ran the network.
    For FPO's per-(sample, t, noise) values, fold the m pairs into the batch axis: (b*m, h, a) -> (b*m,).
    """
    return compute_masked_mse(v_pred, target_velocity(action, noise), valid, huber_delta)
