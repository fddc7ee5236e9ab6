"""The scripted experts: success rate, multimodality, and why averaging the modes fails."""

from __future__ import annotations

import math

import pytest
import torch

import fmpolicy_envs as fe
from fmpolicy_envs.core_base import wrap_angle

N = 200  # environments per measurement


def first_episode_success(vec_env, expert) -> torch.Tensor:
    """Run the expert until every environment has ended one episode; its success, (e,) bool."""
    vec_env.reset(seed=0)
    recorded = torch.zeros(vec_env.num_envs, dtype=torch.bool)
    success = torch.zeros(vec_env.num_envs, dtype=torch.bool)
    for _ in range(vec_env.max_episode_steps):
        _, _, _, _, info = vec_env.step(expert(vec_env.core))
        new = info["_final_info"] & ~recorded
        success |= new & info["final_info"]["is_success"]
        recorded |= new
    assert recorded.all()  # truncation ends every episode by max_episode_steps
    return success


@pytest.mark.parametrize(
    "vec_cls, kwargs",
    [
        (fe.PointObstacleVectorEnv, {}),
        (fe.PointObstacleVectorEnv, {"n_goals": 2}),
        (fe.ArmReachVectorEnv, {"n_links": 2}),
        (fe.ArmReachVectorEnv, {"n_links": 3}),
        (fe.ArmReachVectorEnv, {"n_links": 4}),
        (fe.PushVectorEnv, {}),
    ],
)
def test_expert_success_rate(vec_cls, kwargs):
    env = vec_cls(num_envs=N, seed=0, **kwargs)
    expert = fe.make_expert(next(k for k, v in fe.TASKS.items() if v[1] is vec_cls), seed=1)
    rate = first_episode_success(env, expert).float().mean().item()
    assert rate >= 0.98, f"{vec_cls.__name__}{kwargs}: expert success {rate:.3f}"


def check_bimodal(behaviour_up: torch.Tensor, mode: torch.Tensor):
    """Both observed behaviours occur 35-65% of the time, and each matches the drawn mode."""
    frac = behaviour_up.float().mean().item()
    assert 0.35 <= frac <= 0.65, f"mode fraction {frac:.3f}"
    agreement = (behaviour_up == (mode == 0)).float().mean().item()
    assert agreement >= 0.98, f"behaviour follows the drawn mode only {agreement:.3f} of the time"


@pytest.mark.parametrize("n_goals", [1, 2])
def test_point_expert_goes_above_or_below(n_goals):
    core = fe.PointObstacleCore(N, seed=0, n_goals=n_goals)
    expert = fe.PointObstacleExpert(seed=1)
    crossing_y = torch.zeros(N)
    for _ in range(60):
        before = core.pos.clone()
        _, _, info = core.step(expert(core))
        assert not info["collision"].any()
        crossed = (before[:, 0] < 0) & (core.pos[:, 0] >= 0) & (crossing_y == 0)
        crossing_y = torch.where(crossed, core.pos[:, 1], crossing_y)
    assert (crossing_y.abs() > core.obstacle_radius).all()  # everyone crossed x = 0 clear of it
    check_bimodal(crossing_y > 0, expert.mode)


@pytest.mark.parametrize("n_links", [2, 3, 4])
def test_arm_expert_bends_either_way(n_links):
    core = fe.ArmReachCore(N, seed=0, n_links=n_links)
    expert = fe.ArmReachExpert(seed=1)
    bend = torch.zeros(N)
    for _ in range(60):
        _, terminated, _ = core.step(expert(core))
        bend = torch.where(terminated & (bend == 0), core.q[:, 1:].sum(-1), bend)
    assert (bend != 0).all()
    check_bimodal(bend > 0, expert.mode)


def test_push_expert_goes_round_either_way():
    core = fe.PushCore(N, seed=0)
    expert = fe.PushExpert(seed=1)

    def angle():
        rel = core.pusher - core.object
        return torch.atan2(rel[:, 1], rel[:, 0])

    swept = torch.zeros(N)
    for _ in range(15):  # the detour round the object takes longer than this
        start = angle()
        core.step(expert(core))
        swept += wrap_angle(angle() - start)
    assert (swept.abs() > math.pi / 4).all()
    check_bimodal(swept > 0, expert.mode)


def test_expert_keeps_mode_within_an_episode_and_redraws_after():
    env = fe.PointObstacleVectorEnv(num_envs=N, seed=0, max_episode_steps=20)
    expert = fe.PointObstacleExpert(seed=1)
    env.reset(seed=0)
    expert(env.core)
    first = expert.mode.clone()
    for step in range(20):
        _, _, _, truncated, _ = env.step(expert(env.core))
        if step < 19:
            assert torch.equal(expert.mode, first)
    assert truncated.all()
    expert(env.core)
    second = expert.mode.clone()  # modes for the new episodes
    changed = (second != first).float().mean().item()
    assert 0.3 <= changed <= 0.7  # an independent redraw flips about half of them


def test_mean_of_point_modes_hits_the_obstacle():
    """Regression to the mean: averaging the up and down actions drives straight into the obstacle."""
    core = fe.PointObstacleCore(N, seed=0)
    expert = fe.PointObstacleExpert()
    up, down = torch.zeros(N, dtype=torch.long), torch.ones(N, dtype=torch.long)
    hit = torch.zeros(N, dtype=torch.bool)
    success = torch.zeros(N, dtype=torch.bool)
    for _ in range(60):  # the expert itself needs at most ~50 steps
        action = 0.5 * (expert.act(core, up) + expert.act(core, down))
        _, terminated, info = core.step(action)
        hit |= info["collision"]
        success |= info["is_success"]
    assert hit.float().mean().item() >= 0.95
    assert success.float().mean().item() <= 0.05  # stuck sliding on the obstacle


def test_a_crash_ends_the_episode_as_a_failure_unless_disabled():
    for terminates in (True, False):
        core = fe.PointObstacleCore(N, seed=0, collision_terminates=terminates)
        core.pos = torch.tensor([[-0.27, 0.0]]).expand(N, 2).clone()
        _, terminated, info = core.step(torch.tensor([[1.0, 0.0]]).expand(N, 2))  # straight into the disk
        assert info["collision"].all() and not info["is_success"].any()
        assert bool(terminated.all()) == terminates


def test_mean_of_up_and_down_trajectories_hits_the_obstacle():
    """Average the recorded action sequences of an up and a down demonstration from the same start."""
    def demo(mode):
        core = fe.PointObstacleCore(N, seed=0)
        expert = fe.PointObstacleExpert()
        actions = []
        for _ in range(50):
            actions.append(expert.act(core, torch.full((N,), mode)))
            core.step(actions[-1])
        return torch.stack(actions)  # (n, e, 2)

    mean_actions = 0.5 * (demo(0) + demo(1))
    core = fe.PointObstacleCore(N, seed=0)
    hit = torch.zeros(N, dtype=torch.bool)
    for action in mean_actions:
        hit |= core.step(action)[2]["collision"]
    assert hit.float().mean().item() >= 0.95


def test_mean_of_arm_modes_misses_the_target():
    core = fe.ArmReachCore(N, seed=0, n_links=2)
    expert = fe.ArmReachExpert()
    up, down = torch.zeros(N, dtype=torch.long), torch.ones(N, dtype=torch.long)
    success = torch.zeros(N, dtype=torch.bool)
    for _ in range(40):  # the expert itself needs at most 32 steps
        _, terminated, _ = core.step(0.5 * (expert.act(core, up) + expert.act(core, down)))
        success |= terminated
    assert success.float().mean().item() <= 0.1


def test_push_needs_closed_loop_control():
    """Replaying the expert's recorded actions open loop fails once the object starts 3 cm off."""
    core = fe.PushCore(N, seed=3)
    expert = fe.PushExpert(seed=4)
    actions = []
    for _ in range(core.max_episode_steps):
        actions.append(expert(core))
        core.step(actions[-1])

    def perturbed():
        c = fe.PushCore(N, seed=3)
        g = torch.Generator().manual_seed(9)
        angle = torch.rand(N, generator=g) * 2 * math.pi
        c.object = c.object + 0.03 * torch.stack([angle.cos(), angle.sin()], dim=-1)
        return c

    def run(c, policy):
        success = torch.zeros(N, dtype=torch.bool)
        for t in range(c.max_episode_steps):
            _, terminated, _ = c.step(policy(c, t))
            success |= terminated
        return success.float().mean().item()

    open_loop = run(perturbed(), lambda c, t: actions[t])
    closed_loop = run(perturbed(), lambda c, t: fe.PushExpert(seed=4).act(c, expert.mode))
    assert closed_loop >= 0.98
    assert open_loop <= 0.5
