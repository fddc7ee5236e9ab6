"""`gymnasium.vector.VectorEnv` over a batched torch core: torch tensors in and out, on the core's device."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space
from torch import Tensor

from .core_arm import ArmReachCore
from .core_base import TorchCore
from .core_point import PointObstacleCore
from .core_push import PushCore
from .gym_env import IMAGE_KEY, STATE_KEY, make_observation_space


class TorchVectorEnv(gym.vector.VectorEnv):
    """`num_envs` environments of one task, stepped together in torch on `device`.

    ## Autoreset: same step (`metadata["autoreset_mode"] == AutoresetMode.SAME_STEP`)
    When an episode ends (terminated or truncated) the environment is reset inside that same
    `step`: the returned observation is already the first one of the next episode, and the
    observation the step actually reached is in `info["final_obs"]`. So for RL bootstrapping,
    `next_value = V(info["final_obs"])` where `truncated`, and 0 where `terminated`.

    ## Return types (all torch, on `device`)
    - obs: dict {"observation.state": (e, s) float32, ["observation.images.top": (e, 3, N, N) float32]}
    - reward (e,) float32, terminated (e,) bool, truncated (e,) bool
    - info: "is_success" (e,) bool and task flags (e.g. "collision", "contact"), describing the
      returned observation (so False for environments just reset); "task" (list of e strings) for
      multi-goal tasks; "elapsed_steps" (e,) long;
      "final_obs": obs dict (e, ...) reached by this step for every environment (equal to obs where
      the episode goes on); "final_info": dict of (e,) tensors for the step that ended the episode:
      "is_success", the task flags, "episode_return" (float32), "episode_length" (long), and "task";
      "_final_obs" and "_final_info": (e,) bool, the environments whose episode ended.
    Truncation: a per-environment step counter; `truncated` is True when it reaches
    `max_episode_steps` without success (terminated wins when both happen).

    Args:
        num_envs: number of environments.
        device: torch device of the core and of every returned tensor.
        seed: initial seed of the core's generator (reset(seed=...) reseeds it).
        max_episode_steps: truncation horizon; None uses the core's default.
        image_size: side N of the image observation; None for state only.
        render_mode: None or "rgb_array" (render() returns uint8 (e, H, W, 3) torch).
        render_size: side of the frames returned by render().
        **core_kwargs: task options passed to the core (e.g. n_links, n_goals).
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": ["rgb_array"]}
    core_cls: type[TorchCore] = TorchCore

    def __init__(self, num_envs: int = 64, device: torch.device | str = "cpu", seed: int | None = None,
                 max_episode_steps: int | None = None, image_size: int | None = None,
                 render_mode: str | None = None, render_size: int = 128, **core_kwargs: Any):
        self.core = self.core_cls(num_envs=num_envs, device=device, seed=seed, **core_kwargs)
        self.num_envs = self.core.num_envs
        self.device = self.core.device
        self.max_episode_steps = int(max_episode_steps or self.core.max_episode_steps)
        if self.max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self.image_size, self.render_size, self.render_mode = image_size, int(render_size), render_mode
        self.single_observation_space = make_observation_space(self.core, image_size)
        self.single_action_space = spaces.Box(-1.0, 1.0, (self.core.action_dim,), dtype=np.float32)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        e = self.num_envs
        self.elapsed_steps = torch.zeros(e, dtype=torch.long, device=self.device)
        self.episode_return = torch.zeros(e, dtype=torch.float32, device=self.device)

    def _obs(self) -> dict[str, Tensor]:
        obs = {STATE_KEY: self.core.observation_state()}
        if self.image_size is not None:
            obs[IMAGE_KEY] = self.core.render(self.image_size)
        return obs

    def _with_task(self, info: dict[str, Any]) -> dict[str, Any]:
        task = self.core.task()
        if task is not None:
            info["task"] = task
        return info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset all environments, or those in options["reset_mask"] ((e,) bool). Returns obs, info."""
        if seed is not None:
            if not isinstance(seed, (int, np.integer)):
                raise ValueError(f"seed must be a single int for a TorchVectorEnv, got {seed!r}")
            self.core.seed(int(seed))
        mask = self.core._all((options or {}).get("reset_mask"))
        self.core.reset(mask)
        self.elapsed_steps = torch.where(mask, 0, self.elapsed_steps)
        self.episode_return = torch.where(mask, 0.0, self.episode_return)
        info = {"is_success": self.core.is_success(), "elapsed_steps": self.elapsed_steps.clone()}
        return self._obs(), self._with_task(info)

    def step(self, actions):
        """actions (e, a) tensor or array -> obs, reward (e,), terminated (e,), truncated (e,), info."""
        actions = torch.as_tensor(actions, dtype=torch.float32, device=self.device)
        task_before = self.core.task()
        reward, terminated, flags = self.core.step(actions)
        reward = reward.float()
        self.elapsed_steps = self.elapsed_steps + 1
        self.episode_return = self.episode_return + reward
        truncated = (self.elapsed_steps >= self.max_episode_steps) & ~terminated
        done = terminated | truncated

        final_obs = self._obs()
        final_info: dict[str, Any] = dict(flags)
        final_info["episode_return"] = self.episode_return.clone()
        final_info["episode_length"] = self.elapsed_steps.clone()
        if task_before is not None:
            final_info["task"] = task_before

        # Same-step autoreset (see the class docstring). Resetting with an all-False mask is a no-op.
        self.core.reset(done)
        self.elapsed_steps = torch.where(done, 0, self.elapsed_steps)
        self.episode_return = torch.where(done, 0.0, self.episode_return)
        if self.image_size is None or bool(done.any()):
            obs = self._obs()
        else:
            obs = {k: v.clone() for k, v in final_obs.items()}

        info: dict[str, Any] = {k: v & ~done for k, v in flags.items()}
        info["is_success"] = self.core.is_success()
        info["elapsed_steps"] = self.elapsed_steps.clone()
        info["final_obs"], info["_final_obs"] = final_obs, done
        info["final_info"], info["_final_info"] = final_info, done.clone()
        return obs, reward, terminated, truncated, self._with_task(info)

    def render(self):
        """uint8 frames (e, render_size, render_size, 3) on the device when render_mode == "rgb_array"."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='rgb_array'.")
            return None
        img = self.core.render(self.render_size)  # (e, 3, H, W)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


class PointObstacleVectorEnv(TorchVectorEnv):
    """Batched `fmpolicy/PointObstacle-v0`; see PointObstacleCore and TorchVectorEnv."""

    core_cls = PointObstacleCore


class ArmReachVectorEnv(TorchVectorEnv):
    """Batched `fmpolicy/ArmReach-v0`; see ArmReachCore and TorchVectorEnv."""

    core_cls = ArmReachCore


class PushVectorEnv(TorchVectorEnv):
    """Batched `fmpolicy/Push-v0`; see PushCore and TorchVectorEnv."""

    core_cls = PushCore
