"""PPO-style objectives: the clipped surrogate, FPO's CFM-difference ratio, the Gaussian log-ratio.

FPO (McAllister et al., "Flow Matching Policy Gradients", 2025) replaces the likelihood ratio by

    ratio = exp(L_old - L_new),   L = CFM loss of the sampled chunk at m Monte Carlo pairs (t_i, noise_i)

drawn at rollout time and reused, unchanged, for the old and the new policy. Lower CFM loss of the
new policy on an action means higher likelihood of it, so the ratio rises above 1 where the policy
moved towards the action.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fmpolicy.rl.config import LOSS_REDUCTIONS
from fmpolicy.run.distributed import DistInfo, global_mean_std


def straight_through_clamp(x: Tensor, lo: float | None, hi: float | None) -> Tensor:
    """Clamp the value but pass the gradient straight through (identity gradient)."""
    return x + (x.clamp(lo, hi) - x).detach()


def hard_clamp(x: Tensor, lo: float | None, hi: float | None) -> Tensor:
    """torch.clamp: outside [lo, hi] the value is the bound and the gradient is zero."""
    return x.clamp(lo, hi)


def reduce_chunk_steps(per_step: Tensor, executed: Tensor | None, reduction: str = "mean") -> Tensor:
    """Per-pair CFM losses (b, m) from per-step ones (b, m, h): the mean (`reduction` "mean") or the
    sum ("sum_steps") over the steps `executed` (b, h) bool marks (all of them when None). Each step's
    loss is already the mean over its action entries, which every step has the same number of, so the
    mean equals the masked mean over the executed entries. A chunk with no executed step (impossible
    in a rollout) gets 0."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"CFM loss reduction {reduction!r} is unknown: expected one of {list(LOSS_REDUCTIONS)}")
    if executed is None:
        return per_step.mean(-1) if reduction == "mean" else per_step.sum(-1)
    masked = torch.where(executed[:, None, :], per_step, torch.zeros((), dtype=per_step.dtype, device=per_step.device))
    if reduction == "sum_steps":
        return masked.sum(-1)
    w = executed.to(per_step.dtype)[:, None, :]  # (b, 1, h)
    return masked.sum(-1) / w.sum(-1).clamp_min(1.0)


def compute_fpo_log_ratio(
    loss_old: Tensor,
    loss_new: Tensor,
    mode: str = "mean",
    clamp_old: float | None = None,
    clamp_log_ratio: float | None = None,
    clamp_pair_log_ratio: float | None = None,
    hard_clamps: bool = False,
    shift: Tensor | None = None,
) -> Tensor:
    """log ratio from per-pair CFM losses (b, m) -> (b,) (mode "mean") or (b, m) (mode "per_pair").

    mode "mean": log_ratio = mean_i(l_old_i - l_new_i), one ratio per action (the default);
    "per_pair": one ratio per (t, noise) pair. `clamp_old` caps the per-pair losses (a rare huge old
    loss would otherwise make one ratio explode); the same cap applies to the new losses, so that an
    unchanged policy still has a ratio of exactly 1, and it is a hard cap there (no gradient above it):
    passed straight through, a pair whose old and new losses are both above the cap would read a ratio
    of exactly 1 whatever its loss did, so the PPO clip would never stop it, and a negative advantage
    would raise its loss without bound (measured: the image + instruction policy's CFM losses grew from
    3 to 3,800 and its success fell to 0; docs/rl.md). `clamp_pair_log_ratio` bounds each pair's
    difference l_old_i - l_new_i (before the mean), `clamp_log_ratio` bounds |log_ratio| before exp.
    These clamps are straight-through (they bound values and keep the gradient) unless `hard_clamps`:
    then they are torch.clamp, with a zero gradient outside the bounds. The FPO paper's GridWorld code
    clamps hard, both at 3 (gridworld/models/fpo.py: `clamp(cfm_difference, -3, 3)`, then the mean).
    `shift` (b,): subtracted from every log ratio before `clamp_log_ratio` (`fpo.normalizer_samples`:
    the same difference at fresh samples of the policy, the change of its normaliser).
    """
    if clamp_old is not None:
        loss_old = loss_old.clamp(max=clamp_old)
        loss_new = hard_clamp(loss_new, None, clamp_old)
    diff = loss_old.detach() - loss_new
    clamp = hard_clamp if hard_clamps else straight_through_clamp
    if clamp_pair_log_ratio is not None:
        diff = clamp(diff, -clamp_pair_log_ratio, clamp_pair_log_ratio)
    if mode == "mean":
        log_ratio = diff.mean(dim=-1)
    elif mode == "per_pair":
        log_ratio = diff
    else:
        raise ValueError(f"FPO ratio mode {mode!r} is unknown: expected 'mean' or 'per_pair'")
    if shift is not None:
        log_ratio = log_ratio - (shift if log_ratio.dim() == 1 else shift[:, None])
    if clamp_log_ratio is not None:
        log_ratio = clamp(log_ratio, -clamp_log_ratio, clamp_log_ratio)
    return log_ratio


def normalize_advantages(advantages: Tensor, info: DistInfo | None = None) -> Tensor:
    """Standardise advantages (b,) (`rl.normalize_advantages`): a minibatch's, or the whole rollout's once
    (`rl.normalize_advantages_over: batch`, as the FPO paper code); one sample is left as it is. Under
    torchrun (`info`) over the rows of every process."""
    if info is None or not info.enabled:
        if advantages.numel() < 2:
            return advantages
        return (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    mean, std, n = global_mean_std(advantages, info)
    return advantages if n < 2 else (advantages - mean) / (std + 1e-8)


def _per_pair(ratio: Tensor, advantages: Tensor) -> Tensor:
    """Advantages (b,) shaped to broadcast against per-pair ratios (b, m), which share their action's."""
    return advantages[..., None] if ratio.dim() == advantages.dim() + 1 else advantages


def _mean_over_pairs(loss: Tensor) -> Tensor:
    return loss.mean(dim=-1) if loss.dim() > 1 else loss


def compute_clipped_surrogate(ratio: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """PPO's clipped policy loss per sample (to minimise): -min(r A, clip(r, 1 - c, 1 + c) A).

    ratio: (b,) or (b, m) (per-pair ratios share their action's advantage); advantages: (b,).
    Outside the clip range on the side the advantage favours, the gradient is exactly zero.
    """
    advantages = _per_pair(ratio, advantages)
    loss = -torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages)
    return _mean_over_pairs(loss)


def compute_spo_surrogate(ratio: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """SPO's penalised policy loss per sample (to minimise): -(r A - |A| / (2c) (r - 1)^2).

    (Xie et al., "Simple Policy Optimization", 2025.) Unlike the clipped surrogate, its gradient does not
    vanish outside the trust region: it pulls r back towards 1 -/+ c, the surrogate's maximum for A < 0 /
    A > 0. Shapes as `compute_clipped_surrogate`.
    """
    advantages = _per_pair(ratio, advantages)
    return _mean_over_pairs(-(ratio * advantages - advantages.abs() / (2.0 * clip) * (ratio - 1.0).pow(2)))


def compute_policy_surrogate(ratio: Tensor, advantages: Tensor, clip: float, kind: str = "clip") -> Tensor:
    """The policy loss per sample (to minimise) that `rl.surrogate` names. (b,)

    "clip": PPO's clipped surrogate for every sample. "aspo": the asymmetric trust region of FPO++
    (Yi et al., "Flow Policy Gradients for Robot Control", 2026): PPO clipping where A >= 0, SPO's
    quadratic penalty where A < 0. With a flow policy nothing in the clipped surrogate stops the update
    from raising the CFM loss of a bad action further once its ratio left the clip range (other samples'
    gradients move it on through the shared weights); SPO's restoring gradient does. At r = 1 both give
    the same loss and gradient.
    """
    if kind == "clip":
        return compute_clipped_surrogate(ratio, advantages, clip)
    if kind != "aspo":
        raise ValueError(f"policy surrogate {kind!r} is unknown: expected 'clip' or 'aspo'")
    clipped = compute_clipped_surrogate(ratio, advantages, clip)
    penalised = compute_spo_surrogate(ratio, advantages, clip)
    return torch.where(advantages >= 0, clipped, penalised)


def compute_value_loss(values: Tensor, returns: Tensor, old_values: Tensor | None = None,
                       clip: float | None = None) -> Tensor:
    """Per-sample squared value error, optionally clipped around the old values (as CleanRL). (b,)"""
    err = (values - returns).pow(2)
    if clip is None or old_values is None:
        return 0.5 * err
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum(err, (clipped - returns).pow(2))


def explained_variance(predicted: Tensor, target: Tensor) -> float:
    """1 - Var(target - predicted) / Var(target): 1 is perfect, 0 no better than a constant."""
    var = target.var()
    return float("nan") if var == 0 else float(1.0 - (target - predicted).var() / var)
