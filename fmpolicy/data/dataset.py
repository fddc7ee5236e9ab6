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

Opening a dataset validates it (fmpolicy/data/checks.py): info.json, episodes.jsonl, tasks.jsonl,
stats.json when it is used, and every loaded episode: rows of the declared width, finite states and
actions with |x| <= 1e6, frame_index 0..T-1 with T the length in episodes.jsonl, known task indices.
A failure is a DatasetError naming the file, the episode, the frame and the column.
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

from fmpolicy.data.checks import check_equal, check_known, check_rows, check_stats, check_values
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
        check_rows(listed, {"episode_index": int, "length": int}, str(self.root / EPISODES))
        by_index = {int(e["episode_index"]): e for e in listed}
        if len(by_index) != len(listed):
            seen = [int(e["episode_index"]) for e in listed]
            twice = next(i for i in seen if seen.count(i) > 1)
            raise DatasetError(f"{self.root / EPISODES} lists episode {twice} twice")
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
        task_rows = read_jsonl(self.root / TASKS)
        check_rows(task_rows, {"task_index": int, "task": str}, str(self.root / TASKS))
        task_of_index = {int(t["task_index"]): t["task"] for t in task_rows}
        if sorted(task_of_index) != list(range(len(task_rows))):
            raise DatasetError(f"{self.root / TASKS} has task indices {sorted(task_of_index)}: "
                               f"expected 0..{len(task_rows) - 1}, once each")

        # ---- load every episode into flat arrays (small datasets); rows of the declared width ----
        keys = ["observation.state", "action", *self.image_keys, "frame_index", "episode_index", "task_index"]
        cols: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        wheres, lengths = [], []
        for e in self.episodes:
            ep = int(e["episode_index"])
            path = self.root / episode_path(ep, int(self.info["chunks_size"]))
            where = f"episode file {path} (episode {ep})"
            table = read_episode_table(path, columns=keys)
            n = table.num_rows
            if n != int(e["length"]) or n == 0:
                raise DatasetError(f"{where} has {n} frames but {EPISODES} says {e['length']}")
            for k in keys:
                cols[k].append(column_to_numpy(table, k, features[k], where))
            wheres.append(where)
            lengths.append(n)
        flat = {k: np.concatenate(v) for k, v in cols.items()}
        ends = np.cumsum(lengths)  # one past the last row of each episode
        starts = np.repeat(ends - lengths, lengths)  # (N,) first row of each row's episode

        # ---- values: checked over all frames at once; a failure names its file, episode and frame ----
        def locate(row: int) -> tuple[str, int]:
            k = int(np.searchsorted(ends, row, side="right"))
            return wheres[k], row - int(ends[k] - lengths[k])

        for k in ("observation.state", "action"):
            check_values(flat[k], k, locate)
        check_equal(flat["frame_index"], np.arange(len(starts)) - starts, "frame_index", locate)
        episode_of_row = np.repeat([int(e["episode_index"]) for e in self.episodes], lengths)
        check_equal(flat["episode_index"], episode_of_row, "episode_index", locate)
        check_known(flat["task_index"], task_of_index, "task_index", locate, TASKS)

        self.state = torch.from_numpy(flat["observation.state"])  # (N, s)
        self.action = torch.from_numpy(flat["action"])  # (N, a)
        self.images = {k: torch.from_numpy(flat[k]) for k in self.image_keys}  # (N, 3, H, W) uint8
        self.episode_index = torch.from_numpy(episode_of_row)
        self.frame_index = torch.from_numpy(flat["frame_index"].astype(np.int64))
        self.task_index = torch.from_numpy(flat["task_index"].astype(np.int64))
        self.episode_end = torch.from_numpy(np.repeat(ends, lengths))  # (N,) one past the last frame of its episode
        self.tasks = [task_of_index[i] for i in range(len(task_of_index))]
        self._stats: dict[str, dict[str, Tensor]] | None = None
        self._stored_stats = self._read_stats()

    def _read_stats(self) -> dict[str, Any] | None:
        """meta/stats.json, checked, when it is up to date; None when it is missing or stale."""
        path = self.root / STATS
        if not path.exists() or int(self.info.get("stats_episodes", -1)) != int(self.info["total_episodes"]):
            return None
        raw = read_json(path)
        features = self.info["features"]
        widths = {k: ft["shape"][0] if is_image_key(k) else int(np.prod(ft["shape"])) for k, ft in features.items()}
        check_stats(raw, widths, ["observation.state", "action", *self.image_keys], str(path))
        return raw

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
            raw = self._stored_stats
            if raw is None:
                warnings.warn(f"{self.root / STATS} is missing or stale (an unfinished collection?): "
                              f"computing statistics from the {self.num_episodes} loaded episodes", stacklevel=2)
                raw = {"observation.state": compute_stats(self.state.numpy()),
                       "action": compute_stats(self.action.numpy())}
                for k, img in self.images.items():
                    raw[k] = compute_stats(feature_matrix(k, img.numpy()))
            self._stats = {key: {name: torch.tensor(entry[name], dtype=torch.float32) for name in STAT_NAMES}
                           for key, entry in raw.items()}
        return self._stats
