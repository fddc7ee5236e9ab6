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


def test_disk_and_ring_follow_the_distance_field():
    """paint_disk / paint_ring equal the blend of the plain distance field (pixel centre to centre), in
    float64 where the per-axis form and the norm agree to rounding; colours exact inside, untouched far away."""
    gen = torch.Generator().manual_seed(0)
    size = 40
    centre = (torch.rand(6, 2, generator=gen, dtype=torch.float64) * 2.4 - 1.2)  # some partly off the image
    radius = torch.rand(6, generator=gen, dtype=torch.float64) * 0.5 + 0.05
    base = torch.rand(6, 3, size, size, generator=gen, dtype=torch.float64)
    c = (torch.arange(size, dtype=torch.float64) * 2 + 1) / size - 1  # pixel centres, as pixel_grid's
    grid = torch.stack(torch.meshgrid(c, -c, indexing="xy"), dim=-1)  # (N, N, 2): row i has y = -c[i]
    torch.testing.assert_close(grid.float(), R.pixel_grid(size))
    dist = (grid.unsqueeze(0) - centre[:, None, None, :]).norm(dim=-1)  # (e, N, N)
    pixel = 2.0 / size
    col = torch.tensor(R.RED, dtype=torch.float64).view(1, 3, 1, 1)

    def expected(signed):
        alpha = (0.5 - signed / pixel).clamp(0, 1).unsqueeze(1)
        return base * (1 - alpha) + col * alpha

    disk = R.paint_disk(base, centre, radius, R.RED)
    torch.testing.assert_close(disk, expected(dist - radius.view(-1, 1, 1)), rtol=0, atol=1e-12)
    ring = R.paint_ring(base, centre, 0.3, 0.05, R.RED)
    torch.testing.assert_close(ring, expected((dist - 0.3).abs() - 0.025), rtol=0, atol=1e-12)
    inside = (dist < radius.view(-1, 1, 1) - pixel).unsqueeze(1).expand_as(disk)
    outside = (dist > radius.view(-1, 1, 1) + pixel).unsqueeze(1).expand_as(disk)
    assert inside.any() and outside.any()
    assert torch.equal(disk[inside], col.expand_as(disk)[inside])  # exactly the colour
    assert torch.equal(disk[outside], base[outside])  # exactly what was there
    # a float32 image keeps its dtype whatever the centres' (a core may hold float64 positions)
    img32 = R.paint_disk(base.float(), centre, radius, R.RED)
    assert img32.dtype == torch.float32
    torch.testing.assert_close(img32, disk.float(), rtol=0, atol=1e-6)


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
