"""A 2-D continuous bandit with two equally good optima, batched in torch.

The action a in [-1, 1]^2 is rewarded near two optima, (+0.6, +0.6) and (-0.6, -0.6); every episode
lasts one step. Two reward shapes (`reward_shape`):

- "bump" (default): the larger of two Gaussian bumps of std `width` (peak reward 1 each). A sharper
  mode always earns more, so a policy that sharpens one mode a little faster is pulled towards it.
- "goal": 1 inside either disk of radius `width`, 0 elsewhere: two goal regions, nothing to gain
  from sharpening once an action is inside one.

A policy that can represent two modes (a flow) can keep mass on both optima; a unimodal Gaussian must
pick one (or sit between them, where the reward is ~0).

Two state settings:

- `context=False` (default): a constant zero state, one bandit.
- `context=True`: a contextual bandit, the FPO paper's GridWorld point in one dimension. Each episode
  draws a state s ~ U(-1, 1) and the reward of each optimum is scaled by min(1, 1 + tilt * s) (the
  positive one) or min(1, 1 - tilt * s) (the negative one), floored at 0: for s > 0 the positive
  optimum keeps its full reward and the negative one loses tilt * s of it (none is left past
  s = 1 / tilt), the mirror image for s < 0, and at s = 0 they are equally good (the saddle). Each
  optimum is the only good one on its own side, as each goal is in the GridWorld. The first
  `num_envs // 4` environments always sit at s = 0 (the probes): `action_stats` reports how the
  executed actions at s = 0 split between the optima. A policy smooth in s must, at the saddle,
  either be bimodal or sit between.

Same contract as our `TorchVectorEnv` (docs/envs.md): torch tensors on `device`, dict observations
{"observation.state": (e, 1)}, same-step autoreset (every step ends the episode, so `final_obs` and
`final_info` are filled for every environment). `state_dict` / `load_state_dict` (used by
checkpoints for an exact resume) hold the step counter, the current states and the generator.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from .batched_single import BatchedAsSingleEnv, BatchedEnv
from .gym_env import STATE_KEY as STATE

OPTIMA = ((0.6, 0.6), (-0.6, -0.6))


class TwoOptimaBandit(BatchedEnv):
    """`num_envs` one-step bandits. Args: num_envs, device, seed (of the states' generator; the reward is
    deterministic), width (std of each reward bump, or radius of each goal disk), success_reward (reward
    above which an episode counts as a success), reward_shape ("bump" or "goal"), context (draw a state
    per episode and tilt the optima by it), tilt (how much s favours one optimum); see the module
    docstring."""


    def __init__(self, num_envs: int = 64, device: torch.device | str = "cpu", seed: int | None = None,
                 width: float = 0.3, success_reward: float = 0.5, reward_shape: str = "bump",
                 context: bool = False, tilt: float = 5.0):
        if reward_shape not in ("bump", "goal"):
            raise ValueError(f"TwoOptimaBandit: reward_shape = {reward_shape!r}: expected 'bump' or 'goal'")
        if not width > 0:
            raise ValueError(f"TwoOptimaBandit: width = {width!r}: expected a positive float")
        if not tilt >= 0:
            raise ValueError(f"TwoOptimaBandit: tilt = {tilt!r}: expected a float >= 0")
        self.num_envs, self.device, self.reward_shape = int(num_envs), torch.device(device), reward_shape
        self.width, self.success_reward = float(width), float(success_reward)
        self.optima = torch.tensor(OPTIMA, device=self.device)  # (2, 2)
        self.single_action_space = spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
        self.single_observation_space = spaces.Dict(
            {STATE: spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)})
        self.context, self.tilt = bool(context), float(tilt)
        self.tilt_sign = torch.tensor([1.0, -1.0], device=self.device)  # s favours the first optimum
        self.num_probes = max(1, self.num_envs // 4) if self.context else self.num_envs
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0 if seed is None else int(seed))
        self.steps = 0
        self.states = self._draw_states()

    def _draw_states(self) -> Tensor:
        """(e,) states: 0 for the probes, U(-1, 1) for the rest (all 0 without context)."""
        s = torch.rand(self.num_envs, generator=self.generator, device=self.device) * 2 - 1
        s[: self.num_probes] = 0.0
        return s

    def _obs(self) -> dict[str, Tensor]:
        return {STATE: self.states[:, None].clone()}

    def reward(self, action: Tensor, states: Tensor | None = None) -> Tensor:
        """(b, 2) actions (clipped to [-1, 1]) -> (b,) rewards: the better of the two optima. With
        context each is scaled by its tilt at `states` (b,), by default the current ones (b = num_envs)."""
        a = action.clamp(-1.0, 1.0)
        d2 = (a[:, None, :] - self.optima[None]).pow(2).sum(-1)  # (b, 2)
        hit = (d2 < self.width**2).float() if self.reward_shape == "goal" else torch.exp(-d2 / (2 * self.width**2))
        if not self.context:
            return hit.amax(-1)
        s = self.states if states is None else states
        if s.shape[0] != a.shape[0]:
            given = "no states" if states is None else f"{s.shape[0]} states"
            raise ValueError(f"TwoOptimaBandit.reward: {a.shape[0]} actions and {given}: expected one state "
                             f"per action (without states, one action per env: {self.num_envs})")
        scale = (1 + self.tilt * s[:, None] * self.tilt_sign).clamp(0.0, 1.0)  # (b, 2)
        return (hit * scale).amax(-1)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """The current observation; with `seed`, the states' generator is re-seeded and fresh states drawn."""
        if seed is not None:
            self.generator.manual_seed(int(seed))
            self.states = self._draw_states()
        return self._obs(), {"is_success": torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)}

    def step(self, actions):
        actions = torch.as_tensor(actions, dtype=torch.float32, device=self.device)
        if actions.shape != (self.num_envs, 2):
            raise ValueError(f"actions have shape {tuple(actions.shape)}: expected ({self.num_envs}, 2)")
        self.steps += 1
        reward = self.reward(actions)
        final_obs = self._obs()
        if self.context:
            self.states = self._draw_states()
        done = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        success = reward > self.success_reward
        final_info = {"is_success": success, "episode_return": reward.clone(),
                      "episode_length": torch.ones(self.num_envs, dtype=torch.long, device=self.device)}
        info = {"is_success": torch.zeros_like(done), "final_obs": final_obs, "_final_obs": done,
                "final_info": final_info, "_final_info": done.clone()}
        return self._obs(), reward, done, torch.zeros_like(done), info

    def close(self) -> None:
        pass

    def action_stats(self, actions: Tensor, states: Tensor | None = None) -> dict[str, float]:
        """Diagnostics the trainer logs: fractions of actions (b, 2) near each optimum; with `states`
        (b, 1) given, of the actions taken at the saddle s = 0 only (all of them without context)."""
        if states is not None:
            actions = actions[states.reshape(-1) == 0]
        near_pos, near_neg = mode_fractions(actions)
        return {"near_optimum_pos": near_pos, "near_optimum_neg": near_neg}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "states": self.states.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        if "states" in state:  # checkpoints from before the contextual bandit hold only the counter
            self.states = state["states"].to(self.device)
            self.generator.set_state(state["generator"])


def mode_fractions(actions: Tensor, radius: float = 0.3) -> tuple[float, float]:
    """Fractions of actions (b, 2) within `radius` of the first and of the second optimum."""
    optima = torch.tensor(OPTIMA, device=actions.device)
    d = (actions[:, None, :].clamp(-1, 1) - optima[None]).norm(dim=-1)  # (b, 2)
    near = d < radius
    return float(near[:, 0].float().mean()), float(near[:, 1].float().mean())


class TwoOptimaBanditEnv(BatchedAsSingleEnv):
    """One `TwoOptimaBandit` as a gymnasium.Env (`gymnasium.make("fmpolicy/TwoOptimaBandit-v0")`)."""

    batched_cls = TwoOptimaBandit
