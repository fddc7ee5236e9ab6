"""`EncoderOutputCache`: the frozen backbone's outputs per dataset frame, computed once.

With a frozen backbone (vision tower / text model / VLM), its outputs depend only on the frame, so
re-running it at every training step is wasted work. The cache stores `encoder.backbone(batch)`
per frame index; each step then runs only `encoder.head` (the trainable projections), so the
projections still learn. A hit gives bit-identical features to a fresh backbone pass.

Frame indices must identify a dataset frame uniquely (the dataset's global `index` column, or
`episode_index * K + frame_index`). `save` writes one `.safetensors` file atomically
(`fmpolicy.io.atomic_write`: a crash leaves the old file or the new one), with the encoder's
preprocessing config and a fingerprint of the backbone weights in its metadata; `load` refuses a file
written by another encoder, and a truncated or corrupt one, with `CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from fmpolicy.encoders.base import PrefixEncoder
from fmpolicy.encoders.inputs import batch_size_of
from fmpolicy.errors import CheckpointError, ConfigError, InputError
from fmpolicy.io import atomic_write

FORMAT = "fmpolicy-encoder-cache-v1"


def backbone_fingerprint(encoder: PrefixEncoder) -> str:
    """A cheap digest of the backbone weights (names, shapes, sums): a changed backbone changes it."""
    head = {id(p) for p in encoder.head_parameters()}
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if id(p) in head:
                continue
            q = p.detach().double()
            digest.update(f"{name}{tuple(p.shape)}{float(q.sum()):.10e}{float(q.abs().sum()):.10e}".encode())
    return digest.hexdigest()


def _indices(frames: Any, batch_size: int) -> list[int]:
    idx = torch.as_tensor(frames).reshape(-1).tolist()
    if len(idx) != batch_size:
        raise InputError(f"frame indices: got {len(idx)}, expected {batch_size} (one per sample)")
    return [int(i) for i in idx]


class EncoderOutputCache:
    """Frame index -> the frozen backbone's features (one dict of tensors per frame, on `device`)."""

    def __init__(self, encoder: PrefixEncoder, device: str | torch.device = "cpu"):
        if not encoder.backbone_frozen:
            raise ConfigError("EncoderOutputCache needs a frozen backbone (freeze_vision / freeze_text / freeze_vlm "
                              "True and lora_rank = 0): a trainable backbone's outputs change every step")
        self.encoder = encoder
        self.device = torch.device(device)
        self.frames: dict[int, dict[str, Tensor]] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.frames)

    def __contains__(self, index: int) -> bool:
        return int(index) in self.frames

    @torch.no_grad()
    def _compute(self, batch: Mapping[str, Any], idx: list[int]) -> None:
        feats = self.encoder.backbone(batch)
        for row, i in enumerate(idx):
            self.frames[i] = {k: v[row].detach().to(self.device).clone() for k, v in feats.items()}

    def fill(self, frames: Iterable[tuple[Any, Mapping[str, Any]]]) -> "EncoderOutputCache":
        """Compute the features of every (frame indices (b,), batch) pair not cached yet."""
        for indices, batch in frames:
            b = batch_size_of(batch, self.encoder.config.cameras)
            idx = _indices(indices, b)
            todo = [r for r, i in enumerate(idx) if i not in self.frames]
            if todo:
                self._compute(_select(batch, todo, b), [idx[r] for r in todo])
        return self

    def features(self, batch: Mapping[str, Any], indices: Any) -> dict[str, Tensor]:
        """Backbone features for a batch (b,) of frames: cached ones read back, the others computed and stored."""
        b = batch_size_of(batch, self.encoder.config.cameras)
        idx = _indices(indices, b)
        missing = [r for r, i in enumerate(idx) if i not in self.frames]
        self.misses += len(missing)
        self.hits += b - len(missing)
        if missing:
            self._compute(_select(batch, missing, b), [idx[r] for r in missing])
        dev = self.encoder.device
        keys = self.frames[idx[0]].keys()
        return {k: torch.stack([self.frames[i][k] for i in idx]).to(dev) for k in keys}

    def __call__(self, batch: Mapping[str, Any], indices: Any) -> tuple[Tensor, Tensor]:
        """Same as `encoder(batch)`: prefix (b, p, d), mask (b, p), with the backbone read from the cache."""
        return self.encoder.head(self.features(batch, indices))

    # ---- files -------------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "preprocessing": json.dumps(self.encoder.preprocessing_config(), sort_keys=True),
                "backbone": backbone_fingerprint(self.encoder)}

    def save(self, path: str | Path) -> Path:
        """Write every cached frame to one .safetensors file, atomically (`fmpolicy.io.atomic_write`)."""
        path = Path(path)
        if not self.frames:
            raise InputError("the cache is empty: nothing to save")
        idx = sorted(self.frames)
        tensors = {"frame_index": torch.tensor(idx, dtype=torch.long)}
        for k in self.frames[idx[0]]:
            tensors[f"features.{k}"] = torch.stack([self.frames[i][k] for i in idx]).cpu().contiguous()
        data = safetensors_bytes(tensors, metadata=self._metadata())  # the whole file, serialised in memory
        atomic_write(path, lambda f: f.write(data))
        return path

    @classmethod
    def load(cls, path: str | Path, encoder: PrefixEncoder, device: str | torch.device = "cpu") -> "EncoderOutputCache":
        """Read a file written by `save` for the same encoder (same preprocessing and backbone weights)."""
        cache = cls(encoder, device)
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"encoder cache {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                want = cache._metadata()
                for key in ("format", "preprocessing", "backbone"):
                    if meta.get(key) != want[key]:
                        raise CheckpointError(f"encoder cache {path} was written for another encoder: its {key!r} "
                                              f"differs (file: {meta.get(key, '<none>')[:200]!r})")
                idx = f.get_tensor("frame_index").tolist()
                stacked = {k.removeprefix("features."): f.get_tensor(k) for k in f.keys() if k.startswith("features.")}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"encoder cache {path} is not a readable safetensors file (truncated, empty or "
                                  f"corrupt?): {e}") from e
        for row, i in enumerate(idx):
            cache.frames[int(i)] = {k: v[row].to(cache.device) for k, v in stacked.items()}
        return cache


def _select(batch: Mapping[str, Any], rows: list[int], b: int) -> dict[str, Any]:
    """The sub-batch of `rows` (tensors indexed on axis 0, lists picked) of a batch of b samples."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b:
            out[k] = v[rows]
        elif isinstance(v, (list, tuple)) and len(v) == b:
            out[k] = [v[r] for r in rows]
        else:
            out[k] = v
    return out


def benchmark_cache(encoder: PrefixEncoder, batch: Mapping[str, Any], steps: int = 10,
                    step_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[str, float]:
    """Seconds per training step with the frozen backbone re-run every step vs read from the cache.

    A step = prefix from the encoder (or cache) -> `step_fn(prefix, mask)` (a loss; default a masked
    mean square, standing in for the expert) -> backward -> SGD step on the head. One warm-up step each.
    """
    step_fn = step_fn or (lambda prefix, mask: (prefix.pow(2).mean(-1) * mask).sum() / mask.sum().clamp(min=1))
    opt = torch.optim.SGD(encoder.head_parameters(), lr=1e-3)
    b = batch_size_of(batch, encoder.config.cameras)
    cache = EncoderOutputCache(encoder).fill([(torch.arange(b), batch)])
    encoder.train()
    results = {}
    for name, run in (("no_cache", lambda: encoder(batch)), ("cache", lambda: cache(batch, torch.arange(b)))):
        for i in range(steps + 1):
            if i == 1:
                start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            step_fn(*run()).backward()
            opt.step()
        results[f"{name}_s_per_step"] = (time.perf_counter() - start) / steps
    results["speedup"] = results["no_cache_s_per_step"] / results["cache_s_per_step"]
    return results

