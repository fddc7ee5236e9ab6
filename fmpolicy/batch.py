"""Data keys (LeRobot's names) and the checks that turn a user's batch into validated tensors.

Errors name the key, the value's shape or content, and what was expected, so that a wrong input
never surfaces as a bare shape mismatch deep inside torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fmpolicy.config import IMAGES_PREFIX  # noqa: F401  (a data key, defined once with the configs)
from fmpolicy.errors import InputError

STATE = "observation.state"
PREFIX = "observation.prefix"
PREFIX_MASK = "observation.prefix_mask"
ACTION = "action"
ACTION_IS_PAD = "action_is_pad"
TASK = "task"
ENCODER_FEATURES = "encoder_features"  # a frozen encoder backbone's cached outputs (dict of tensors)


def as_tensor(value: Any, key: str, device: torch.device, dtype: torch.dtype | None = torch.float32) -> Tensor:
    """A tensor on `device` from a tensor, numpy array or nested list; `key` names it in errors."""
    if isinstance(value, Tensor):
        t = value
    elif isinstance(value, (np.ndarray, np.generic, list, tuple, float, int)):
        try:
            array = np.asarray(value)
        except ValueError as e:  # nested lists of unequal lengths
            raise InputError(f"{key!r} is not a rectangular array ({e}): expected a numeric array") from None
        if array.dtype.kind not in "biuf":  # object, string, complex, datetime ...
            raise InputError(f"{key!r} has dtype {array.dtype}: expected a numeric array (float, int or bool)")
        t = torch.as_tensor(array)
    else:
        raise InputError(f"{key!r} has type {type(value).__name__}: expected a torch.Tensor or numpy array")
    if dtype is not None and t.dtype != dtype:
        if dtype.is_floating_point and not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.uint8)):
            raise InputError(f"{key!r} has dtype {t.dtype}: expected a real-valued array")
        t = t.to(dtype)
    return t.to(device)


def require(batch: Mapping[str, Any], key: str) -> Any:
    if not isinstance(batch, Mapping):
        raise InputError(f"a batch must be a mapping of keys to arrays, got {type(batch).__name__}")
    if key not in batch:
        raise InputError(f"the batch is missing the key {key!r}: it has {sorted(map(str, batch))}")
    return batch[key]


def check_finite(t: Tensor, key: str, where: Tensor | None = None) -> None:
    """NaN or inf in an observation or action is an input error, reported with a location."""
    bad = ~torch.isfinite(t)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise InputError(f"{key!r} contains NaN or inf ({int(bad.sum())} entries, first at index {first})")


def check_shape(t: Tensor, key: str, expected: tuple[int | str | None, ...], names: str) -> None:
    """Check rank and the fixed sizes in `expected` (None or a letter = any size). `names` labels the axes."""
    if t.dim() != len(expected) or any(isinstance(e, int) and s != e for s, e in zip(t.shape, expected)):
        want = ", ".join(str(e) if isinstance(e, int) else n for e, n in zip(expected, names.split()))
        raise InputError(f"{key!r} has shape {tuple(t.shape)}: expected ({want})")


def check_tensor(t: Any, key: str, expected: tuple[int | str | None, ...], names: str,
                 dtype: torch.dtype = torch.float32) -> None:
    """A caller-made tensor argument (noise, t): a torch.Tensor of `dtype` and shape `expected`."""
    if not isinstance(t, Tensor):
        raise InputError(f"{key!r} has type {type(t).__name__}: expected a torch.Tensor of dtype {dtype}")
    check_shape(t, key, expected, names)
    if t.dtype != dtype:
        raise InputError(f"{key!r} has dtype {t.dtype}: expected {dtype}, the policy's dtype")


def read_noise(noise: Any, expected: tuple[int, ...], names: str, device: torch.device,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Caller-given flow noise: `dtype`, exactly `expected` (padded network units), finite. -> on `device`"""
    check_tensor(noise, "noise", expected, names, dtype)
    check_finite(noise, "noise")
    return noise.to(device)


def read_time(t: Any, expected: tuple[int, ...], names: str, device: torch.device,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """Caller-given flow times: `dtype`, shape `expected`, every value in [0, 1]. -> on `device`"""
    check_tensor(t, "t", expected, names, dtype)
    check_finite(t, "t")
    outside = (t < 0) | (t > 1)
    if bool(outside.any()):
        raise InputError(f"'t' has values outside [0, 1] ({int(outside.sum())} of them, min {float(t.min()):.4g}, "
                         f"max {float(t.max()):.4g}): t = 0 is noise, t = 1 the action")
    return t.to(device)


def read_state(batch: Mapping[str, Any], max_state_dim: int, device: torch.device) -> Tensor:
    """observation.state (b, s), s <= max_state_dim, finite. -> float32 (b, s); the caller checks s."""
    state = as_tensor(require(batch, STATE), STATE, device)
    if state.dim() != 2:
        raise InputError(f"{STATE!r} has shape {tuple(state.shape)}: expected (b, s), a batch of states")
    if state.shape[0] == 0:
        raise InputError(f"{STATE!r} has batch size 0: expected at least one sample")
    if state.shape[1] > max_state_dim:
        raise InputError(f"{STATE!r} has width {state.shape[1]}, more than max_state_dim={max_state_dim}")
    check_finite(state, STATE)
    return state


def check_width(t: Tensor, key: str, allowed: tuple[int, ...], name: str) -> None:
    """The last axis of `t` must be one of the `allowed` widths (the robot's own, or the policy's)."""
    if t.shape[-1] not in allowed:
        want = " or ".join(str(w) for w in sorted(set(allowed)))
        raise InputError(f"{key!r} has width {t.shape[-1]}: this policy expects {name}={want}")


def read_prefix(batch: Mapping[str, Any], batch_size: int, prefix_dim: int,
                device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """Optional observation.prefix (b, p, d_prefix) and observation.prefix_mask (b, p) bool."""
    if PREFIX not in batch:
        if PREFIX_MASK in batch:
            raise InputError(f"{PREFIX_MASK!r} was given without {PREFIX!r}")
        return None, None
    if prefix_dim == 0:
        raise InputError(f"{PREFIX!r} was given but this policy has no prefix input (expert.prefix_dim = 0)")
    prefix = as_tensor(batch[PREFIX], PREFIX, device)
    check_shape(prefix, PREFIX, (batch_size, None, prefix_dim), "b p d_prefix")
    mask = None
    if PREFIX_MASK in batch:
        mask = as_tensor(batch[PREFIX_MASK], PREFIX_MASK, device, dtype=None).bool()
        check_shape(mask, PREFIX_MASK, (batch_size, prefix.shape[1]), "b p")
    check_finite(prefix, PREFIX, None if mask is None else mask[..., None])
    return prefix, mask


def read_action(batch: Mapping[str, Any], batch_size: int, chunk_size: int, action_dims: tuple[int, ...],
                max_action_dim: int, device: torch.device, own_dims: Tensor | None = None,
                finite: bool = True) -> tuple[Tensor, Tensor | None]:
    """action (b, h, a) with a in `action_dims`, and optional action_is_pad (b, h) bool.

    Padded steps, and entries past a sample's own width `own_dims` (b,) (a narrower robot in a mixed
    batch), may hold anything, NaN included; the other entries must be finite (unless `finite` is False).
    """
    action = as_tensor(require(batch, ACTION), ACTION, device)
    if action.dim() == 3 and action.shape[2] > max_action_dim:
        raise InputError(f"{ACTION!r} has width {action.shape[2]}, more than max_action_dim={max_action_dim}")
    check_shape(action, ACTION, (batch_size, chunk_size, None), "b h a")
    check_width(action, ACTION, action_dims, "action_dim")
    is_pad = None
    if ACTION_IS_PAD in batch:
        is_pad = as_tensor(batch[ACTION_IS_PAD], ACTION_IS_PAD, device, dtype=None).bool()
        check_shape(is_pad, ACTION_IS_PAD, (batch_size, chunk_size), "b h")
    if finite:
        counted = None if is_pad is None else ~is_pad[..., None]  # (b, h, 1)
        if own_dims is not None:
            own = torch.arange(action.shape[2], device=action.device) < own_dims.to(action.device)[:, None]
            counted = own[:, None, :] if counted is None else counted & own[:, None, :]
        check_finite(action, ACTION, counted)
    return action, is_pad
