"""PointObstacle: a 2-D point robot goes round a disk obstacle to a goal (batched torch core).

The obstacle sits at the origin, straight between the start (left) and the goal (right), so every
demonstration goes round it either above or below: a regressor that averages the two drives into it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import render as R
from .core_base import ModalExpert, TorchCore, clip_norm, segment_distance, tangent_target

GOAL_NAMES = ("red", "blue")
GOAL_COLOURS = (R.RED, R.BLUE)


class PointObstacleCore(TorchCore):
    """Batched PointObstacle.

    State (e, 4): [x, y, goal_x, goal_y]; with goal_in_state=False only [x, y].
    Action (e, 2): velocity in [-1, 1]^2, scaled by max_speed * dt (0.04 per step by default).
    Reward: progress towards the goal in units of one full step, + success_bonus on success.
    Success (terminates): within success_radius of the goal.
    Crash: touching the obstacle ends the episode as a failure (`collision_terminates`, default), so
    a policy that averages the two ways round fails instead of sliding along the obstacle.

    Args:
        num_envs: number of environments stepped together.
        device: torch device of the state.
        seed: seed of the core's generator (None: OS entropy).
        n_goals: 1 (a goal near (0.7, 0)) or 2 (red near (0.7, 0.45), blue near (0.7, -0.45));
            with two, each episode's goal is drawn at random and named in `task()`.
        goal_in_state: whether the goal position is part of the state; default: only when n_goals == 1.
        obstacle_radius: radius of the obstacle disk at the origin.
        max_speed: speed for an action of 1 (world units per second).
        dt: control period in seconds.
        start_noise: half-width of the uniform noise on the start and goal positions.
        collision_terminates: end the episode (without success) when the robot hits the obstacle;
            False keeps the robot on the obstacle's boundary and lets it slide on.
    """

    max_episode_steps = 100
    agent_radius = 0.05  # drawn size only; the robot is a point for collisions
    success_bonus = 10.0

    def __init__(
        self,
        num_envs: int = 1,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        n_goals: int = 1,
        goal_in_state: bool | None = None,
        obstacle_radius: float = 0.25,
        max_speed: float = 0.4,
        dt: float = 0.1,
        start_noise: float = 0.05,
        collision_terminates: bool = True,
    ):
        if n_goals not in (1, 2):
            raise ValueError(f"n_goals must be 1 or 2, got {n_goals}")
        if not 0 < obstacle_radius < 0.6:
            raise ValueError(f"obstacle_radius must be in (0, 0.6), got {obstacle_radius}")
        super().__init__(num_envs, device, seed)
        self.n_goals = n_goals
        self.goal_in_state = (n_goals == 1) if goal_in_state is None else bool(goal_in_state)
        self.state_dim = 4 if self.goal_in_state else 2
        self.action_dim = 2
        self.obstacle_radius = float(obstacle_radius)
        self.step_size = float(max_speed * dt)
        self.start_noise = float(start_noise)
        self.collision_terminates = bool(collision_terminates)
        centres = [[0.7, 0.0]] if n_goals == 1 else [[0.7, 0.45], [0.7, -0.45]]
        self.goal_centres = torch.tensor(centres, device=self.device)  # (g, 2)
        self.start_centre = torch.tensor([-0.7, 0.0], device=self.device)
        e = self.num_envs
        self.pos = torch.zeros(e, 2, device=self.device)
        self.goals = torch.zeros(e, n_goals, 2, device=self.device)  # every goal drawn in the image
        self.goal_index = torch.zeros(e, dtype=torch.long, device=self.device)
        self.reset()

    @property
    def goal(self) -> Tensor:
        """The episode's goal, (e, 2)."""
        return self.goals[torch.arange(self.num_envs, device=self.device), self.goal_index]

    def _reset(self, mask: Tensor) -> None:
        n = self.start_noise
        pos = self.start_centre + self._uniform(2, low=-n, high=n)  # (e, 2)
        goals = self.goal_centres + self._uniform(self.n_goals, 2, low=-n, high=n)  # (e, g, 2)
        index = self._randint(self.n_goals)  # (e,)
        self.pos = torch.where(mask[:, None], pos, self.pos)
        self.goals = torch.where(mask[:, None, None], goals, self.goals)
        self.goal_index = torch.where(mask, index, self.goal_index)

    def _project_out(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Push points inside the obstacle radially onto its boundary. (e, 2) -> (e, 2), hit (e,)."""
        dist = pos.norm(dim=-1, keepdim=True)  # (e, 1)
        hit = dist.squeeze(-1) < self.obstacle_radius
        left = torch.tensor([-1.0, 0.0], device=self.device)
        direction = torch.where(dist > 1e-9, pos / dist.clamp_min(1e-9), left)
        return torch.where(hit[:, None], direction * self.obstacle_radius, pos), hit

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """action (e, 2) -> reward (e,), terminated (e,) bool, info {is_success, collision} (e,) bool."""
        action = self._check_action(action)
        before = (self.goal - self.pos).norm(dim=-1)
        pos = (self.pos + action * self.step_size).clamp(-1.0, 1.0)
        self.pos, collision = self._project_out(pos)
        after = (self.goal - self.pos).norm(dim=-1)
        success = after < self.success_radius
        reward = (before - after) / self.step_size + self.success_bonus * success.float()
        terminated = success | (collision & self.collision_terminates)
        return reward, terminated, {"is_success": success, "collision": collision}

    def observation_state(self) -> Tensor:
        """(e, 4) [pos, goal], or (e, 2) [pos] when the goal is not in the state."""
        return torch.cat([self.pos, self.goal], dim=-1) if self.goal_in_state else self.pos.clone()

    def is_success(self) -> Tensor:
        """(e,) bool: within success_radius of the goal."""
        return (self.goal - self.pos).norm(dim=-1) < self.success_radius

    def task(self) -> list[str] | None:
        """'go to the red goal' / 'go to the blue goal' per environment when n_goals == 2."""
        if self.n_goals == 1:
            return None
        return [f"go to the {GOAL_NAMES[i]} goal" for i in self.goal_index.tolist()]

    def render(self, size: int = 64) -> Tensor:
        """(e, 3, size, size) float in [0, 1]: obstacle, goal(s), then the robot on top."""
        img = R.blank_canvas(self.num_envs, size, self.device)
        origin = torch.zeros(self.num_envs, 2, device=self.device)
        img = R.paint_disk(img, origin, self.obstacle_radius, R.OBSTACLE)
        for g in range(self.n_goals):
            colour = R.GOAL if self.n_goals == 1 else GOAL_COLOURS[g]
            img = R.paint_disk(img, self.goals[:, g], self.success_radius, colour)
        return R.paint_disk(img, self.pos, self.agent_radius, R.AGENT)


class PointObstacleExpert(ModalExpert):
    """Goes round the obstacle above (mode 0) or below (mode 1), then straight to the goal.

    While the straight line to the goal passes within `clearance` of the obstacle centre, it heads
    for the waypoint (0, +-waypoint_y) until x > -0.1, then circles the obstacle at `orbit_radius`
    on its mode's side; once the line is clear it heads for the goal. Always at full speed
    (saturated), slowing only on the last step. The two modes' actions are mirror images, so their
    mean points straight at the obstacle.

    Args:
        seed: seed for the per-episode mode draws.
        waypoint_y: height of the first waypoint above (mode 0) or below (mode 1) the obstacle.
        orbit_radius: radius of the detour circle round the obstacle centre.
        clearance: a straight line to the goal is taken once it stays this far from the centre.
        lookahead: radians ahead on the detour circle (keeps the robot moving round it).
    """

    def __init__(self, seed: int | None = None, waypoint_y: float = 0.45, orbit_radius: float = 0.42,
                 clearance: float = 0.3, lookahead: float = 0.3):
        super().__init__(seed)
        self.waypoint_y, self.orbit_radius = waypoint_y, orbit_radius
        self.clearance, self.lookahead = clearance, lookahead

    def act(self, core: PointObstacleCore, mode: Tensor) -> Tensor:
        """core state + mode (e,) {0 above, 1 below} -> action (e, 2)."""
        pos, goal = core.pos, core.goal
        centre = torch.zeros_like(pos)
        side = torch.where(mode == 0, -1.0, 1.0)  # from the left, above = clockwise
        clearance = max(self.clearance, core.obstacle_radius + 0.05)
        radius = max(self.orbit_radius, core.obstacle_radius + 0.15)
        blocked = segment_distance(pos, goal, centre) < clearance  # (e,)
        waypoint = torch.stack([torch.zeros_like(side), -side * max(self.waypoint_y, radius)], dim=-1)
        orbit = tangent_target(centre, pos, radius, side, self.lookahead)
        detour = torch.where((pos[:, 0] < -0.1)[:, None], waypoint, orbit)
        target = torch.where(blocked[:, None], detour, goal)
        return clip_norm((target - pos) / core.step_size)
