"""On-disk demonstration datasets in a LeRobot-v2-style layout, written crash-safely.

    root/meta/info.json        format, fps, robot_type, env, totals, features, chunks_size, data_path
    root/meta/episodes.jsonl   one line per episode: episode_index, length, tasks, success, mode, ...
    root/meta/tasks.jsonl      one line per task: task_index, task
    root/meta/stats.json       per feature: mean, std, min, max, q01, q99, count (lists per dimension)
    root/data/chunk-000/episode_000000.parquet   one row per frame

Columns of an episode file (one row per frame):

| column | arrow type | meaning |
| --- | --- | --- |
| `observation.state` | list<float32> (s) | proprioceptive state at frame t |
| `action` | list<float32> (a) | action taken at frame t |
| `observation.images.<cam>` | binary, 3*H*W bytes | uint8 image (3, H, W), C-order raw bytes |
| `timestamp` | float32 | frame_index / fps, seconds |
| `frame_index` | int64 | index within the episode |
| `episode_index` | int64 | episode number |
| `index` | int64 | global frame number over the dataset |
| `task_index` | int64 | row of tasks.jsonl |
| `next.reward` | float32 | reward of the step taken at frame t |
| `next.done` | bool | the step taken at frame t ended the episode |
| `next.success` | bool | the step taken at frame t reached success |

Crash safety: every file is written with `fmpolicy.io.atomic_write` (a temporary file
`.<name>.<random>.tmp` in its own directory, fsynced and moved in place with `os.replace`). An
episode file is written before the meta files that list it, so a killed collection leaves a readable
dataset of the episodes finished so far (an episode file not listed in episodes.jsonl is overwritten
by the next episode written). Opening an existing root appends; the temporary files a killed writer
left are removed then, while holding the lock.

One writer per root: `DatasetWriter` holds `fmpolicy.io.WriterLock(root)` (the file `root/.lock`)
from construction to `close()`, so a second writer, in any process, fails at once naming the holder.

Validation: `read_info` checks info.json, and every column read goes through `fmpolicy.data.checks`
(rows of the declared width); `ChunkDataset` checks the rest when it opens a dataset (see checks.py).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fmpolicy.batch import IMAGES_PREFIX
from fmpolicy.data.checks import (MAX_ABS_VALUE, binary_offsets, check_binary_widths, check_features, check_info,
                                  check_values, list_column_to_numpy)
from fmpolicy.errors import DatasetError
from fmpolicy.io import WriterLock, atomic_write, atomic_write_text, remove_orphans

FORMAT = "fmpolicy-lerobot-v1"
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
INFO, EPISODES, TASKS, STATS = "meta/info.json", "meta/episodes.jsonl", "meta/tasks.jsonl", "meta/stats.json"
STATS_QUANTILES = (0.01, 0.99)

# Per-frame columns every episode file has, besides the features given to the writer.
FRAME_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1]},
    "frame_index": {"dtype": "int64", "shape": [1]},
    "episode_index": {"dtype": "int64", "shape": [1]},
    "index": {"dtype": "int64", "shape": [1]},
    "task_index": {"dtype": "int64", "shape": [1]},
    "next.reward": {"dtype": "float32", "shape": [1]},
    "next.done": {"dtype": "bool", "shape": [1]},
    "next.success": {"dtype": "bool", "shape": [1]},
}
# Optional per-frame inputs of add_episode and what they default to.
_OPTIONAL_FRAME_KEYS = ("next.reward", "next.done", "next.success")


def is_image_key(key: str) -> bool:
    return key.startswith(IMAGES_PREFIX)


def episode_path(episode_index: int, chunks_size: int) -> str:
    """Relative path of an episode file (LeRobot's `data_path` template)."""
    return DATA_PATH.format(episode_chunk=episode_index // chunks_size, episode_index=episode_index)


# ---- reading meta files ------------------------------------------------------------------------

def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not readable JSON: {e}") from e


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not readable: {e}") from e
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path} line {n} is not valid JSON: {e}") from e
    return rows


def read_info(root: Path) -> dict[str, Any]:
    """meta/info.json of a dataset root, checked: format name, fps, chunks_size, features (see checks.py)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a directory")
    path = root / INFO
    if not path.exists():
        raise DatasetError(f"{root} is not a dataset: {INFO} is missing (expected the layout of docs/datasets.md)")
    info = read_json(path)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise DatasetError(f"{path} has format {got!r}: expected {FORMAT!r}")
    check_info(info, str(path))
    for key in ("frame_index", "episode_index", "task_index"):
        if info["features"].get(key) != FRAME_FEATURES[key]:
            raise DatasetError(f"{path} features[{key!r}] is {info['features'].get(key)!r}: "
                               f"expected {FRAME_FEATURES[key]}")
    return info


def read_episode_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One episode file; a missing or unreadable file is a DatasetError that names it."""
    if not path.exists():
        raise DatasetError(f"episode file {path} is listed in {EPISODES} but does not exist")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DatasetError(f"episode file {path} is corrupt or unreadable: {e}") from e


# ---- statistics --------------------------------------------------------------------------------

def compute_stats(data: np.ndarray) -> dict[str, list[float]]:
    """mean, std, min, max, q01, q99 over axis 0 of (n, d) data, and count [n]. Lists of length d."""
    x = np.asarray(data, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DatasetError(f"statistics need (n >= 1, d) data, got shape {x.shape}")
    q = np.quantile(x, STATS_QUANTILES, axis=0)
    return {
        "mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
        "min": x.min(0).tolist(), "max": x.max(0).tolist(),
        "q01": q[0].tolist(), "q99": q[1].tolist(), "count": [int(x.shape[0])],
    }


def feature_matrix(key: str, column: np.ndarray) -> np.ndarray:
    """The (n, d) matrix a feature's statistics are computed over.

    Vectors: (n, d). Scalars: (n, 1). Images: per channel over all pixels, in [0, 1] (the units the
    dataset yields), so the stats have 3 entries.
    """
    if is_image_key(key):
        c = column.shape[1]
        return (column.transpose(0, 2, 3, 1).reshape(-1, c) / 255.0)
    return column.reshape(column.shape[0], -1)


# ---- the writer --------------------------------------------------------------------------------

class DatasetWriter:
    """Writes episodes one at a time; reopening an existing root appends to it (resume).

    Args:
        root: dataset directory (created when missing).
        fps: control frequency; timestamps are frame_index / fps.
        features: {key: {"dtype": ..., "shape": [...]}} of the recorded arrays: at least
            `observation.state` and `action` (float32, shape [d]); images `observation.images.<cam>`
            with dtype "uint8" and shape [3, H, W].
        robot_type: free-form robot name (LeRobot's `robot_type`).
        env_info: how the data was made, e.g. {"id": ..., "kwargs": {...}}; stored in info.json as "env".
        chunks_size: episodes per data/chunk-XXX directory.

    The writer holds the root's `WriterLock` from construction (before it writes anything) until
    `close()`: a second writer on the root, in this process or another, raises `LockError` naming
    the holder's PID. Use it as a context manager (`with DatasetWriter(...) as writer:`).
    `finalize()` writes the statistics and leaves the writer open: more episodes may follow (then
    finalize again); `close()` ends it.
    """

    def __init__(self, root: str | os.PathLike, fps: float, features: Mapping[str, Mapping[str, Any]],
                 robot_type: str | None = None, env_info: Mapping[str, Any] | None = None,
                 chunks_size: int = 1000):
        self.root = Path(root)
        features = check_features(features, "DatasetWriter")
        for key, ft in features.items():
            if key in FRAME_FEATURES:
                raise DatasetError(f"feature {key!r} is written by the writer itself; do not pass it")
            if not is_image_key(key) and ft["dtype"] != "float32":
                raise DatasetError(f"feature {key!r} must have dtype float32, got {ft['dtype']!r}")
        if isinstance(fps, bool) or not isinstance(fps, (int, float, np.number)) or not math.isfinite(fps) or fps <= 0:
            raise DatasetError(f"fps must be a finite number > 0, got {fps!r}")
        if isinstance(chunks_size, bool) or not isinstance(chunks_size, (int, np.integer)) or chunks_size < 1:
            raise DatasetError(f"chunks_size must be an int >= 1, got {chunks_size!r}")
        self.features = features
        # one writer per root, taken before anything is written; the kernel drops it if we die
        self._lock = WriterLock(self.root, "dataset").acquire()
        try:
            # temporaries of a killed writer are never renamed: drop them (ours alone while we hold the lock)
            for directory in [self.root / "meta", *self.root.glob("data/chunk-*")]:
                remove_orphans(directory)
            if (self.root / INFO).exists():
                self._open_existing(fps, robot_type, env_info)
            else:
                self.info = {
                    "format": FORMAT, "fps": fps, "robot_type": robot_type, "env": dict(env_info or {}),
                    "total_episodes": 0, "total_frames": 0, "total_tasks": 0, "total_chunks": 0,
                    "chunks_size": int(chunks_size), "data_path": DATA_PATH, "splits": {},
                    "stats_episodes": 0, "features": {**features, **FRAME_FEATURES},
                }
                self.episodes: list[dict[str, Any]] = []
                self.tasks: dict[str, int] = {}
                self._write_meta()
        except BaseException:
            self._lock.release()
            raise

    def _open_existing(self, fps: float, robot_type: str | None, env_info: Mapping[str, Any] | None) -> None:
        info = read_info(self.root)
        mine = {k: v for k, v in info["features"].items() if k not in FRAME_FEATURES}
        if mine != self.features:
            raise DatasetError(f"cannot append to {self.root}: its features {mine} differ from {self.features}")
        if float(info["fps"]) != float(fps):
            raise DatasetError(f"cannot append to {self.root}: its fps is {info['fps']}, not {fps}")
        if env_info is not None and info.get("env") and info["env"] != json.loads(json.dumps(dict(env_info))):
            raise DatasetError(f"cannot append to {self.root}: it was made with env {info['env']}, not {dict(env_info)}")
        if robot_type is not None and info.get("robot_type") not in (None, robot_type):
            raise DatasetError(f"cannot append to {self.root}: its robot_type is {info['robot_type']!r}, not {robot_type!r}")
        self.info = info
        self.episodes = read_jsonl(self.root / EPISODES)
        self.tasks = {row["task"]: int(row["task_index"]) for row in read_jsonl(self.root / TASKS)}
        # episodes.jsonl is the source of truth (it is written before info.json)
        self.info["total_episodes"] = len(self.episodes)
        self.info["total_frames"] = sum(int(e["length"]) for e in self.episodes)

    # ---- life: the lock is held from __init__ to close() ----
    @property
    def closed(self) -> bool:
        return not self._lock.held

    def close(self) -> None:
        """Release the root's lock; the writer can no longer write. Closing twice is harmless."""
        self._lock.release()

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise DatasetError(f"the DatasetWriter of {self.root} is closed: open a new one to append")

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def num_frames(self) -> int:
        return int(self.info["total_frames"])

    def add_episode(self, frames: Mapping[str, np.ndarray], task: str, extra: Mapping[str, Any] | None = None) -> int:
        """Write one episode; returns its episode_index.

        frames: {feature key: array (T, *shape)} for every feature, plus optional `next.reward` (T,)
            float, `next.done` (T,) bool (default: True at the last frame) and `next.success` (T,) bool.
        task: the episode's language instruction.
        extra: JSON values stored on the episode's line of episodes.jsonl (e.g. success, mode).
        """
        self._check_open()
        unknown = set(frames) - set(self.features) - set(_OPTIONAL_FRAME_KEYS)
        missing = set(self.features) - set(frames)
        if unknown or missing:
            raise DatasetError(f"episode frames: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
        length = int(np.asarray(frames["action"]).shape[0])
        if length < 1:
            raise DatasetError("an episode needs at least one frame")
        arrays: dict[str, np.ndarray] = {}
        for key, ft in self.features.items():
            a = np.asarray(frames[key])
            if a.shape != (length, *ft["shape"]):
                raise DatasetError(f"episode frames {key!r} has shape {a.shape}: expected ({length}, {', '.join(map(str, ft['shape']))})")
            if is_image_key(key):
                if a.dtype != np.uint8:
                    raise DatasetError(f"episode frames {key!r} has dtype {a.dtype}: expected uint8")
            else:  # what ChunkDataset would refuse to open (other features: finite float32 only)
                limit = MAX_ABS_VALUE if key in ("observation.state", "action") else float(np.finfo(np.float32).max)
                check_values(a, key, f"the episode being added to {self.root} (episode {len(self.episodes)})", limit)
            arrays[key] = np.ascontiguousarray(a, dtype=np.uint8 if is_image_key(key) else np.float32)
        done = np.zeros(length, bool)
        done[-1] = True
        defaults = {"next.reward": np.zeros(length, np.float32), "next.done": done, "next.success": np.zeros(length, bool)}
        for key, default in defaults.items():
            a = np.asarray(frames.get(key, default)).astype(default.dtype).reshape(-1)
            if a.shape != (length,):
                raise DatasetError(f"episode frames {key!r} has {a.shape[0]} entries: expected {length}")
            arrays[key] = a

        if not isinstance(task, str):
            raise DatasetError(f"task must be a string, got {type(task).__name__}")
        ep = len(self.episodes)
        start = int(self.info["total_frames"])
        new_task = task not in self.tasks
        task_index = self.tasks.setdefault(task, len(self.tasks))
        frame_index = np.arange(length, dtype=np.int64)
        columns: dict[str, pa.Array] = {}
        for key, a in arrays.items():
            if is_image_key(key):
                flat = a.reshape(length, -1)
                columns[key] = pa.array([row.tobytes() for row in flat], type=pa.binary())
            elif a.ndim == 2:  # (T, d) -> list<float32>
                columns[key] = pa.ListArray.from_arrays(pa.array(np.arange(0, a.size + 1, a.shape[1], dtype=np.int32)),
                                                        pa.array(a.reshape(-1)))
            else:
                columns[key] = pa.array(a)
        columns["timestamp"] = pa.array((frame_index / float(self.info["fps"])).astype(np.float32))
        columns["frame_index"] = pa.array(frame_index)
        columns["episode_index"] = pa.array(np.full(length, ep, np.int64))
        columns["index"] = pa.array(start + frame_index)
        columns["task_index"] = pa.array(np.full(length, task_index, np.int64))
        table = pa.table(columns)
        path = self.root / episode_path(ep, int(self.info["chunks_size"]))
        atomic_write(path, lambda f: pq.write_table(table, f))

        self.episodes.append({"episode_index": ep, "length": length, "tasks": [task], **json.loads(json.dumps(dict(extra or {})))})
        self.info["total_episodes"] = len(self.episodes)
        self.info["total_frames"] = start + length
        self._write_meta(tasks_changed=new_task)
        return ep

    def _write_meta(self, tasks_changed: bool = True) -> None:
        """episodes.jsonl and tasks.jsonl first, info.json last (readers trust episodes.jsonl)."""
        n = len(self.episodes)
        self.info["total_tasks"] = len(self.tasks)
        self.info["total_chunks"] = (n - 1) // int(self.info["chunks_size"]) + 1 if n else 0
        self.info["splits"] = {"train": f"0:{n}"} if n else {}
        if tasks_changed or not (self.root / TASKS).exists():
            atomic_write_text(self.root / TASKS, "".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                         for t, i in sorted(self.tasks.items(), key=lambda x: x[1])))
        atomic_write_text(self.root / EPISODES, "".join(json.dumps(e) + "\n" for e in self.episodes))
        atomic_write_text(self.root / INFO, json.dumps(self.info, indent=2) + "\n")

    def finalize(self) -> dict[str, dict[str, list[float]]]:
        """Compute stats over all frames of all episodes, write stats.json and info.json; return the stats.
        The writer stays open: episodes added afterwards make the stats stale until the next finalize()."""
        self._check_open()
        if not self.episodes:
            raise DatasetError(f"{self.root} has no episodes: nothing to compute statistics over")
        keys = [k for k in self.features] + ["next.reward"]
        columns: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        cs = int(self.info["chunks_size"])
        for e in self.episodes:
            path = self.root / episode_path(int(e["episode_index"]), cs)
            table = read_episode_table(path, columns=keys)
            where = f"episode file {path} (episode {e['episode_index']})"
            for k in keys:
                columns[k].append(column_to_numpy(table, k, self.info["features"][k], where))
        stats = {k: compute_stats(feature_matrix(k, np.concatenate(v))) for k, v in columns.items()}
        atomic_write_text(self.root / STATS, json.dumps(stats) + "\n")
        self.info["stats_episodes"] = len(self.episodes)
        atomic_write_text(self.root / INFO, json.dumps(self.info, indent=2) + "\n")
        return stats


def column_to_numpy(table: pa.Table, key: str, feature: Mapping[str, Any], where: str = "episode file") -> np.ndarray:
    """A column as a numpy array (T, *shape): float32 vectors, uint8 images (T, 3, H, W), scalars (T,).
    Every row must hold exactly the feature's size (checked per row); `where` names the file in errors."""
    if key not in table.column_names:
        raise DatasetError(f"{where}: column {key!r} is missing: the file has {table.column_names}")
    col = table.column(key).combine_chunks()
    shape = [int(s) for s in feature["shape"]]
    n = len(col)
    if is_image_key(key):
        nbytes = math.prod(shape)
        check_binary_widths(col, nbytes, key, where)  # so the data buffer is n images, back to back
        if n == 0:
            return np.zeros((0, *shape), np.uint8)
        start = int(binary_offsets(col)[0])
        return np.frombuffer(col.buffers()[2], np.uint8, count=n * nbytes, offset=start).reshape(n, *shape)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        return list_column_to_numpy(col, math.prod(shape), key, where).reshape(n, *shape)
    if shape != [1] or pa.types.is_nested(col.type):
        raise DatasetError(f"{where}: column {key!r} has arrow type {col.type}: expected {shape} values per frame")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DatasetError(f"{where}, frame {row}, column {key!r}: the row is null")
    return col.to_numpy(zero_copy_only=False)
