"""Streaming training batches: the same global batches as the in-memory path, read from disk by
DataLoader workers, for datasets too large to hold in memory (video decoded, or many frames).

The in-memory path (`combine_windows`) holds every window as tensors and slices the rows that
`EpochSampler` draws. Here the same sampler draws the same indices, a worker reads exactly those
windows (`ChunkDataset.windows`: images uint8, the state and action chunks gathered at once) and the
training process converts them as `_slice_batch` does, so a streamed run equals an in-memory run bit
for bit (tests/test_data_stream.py), and a resumed streamed run equals an uninterrupted one.

Why two samplers: a DataLoader reads its sampler ahead of the loop (prefetch_factor batches per
worker), so the sampler that feeds it is always a few batches past the step being trained. The
trainer keeps its own `EpochSampler`, advanced once per step and saved in checkpoints; the loader
gets a copy taken at the start (or at the resumed step) and checks each batch it yields against the
trainer's draw, so the two cannot drift apart unnoticed.

Under torchrun each process reads only its rows of the global batch (`local_rows`): the workers of
rank r decode rows r, r + world, ... and nothing else.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fmpolicy.config import DataConfig

GB = 1024 ** 3
STATE, ACTION = "observation.state", "action"


class WindowBatches(Dataset):
    """Global window index lists -> batches with the keys and dtypes of `combine_windows` (states and
    actions zero-padded to the policy's widths, `embodiment`, images uint8). The datasets' windows are
    numbered one after another in the order given, as `combine_windows` concatenates them."""

    def __init__(self, datasets: dict[str, Any], state_dim: int, action_dim: int, embodiment_ids: dict[str, int]):
        self.datasets = list(datasets.values())
        self.ids = [embodiment_ids[name] for name in datasets]
        self.state_dim, self.action_dim = state_dim, action_dim
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in self.datasets])])
        # several robots: the keys every dataset has (as `combine_windows` keeps them)
        keys = [{STATE, ACTION, "action_is_pad", "episode_index", "frame_index", "task", *d.image_keys, *d.extras}
                for d in self.datasets]
        self.keys = set.intersection(*keys)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, rows: list[int]) -> tuple[torch.Tensor, dict[str, Any]]:
        """(the global indices, the batch of those windows in that order)."""
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        which = np.searchsorted(self.offsets, rows_t.numpy(), side="right") - 1
        parts, where = [], []
        for k, dataset in enumerate(self.datasets):
            pos = np.flatnonzero(which == k)
            if not pos.size:
                continue
            w = dataset.windows(rows_t[pos] - int(self.offsets[k]))
            w[STATE] = nn.functional.pad(w[STATE], (0, self.state_dim - dataset.state_dim))
            w[ACTION] = nn.functional.pad(w[ACTION], (0, self.action_dim - dataset.action_dim))
            w["embodiment"] = torch.full((len(pos),), self.ids[k], dtype=torch.long)
            parts.append(w)
            where.append(torch.from_numpy(pos))
        if len(parts) == 1:
            return rows_t, {k: v for k, v in parts[0].items() if k in self.keys or k == "embodiment"}
        back = torch.argsort(torch.cat(where))  # batch order again
        out: dict[str, Any] = {}
        for key in [*self.keys, "embodiment"]:
            if isinstance(parts[0][key], list):
                flat = sum((p[key] for p in parts), [])
                out[key] = [flat[i] for i in back.tolist()]
            else:
                out[key] = torch.cat([p[key] for p in parts])[back]
        return rows_t, out


class _AheadIndices:
    """The loader's sampler: a copy of the trainer's `EpochSampler`, this process's rows of each of the
    next `steps` global batches."""

    def __init__(self, sampler, rows: slice, steps: int):
        self.sampler, self.rows, self.steps = copy.deepcopy(sampler), rows, steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.sampler.next()[self.rows].tolist()

    def __len__(self) -> int:
        return self.steps


def _as_is(batch):
    return batch


def stream_batches(source: WindowBatches, sampler, rows: slice, steps: int, num_workers: int,
                   pin_memory: bool = False, seed: int = 0) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """An iterator over (global indices, batch) for the next `steps` steps, read by `num_workers`
    DataLoader workers (0: in this process). The loader gets its own generator: by default a DataLoader
    draws its workers' base seed from the global RNG, which would shift the dropout stream and make a
    streamed run differ from an in-memory one."""
    loader = DataLoader(source, batch_size=None, sampler=_AheadIndices(sampler, rows, steps), num_workers=num_workers,
                        collate_fn=_as_is, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(seed),
                        prefetch_factor=2 if num_workers else None, persistent_workers=False)
    return iter(loader)


def should_stream(data: DataConfig, datasets: dict[str, Any]) -> tuple[bool, str]:
    """Whether to stream, and why in words (printed by the trainer)."""
    if data.stream is True:
        return True, "data.stream = true"
    if data.stream is False:
        return False, "data.stream = false"
    video = [f"{name}: {key}" for name, d in datasets.items() for key in getattr(d, "video_keys", [])]
    if video:
        return True, f"data.stream = auto and the data has video cameras ({', '.join(video)})"
    need = sum(d.in_memory_bytes() for d in datasets.values())
    if need > data.in_memory_max_gb * GB:
        return True, (f"data.stream = auto and every window in memory would take {need / GB:.2f} GB "
                      f"> data.in_memory_max_gb = {data.in_memory_max_gb}")
    return False, f"data.stream = auto, in memory: {need / GB:.3f} GB <= data.in_memory_max_gb"
