"""What every batched task core shares: device, seeded generator, masked resets, episode ids.

A core holds the state of `num_envs` environments as torch tensors and steps them all at once.
The gymnasium wrappers (`gym_env.py`, `vector_env.py`) only talk to a core through:

    core.reset(mask)            resample the environments where mask (e,) is True (all when None)
    core.step(action)           action (e, a) in [-1, 1] -> reward (e,), terminated (e,), info
    core.observation_state()    (e, s) float32
    core.is_success()           (e,) bool
    core.render(size)           (e, 3, size, size) float in [0, 1]
    core.task()                 list of e instructions, or None for single-goal tasks
    core.state_bounds()         (low, high) numpy float32 arrays of shape (s,)

Resets draw random numbers for *all* environments and keep them where the mask is True: the random
stream then does not depend on which environments ended, and no host-device sync is needed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def wrap_angle(x: Tensor) -> Tensor:
    """Wrap angles to [-pi, pi]. Any shape."""
    return torch.atan2(torch.sin(x), torch.cos(x))


def clip_norm(v: Tensor, max_norm: float = 1.0) -> Tensor:
    """Scale vectors (..., d) down so that their norm is at most max_norm."""
    n = v.norm(dim=-1, keepdim=True)
    return v * (max_norm / n.clamp_min(max_norm))


class TorchCore:
    """Base of the batched task cores (not used on its own).

    Args:
        num_envs: number of environments stepped together.
        device: torch device holding every state tensor ("cpu", "cuda", ...).
        seed: seed of the core's own torch.Generator; None draws one from the OS.
    """

    state_dim: int
    action_dim: int
    max_episode_steps: int = 100
    success_radius: float = 0.05

    def __init__(self, num_envs: int = 1, device: torch.device | str = "cpu", seed: int | None = None):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = int(num_envs)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.seed(seed)
        # Incremented at every reset of an environment; experts use it to redraw their mode.
        self.episode_id = torch.full((self.num_envs,), -1, dtype=torch.long, device=self.device)

    def seed(self, seed: int | None = None) -> None:
        """Reseed the core's generator (None: from OS entropy)."""
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    # ---- random helpers: always (num_envs, ...) so the stream does not depend on masks ----
    def _uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        """Uniform samples of shape (e, *shape)."""
        u = torch.rand((self.num_envs, *shape), generator=self.generator, device=self.device)
        return low + (high - low) * u

    def _randint(self, high: int) -> Tensor:
        """Integers in [0, high), shape (e,)."""
        return torch.randint(0, high, (self.num_envs,), generator=self.generator, device=self.device)

    def _all(self, mask: Tensor | None) -> Tensor:
        """A (e,) bool mask: the given one on the core's device, or all True."""
        if mask is None:
            return torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        mask = torch.as_tensor(mask, device=self.device).bool()
        if mask.shape != (self.num_envs,):
            raise ValueError(f"reset mask must have shape ({self.num_envs},), got {tuple(mask.shape)}")
        return mask

    def reset(self, mask: Tensor | None = None) -> None:
        """Resample the environments where mask (e,) is True; all of them when mask is None."""
        mask = self._all(mask)
        self._reset(mask)
        self.episode_id = torch.where(mask, self.episode_id + 1, self.episode_id)

    def _reset(self, mask: Tensor) -> None:
        raise NotImplementedError

    def _check_action(self, action: Tensor) -> Tensor:
        """Validate and clip an action batch to [-1, 1]. (e, a) -> (e, a) float32 on device."""
        action = torch.as_tensor(action, device=self.device, dtype=torch.float32)
        if action.shape != (self.num_envs, self.action_dim):
            raise ValueError(
                f"{type(self).__name__}.step expects actions of shape ({self.num_envs}, {self.action_dim}), "
                f"got {tuple(action.shape)}"
            )
        return action.clamp(-1.0, 1.0)

    def task(self) -> list[str] | None:
        """Language instruction of each environment's episode, or None when there is one goal."""
        return None

    def state_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Bounds of observation.state: positions live in the arena [-1, 1]^2 by default."""
        return (-np.ones(self.state_dim, np.float32), np.ones(self.state_dim, np.float32))


class ModalExpert:
    """Base of the scripted experts: a per-episode random mode, redrawn when an episode starts.

    Call `expert(core) -> action (e, a)`. The expert notices new episodes through
    `core.episode_id`, so it works unchanged under a vector env's autoreset.
    `act(core, mode)` is the deterministic controller for given modes (e,) long in {0, 1}.

    Args:
        seed: seed of the expert's own generator for mode draws (None: from OS entropy).
        n_modes: number of modes, drawn uniformly.
    """

    n_modes: int = 2

    def __init__(self, seed: int | None = None):
        self._seed = seed
        self.generator: torch.Generator | None = None
        self.mode: Tensor | None = None  # (e,) long
        self._seen: Tensor | None = None  # (e,) episode ids the modes were drawn for

    def _update_modes(self, core: TorchCore) -> Tensor:
        """Redraw the mode of every environment whose episode changed. Returns mode (e,)."""
        if self.generator is None or self.mode is None or self.mode.shape[0] != core.num_envs:
            self.generator = torch.Generator(device=core.device)
            if self._seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(int(self._seed))
            self.mode = torch.zeros(core.num_envs, dtype=torch.long, device=core.device)
            self._seen = torch.full_like(self.mode, -2)
        draw = torch.randint(0, self.n_modes, (core.num_envs,), generator=self.generator, device=core.device)
        new = core.episode_id != self._seen
        self.mode = torch.where(new, draw, self.mode)
        self._seen = core.episode_id.clone()
        return self.mode

    def __call__(self, core: TorchCore) -> Tensor:
        """Expert actions (e, a) in [-1, 1] for the core's current state."""
        return self.act(core, self._update_modes(core))

    def act(self, core: TorchCore, mode: Tensor) -> Tensor:
        raise NotImplementedError


def tangent_target(centre: Tensor, pos: Tensor, radius: float, side: Tensor, lookahead: float) -> Tensor:
    """A point to steer to that circles `centre` at `radius`, on the side given by `side`.

    Far away it is the tangent point (plus `lookahead` radians); on or inside the circle it is a
    point `lookahead` radians further round, so the path orbits without touching the centre.
    centre, pos (e, 2); side (e,) +1 counter-clockwise, -1 clockwise. Returns (e, 2).
    """
    rel = pos - centre  # (e, 2)
    dist = rel.norm(dim=-1).clamp_min(1e-6)  # (e,)
    theta = torch.atan2(rel[:, 1], rel[:, 0])
    phi = theta + side * (torch.acos((radius / dist).clamp(max=1.0)) + lookahead)
    return centre + radius * torch.stack([torch.cos(phi), torch.sin(phi)], dim=-1)


def segment_distance(a: Tensor, b: Tensor, p: Tensor) -> Tensor:
    """Distance from points p to segments [a, b]. a, b, p (e, 2) -> (e,)."""
    ab = b - a
    t = (((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)).clamp(0.0, 1.0)
    return (a + t.unsqueeze(-1) * ab - p).norm(dim=-1)

