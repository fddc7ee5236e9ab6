"""Push: a disk pusher pushes a disk object to a goal position (batched torch core).

Quasi-static, friction-free contact by projection: the pusher may not overlap the object, and any
overlap after the pusher moves pushes the object along the contact normal by the overlap. A push
off the object's centre line therefore sends it sideways: the task needs closed-loop control.
The pusher starts on the goal side of the object, so it has to go round the object first,
clockwise or counter-clockwise: the expert's two modes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import render as R
from .core_base import ModalExpert, TorchCore, clip_norm, tangent_target, wrap_angle


class PushCore(TorchCore):
    """Batched Push.

    State (e, 6): [pusher xy, object xy, goal xy].
    Action (e, 2): pusher velocity in [-1, 1]^2, scaled by max_speed * dt (0.04 per step by default).
    Reward: object progress towards the goal in units of one full step, + success_bonus on success.
    Success (terminates): object centre within success_radius of the goal.

    Args:
        num_envs: number of environments stepped together.
        device: torch device of the state.
        seed: seed of the core's generator (None: OS entropy).
        pusher_radius: radius of the pusher disk.
        object_radius: radius of the object disk.
        max_speed: pusher speed for an action of 1 (world units per second).
        dt: control period in seconds.
        goal_distance: (min, max) initial distance from the object to the goal.
    """

    max_episode_steps = 100
    success_bonus = 10.0

    def __init__(
        self,
        num_envs: int = 1,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        pusher_radius: float = 0.05,
        object_radius: float = 0.1,
        max_speed: float = 0.4,
        dt: float = 0.1,
        goal_distance: tuple[float, float] = (0.3, 0.5),
    ):
        if not 0 < goal_distance[0] <= goal_distance[1] <= 0.6:
            raise ValueError(f"goal_distance must satisfy 0 < min <= max <= 0.6, got {goal_distance}")
        super().__init__(num_envs, device, seed)
        self.state_dim, self.action_dim = 6, 2
        self.pusher_radius, self.object_radius = float(pusher_radius), float(object_radius)
        self.contact_distance = self.pusher_radius + self.object_radius
        self.step_size = float(max_speed * dt)
        self.goal_distance = (float(goal_distance[0]), float(goal_distance[1]))
        e = self.num_envs
        self.pusher = torch.zeros(e, 2, device=self.device)
        self.object = torch.zeros(e, 2, device=self.device)
        self.goal = torch.zeros(e, 2, device=self.device)
        self.reset()

    def _reset(self, mask: Tensor) -> None:
        obj = self._uniform(2, low=-0.35, high=0.35)  # (e, 2)
        heading = self._uniform(low=-math.pi, high=math.pi)  # object -> goal direction
        dist = self._uniform(low=self.goal_distance[0], high=self.goal_distance[1])
        goal = (obj + dist[:, None] * _unit(heading)).clamp(-0.75, 0.75)
        # The pusher starts on the goal side, within 45 degrees of the object -> goal line.
        to_goal = torch.atan2(goal[:, 1] - obj[:, 1], goal[:, 0] - obj[:, 0])
        side_angle = to_goal + self._uniform(low=-math.pi / 4, high=math.pi / 4)
        gap = self._uniform(low=0.07, high=0.15)
        pusher = obj + (self.contact_distance + gap)[:, None] * _unit(side_angle)
        self.object = torch.where(mask[:, None], obj, self.object)
        self.goal = torch.where(mask[:, None], goal, self.goal)
        self.pusher = torch.where(mask[:, None], pusher, self.pusher)

    def _resolve_contact(self) -> Tensor:
        """Push the object out of the pusher along the contact normal; keep both in the arena.

        Returns contact (e,) bool: whether the pusher touched the object this step.
        """
        delta = self.object - self.pusher  # (e, 2)
        dist = delta.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        normal = delta / dist
        overlap = (self.contact_distance - dist).clamp_min(0.0)  # (e, 1)
        wall = 1.0 - self.object_radius
        self.object = (self.object + normal * overlap).clamp(-wall, wall)
        # An object stopped by the wall pushes the pusher back instead.
        delta = self.object - self.pusher
        dist = delta.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        still = (self.contact_distance - dist).clamp_min(0.0)
        self.pusher = self.pusher - delta / dist * still
        return overlap.squeeze(-1) > 0

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """action (e, 2) -> reward (e,), terminated (e,) bool, info {is_success, contact} (e,) bool."""
        action = self._check_action(action)
        before = (self.goal - self.object).norm(dim=-1)
        wall = 1.0 - self.pusher_radius
        self.pusher = (self.pusher + action * self.step_size).clamp(-wall, wall)
        contact = self._resolve_contact()
        after = (self.goal - self.object).norm(dim=-1)
        success = after < self.success_radius
        reward = (before - after) / self.step_size + self.success_bonus * success.float()
        return reward, success, {"is_success": success, "contact": contact}

    def observation_state(self) -> Tensor:
        """(e, 6) [pusher, object, goal]."""
        return torch.cat([self.pusher, self.object, self.goal], dim=-1)

    def is_success(self) -> Tensor:
        """(e,) bool."""
        return (self.goal - self.object).norm(dim=-1) < self.success_radius

    def render(self, size: int = 64) -> Tensor:
        """(e, 3, size, size): goal outline, object, then the pusher on top."""
        img = R.blank_canvas(self.num_envs, size, self.device)
        img = R.paint_ring(img, self.goal, self.object_radius, 0.025, R.GOAL)
        img = R.paint_disk(img, self.goal, self.success_radius * 0.5, R.GOAL)
        img = R.paint_disk(img, self.object, self.object_radius, R.OBJECT)
        return R.paint_disk(img, self.pusher, self.pusher_radius, R.AGENT)


def _unit(angle: Tensor) -> Tensor:
    """Angles (e,) -> unit vectors (e, 2)."""
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


class PushExpert(ModalExpert):
    """Closed-loop pushing: get behind the object, then push it along the object -> goal line.

    "Behind" is the side of the object opposite the goal. While the pusher is more than
    `align_angle` off that side, it orbits the object at a safe radius; from the front half it goes
    round counter-clockwise (mode 0) or clockwise (mode 1), from the back half the short way.
    Once aligned it moves to the contact point on the line and advances, correcting sideways drift
    every step (re-orbiting if the object slips out of line).

    Args:
        seed: seed for the per-episode mode draws.
        align_angle: radians off the push line within which the pusher pushes.
        orbit_margin: gap between pusher and object while going round.
        lookahead: radians ahead on the orbit circle.
    """

    def __init__(self, seed: int | None = None, align_angle: float = 0.3, orbit_margin: float = 0.05,
                 lookahead: float = 0.35):
        super().__init__(seed)
        self.align_angle, self.orbit_margin, self.lookahead = align_angle, orbit_margin, lookahead

    def act(self, core: PushCore, mode: Tensor) -> Tensor:
        """core state + mode (e,) {0 counter-clockwise, 1 clockwise} -> action (e, 2)."""
        obj, pusher = core.object, core.pusher
        to_goal = core.goal - obj  # (e, 2)
        goal_dist = to_goal.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        push_dir = to_goal / goal_dist
        rel = pusher - obj
        # Signed angle of the pusher round the object, measured from the "behind" direction.
        offset = wrap_angle(torch.atan2(rel[:, 1], rel[:, 0]) - torch.atan2(-push_dir[:, 1], -push_dir[:, 0]))
        front = offset.abs() > math.pi / 2
        side = torch.where(front, torch.where(mode == 0, 1.0, -1.0), -torch.sign(offset))
        orbit = tangent_target(obj, pusher, core.contact_distance + self.orbit_margin, side, self.lookahead)
        advance = goal_dist.clamp(max=core.step_size)
        push = obj - push_dir * core.contact_distance + push_dir * advance  # contact point, moved on
        aligned = offset.abs() < self.align_angle
        target = torch.where(aligned[:, None], push, orbit)
        return clip_norm((target - pusher) / core.step_size)
