"""Generalized advantage estimation over a rollout of n steps in e environments.

Conventions (as gymnasium's same-step autoreset gives them): at step i the agent saw `obs_i`, acted,
got `rewards[i]`, and the episode `terminated[i]` (a true end: no future value) or was `truncated[i]`
(cut by a time limit: the future value of the state it reached, `final_values[i]`, is bootstrapped).
After either, step i + 1 starts a new episode, so nothing flows back across the boundary.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    next_value: Tensor,
    final_values: Tensor | None = None,
    gamma: float = 0.99,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Advantages and returns, both (n, e).

    rewards, values, terminated, truncated: (n, e); next_value (e,): V of the observation after the
    last step; final_values (n, e): V of the state a truncated step reached (only read where
    `truncated`). `gamma` is the per-step (for chunked control: per macro-step) discount.
    """
    n = rewards.shape[0]
    terminated, truncated = terminated.to(rewards.dtype), truncated.to(rewards.dtype)
    if final_values is None:
        final_values = torch.zeros_like(values)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for i in reversed(range(n)):
        following = next_value if i == n - 1 else values[i + 1]
        ended = torch.clamp(terminated[i] + truncated[i], max=1.0)
        # the value after step i: 0 at a terminal state, V(final obs) at a time limit, else V(obs_{i+1})
        bootstrap = (1.0 - ended) * following + truncated[i] * (1.0 - terminated[i]) * final_values[i]
        delta = rewards[i] + gamma * bootstrap - values[i]
        last = delta + gamma * lam * (1.0 - ended) * last
        advantages[i] = last
    return advantages, advantages + values
