"""Robot shapes served by one policy: per-embodiment normalization and zero-padding masks.

A batch may mix robots of several widths (a 2-link and a 4-link arm, say). Each sample names its
embodiment under the key `embodiment` (a name for the whole batch, a list of names, or indices); its
state and action are normalized with that robot's own statistics, then zero-padded to the expert's
`max_state_dim` / `max_action_dim`, and masks mark the robot's own entries. With one embodiment
(the default) the key may be left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fmpolicy.config import PolicyConfig
from fmpolicy.errors import InputError
from fmpolicy.normalize import Normalizer

EMBODIMENT = "embodiment"


class Embodiments(nn.Module):
    """Normalizers and width masks of each embodiment of a policy; tables are padded to max widths."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.specs = config.embodiment_list()
        self.names = [e.name for e in self.specs]
        norm = config.normalization
        self.state = nn.ModuleList(Normalizer(e.state_dim, norm.state, norm.min_scale, norm.relative_min_scale)
                                   for e in self.specs)
        # actions are outputs, never fed back as they were recorded: no relative floor (their fit is as it was)
        self.action = nn.ModuleList(Normalizer(e.action_dim, norm.action, norm.min_scale, relative_min_scale=0.0)
                                    for e in self.specs)
        self.max_state_dim = config.expert.max_state_dim
        self.max_action_dim = config.expert.max_action_dim
        self.register_buffer("state_dims", torch.tensor([e.state_dim for e in self.specs]), persistent=False)
        self.register_buffer("action_dims", torch.tensor([e.action_dim for e in self.specs]), persistent=False)
        # the same on the host, whatever the policy's device (`host_widths`)
        self._host_dims = {"state": self.state_dims.clone(), "action": self.action_dims.clone()}

    # ---- which embodiment each sample is ----

    def index(self, batch: Mapping[str, Any], batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """(b,) long indices from `batch["embodiment"]` (a name, a list of names, or indices), on
        `device` (default: the policy's)."""
        device = self.state_dims.device if device is None else torch.device(device)
        value = batch.get(EMBODIMENT) if isinstance(batch, Mapping) else None
        if value is None:
            if len(self.names) > 1:
                raise InputError(f"the batch has no {EMBODIMENT!r} key: this policy serves {self.names}, name one")
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        if isinstance(value, str):
            value = [value] * batch_size
        if isinstance(value, Sequence) and not isinstance(value, Tensor) and all(isinstance(v, str) for v in value):
            unknown = sorted(set(value) - set(self.names))
            if unknown:
                raise InputError(f"{EMBODIMENT!r} names {unknown}: this policy serves {self.names}")
            idx = torch.tensor([self.names.index(v) for v in value], device=device)
        else:
            idx = torch.as_tensor(value, device=device).long().reshape(-1)
            if idx.numel() and (idx.min() < 0 or idx.max() >= len(self.names)):
                raise InputError(f"{EMBODIMENT!r} indices must be in [0, {len(self.names)}): got {idx.tolist()}")
        if idx.shape != (batch_size,):
            raise InputError(f"{EMBODIMENT!r} has {idx.numel()} entries: expected one per sample ({batch_size})")
        return idx

    def width(self, idx: Tensor, kind: str) -> int:
        """The width a batch's tensors must have: the widest robot's among the samples' embodiments. With
        one robot, its own, without reading `idx` (a device tensor: on a GPU, reading it would wait for
        every kernel queued before, the encoder's among them)."""
        if len(self.specs) == 1:
            return self.specs[0].state_dim if kind == "state" else self.specs[0].action_dim
        dims = self.state_dims if kind == "state" else self.action_dims
        return int(dims[idx].max()) if idx.numel() else int(dims.max())

    def host_widths(self, batch: Mapping[str, Any], batch_size: int) -> tuple[int, int]:
        """(state width, action width) of a batch, as `width` gives them, computed on the host whatever
        the policy's device (no device tensor is read: the policy server checks requests with it while
        the GPU computes)."""
        if batch.get(EMBODIMENT) is None and len(self.specs) == 1:  # one robot: its widths
            return self.specs[0].state_dim, self.specs[0].action_dim
        idx = self.index(batch, batch_size, device="cpu")
        return tuple(int(self._host_dims[k][idx].max()) if idx.numel() else int(self._host_dims[k].max())
                     for k in ("state", "action"))

    # ---- masks ----

    def state_valid(self, idx: Tensor) -> Tensor:
        """(b, S) bool: the robot's own state entries."""
        return torch.arange(self.max_state_dim, device=idx.device) < self.state_dims[idx][:, None]

    def action_valid(self, idx: Tensor) -> Tensor:
        """(b, A) bool: the robot's own action entries."""
        return torch.arange(self.max_action_dim, device=idx.device) < self.action_dims[idx][:, None]

    # ---- normalization ----

    def _table(self, normalizers: nn.ModuleList, width: int) -> tuple[Tensor, Tensor]:
        """Offsets and scales of every embodiment, padded to `width` with (0, 1): (E, width) each."""
        offset = torch.stack([nn.functional.pad(n.offset, (0, width - n.dim)) for n in normalizers])
        scale = torch.stack([nn.functional.pad(n.scale, (0, width - n.dim), value=1.0) for n in normalizers])
        return offset, scale

    def normalize_state(self, state: Tensor, idx: Tensor) -> Tensor:
        """Environment units (b, w) -> network units, zero-padded to (b, S)."""
        x = nn.functional.pad(state, (0, self.max_state_dim - state.shape[-1]))
        offset, scale = self._table(self.state, self.max_state_dim)
        y = (x - offset[idx]) / scale[idx]
        return torch.where(self.state_valid(idx), y, torch.zeros((), dtype=y.dtype, device=y.device))

    def normalize_action(self, action: Tensor, idx: Tensor) -> Tensor:
        """Environment units (b, h, w) -> network units, zero-padded to (b, h, A)."""
        x = nn.functional.pad(action, (0, self.max_action_dim - action.shape[-1]))
        offset, scale = self._table(self.action, self.max_action_dim)
        y = (x - offset[idx][:, None]) / scale[idx][:, None]
        return torch.where(self.action_valid(idx)[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))

    def unnormalize_action(self, y: Tensor, idx: Tensor, width: int) -> Tensor:
        """Network units (b, h, A) -> environment units (b, h, width); entries past a robot's own width are 0."""
        offset, scale = self._table(self.action, self.max_action_dim)
        x = y * scale[idx][:, None] + offset[idx][:, None]
        x = torch.where(self.action_valid(idx)[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x[..., :width]

    def get(self, name: str | None) -> int:
        """Index of an embodiment by name (None: the only one)."""
        if name is None:
            if len(self.names) > 1:
                raise InputError(f"name the embodiment: this policy serves {self.names}")
            return 0
        if name not in self.names:
            raise InputError(f"embodiment {name!r} is unknown: this policy serves {self.names}")
        return self.names.index(name)

    def check_fitted(self) -> None:
        for kind, normalizers in (("state", self.state), ("action", self.action)):
            for name, n in zip(self.names, normalizers):
                if not bool(n.fitted):
                    raise InputError(
                        f"the {kind} normalizer of embodiment {name!r} (mode {n.mode!r}) is not fitted: call "
                        f"policy.fit_normalization(states, actions) first, or set normalization.{kind}='identity'")
