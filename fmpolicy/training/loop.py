"""A compact imitation training loop: AdamW, linear warm-up + cosine decay, gradient clipping.

Enough for the toy demo and the learning tests; the full trainer (EMA, checkpoints, resume, logging,
DDP) wraps the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear from 0 to 1 over `warmup` steps, cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_steps(
    policy: nn.Module,
    next_batch: Callable[[int], Mapping[str, Any]],
    steps: int,
    *,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup: int = 50,
    grad_clip: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Train `policy.compute_loss` for `steps` steps on `next_batch(step)`; returns the loss curve."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup))
    policy.train()
    losses = []
    for step in range(steps):
        loss, _ = policy.compute_loss(next_batch(step), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    policy.eval()
    return losses
