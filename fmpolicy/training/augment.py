"""Image augmentation for imitation training: random shifts (DrQ's, Kostrikov et al. 2020).

A policy trained on a few demonstrations from a fixed camera can learn the exact pixels of those
frames; moving each training image by a few pixels (the border repeated: a replicate pad of `pad`
pixels, then a random crop back to the original size) makes it read where things are relative to
one another rather than to the frame. Diffusion Policy and LeRobot's policies use the same idea
(random crops). Only imitation training shifts; evaluation, serving and RL see the images as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fmpolicy.config import IMAGES_PREFIX


def draw_shifts(n: int, pad: int, generator: torch.Generator) -> Tensor:
    """(n, 2) int64 offsets (dy, dx), each uniform in -pad .. pad, drawn on the CPU from `generator`."""
    return torch.randint(-pad, pad + 1, (n, 2), generator=generator)


def shift_images(images: Tensor, shifts: Tensor) -> Tensor:
    """(b, ..., c, H, W) images, (b, 2) offsets -> sample i moved by shifts[i] = (dy, dx):

    out[i, ..., y, x] = images[i, ..., clamp(y + dy, 0, H - 1), clamp(x + dx, 0, W - 1)], exactly a
    replicate pad followed by a crop, for any dtype (uint8 stays uint8). Every camera and time step of a
    sample moves alike."""
    if images.ndim < 4 or shifts.shape != (images.shape[0], 2):
        raise ValueError(f"shift_images: images (b, ..., c, H, W) and shifts (b, 2) expected, got "
                         f"{tuple(images.shape)} and {tuple(shifts.shape)}")
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    shifts = shifts.to(images.device)
    ys = (torch.arange(h, device=images.device)[None, :] + shifts[:, :1]).clamp(0, h - 1)  # (b, H)
    xs = (torch.arange(w, device=images.device)[None, :] + shifts[:, 1:]).clamp(0, w - 1)  # (b, W)
    flat = images.reshape(b, -1, h, w)  # (b, m, H, W): every channel / camera / time step of a sample
    rows = torch.gather(flat, 2, ys[:, None, :, None].expand(-1, flat.shape[1], -1, w))
    out = torch.gather(rows, 3, xs[:, None, None, :].expand(-1, flat.shape[1], h, -1))
    return out.reshape(images.shape)


def image_keys(batch: Mapping[str, Any]) -> list[str]:
    """The camera entries of a batch: `observation.images.<cam>` tensors (not their `_is_pad` flags)."""
    return [k for k, v in batch.items()
            if k.startswith(IMAGES_PREFIX) and not k.endswith("_is_pad") and isinstance(v, Tensor)]


def shift_batch(batch: Mapping[str, Any], shifts: Tensor) -> dict[str, Any]:
    """A copy of `batch` with every camera image shifted by its sample's (dy, dx)."""
    cameras = set(image_keys(batch))
    return {k: shift_images(v, shifts) if k in cameras else v for k, v in batch.items()}
