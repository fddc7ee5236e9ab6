"""Checks that turn a batch's camera images and instructions into model inputs, with clear errors.

Rules (documented in docs/encoders.md):
- `observation.images.<cam>`: (b, 3, H, W) with H = W = `image_size`; other sizes are an error unless
  `resize_images` (then they are resized, bilinear and antialiased). float images must
  lie in [0, 1]; uint8 images are taken as [0, 255] and divided by 255; other dtypes are an error.
- A configured camera missing from the batch, or flagged by `observation.images.<cam>_is_pad` (b,)
  bool, is masked out: its tokens get mask False. An image key in the batch that the config does not
  name is an error (a typo would otherwise silently mask a camera).
- `task`: a list (or tuple) of b strings. With `require_task`, a missing key or an empty / blank
  instruction is an error; otherwise missing instructions read as "".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fmpolicy.encoders.config import IMAGES_PREFIX
from fmpolicy.errors import InputError

TASK = "task"
PAD_SUFFIX = "_is_pad"


def batch_size_of(batch: Mapping[str, Any], cameras: tuple[str, ...]) -> int:
    """b from the first configured camera present as a 4-d array, else from `task`."""
    if not isinstance(batch, Mapping):
        raise InputError(f"a batch must be a mapping of keys to arrays, got {type(batch).__name__}")
    for cam in cameras:
        if cam in batch and len(getattr(batch[cam], "shape", ())) == 4:
            return int(batch[cam].shape[0])
    if isinstance(batch.get(TASK), (list, tuple)):
        return len(batch[TASK])
    raise InputError(f"cannot tell the batch size: none of the cameras {list(cameras)} and no {TASK!r} list "
                     f"is in the batch (it has {sorted(map(str, batch))})")


def check_camera_keys(batch: Mapping[str, Any], cameras: tuple[str, ...]) -> None:
    """Every `observation.images.*` key of the batch must be a configured camera (or its `_is_pad` flag)."""
    for key in batch:
        if not (isinstance(key, str) and key.startswith(IMAGES_PREFIX)):
            continue
        cam = key[: -len(PAD_SUFFIX)] if key.endswith(PAD_SUFFIX) else key
        if cam not in cameras:
            raise InputError(f"the batch has the image key {key!r}, but the encoder's cameras are {list(cameras)}: "
                             "add it to EncoderConfig.cameras or drop it from the batch")


def read_image(value: Any, key: str, batch_size: int, device: torch.device) -> Tensor:
    """One camera's images -> float32 (b, 3, H, W) in [0, 1]."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise InputError(f"{key!r} has type {type(value).__name__}: expected a torch.Tensor (b, 3, H, W)")
    if value.dim() != 4:
        raise InputError(f"{key!r} has shape {tuple(value.shape)}: expected (b, 3, H, W), a batch of RGB images "
                         "channels first")
    if value.shape[0] != batch_size or value.shape[1] != 3:
        hint = " (channels last? use x.permute(0, 3, 1, 2))" if value.dim() == 4 and value.shape[-1] == 3 else ""
        raise InputError(f"{key!r} has shape {tuple(value.shape)}: expected ({batch_size}, 3, H, W), "
                         f"RGB images channels first{hint}")
    if value.dtype == torch.uint8:
        return value.to(device=device, dtype=torch.float32) / 255.0
    if not value.is_floating_point():
        raise InputError(f"{key!r} has dtype {value.dtype}: expected float in [0, 1] (or uint8 in [0, 255])")
    x = value.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{key!r} contains NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"{key!r} has values in [{lo:.4g}, {hi:.4g}]: expected float images in [0, 1] "
                         "(divide 0..255 images by 255, or pass them as uint8)")
    return x


def read_pad_flag(batch: Mapping[str, Any], key: str, batch_size: int, device: torch.device) -> Tensor | None:
    """Optional per-sample `<cam>_is_pad` (b,) bool."""
    flag_key = key + PAD_SUFFIX
    if flag_key not in batch:
        return None
    flag = torch.as_tensor(batch[flag_key], device=device)
    if flag.shape != (batch_size,):
        raise InputError(f"{flag_key!r} has shape {tuple(flag.shape)}: expected ({batch_size},) bool")
    return flag.bool()


def preprocess_images(batch: Mapping[str, Any], cameras: tuple[str, ...], image_size: int,
                      mean: tuple[float, ...], std: tuple[float, ...],
                      device: torch.device, resize: bool = False) -> tuple[Tensor, Tensor, int]:
    """-> pixels (b, k, 3, S, S) normalized (zeros for absent cameras), present (b, k) bool, b."""
    b = batch_size_of(batch, cameras)
    check_camera_keys(batch, cameras)
    k, s = len(cameras), image_size
    pixels = torch.zeros(b, k, 3, s, s, device=device)
    present = torch.zeros(b, k, dtype=torch.bool, device=device)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=device).view(1, 3, 1, 1)
    for i, cam in enumerate(cameras):
        if cam not in batch:
            continue
        x = read_image(batch[cam], cam, b, device)
        if x.shape[-2:] != (s, s):
            if not resize:
                raise InputError(f"{cam!r} has images of {x.shape[-2]} x {x.shape[-1]} pixels: expected {s} x {s} "
                                 "(EncoderConfig.image_size); render at that size, or set "
                                 "EncoderConfig.resize_images=True to resize them")
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        pixels[:, i] = (x - m) / sd
        flag = read_pad_flag(batch, cam, b, device)
        present[:, i] = True if flag is None else ~flag
    return pixels, present, b


def read_tasks(batch: Mapping[str, Any], batch_size: int, require_task: bool) -> list[str]:
    """`task`: b instructions. Missing / empty ones are an error under `require_task`, else ""."""
    if TASK not in batch:
        if require_task:
            raise InputError(f"the batch is missing the key {TASK!r} (a list of {batch_size} instructions): "
                             "this encoder has require_task=True")
        return [""] * batch_size
    tasks = batch[TASK]
    if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)):
        raise InputError(f"{TASK!r} has type {type(tasks).__name__}: expected a list of {batch_size} strings")
    if len(tasks) != batch_size:
        raise InputError(f"{TASK!r} has {len(tasks)} instructions: expected {batch_size}, one per sample")
    for i, t in enumerate(tasks):
        if not isinstance(t, str):
            raise InputError(f"{TASK!r}[{i}] has type {type(t).__name__}: expected a string")
        if require_task and not t.strip():
            raise InputError(f"{TASK!r}[{i}] is empty: this encoder has require_task=True")
    return list(tasks)
