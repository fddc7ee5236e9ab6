"""Training windows over an on-disk dataset (format.py), held in memory as tensors.

Window i starts at frame t = i (every frame of every episode starts one window):

    observation.state   (s,)      float32, the state at frame t
    action              (h, a)    float32, actions t .. t+h-1; steps past the episode end repeat
                                  the episode's last action
    action_is_pad       (h,)      bool, True exactly for those steps past the episode end
    observation.images.<cam>  (3, H, W) float32 in [0, 1], at frame t (when the dataset has images)
    task                str       the episode's instruction
    episode_index, frame_index    int64 scalars

The default torch DataLoader collate batches these into the keys `FlowPolicy.compute_loss` reads
(`task` becomes a list of strings).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fmpolicy.data.format import (EPISODES, STATS, TASKS, column_to_numpy, compute_stats, episode_path,
                                  feature_matrix, is_image_key, read_episode_table, read_info, read_json, read_jsonl)
from fmpolicy.errors import DatasetError

STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")


class ChunkDataset(Dataset):
    """Action-chunk windows of length `chunk_size` over the episodes of a dataset root.

    Args:
        root: dataset directory (see docs/datasets.md).
        chunk_size: h, the number of actions per window (>= 1).
        image_keys: None for every image feature of the dataset, [] for none, or a list of keys
            `observation.images.<cam>`.
        episodes: optional subset of episode indices (train/val splits, few-demo experiments).
    """

    def __init__(self, root: str | os.PathLike, chunk_size: int, image_keys: Sequence[str] | None = None,
                 episodes: Sequence[int] | None = None):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise DatasetError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.root = Path(root)
        self.chunk_size = int(chunk_size)
        self.info = read_info(self.root)
        features = self.info["features"]
        all_images = [k for k in features if is_image_key(k)]
        if image_keys is None:
            image_keys = all_images
        for k in image_keys:
            if k not in all_images:
                raise DatasetError(f"image key {k!r} is not in {self.root}: it has {all_images}")
        self.image_keys = list(image_keys)

        listed = read_jsonl(self.root / EPISODES)
        by_index = {int(e["episode_index"]): e for e in listed}
        if not by_index:
            raise DatasetError(f"{self.root} has zero episodes ({EPISODES} is empty)")
        if episodes is None:
            episodes = sorted(by_index)
        else:
            episodes = [int(e) for e in episodes]
            absent = [e for e in episodes if e not in by_index]
            if absent:
                raise DatasetError(f"episodes {absent} are not in {self.root} (it has episodes 0..{len(by_index) - 1})")
            if not episodes:
                raise DatasetError("the episodes subset is empty")
        self.episodes = [by_index[e] for e in episodes]
        task_of_index = {int(t["task_index"]): t["task"] for t in read_jsonl(self.root / TASKS)}

        # ---- load every episode into flat arrays (small datasets) ----
        keys = ["observation.state", "action", *self.image_keys]
        cols: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        ep_idx, frame_idx, task_idx, ends = [], [], [], []
        total = 0
        for e in self.episodes:
            path = self.root / episode_path(int(e["episode_index"]), int(self.info["chunks_size"]))
            table = read_episode_table(path, columns=[*keys, "frame_index", "episode_index", "task_index"])
            try:
                for k in keys:
                    cols[k].append(column_to_numpy(table, k, features[k]))
                fi = column_to_numpy(table, "frame_index", features["frame_index"])
                ti = column_to_numpy(table, "task_index", features["task_index"])
            except DatasetError as err:
                raise DatasetError(f"episode file {path}: {err}") from err
            n = len(fi)
            if n != int(e["length"]) or n == 0:
                raise DatasetError(f"episode file {path} has {n} frames but {EPISODES} says {e['length']}")
            ep_idx.append(np.full(n, int(e["episode_index"]), np.int64))
            frame_idx.append(fi.astype(np.int64))
            task_idx.append(ti.astype(np.int64))
            total += n
            ends.append(np.full(n, total, np.int64))
        self.state = torch.from_numpy(np.concatenate(cols["observation.state"]))  # (N, s)
        self.action = torch.from_numpy(np.concatenate(cols["action"]))  # (N, a)
        self.images = {k: torch.from_numpy(np.concatenate(cols[k])) for k in self.image_keys}  # (N, 3, H, W) uint8
        self.episode_index = torch.from_numpy(np.concatenate(ep_idx))
        self.frame_index = torch.from_numpy(np.concatenate(frame_idx))
        self.task_index = torch.from_numpy(np.concatenate(task_idx))
        self.episode_end = torch.from_numpy(np.concatenate(ends))  # (N,) one past the last frame of its episode
        unknown = set(self.task_index.tolist()) - set(task_of_index)
        if unknown:
            raise DatasetError(f"task indices {sorted(unknown)} are used by episode files but absent from {TASKS}")
        self.tasks = [task_of_index[i] for i in range(max(task_of_index) + 1)] if task_of_index else []
        self._stats: dict[str, dict[str, Tensor]] | None = None

    # ---- sizes ----
    def __len__(self) -> int:
        return self.state.shape[0]

    @property
    def state_dim(self) -> int:
        return self.state.shape[1]

    @property
    def action_dim(self) -> int:
        return self.action.shape[1]

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def num_frames(self) -> int:
        return len(self)

    # ---- windows ----
    def _window(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Frame indices (b, h) of the chunks starting at frames t (b,), clamped to each episode, and pad (b, h)."""
        idx = t[:, None] + torch.arange(self.chunk_size)  # (b, h)
        last = (self.episode_end[t] - 1)[:, None]  # (b, 1)
        return torch.minimum(idx, last), idx > last

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        i = i % n
        idx, pad = self._window(torch.tensor([i]))
        item: dict[str, Any] = {
            "observation.state": self.state[i],
            "action": self.action[idx[0]],
            "action_is_pad": pad[0],
        }
        for k, img in self.images.items():
            item[k] = img[i].float() / 255.0
        item["task"] = self.tasks[int(self.task_index[i])]
        item["episode_index"] = self.episode_index[i]
        item["frame_index"] = self.frame_index[i]
        return item

    def all_windows(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """Every window at once, batched like a DataLoader batch (b = len(self)): the fast path for
        training on small datasets (index it with a random permutation). Images stay uint8
        (b, 3, H, W) to save memory: divide by 255 after indexing."""
        t = torch.arange(len(self))
        idx, pad = self._window(t)
        out: dict[str, Any] = {"observation.state": self.state, "action": self.action[idx], "action_is_pad": pad,
                               "episode_index": self.episode_index, "frame_index": self.frame_index}
        out.update(self.images)
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        out["task"] = [self.tasks[j] for j in self.task_index.tolist()]
        return out

    # ---- statistics ----
    @property
    def stats(self) -> dict[str, dict[str, Tensor]]:
        """{feature: {mean, std, min, max, q01, q99: float32 tensors (d,)}} of the *whole* dataset,
        from meta/stats.json (computed once at collection). When stats.json is missing or older than
        the episodes (an interrupted collection), they are computed from the loaded frames instead."""
        if self._stats is None:
            path = self.root / STATS
            fresh = path.exists() and int(self.info.get("stats_episodes", -1)) == int(self.info["total_episodes"])
            if fresh:
                raw = read_json(path)
            else:
                warnings.warn(f"{path} is missing or stale (an unfinished collection?): computing statistics "
                              f"from the {self.num_episodes} loaded episodes", stacklevel=2)
                raw = {"observation.state": compute_stats(self.state.numpy()),
                       "action": compute_stats(self.action.numpy())}
                for k, img in self.images.items():
                    raw[k] = compute_stats(feature_matrix(k, img.numpy()))
            stats = {}
            for key, entry in raw.items():
                try:
                    stats[key] = {name: torch.tensor(entry[name], dtype=torch.float32) for name in STAT_NAMES}
                except (KeyError, TypeError, ValueError) as e:
                    raise DatasetError(f"{path}: the statistics of {key!r} lack or mangle {e}") from e
            self._stats = stats
        return self._stats
