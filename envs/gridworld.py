"""The FPO paper's two-goal GridWorld, batched in torch.

A `size` x `size` grid (25 by default). The two bottom rows (y = 0, 1) and the two top rows
(y = size - 2, size - 1) are goals: entering one pays `goal_reward` and ends the episode. Episodes
start in a uniformly drawn non-goal cell and are truncated after `max_steps` steps. The action
a in [-1, 1]^2 is a move: each coordinate is clipped and rounded to -1, 0 or +1 (so any a_y > 0.5
moves up), and the position is clamped to the grid. The observation is the position scaled to
[-1, 1]^2: (pos - c) / (size // 2) with c = size // 2.

On the middle row (y = c, observation y = 0) both goal rows are equally far: going up and going down
are equally good, so a policy that is smooth in the state must, there, either be bimodal in a_y or
sit between (and stay on the row). `action_stats` logs how the executed moves at that row split:
`center_up`, `center_down` (fractions of moves with a_y rounding to +1 and to -1).

This is the "two walls" layout of the FPO paper's GridWorld (McAllister et al. 2025): the layout,
the rounding and the 100-step limit follow the paper's public GridWorld code; the code is ours.
Same contract as our `TorchVectorEnv` (docs/envs.md): torch tensors on `device`, dict observations
{"observation.state": (e, 2)}, same-step autoreset with `final_obs` / `final_info`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from .batched_single import BatchedAsSingleEnv, BatchedEnv
from .gym_env import STATE_KEY as STATE


class TwoGoalGridWorld(BatchedEnv):
    """`num_envs` GridWorlds. Args: num_envs, device, seed (of the start cells' generator), size (odd,
    >= 7), max_steps (time limit per episode), goal_reward (paid on entering a goal row)."""


    def __init__(self, num_envs: int = 64, device: torch.device | str = "cpu", seed: int | None = None,
                 size: int = 25, max_steps: int = 100, goal_reward: float = 1.0):
        if not (isinstance(size, int) and size >= 7 and size % 2 == 1):
            raise ValueError(f"TwoGoalGridWorld: size = {size!r}: expected an odd int >= 7 (a middle row)")
        if not (isinstance(max_steps, int) and max_steps >= 1):
            raise ValueError(f"TwoGoalGridWorld: max_steps = {max_steps!r}: expected an int >= 1")
        if not goal_reward > 0:
            raise ValueError(f"TwoGoalGridWorld: goal_reward = {goal_reward!r}: expected a positive float")
        self.num_envs, self.device = int(num_envs), torch.device(device)
        self.size, self.max_steps, self.goal_reward = size, max_steps, float(goal_reward)
        self.center = size // 2
        self.single_action_space = spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
        self.single_observation_space = spaces.Dict({STATE: spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)})
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0 if seed is None else int(seed))
        self.pos = torch.zeros(self.num_envs, 2, dtype=torch.long, device=self.device)  # (x, y)
        self.elapsed = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self.episode_return = torch.zeros(self.num_envs, device=self.device)
        self._restart(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))

    def is_goal(self, y: Tensor) -> Tensor:
        return (y <= 1) | (y >= self.size - 2)

    def _restart(self, which: Tensor) -> None:
        """New episodes in the envs `which` (e,) bool: a uniform non-goal start cell."""
        n = int(which.sum())
        if n == 0:
            return
        x = torch.randint(0, self.size, (n,), generator=self.generator, device=self.device)
        y = torch.randint(2, self.size - 2, (n,), generator=self.generator, device=self.device)
        self.pos[which] = torch.stack([x, y], dim=-1)
        self.elapsed[which] = 0
        self.episode_return[which] = 0.0

    def observe(self, pos: Tensor) -> Tensor:
        """Positions (b, 2) -> observations (b, 2) in [-1, 1]."""
        return (pos - self.center).float() / self.center

    def _obs(self) -> dict[str, Tensor]:
        return {STATE: self.observe(self.pos)}

    @staticmethod
    def moves(actions: Tensor) -> Tensor:
        """Actions (b, 2) -> grid moves (b, 2) in {-1, 0, 1}: clipped to [-1, 1] and rounded."""
        return torch.round(actions.clamp(-1.0, 1.0)).long()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """New episodes everywhere; with `seed`, the start cells' generator is re-seeded first."""
        if seed is not None:
            self.generator.manual_seed(int(seed))
        self._restart(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))
        return self._obs(), {"is_success": torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)}

    def step(self, actions):
        actions = torch.as_tensor(actions, dtype=torch.float32, device=self.device)
        if actions.shape != (self.num_envs, 2):
            raise ValueError(f"actions have shape {tuple(actions.shape)}: expected ({self.num_envs}, 2)")
        self.pos = (self.pos + self.moves(actions)).clamp(0, self.size - 1)
        self.elapsed += 1
        terminated = self.is_goal(self.pos[:, 1])
        truncated = ~terminated & (self.elapsed >= self.max_steps)
        reward = terminated.float() * self.goal_reward
        self.episode_return += reward
        done = terminated | truncated
        final_obs = self._obs()
        final_info = {"is_success": terminated.clone(), "episode_return": self.episode_return.clone(),
                      "episode_length": self.elapsed.clone()}
        self._restart(done)
        info = {"is_success": torch.zeros_like(done), "final_obs": final_obs, "_final_obs": done,
                "final_info": final_info, "_final_info": done.clone()}
        return self._obs(), reward, terminated, truncated, info

    def close(self) -> None:
        pass

    def action_stats(self, actions: Tensor, states: Tensor | None = None) -> dict[str, float]:
        """Diagnostics the trainer logs: how the moves of actions (b, 2) taken on the middle row (states
        (b, 2) with y = 0) split between up and down; empty when no action was taken there."""
        if states is None:
            return {}
        on_row = states.reshape(-1, 2)[:, 1] == 0
        if not bool(on_row.any()):
            return {}
        up, down = vertical_split(actions[on_row])
        return {"center_up": up, "center_down": down}

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos.clone(), "elapsed": self.elapsed.clone(),
                "episode_return": self.episode_return.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos, self.elapsed = state["pos"].to(self.device), state["elapsed"].to(self.device)
        self.episode_return = state["episode_return"].to(self.device)
        self.generator.set_state(state["generator"])


def vertical_split(actions: Tensor) -> tuple[float, float]:
    """Fractions of actions (b, 2) whose move goes up (a_y rounds to +1) and down (to -1)."""
    dy = TwoGoalGridWorld.moves(actions)[:, 1]
    return float((dy == 1).float().mean()), float((dy == -1).float().mean())


class TwoGoalGridWorldEnv(BatchedAsSingleEnv):
    """One `TwoGoalGridWorld` as a gymnasium.Env (`gymnasium.make("fmpolicy/TwoGoalGridWorld-v0")`)."""

    batched_cls = TwoGoalGridWorld
