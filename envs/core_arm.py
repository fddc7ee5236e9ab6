"""ArmReach: a planar arm of n equal links brings its end effector to a target (batched torch core).

Every reachable target (0 < r < 1) has two mirror-image postures of the "constant curl" family
(all joints after the first bent by the same angle theta, +theta or -theta): elbow-up and elbow-down
for two links. The expert picks one at random per episode, so demonstrations are bimodal; the mean
of the two postures is a straight arm, which misses the target.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from . import render as R
from .core_base import ModalExpert, TorchCore, wrap_angle


def forward_kinematics(q: Tensor, link_length: float) -> Tensor:
    """Joint angles (e, n) relative to the previous link -> link end points (e, n, 2); last = end effector."""
    absolute = torch.cumsum(q, dim=-1)  # (e, n)
    steps = link_length * torch.stack([torch.cos(absolute), torch.sin(absolute)], dim=-1)  # (e, n, 2)
    return torch.cumsum(steps, dim=-2)


def curl_reach(theta: Tensor, n_links: int) -> Tensor:
    """Reach |ee| / total length of the curl posture [q1, theta, ..., theta]. theta (e,) -> (e,).

    |sum_k exp(i k theta)| / n = |sin(n theta / 2) / (n sin(theta / 2))|.
    """
    half = theta / 2
    small = half.abs() < 1e-6
    ratio = torch.sin(n_links * half) / (n_links * torch.sin(torch.where(small, torch.ones_like(half), half)))
    return torch.where(small, torch.ones_like(theta), ratio.abs())


def curl_ik(target: Tensor, n_links: int, sign: Tensor, iters: int = 24) -> Tensor:
    """Curl posture reaching `target`: q = [phi - (n-1) theta / 2, theta, ..., theta].

    target (e, 2) with 0 < |target| < 1 (total arm length 1); sign (e,) +1 or -1 picks the
    mirror solution. |theta| in [0, 2 pi / n] is found by bisection (the reach decreases on it).
    Returns q (e, n).
    """
    r = target.norm(dim=-1).clamp(1e-4, 1.0)  # (e,)
    lo = torch.zeros_like(r)
    hi = torch.full_like(r, 2 * math.pi / n_links)
    for _ in range(iters):
        mid = (lo + hi) / 2
        too_long = curl_reach(mid, n_links) > r  # reach still too long: bend more
        lo = torch.where(too_long, mid, lo)
        hi = torch.where(too_long, hi, mid)
    theta = sign * (lo + hi) / 2  # (e,)
    phi = torch.atan2(target[:, 1], target[:, 0])
    base = phi - (n_links - 1) * theta / 2
    rest = theta.unsqueeze(-1).expand(-1, n_links - 1)
    return wrap_angle(torch.cat([base.unsqueeze(-1), rest], dim=-1))


class ArmReachCore(TorchCore):
    """Batched ArmReach.

    State (e, n + 4): [joint angles (n) in [-pi, pi], end effector xy (2), target xy (2)].
    Action (e, n): joint angle changes in [-1, 1]^n, scaled by max_joint_step radians per step.
    Reward: end-effector progress towards the target in units of `progress_unit`, + success_bonus.
    Success (terminates): end effector within success_radius of the target.

    Args:
        num_envs: number of environments stepped together.
        device: torch device of the state.
        seed: seed of the core's generator (None: OS entropy).
        n_links: number of equal links (total length 1, base at the origin), >= 2.
        max_joint_step: radians per step for an action of 1.
        target_radius: (min, max) distance of the target from the base, inside the reachable disk.
        init_bend: half-width of the uniform initial angle of the joints after the first.
    """

    max_episode_steps = 100
    success_bonus = 10.0
    progress_unit = 0.05

    def __init__(
        self,
        num_envs: int = 1,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        n_links: int = 2,
        max_joint_step: float = 0.1,
        target_radius: tuple[float, float] = (0.3, 0.9),
        init_bend: float = 0.3,
    ):
        if int(n_links) < 2:
            raise ValueError(f"n_links must be >= 2, got {n_links}")
        if not 0 < target_radius[0] < target_radius[1] < 1:
            raise ValueError(f"target_radius must satisfy 0 < min < max < 1, got {target_radius}")
        super().__init__(num_envs, device, seed)
        self.n_links = int(n_links)
        self.link_length = 1.0 / self.n_links
        self.state_dim = self.n_links + 4
        self.action_dim = self.n_links
        self.max_joint_step = float(max_joint_step)
        self.target_radius = (float(target_radius[0]), float(target_radius[1]))
        self.init_bend = float(init_bend)
        self.q = torch.zeros(self.num_envs, self.n_links, device=self.device)
        self.target = torch.zeros(self.num_envs, 2, device=self.device)
        self.reset()

    def joints(self) -> Tensor:
        """Link end points (e, n, 2); the last one is the end effector."""
        return forward_kinematics(self.q, self.link_length)

    def end_effector(self) -> Tensor:
        """(e, 2)."""
        return self.joints()[:, -1]

    def _reset(self, mask: Tensor) -> None:
        base = self._uniform(1, low=-math.pi, high=math.pi)
        bend = self._uniform(self.n_links - 1, low=-self.init_bend, high=self.init_bend)
        q = torch.cat([base, bend], dim=-1)  # (e, n)
        lo, hi = self.target_radius
        r = torch.sqrt(self._uniform(low=lo**2, high=hi**2))  # uniform over the annulus' area
        angle = self._uniform(low=-math.pi, high=math.pi)
        target = r.unsqueeze(-1) * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)  # (e, 2)
        self.q = torch.where(mask[:, None], q, self.q)
        self.target = torch.where(mask[:, None], target, self.target)

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """action (e, n) -> reward (e,), terminated (e,) bool, info {is_success} (e,) bool."""
        action = self._check_action(action)
        before = (self.end_effector() - self.target).norm(dim=-1)
        self.q = wrap_angle(self.q + action * self.max_joint_step)
        after = (self.end_effector() - self.target).norm(dim=-1)
        success = after < self.success_radius
        reward = (before - after) / self.progress_unit + self.success_bonus * success.float()
        return reward, success, {"is_success": success}

    def observation_state(self) -> Tensor:
        """(e, n + 4) [q, end effector, target]."""
        return torch.cat([self.q, self.end_effector(), self.target], dim=-1)

    def is_success(self) -> Tensor:
        """(e,) bool."""
        return (self.end_effector() - self.target).norm(dim=-1) < self.success_radius

    def state_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Angles in [-pi, pi], positions in [-1, 1]."""
        high = np.concatenate([np.full(self.n_links, np.pi), np.ones(4)]).astype(np.float32)
        return -high, high

    def render(self, size: int = 64) -> Tensor:
        """(e, 3, size, size): target, links, joints, then the end effector on top."""
        img = R.blank_canvas(self.num_envs, size, self.device)
        img = R.paint_disk(img, self.target, self.success_radius, R.GOAL)
        points = torch.cat([torch.zeros_like(self.target).unsqueeze(1), self.joints()], dim=1)  # (e, n+1, 2)
        width = 0.08 if self.n_links <= 3 else 0.06
        for i in range(self.n_links):
            img = R.paint_segment(img, points[:, i], points[:, i + 1], width, R.LINK)
        for i in range(self.n_links):
            img = R.paint_disk(img, points[:, i], width * 0.45, R.JOINT)
        return R.paint_disk(img, points[:, -1], 0.045, R.AGENT)


class ArmReachExpert(ModalExpert):
    """Drives the joints to one of the two mirror curl postures that reach the target.

    Mode 0 bends the joints after the first by +theta, mode 1 by -theta (elbow up / down for two
    links). Each joint moves at full speed (saturated) towards its target angle along the shorter
    way round.

    Args:
        seed: seed for the per-episode mode draws.
    """

    def act(self, core: ArmReachCore, mode: Tensor) -> Tensor:
        """core state + mode (e,) -> joint actions (e, n)."""
        sign = torch.where(mode == 0, 1.0, -1.0)
        goal_q = curl_ik(core.target, core.n_links, sign)  # (e, n)
        return (wrap_angle(goal_q - core.q) / core.max_joint_step).clamp(-1.0, 1.0)
