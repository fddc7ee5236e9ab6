"""Batched pure-torch renderer: filled disks and thick segments painted by distance fields.

The world is the square [-1, 1]^2, seen from above. Pixel (row i, column j) of a size-N image has
its centre at x = -1 + (2j + 1) / N, y = 1 - (2i + 1) / N, so row 0 is the top (y = +1).
Edges are anti-aliased over one pixel, so a shape's colour is exact at its centre.
No torchvision: it does not load with the CPU torch build here (see DESIGN.md).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Palette (RGB in [0, 1]). The agent colour is the one tests look for at the agent's position.
BACKGROUND = (1.0, 1.0, 1.0)
AGENT = (0.95, 0.55, 0.05)  # orange: point robot, arm end effector, pusher
GOAL = (0.15, 0.75, 0.25)  # green: the goal of a single-goal task
RED = (0.9, 0.1, 0.1)
BLUE = (0.1, 0.25, 0.9)
OBSTACLE = (0.35, 0.35, 0.35)
LINK = (0.25, 0.35, 0.75)
JOINT = (0.1, 0.1, 0.1)
OBJECT = (0.6, 0.2, 0.7)


def _pixel_centres(size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """(size,): the x of column j's centre, c[j] = -1 + (2j + 1) / size; row i's centre has y = -c[i]."""
    return (torch.arange(size, device=device, dtype=dtype) * 2 + 1) / size - 1


def pixel_grid(size: int, device: torch.device | str = "cpu") -> Tensor:
    """World coordinates of the pixel centres. Returns (size, size, 2) as (x, y)."""
    c = _pixel_centres(size, device)  # (size,)
    y, x = torch.meshgrid(-c, c, indexing="ij")  # row i -> y decreasing, column j -> x increasing
    return torch.stack([x, y], dim=-1)


def blank_canvas(num_envs: int, size: int, device: torch.device | str = "cpu") -> Tensor:
    """A background-filled batch of images, (e, 3, size, size)."""
    colour = torch.tensor(BACKGROUND, device=device, dtype=torch.float32)
    return colour.view(1, 3, 1, 1).expand(num_envs, 3, size, size).clone()


def _blend(img: Tensor, signed_dist: Tensor, colour: tuple[float, float, float]) -> Tensor:
    """Paint `colour` where signed_dist < 0 (inside), anti-aliased over one pixel.

    img (e, 3, N, N); signed_dist (e, N, N) in world units. Returns (e, 3, N, N): `img` where alpha
    is 0, `colour` exactly where it is 1 (torch.lerp, one pass over the image).
    """
    pixel = 2.0 / img.shape[-1]
    alpha = (0.5 - signed_dist / pixel).clamp(0.0, 1.0).unsqueeze(1).to(img.dtype)  # (e, 1, N, N)
    col = torch.tensor(colour, device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    return torch.lerp(img, col.expand_as(img), alpha)


def _disk_distance(size: int, centre: Tensor) -> Tensor:
    """Distance of every pixel centre to each env's point, (e, size, size), from per-axis offsets.

    Equal to `(pixel_grid(size) - centre).norm(dim=-1)` up to float32 rounding, without building the
    (e, N, N, 2) offsets: the env loops render every step, and this was most of their time.
    """
    c = _pixel_centres(size, centre.device, centre.dtype)  # (N,)
    dx = c[None, :] - centre[:, 0:1]  # (e, N): column j has x = c[j]
    dy = -c[None, :] - centre[:, 1:2]  # (e, N): row i has y = -c[i]
    return (dy.square()[:, :, None] + dx.square()[:, None, :]).sqrt()


def paint_disk(img: Tensor, centre: Tensor, radius: float | Tensor, colour) -> Tensor:
    """Filled disk per environment. img (e, 3, N, N); centre (e, 2); radius float or (e,)."""
    dist = _disk_distance(img.shape[-1], centre)  # (e, N, N)
    if isinstance(radius, Tensor):
        radius = radius.view(-1, 1, 1)
    return _blend(img, dist - radius, colour)


def paint_ring(img: Tensor, centre: Tensor, radius: float, width: float, colour) -> Tensor:
    """Circle outline of the given line width. img (e, 3, N, N); centre (e, 2)."""
    dist = _disk_distance(img.shape[-1], centre)  # (e, N, N)
    return _blend(img, (dist - radius).abs() - width / 2, colour)


def paint_segment(img: Tensor, a: Tensor, b: Tensor, width: float, colour) -> Tensor:
    """Thick segment with round caps from a to b. img (e, 3, N, N); a, b (e, 2)."""
    grid = pixel_grid(img.shape[-1], img.device).unsqueeze(0)  # (1, N, N, 2)
    ab = (b - a)[:, None, None, :]  # (e, 1, 1, 2)
    ap = grid - a[:, None, None, :]  # (e, N, N, 2)
    t = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)).clamp(0.0, 1.0)  # (e, N, N)
    dist = (ap - t.unsqueeze(-1) * ab).norm(dim=-1)  # (e, N, N)
    return _blend(img, dist - width / 2, colour)


def world_to_pixel(xy: Tensor, size: int) -> Tensor:
    """Integer (row, column) of the pixel containing each point. xy (..., 2) -> (..., 2) long."""
    col = ((xy[..., 0] + 1) * size / 2).floor().long().clamp(0, size - 1)
    row = ((1 - xy[..., 1]) * size / 2).floor().long().clamp(0, size - 1)
    return torch.stack([row, col], dim=-1)


def to_uint8_hwc(img: Tensor) -> np.ndarray:
    """One image (3, H, W) float in [0, 1] -> numpy (H, W, 3) uint8, as gymnasium's rgb_array."""
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
