"""Gaussian action noise around any expert callable: a weaker expert, or DART's corrective labels.

`NoisyExpert(expert, noise_std)` returns the expert's actions plus N(0, noise_std^2) noise, clipped to the
action bounds; the environment executes those. `record` says what a collection (`fmpolicy.data.collect`)
writes: "executed" (the noisy actions: demonstrations of a weaker, more diverse expert) or "clean" (the
expert's own actions, through the `label` attribute: DART, Laskey et al. 2017: the states drift off the
expert's path and each is labelled with the expert's correction). The wrapped expert's `mode` passes
through. Numpy or torch actions both work (torch keeps its device and dtype); the noise comes from a numpy
generator seeded by `seed`, so a collection is reproducible.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

RECORD = ("executed", "clean")


class NoisyExpert:
    """`expert` (any callable -> actions (e, a)) with Gaussian action noise; see the module's docstring.

    low / high: the action bounds the noisy actions are clipped to (scalars or (a,) arrays; None: no bound);
    the clean labels are clipped to them too."""

    def __init__(self, expert: Any, noise_std: float, *, seed: int | None = None, record: str = "executed",
                 low: Any = None, high: Any = None):
        if not callable(expert):
            raise TypeError(f"expert = {expert!r} is not callable")
        if isinstance(noise_std, bool) or not (isinstance(noise_std, (int, float)) and np.isfinite(noise_std)
                                               and noise_std >= 0):
            raise ValueError(f"noise_std = {noise_std!r} is invalid: expected a finite number >= 0")
        if record not in RECORD:
            raise ValueError(f"record = {record!r} is invalid: expected one of {RECORD}")
        self.expert, self.noise_std, self.record = expert, float(noise_std), record
        self.low = None if low is None else np.asarray(low, dtype=np.float64)
        self.high = None if high is None else np.asarray(high, dtype=np.float64)
        if self.low is not None and self.high is not None and np.any(self.low > self.high):
            raise ValueError(f"low = {low!r} exceeds high = {high!r}")
        self.rng = np.random.default_rng(seed)
        self.label: Any = None  # the last call's clean actions (record="clean"), else None

    @property
    def mode(self) -> Any:
        return getattr(self.expert, "mode", None)

    def _clip(self, x: np.ndarray) -> np.ndarray:
        return x if self.low is None and self.high is None else np.clip(x, self.low, self.high)

    def __call__(self, obs: Any) -> Any:
        clean = self.expert(obs)
        as_torch = isinstance(clean, torch.Tensor)
        given = clean.detach().cpu().numpy() if as_torch else np.asarray(clean)
        raw = given.astype(np.float64)
        noisy = self._clip(raw + self.rng.normal(0.0, self.noise_std, raw.shape)) if self.noise_std else self._clip(raw)
        label = self._clip(raw) if self.record == "clean" else None
        if as_torch:
            self.label = None if label is None else torch.as_tensor(label).to(clean)
            return torch.as_tensor(noisy).to(clean)
        dtype = given.dtype if given.dtype.kind == "f" else np.float32
        self.label = None if label is None else label.astype(dtype)
        return noisy.astype(dtype)
