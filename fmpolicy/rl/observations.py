"""Observations in the RL loop: what an env step gives, what the rollout buffer keeps, how it is sliced.

An RL observation is a dict: tensors with the batch on axis 0 (`observation.state`, camera images,
`encoder_features`: a dict of such tensors), and the instruction `task` as a list of strings (one per
env), read from `info["task"]` where the env names its goal in words (our multi-goal tasks do; so does
any env that puts the instruction there). Every function here treats all three kinds alike, so that an
instruction travels with its observation through rollouts, buffers, minibatches, checkpoints and
evaluation.

Images: an env renders float images in [0, 1]; `from_env(..., uint8_images=True)` rounds them to uint8
(what a camera gives, and 4x smaller in the buffer). The policy then reads the same uint8 image at
rollout and at update time, so the ratio before the first update stays exactly 1 (the encoders divide
uint8 by 255).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fmpolicy.batch import IMAGES_PREFIX, STATE, TASK

Obs = dict[str, Any]


def _tasks(info: Any, e: int) -> list[str] | None:
    if not isinstance(info, Mapping) or TASK not in info:
        return None
    tasks = [str(x) for x in list(info[TASK])]
    if len(tasks) != e:
        raise ValueError(f"info['task'] holds {len(tasks)} instructions for {e} environments")
    return tasks


def from_env(obs: Mapping[str, Any], info: Any, device: torch.device, uint8_images: bool = False) -> Obs:
    """An env's observation (dict of (e, ...) tensors) with the instruction of `info["task"]`, on `device`."""
    out: Obs = {}
    for k, v in obs.items():
        v = torch.as_tensor(v).to(device)
        if uint8_images and k.startswith(IMAGES_PREFIX) and v.is_floating_point():
            v = (v.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        out[k] = v
    tasks = _tasks(info, out[STATE].shape[0])
    if tasks is not None:
        out[TASK] = tasks
    return out


def final_from_env(final_obs: Mapping[str, Any], info: Any, previous: Obs, ended: Tensor, device: torch.device,
                   uint8_images: bool = False) -> Obs:
    """The observation each env reached at the end of its episode (where `ended`), else `previous`'s,
    with the ended episode's instruction (`info["final_info"]["task"]`)."""
    reached = from_env(final_obs, None, device, uint8_images)
    out: Obs = {}
    for k, v in previous.items():
        if k == TASK:
            final_tasks = _tasks(info.get("final_info", {}) if isinstance(info, Mapping) else None, len(v))
            if final_tasks is None:
                out[k] = list(v)
            else:
                out[k] = [f if x else p for p, f, x in zip(v, final_tasks, ended.tolist())]
            continue
        r = reached[k]
        out[k] = torch.where(ended.to(r.device).view(-1, *[1] * (r.dim() - 1)), r, v)
    return out


def where(cond: Tensor, a: Obs, b: Obs) -> Obs:
    """Row i of `a` where `cond[i]`, else of `b` (two observations of the same e envs, the same keys)."""
    out: Obs = {}
    for k, v in a.items():
        if isinstance(v, Tensor):
            out[k] = torch.where(cond.to(v.device).view(-1, *[1] * (v.dim() - 1)), v, b[k])
        elif isinstance(v, Mapping):
            out[k] = where(cond, v, b[k])
        else:
            out[k] = [x if c else y for x, y, c in zip(v, b[k], cond.tolist())]
    return out


def stack(items: Sequence[Obs]) -> Obs:
    """n observations of e envs -> one of (n * e) rows, step-major (row i * e + j: step i, env j)."""
    first = items[0]
    out: Obs = {}
    for k, v in first.items():
        if isinstance(v, Tensor):
            out[k] = torch.cat([o[k] for o in items])
        elif isinstance(v, Mapping):
            out[k] = stack([o[k] for o in items])
        else:
            out[k] = [x for o in items for x in o[k]]
    return out


def take(obs: Obs, idx: Tensor) -> Obs:
    """Rows `idx` (1-d long tensor) of every entry."""
    out: Obs = {}
    rows: list[int] | None = None
    for k, v in obs.items():
        if isinstance(v, Tensor):
            out[k] = v[idx.to(v.device)]
        elif isinstance(v, Mapping):
            out[k] = take(v, idx)
        else:
            rows = idx.tolist() if rows is None else rows
            out[k] = [v[i] for i in rows]
    return out


def to_device(obs: Obs, device: torch.device) -> Obs:
    return {k: v.to(device) if isinstance(v, Tensor) else to_device(v, device) if isinstance(v, Mapping) else v
            for k, v in obs.items()}

