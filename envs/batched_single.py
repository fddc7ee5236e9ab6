"""A single-environment `gymnasium.Env` view of a batched torch env built with num_envs = 1.

For the RL test beds (`TwoOptimaBandit`, `TwoGoalGridWorld`) whose batched class *is* the vector env:
`gymnasium.make("fmpolicy/TwoOptimaBandit-v0")` gives this view (numpy in, numpy out, no autoreset:
the observation returned when an episode ends is the one it reached), while `gymnasium.make_vec(...,
vectorization_mode="vector_entry_point")` gives the batched class itself.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode


class BatchedEnv:
    """What gymnasium.make_vec expects of a vector entry point that is not a gymnasium VectorEnv: the
    autoreset mode, a `spec` slot and `unwrapped` (the class is its own innermost env)."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}
    spec = None  # set by gymnasium.make_vec

    @property
    def unwrapped(self):
        return self


class BatchedAsSingleEnv(gym.Env):
    """Wraps `batched_cls(num_envs=1, device="cpu", **kwargs)`; the episode's time limit is its own."""

    batched_cls: type = None  # set by the subclasses below

    def __init__(self, **kwargs: Any):
        self.batched = self.batched_cls(num_envs=1, device="cpu", **kwargs)
        self.observation_space = self.batched.single_observation_space
        self.action_space = self.batched.single_action_space

    @staticmethod
    def _numpy(obs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: v[0].cpu().numpy().astype(np.float32) for k, v in obs.items()}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        obs, _ = self.batched.reset(seed=seed, options=options)  # a seed re-seeds the batched env's generator
        return self._numpy(obs), {}

    def step(self, action):
        a = torch.as_tensor(np.asarray(action, dtype=np.float32).reshape(1, -1))
        obs, reward, terminated, truncated, info = self.batched.step(a)
        ended = bool(terminated[0] or truncated[0])
        if ended:  # the batched env has already started its next episode: show where this one ended
            obs = info["final_obs"]
        out = {}
        if ended and "final_info" in info and "is_success" in info["final_info"]:
            out["is_success"] = bool(info["final_info"]["is_success"][0])
        return self._numpy(obs), float(reward[0]), bool(terminated[0]), bool(truncated[0]), out

    def close(self) -> None:
        self.batched.close()
