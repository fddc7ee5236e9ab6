"""The critic V(obs): an MLP on the raw state (optionally with the pooled prefix), separate from the actor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fmpolicy.batch import PREFIX, PREFIX_MASK, STATE
from fmpolicy.errors import InputError
from fmpolicy.policy import pool_prefix
from fmpolicy.rl.config import ValueConfig


class ValueNet(nn.Module):
    """obs -> V (b,). Input "state": observation.state (b, s); "prefix_pooled": the state and the masked
    mean of the policy's prefix tokens (b, d): what the policy's own encoder makes of the images and the
    instruction, detached (the value loss does not train the encoder; the critic is the small MLP on
    top). Given as `pooled` by the RL loop, or computed from observation.prefix; an error without either.
    Why not an encoder of its own: the pooled prefix costs nothing more (the rollout computes it for the
    actor anyway) and carries exactly what the policy conditions on, the goal named in the instruction
    included, which the state alone lacks (two-goal PointObstacle)."""

    def __init__(self, state_dim: int, config: ValueConfig, prefix_dim: int = 0, device: torch.device | str = "cpu"):
        super().__init__()
        self.config, self.prefix_dim = config, prefix_dim if config.input == "prefix_pooled" else 0
        if config.input == "prefix_pooled" and prefix_dim <= 0:
            raise ValueError("value.input = 'prefix_pooled' needs policy.expert.prefix_dim > 0: the policy has no prefix")
        layers: list[nn.Module] = []
        width_in = state_dim + self.prefix_dim
        for _ in range(config.depth):
            layers += [nn.Linear(width_in, config.width), {"tanh": nn.Tanh, "relu": nn.ReLU}[config.activation]()]
            width_in = config.width
        layers.append(nn.Linear(width_in, 1))
        self.net = nn.Sequential(*layers)
        self.to(device)

    def features(self, obs: Mapping[str, Any], pooled: Tensor | None = None) -> Tensor:
        device = self.net[0].weight.device
        state = obs[STATE].to(device, torch.float32)
        if not self.prefix_dim:
            return state
        if pooled is None:
            prefix = obs.get(PREFIX)
            if prefix is None:
                raise InputError("value.input = 'prefix_pooled': the critic got neither the policy's pooled prefix "
                                 f"nor {PREFIX!r} in the observation (keys {sorted(obs)}); pass `pooled` "
                                 "(FlowActor.critic_features of the policy's cache)")
            pooled = pool_prefix(prefix.to(device, torch.float32), None if obs.get(PREFIX_MASK) is None
                                 else obs[PREFIX_MASK].to(device))
        return torch.cat([state, pooled.to(device, torch.float32)], -1)

    def forward(self, obs: Mapping[str, Any], pooled: Tensor | None = None) -> Tensor:
        """V (b,); `pooled` (b, d_prefix): the policy's pooled prefix tokens, for `input: prefix_pooled`."""
        return self.net(self.features(obs, pooled)).squeeze(-1)
