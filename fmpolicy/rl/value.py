"""The critic V(obs): an MLP on the raw state (optionally with the pooled prefix), separate from the actor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fmpolicy.batch import PREFIX, PREFIX_MASK, STATE
from fmpolicy.rl.config import ValueConfig


class ValueNet(nn.Module):
    """obs -> V (b,). Input "state": observation.state (b, s); "prefix_pooled": the state and the masked
    mean of observation.prefix (b, p, d) (zeros when the observation has no prefix)."""

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

    def features(self, obs: Mapping[str, Any]) -> Tensor:
        device = self.net[0].weight.device
        state = obs[STATE].to(device, torch.float32)
        if not self.prefix_dim:
            return state
        prefix = obs.get(PREFIX)
        if prefix is None:
            return torch.cat([state, state.new_zeros(state.shape[0], self.prefix_dim)], -1)
        prefix = prefix.to(device, torch.float32)
        mask = obs.get(PREFIX_MASK)
        w = (torch.ones(prefix.shape[:2], device=device) if mask is None else mask.to(device, torch.float32))[..., None]
        pooled = (prefix * w).sum(1) / w.sum(1).clamp_min(1.0)  # (b, d)
        return torch.cat([state, pooled], -1)

    def forward(self, obs: Mapping[str, Any]) -> Tensor:
        return self.net(self.features(obs)).squeeze(-1)
