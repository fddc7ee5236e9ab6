"""A 2-D continuous bandit with two equally good optima, batched in torch.

The action a in [-1, 1]^2 earns the larger of two Gaussian bumps centred at (+0.6, +0.6) and
(-0.6, -0.6) (peak reward 1 each); every episode lasts one step. A policy that can represent two
modes (a flow) can keep mass on both optima; a unimodal Gaussian must pick one (or sit between them,
where the reward is ~0). The observation is a constant zero state.

Same contract as our `TorchVectorEnv` (docs/envs.md): torch tensors on `device`, dict observations
{"observation.state": (e, 1)}, same-step autoreset (every step ends the episode, so `final_obs` and
`final_info` are filled for every environment). It holds no state besides the step counter, so
`state_dict` / `load_state_dict` (used by checkpoints for an exact resume) are trivial.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from torch import Tensor

STATE_KEY = "observation.state"
OPTIMA = ((0.6, 0.6), (-0.6, -0.6))


class TwoOptimaBandit:
    """`num_envs` one-step bandits. Args: num_envs, device, seed (unused: the bandit is deterministic),
    width (std of each reward bump), success_reward (reward above which an episode counts as a success)."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, num_envs: int = 64, device: torch.device | str = "cpu", seed: int | None = None,
                 width: float = 0.3, success_reward: float = 0.5):
        self.num_envs, self.device = int(num_envs), torch.device(device)
        self.width, self.success_reward = float(width), float(success_reward)
        self.optima = torch.tensor(OPTIMA, device=self.device)  # (2, 2)
        self.single_action_space = spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
        self.single_observation_space = spaces.Dict(
            {STATE_KEY: spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)})
        self.steps = 0

    def _obs(self) -> dict[str, Tensor]:
        return {STATE_KEY: torch.zeros(self.num_envs, 1, device=self.device)}

    def reward(self, action: Tensor) -> Tensor:
        """(e, 2) actions (clipped to [-1, 1]) -> (e,) rewards, max over the two bumps."""
        a = action.clamp(-1.0, 1.0)
        d2 = (a[:, None, :] - self.optima[None]).pow(2).sum(-1)  # (e, 2)
        return torch.exp(-d2 / (2 * self.width**2)).amax(-1)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        return self._obs(), {"is_success": torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)}

    def step(self, actions):
        actions = torch.as_tensor(actions, dtype=torch.float32, device=self.device)
        if actions.shape != (self.num_envs, 2):
            raise ValueError(f"actions have shape {tuple(actions.shape)}: expected ({self.num_envs}, 2)")
        self.steps += 1
        reward = self.reward(actions)
        done = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        success = reward > self.success_reward
        final_info = {"is_success": success, "episode_return": reward.clone(),
                      "episode_length": torch.ones(self.num_envs, dtype=torch.long, device=self.device)}
        info = {"is_success": torch.zeros_like(done), "final_obs": self._obs(), "_final_obs": done,
                "final_info": final_info, "_final_info": done.clone()}
        return self._obs(), reward, done, torch.zeros_like(done), info

    def close(self) -> None:
        pass

    def action_stats(self, actions: Tensor) -> dict[str, float]:
        """Diagnostics the trainer logs: fractions of actions (b, 2) near each optimum."""
        near_pos, near_neg = mode_fractions(actions)
        return {"near_optimum_pos": near_pos, "near_optimum_neg": near_neg}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


def mode_fractions(actions: Tensor, radius: float = 0.3) -> tuple[float, float]:
    """Fractions of actions (b, 2) within `radius` of the first and of the second optimum."""
    optima = torch.tensor(OPTIMA, device=actions.device)
    d = (actions[:, None, :].clamp(-1, 1) - optima[None]).norm(dim=-1)  # (b, 2)
    near = d < radius
    return float(near[:, 0].float().mean()), float(near[:, 1].float().mean())
