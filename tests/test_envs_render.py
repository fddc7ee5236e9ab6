"""The batched torch renderer: shapes, range, and shapes drawn where the state says."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import fmpolicy_envs as fe
from fmpolicy_envs import IMAGE_KEY, render as R

SIZE = 96


def colour_mask(img: torch.Tensor, colour, tol: float = 0.02) -> torch.Tensor:
    """Pixels of exactly this colour. img (e, 3, N, N) -> (e, N, N) bool."""
    col = torch.tensor(colour).view(1, 3, 1, 1)
    return ((img - col).abs() < tol).all(dim=1)


def centroid(mask: torch.Tensor) -> torch.Tensor:
    """World (x, y) centroid of each image's True pixels. (e, N, N) -> (e, 2)."""
    grid = R.pixel_grid(mask.shape[-1])  # (N, N, 2)
    w = mask.float().unsqueeze(-1)
    return (w * grid).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp_min(1)


def agent_position(core) -> torch.Tensor:
    if isinstance(core, fe.PointObstacleCore):
        return core.pos
    if isinstance(core, fe.ArmReachCore):
        return core.end_effector()
    return core.pusher


CORES = [
    lambda: fe.PointObstacleCore(32, seed=0),
    lambda: fe.PointObstacleCore(32, seed=0, n_goals=2),
    lambda: fe.ArmReachCore(32, seed=0, n_links=3),
    lambda: fe.PushCore(32, seed=0),
]


@pytest.mark.parametrize("make_core", CORES)
def test_render_shape_range_and_agent_location(make_core):
    core = make_core()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # a few random states, not only the start
        img = core.render(SIZE)
        assert img.shape == (32, 3, SIZE, SIZE) and img.dtype == torch.float32
        assert img.min() >= 0 and img.max() <= 1
        agent = colour_mask(img, R.AGENT)
        assert (agent.sum(dim=(1, 2)) >= 4).all()  # a disk of several pixels per image
        # the agent's colour is centred on the agent (within about two pixels)
        err = (centroid(agent) - agent_position(core)).norm(dim=-1)
        assert (err < 2 * 2 / SIZE).all(), err.max()
        # and the pixel under the agent's centre has its colour
        rc = R.world_to_pixel(agent_position(core), SIZE)
        centre = img[torch.arange(32), :, rc[:, 0], rc[:, 1]]  # (e, 3)
        assert torch.allclose(centre, torch.tensor(R.AGENT).expand(32, 3), atol=0.02)
        core.step(torch.rand(32, core.action_dim, generator=gen) * 2 - 1)


def test_point_render_shows_obstacle_and_both_goals():
    core = fe.PointObstacleCore(8, seed=0, n_goals=2)
    img = core.render(SIZE)
    for colour, goal in [(R.RED, core.goals[:, 0]), (R.BLUE, core.goals[:, 1])]:
        err = (centroid(colour_mask(img, colour)) - goal).norm(dim=-1)
        assert (err < 2 * 2 / SIZE).all()
    obstacle = colour_mask(img, R.OBSTACLE).sum(dim=(1, 2)).float()
    expected = np.pi * core.obstacle_radius**2 / (2 / SIZE) ** 2  # disk area in pixels
    assert ((obstacle - expected).abs() < 0.15 * expected).all()


def test_arm_render_draws_every_link():
    core = fe.ArmReachCore(4, seed=0, n_links=4)
    img = core.render(SIZE)
    link = colour_mask(img, R.LINK)
    joints = torch.cat([torch.zeros(4, 1, 2), core.joints()], dim=1)  # (e, n+1, 2)
    midpoints = (joints[:, :-1] + joints[:, 1:]) / 2  # (e, n, 2)
    for i in range(core.n_links):
        rc = R.world_to_pixel(midpoints[:, i], SIZE)
        assert link[torch.arange(4), rc[:, 0], rc[:, 1]].all()


def test_disk_outside_is_background():
    img = R.blank_canvas(1, SIZE)
    img = R.paint_disk(img, torch.tensor([[0.5, -0.5]]), 0.1, R.RED)
    red = colour_mask(img, R.RED)[0]
    rc = R.world_to_pixel(torch.tensor([0.5, -0.5]), SIZE)
    assert red[rc[0], rc[1]]
    assert red.sum() < np.pi * 0.1**2 / (2 / SIZE) ** 2 * 1.3
    assert colour_mask(img, R.BACKGROUND)[0, 0, 0]  # top-left corner untouched
    assert rc[0] > SIZE // 2 and rc[1] > SIZE // 2  # y = -0.5 is in the lower half (row 0 = top)


@pytest.mark.parametrize("env_id", ["fmpolicy/PointObstacle-v0", "fmpolicy/ArmReach-v0", "fmpolicy/Push-v0"])
def test_gym_env_image_obs_and_rgb_array(env_id):
    env = gym.make(env_id, image_size=32, render_mode="rgb_array", render_size=96)
    obs, _ = env.reset(seed=0)
    image = obs[IMAGE_KEY]
    assert image.shape == (3, 32, 32) and image.dtype == np.float32
    np.testing.assert_allclose(image, env.unwrapped.core.render(32)[0].numpy())
    frame = env.render()
    assert frame.shape == (96, 96, 3) and frame.dtype == np.uint8
    orange = np.all(np.abs(frame.astype(np.float32) / 255 - np.array(R.AGENT)) < 0.02, axis=-1)
    assert orange.sum() >= 4


def test_vector_env_render_frames():
    env = fe.PushVectorEnv(num_envs=5, seed=0, render_mode="rgb_array", render_size=40)
    env.reset(seed=0)
    frames = env.render()
    assert frames.shape == (5, 40, 40, 3) and frames.dtype == torch.uint8
