"""Single-environment `gymnasium.Env` views of the batched cores (numpy in, numpy out).

A `TorchCoreEnv` holds a core with num_envs = 1 on the CPU. Time limits come from the registered
`max_episode_steps` (gymnasium's TimeLimit wrapper), so `step` itself never truncates.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from .core_arm import ArmReachCore
from .core_base import TorchCore
from .core_point import PointObstacleCore
from .core_push import PushCore
from .render import to_uint8_hwc

STATE_KEY = "observation.state"
IMAGE_KEY = "observation.images.top"


def make_observation_space(core: TorchCore, image_size: int | None) -> spaces.Dict:
    """Dict space of one environment: the state Box, plus a (3, N, N) image Box in [0, 1]."""
    low, high = core.state_bounds()
    entries: dict[str, spaces.Space] = {STATE_KEY: spaces.Box(low, high, dtype=np.float32)}
    if image_size is not None:
        entries[IMAGE_KEY] = spaces.Box(0.0, 1.0, (3, image_size, image_size), dtype=np.float32)
    return spaces.Dict(entries)


class TorchCoreEnv(gym.Env):
    """One environment of a batched torch core, as a gymnasium.Env.

    ## Observation
    Dict: "observation.state" float32 (s,) (layout: see the core class); with `image_size=N`
    also "observation.images.top" float32 (3, N, N) in [0, 1] (the core's renderer).
    ## Action
    float32 Box [-1, 1]^a (see the core class for the scaling).
    ## Info
    "is_success" (bool) on every reset and step; task-specific flags (e.g. "collision");
    "task" (str) when the task has several goals.
    ## Episode end
    Terminates on success; truncation at the registered `max_episode_steps`.

    Args:
        render_mode: None or "rgb_array" (render() returns uint8 (H, W, 3)).
        image_size: side of the image observation; None for a state-only observation.
        render_size: side of the frames returned by render().
        **core_kwargs: task options passed to the core (e.g. n_links, n_goals).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    core_cls: type[TorchCore] = TorchCore

    def __init__(self, render_mode: str | None = None, image_size: int | None = None, render_size: int = 128,
                 **core_kwargs: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        if image_size is not None and image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        self.core = self.core_cls(num_envs=1, device="cpu", **core_kwargs)
        self.render_mode = render_mode
        self.image_size = image_size
        self.render_size = int(render_size)
        self.observation_space = make_observation_space(self.core, image_size)
        self.action_space = spaces.Box(-1.0, 1.0, (self.core.action_dim,), dtype=np.float32)
        self._core_seeded = False

    def _obs(self) -> dict[str, np.ndarray]:
        obs = {STATE_KEY: self.core.observation_state()[0].cpu().numpy().astype(np.float32)}
        if self.image_size is not None:
            obs[IMAGE_KEY] = self.core.render(self.image_size)[0].cpu().numpy().astype(np.float32)
        return obs

    def _info(self, flags: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        info: dict[str, Any] = {"is_success": bool(self.core.is_success()[0])}
        for key, value in (flags or {}).items():
            if key != "is_success":
                info[key] = bool(value[0])
        task = self.core.task()
        if task is not None:
            info["task"] = task[0]
        return info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        # The torch generator is seeded from gymnasium's np_random, so reset(seed=s) fixes both.
        if seed is not None or not self._core_seeded:
            self.core.seed(int(self.np_random.integers(0, 2**62)))
            self._core_seeded = True
        self.core.reset()
        return self._obs(), self._info()

    def step(self, action):
        action = torch.as_tensor(np.asarray(action, dtype=np.float32)).reshape(1, -1)
        if action.shape[1] != self.core.action_dim:
            raise ValueError(f"expected an action of shape ({self.core.action_dim},), got {np.shape(action)}")
        reward, terminated, flags = self.core.step(action)
        return self._obs(), float(reward[0]), bool(terminated[0]), False, self._info(flags)

    def render(self):
        """uint8 (render_size, render_size, 3) frame when render_mode == "rgb_array"."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='rgb_array'.")
            return None
        return to_uint8_hwc(self.core.render(self.render_size)[0])


class PointObstacleEnv(TorchCoreEnv):
    """Point robot round a disk obstacle to a goal (`fmpolicy/PointObstacle-v0`); see PointObstacleCore."""

    core_cls = PointObstacleCore


class ArmReachEnv(TorchCoreEnv):
    """Planar n-link arm reaching a target (`fmpolicy/ArmReach-v0`, kwarg n_links); see ArmReachCore."""

    core_cls = ArmReachCore


class PushEnv(TorchCoreEnv):
    """Disk pusher pushing a disk object to a goal (`fmpolicy/Push-v0`); see PushCore."""

    core_cls = PushCore
