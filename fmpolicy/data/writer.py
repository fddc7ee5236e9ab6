"""Write demonstrations as a LeRobot v3.0 dataset, crash-safely and resumably (docs/datasets.md).

The layout is the one lerobot 0.4 writes (tests/fixtures/lerobot_v3/ holds datasets LeRobot wrote):

    meta/info.json                 codebase_version "v3.0", fps, robot_type, totals, features (with
                                   LeRobot's default index columns), data_path / video_path templates,
                                   chunks_size, data_files_size_in_mb, video_files_size_in_mb; plus `env`
                                   (how the data was made), which LeRobot ignores
    meta/tasks.parquet             task_index, and the task string as the pandas index column
    meta/episodes/chunk-000/file-000.parquet   one row per episode: episode_index, tasks, length,
                                   data/chunk_index, data/file_index, dataset_from_index,
                                   dataset_to_index, per video key videos/<key>/chunk_index, file_index,
                                   from_timestamp, to_timestamp; plus our columns from `extra`
                                   (success, mode, seed, return), which LeRobot ignores
    meta/stats.json                per feature: min, max, mean, std, count, q01, q10, q50, q90, q99
    data/chunk-CCC/file-FFF.parquet   many episodes per file, one row group per episode
    videos/<key>/chunk-CCC/file-FFF.mp4   `video` cameras, many episodes per file one after another

Images are given to `add_episode` as uint8 (T, 3, H, W) (what our environments render) and stored as
LeRobot does: `image` features (PNG bytes in the parquet, struct<bytes, path>) by default, or `video`
features (H.264 mp4, see media.py for why) with `video=True`. Either way info.json records the shape
(H, W, 3) with names ["height", "width", "channels"].

Crash safety. Every file is replaced atomically (`fmpolicy.io.atomic_write`): appending an episode
rewrites the current data file with one more row group (and remuxes the current mp4 with the episode's
frames appended), and rolls over to the next file once the current one exceeds its size limit
(`file-FFF` counts up to chunks_size - 1, then the next `chunk-CCC`). An episode's frames reach the
disk before the meta that lists it (tasks, then episodes, then info.json): a killed collection leaves
a dataset that reads as the episodes finished so far. Frames of the unfinished episode may remain at
the end of a data or video file, listed by no episode; reopening the root with a writer removes them
(and any temporary file of an interrupted write), while holding the root's lock.

One writer per root: the writer holds `fmpolicy.io.WriterLock(root)` from construction to `close()`.

Statistics: `finalize()` computes them over all frames (exact quantiles, float64; images per channel
in [0, 1] from a histogram of the uint8 pixels) and writes stats.json. They are stale when their
`count` differs from the number of frames (episodes added since): the reader then recomputes them.

The writer refuses what the reader refuses (fmpolicy/data/checks.py): features of bad dtype or shape,
non-finite states and actions or |x| > 1e6, frames of the wrong shape.
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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fmpolicy.batch import IMAGES_PREFIX
from fmpolicy.data.checks import MAX_ABS_VALUE, check_features, check_values
from fmpolicy.data.dataset import (CODEBASE_VERSION, EPISODES_GLOB, INDEX_COLUMNS, INFO, STATS, TASKS,
                                   read_v3_info, read_v3_tasks)
from fmpolicy.data.media import VIDEO_PIX_FMT, append_mp4, decode_png, encode_png, image_hw
from fmpolicy.data.stats import compute_stats, histogram_stats
from fmpolicy.errors import DatasetError
from fmpolicy.io import WriterLock, atomic_write, atomic_write_text, remove_orphans

DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
# Per-frame columns the writer adds to the recorded features: what the step returned, then LeRobot's
# default index columns.
STEP_FEATURES: dict[str, dict[str, Any]] = {
    "next.reward": {"dtype": "float32", "shape": [1], "names": None},
    "next.done": {"dtype": "bool", "shape": [1], "names": None},
    "next.success": {"dtype": "bool", "shape": [1], "names": None},
}
INDEX_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    **{k: {"dtype": "int64", "shape": [1], "names": None} for k in INDEX_COLUMNS[1:]},
}
# Columns of the episodes table that `extra` may not overwrite.
EPISODE_COLUMNS = ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                   "dataset_to_index", "meta/episodes/chunk_index", "meta/episodes/file_index")
# The pandas metadata LeRobot's tasks.parquet carries (written by DataFrame.to_parquet with the task as index).
TASKS_PANDAS_META = {
    "index_columns": ["__index_level_0__"],
    "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "str",
                        "metadata": {"encoding": "UTF-8"}}],
    "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                 "metadata": None},
                {"name": None, "field_name": "__index_level_0__", "pandas_type": "object", "numpy_type": "str",
                 "metadata": None}],
    "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3",
}


def is_image_key(key: str) -> bool:
    return key.startswith(IMAGES_PREFIX)


def _mb(path: Path) -> float:
    return path.stat().st_size / 2**20 if path.exists() else 0.0


def _next_file(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    """LeRobot's numbering: file-000 .. file-(chunks_size - 1) in a chunk, then the next chunk."""
    return (chunk + 1, 0) if file + 1 >= chunks_size else (chunk, file + 1)


def lerobot_feature(key: str, ft: Mapping[str, Any], video: bool, fps: float) -> dict[str, Any]:
    """info.json's entry for a feature given to the writer: images (uint8 [3, H, W]) become LeRobot's
    `image` / `video` of shape [H, W, 3]."""
    if not is_image_key(key):
        return {"dtype": ft["dtype"], "shape": list(ft["shape"]), "names": None}
    _, h, w = ft["shape"]
    out = {"dtype": "video" if video else "image", "shape": [h, w, 3], "names": ["height", "width", "channels"]}
    if video:
        out["info"] = {"video.height": h, "video.width": w, "video.codec": "h264", "video.pix_fmt": VIDEO_PIX_FMT,
                       "video.is_depth_map": False, "video.fps": fps, "video.channels": 3, "has_audio": False}
    return out


def writer_feature(ft: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `lerobot_feature`: the writer's form of an info.json feature."""
    if ft["dtype"] in ("image", "video"):
        h, w = image_hw(ft)
        return {"dtype": "uint8", "shape": [3, h, w]}
    return {"dtype": ft["dtype"], "shape": list(ft["shape"])}


def hf_features(features: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The `huggingface` schema metadata LeRobot's data files carry (what `datasets` casts them to)."""
    out = {}
    for key, ft in features.items():
        if ft["dtype"] == "video":
            continue
        if ft["dtype"] == "image":
            out[key] = {"_type": "Image"}
        elif ft["shape"] == [1]:
            out[key] = {"dtype": ft["dtype"], "_type": "Value"}
        else:
            out[key] = {"feature": {"dtype": ft["dtype"], "_type": "Value"}, "length": ft["shape"][0], "_type": "List"}
    return {"info": {"features": out}}


# ---- the writer --------------------------------------------------------------------------------

class DatasetWriter:
    """Writes episodes one at a time into a LeRobot v3.0 dataset; reopening an existing root appends.

    Args:
        root: dataset directory (created when missing).
        fps: control frequency; timestamps are frame_index / fps.
        features: {key: {"dtype", "shape"}} of the recorded arrays: at least `observation.state` and
            `action` (float32, shape [d]); cameras `observation.images.<cam>` uint8 of shape [3, H, W].
        robot_type: LeRobot's `robot_type` (free-form).
        env_info: how the data was made, e.g. {"id": ..., "kwargs": {...}}: info.json's `env`.
        video: store cameras as mp4 video (`video` features) instead of PNG in the parquet (`image`).
        chunks_size: files per data/chunk-CCC (and videos/<key>/chunk-CCC) directory.
        data_files_size_in_mb, video_files_size_in_mb: a file that reached this size takes no more
            episodes (LeRobot's limits).
        episodes_per_file: nor does a file that holds this many episodes. Appending an episode rewrites
            the current file, so this bounds the cost of an episode (without it, a collection of E
            small episodes into one file would cost O(E^2)); LeRobot reads any number of files.

    The writer holds the root's `WriterLock` from construction until `close()` (use `with`).
    `finalize()` writes the statistics and leaves the writer open.
    """

    def __init__(self, root: str | os.PathLike, fps: float, features: Mapping[str, Mapping[str, Any]],
                 robot_type: str | None = None, env_info: Mapping[str, Any] | None = None, video: bool = False,
                 chunks_size: int = 1000, data_files_size_in_mb: float = 100.0, video_files_size_in_mb: float = 200.0,
                 episodes_per_file: int = 50):
        self.root = Path(root)
        features = check_features(features, "DatasetWriter")
        for key, ft in features.items():
            if key in STEP_FEATURES or key in INDEX_FEATURES:
                raise DatasetError(f"feature {key!r} is written by the writer itself; do not pass it")
            if not is_image_key(key) and ft["dtype"] != "float32":
                raise DatasetError(f"feature {key!r} must have dtype float32, got {ft['dtype']!r}")
            if is_image_key(key) and video and (ft["shape"][1] % 2 or ft["shape"][2] % 2):
                raise DatasetError(f"feature {key!r} has shape {ft['shape']}: video (yuv420p) needs an even "
                                   "height and width")
        if isinstance(fps, bool) or not isinstance(fps, (int, float, np.number)) or not math.isfinite(fps) or fps <= 0:
            raise DatasetError(f"fps must be a finite number > 0, got {fps!r}")
        for name, value in (("chunks_size", chunks_size), ("episodes_per_file", episodes_per_file)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise DatasetError(f"{name} must be an int >= 1, got {value!r}")
        for name, size in (("data_files_size_in_mb", data_files_size_in_mb),
                           ("video_files_size_in_mb", video_files_size_in_mb)):
            if not isinstance(size, (int, float)) or isinstance(size, bool) or not size > 0:
                raise DatasetError(f"{name} must be a number > 0, got {size!r}")
        self.features = features
        self.video = bool(video)
        self.episodes_per_file = int(episodes_per_file)
        self._groups: tuple[Path, list[pa.Table]] | None = None  # the current data file's row groups
        self.fps = int(fps) if float(fps).is_integer() else float(fps)
        # one writer per root, taken before anything is written; the kernel drops it if we die
        self._lock = WriterLock(self.root, "dataset").acquire()
        try:
            self._remove_orphans()
            if (self.root / INFO).exists():
                self._open_existing(robot_type, env_info)
            else:
                info_features = {k: lerobot_feature(k, ft, self.video, self.fps) for k, ft in features.items()}
                self.info: dict[str, Any] = {
                    "codebase_version": CODEBASE_VERSION, "robot_type": robot_type, "total_episodes": 0,
                    "total_frames": 0, "total_tasks": 0, "chunks_size": int(chunks_size),
                    "data_files_size_in_mb": float(data_files_size_in_mb),
                    "video_files_size_in_mb": float(video_files_size_in_mb), "fps": self.fps, "splits": {},
                    "data_path": DATA_PATH, "video_path": VIDEO_PATH if self.video_keys(info_features) else None,
                    "features": {**info_features, **STEP_FEATURES, **INDEX_FEATURES},
                    "env": json.loads(json.dumps(dict(env_info or {}))),
                }
                self.episodes: list[dict[str, Any]] = []
                self.tasks: dict[str, int] = {}
                atomic_write_text(self.root / INFO, json.dumps(self.info, indent=4) + "\n")
        except BaseException:
            self._lock.release()
            raise

    @staticmethod
    def video_keys(features: Mapping[str, Mapping[str, Any]]) -> list[str]:
        return [k for k, ft in features.items() if ft["dtype"] == "video"]

    def _remove_orphans(self) -> None:
        """Temporaries of a killed writer are never renamed: drop them (ours alone under the lock)."""
        dirs = [self.root / "meta", *self.root.glob("meta/episodes/chunk-*"), *self.root.glob("data/chunk-*"),
                *self.root.glob("videos/*/chunk-*")]
        for directory in dirs:
            remove_orphans(directory)

    def _open_existing(self, robot_type: str | None, env_info: Mapping[str, Any] | None) -> None:
        info = read_v3_info(self.root)
        where = f"cannot append to {self.root}"
        mine = {k: writer_feature(ft) for k, ft in info["features"].items()
                if k not in STEP_FEATURES and k not in INDEX_FEATURES}
        if mine != self.features:
            raise DatasetError(f"{where}: its features {mine} differ from {self.features}")
        stored_video = bool(self.video_keys(info["features"]))
        if any(is_image_key(k) for k in mine) and stored_video != self.video:
            raise DatasetError(f"{where}: its cameras are stored as {'video' if stored_video else 'PNG images'}, "
                               f"not {'video' if self.video else 'PNG images'} (the `video` switch)")
        if float(info["fps"]) != float(self.fps):
            raise DatasetError(f"{where}: its fps is {info['fps']}, not {self.fps}")
        if env_info is not None and info.get("env") and info["env"] != json.loads(json.dumps(dict(env_info))):
            raise DatasetError(f"{where}: it was made with env {info['env']}, not {dict(env_info)}")
        if robot_type is not None and info.get("robot_type") not in (None, robot_type):
            raise DatasetError(f"{where}: its robot_type is {info['robot_type']!r}, not {robot_type!r}")
        for key in ("chunks_size", "data_files_size_in_mb", "video_files_size_in_mb"):
            if key not in info:
                raise DatasetError(f"{self.root / INFO} lacks the key {key!r}")
        self.info = info
        self.episodes = []
        others = [p for p in self.root.glob(EPISODES_GLOB) if p != self.root / EPISODES_PATH]
        if others:
            raise DatasetError(f"{where}: its episodes table spans several files ({others[0]}): appending is "
                               f"supported for datasets this writer made (one file, {EPISODES_PATH})")
        if list(self.root.glob(EPISODES_GLOB)):
            try:
                self.episodes = pq.read_table(self.root / EPISODES_PATH).to_pylist()
            except (OSError, pa.ArrowException) as e:
                raise DatasetError(f"{where}: {self.root / EPISODES_PATH} is not readable parquet: {e}") from e
            self.episodes.sort(key=lambda e: e["episode_index"])
            if [e["episode_index"] for e in self.episodes] != list(range(len(self.episodes))):
                raise DatasetError(f"{where}: its episodes table does not hold episodes 0..{len(self.episodes) - 1}")
        self.tasks = {t: i for i, t in enumerate(read_v3_tasks(self.root))} if (self.root / TASKS).exists() else {}
        self._drop_unlisted_frames()
        self._write_meta(tasks_changed=False)  # the totals follow the episodes table (written before info.json)

    def _drop_unlisted_frames(self) -> None:
        """Remove what a writer killed inside `add_episode` left: rows of the unlisted episode at the end
        of the last data file, and data / video files that no episode lists (LeRobot reads every data
        file). The trailing frames of an mp4 are dropped when the next episode is appended to it."""
        listed = {(e["data/chunk_index"], e["data/file_index"]) for e in self.episodes}
        for path in self.root.glob("data/chunk-*/file-*.parquet"):
            chunk, file = int(path.parent.name[6:]), int(path.stem[5:])
            if (chunk, file) not in listed:
                path.unlink()
            elif (chunk, file) == max(listed):
                table = pq.read_table(path, columns=["episode_index"])
                if pc.max(table.column(0)).as_py() >= len(self.episodes):
                    self._rewrite_data_file(path, len(self.episodes), None, keep_old=True)
        for key in self.video_keys(self.info["features"]):
            listed = {(e[f"videos/{key}/chunk_index"], e[f"videos/{key}/file_index"]) for e in self.episodes}
            for path in self.root.glob(f"videos/{key}/chunk-*/file-*.mp4"):
                if (int(path.parent.name[6:]), int(path.stem[5:])) not in listed:
                    path.unlink()

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
        return sum(int(e["length"]) for e in self.episodes)

    @property
    def stats_are_current(self) -> bool:
        """stats.json exists and was computed over every frame (its count is the number of frames)."""
        try:
            stats = json.loads((self.root / STATS).read_text())
            return int(stats["observation.state"]["count"][0]) == self.num_frames
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return False

    # ---- episodes ----
    def _frames(self, frames: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The episode's arrays, checked as the reader would check them, with the step columns' defaults."""
        unknown = set(frames) - set(self.features) - set(STEP_FEATURES)
        missing = set(self.features) - set(frames)
        if unknown or missing:
            raise DatasetError(f"episode frames: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
        length = int(np.asarray(frames["action"]).shape[0])
        if length < 1:
            raise DatasetError("an episode needs at least one frame")
        arrays: dict[str, np.ndarray] = {}
        where = f"the episode being added to {self.root} (episode {len(self.episodes)})"
        for key, ft in self.features.items():
            a = np.asarray(frames[key])
            if a.shape != (length, *ft["shape"]):
                raise DatasetError(f"episode frames {key!r} has shape {a.shape}: expected {(length, *ft['shape'])}")
            if is_image_key(key):
                if a.dtype != np.uint8:
                    raise DatasetError(f"episode frames {key!r} has dtype {a.dtype}: expected uint8")
                arrays[key] = np.ascontiguousarray(a)
            else:  # what the reader would refuse to open (other features: finite float32 only)
                limit = MAX_ABS_VALUE if key in ("observation.state", "action") else float(np.finfo(np.float32).max)
                check_values(a.astype(np.float64), key, where, limit)
                arrays[key] = np.ascontiguousarray(a, dtype=np.float32)
        done = np.zeros(length, bool)
        done[-1] = True
        defaults = {"next.reward": np.zeros(length, np.float32), "next.done": done, "next.success": np.zeros(length, bool)}
        for key, default in defaults.items():
            a = np.asarray(frames.get(key, default)).astype(default.dtype).reshape(-1)
            if a.shape != (length,):
                raise DatasetError(f"episode frames {key!r} has {a.shape[0]} entries: expected {length}")
            if key == "next.reward":
                check_values(a.reshape(-1, 1).astype(np.float64), key, where, float(np.finfo(np.float32).max))
            arrays[key] = a
        return arrays

    def add_episode(self, frames: Mapping[str, np.ndarray], task: str, extra: Mapping[str, Any] | None = None) -> int:
        """Write one episode; returns its episode_index.

        frames: {feature key: array (T, *shape)} for every feature (cameras uint8 (T, 3, H, W)), plus
            optional `next.reward` (T,) float, `next.done` (T,) bool (default: True at the last frame)
            and `next.success` (T,) bool.
        task: the episode's language instruction.
        extra: JSON values stored as columns of the episode's row in the episodes table (e.g. success,
            mode, seed); LeRobot ignores them.
        """
        self._check_open()
        arrays = self._frames(frames)
        if not isinstance(task, str):
            raise DatasetError(f"task must be a string, got {type(task).__name__}")
        extra = json.loads(json.dumps(dict(extra or {})))
        clash = [k for k in extra if k in EPISODE_COLUMNS or k.startswith(("videos/", "stats/"))]
        if clash:
            raise DatasetError(f"extra {clash} would overwrite columns of the episodes table")
        ep, start = len(self.episodes), self.num_frames
        length = len(arrays["action"])
        new_task = task not in self.tasks
        task_index = self.tasks.setdefault(task, len(self.tasks))
        row: dict[str, Any] = {"episode_index": ep, "tasks": [task], "length": length}
        try:
            # frames first (data, then video), meta last: the meta never lists what is not on disk
            row.update(self._write_data(arrays, ep, start, task_index))
            for key in self.video_keys(self.info["features"]):
                row.update(self._write_video(key, arrays[key]))
            row.update({"dataset_from_index": start, "dataset_to_index": start + length,
                        "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0, **extra})
            self.episodes.append(row)
            self._write_meta(tasks_changed=new_task)
        except BaseException:
            # as if the episode was never added: its frames on disk are listed by no episode, and the
            # next episode (same index) replaces them (the data file is read back, filtered)
            if self.episodes and self.episodes[-1] is row:
                self.episodes.pop()
            if new_task:
                del self.tasks[task]
            self._groups = None
            raise
        return ep

    def _current(self, prefix: str, path_of, limit_mb: float) -> tuple[int, int, bool]:
        """(chunk, file) the next episode goes to, and whether that file already holds episodes."""
        if not self.episodes:
            return 0, 0, False
        last = self.episodes[-1]
        chunk, file = int(last[f"{prefix}/chunk_index"]), int(last[f"{prefix}/file_index"])
        in_file = sum(1 for e in self.episodes[-self.episodes_per_file:]
                      if (e[f"{prefix}/chunk_index"], e[f"{prefix}/file_index"]) == (chunk, file))
        if _mb(path_of(chunk, file)) < limit_mb and in_file < self.episodes_per_file:
            return chunk, file, True
        return (*_next_file(chunk, file, int(self.info["chunks_size"])), False)

    def _data_path(self, chunk: int, file: int) -> Path:
        return self.root / self.info["data_path"].format(chunk_index=chunk, file_index=file)

    def _video_path(self, key: str, chunk: int, file: int) -> Path:
        return self.root / self.info["video_path"].format(video_key=key, chunk_index=chunk, file_index=file)

    def _write_data(self, arrays: dict[str, np.ndarray], ep: int, start: int, task_index: int) -> dict[str, int]:
        length = len(arrays["action"])
        frame_index = np.arange(length, dtype=np.int64)
        columns: dict[str, pa.Array] = {}
        for key, ft in self.info["features"].items():
            if ft["dtype"] == "video" or key in INDEX_FEATURES:
                continue
            a = arrays[key]
            if ft["dtype"] == "image":
                columns[key] = pa.array([{"bytes": encode_png(img), "path": None} for img in a],
                                        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
            elif a.ndim == 2:  # (T, d) -> fixed_size_list<float32>[d], as LeRobot writes vectors
                columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
            else:
                columns[key] = pa.array(a)
        columns["timestamp"] = pa.array((frame_index / float(self.fps)).astype(np.float32))
        columns["frame_index"] = pa.array(frame_index)
        columns["episode_index"] = pa.array(np.full(length, ep, np.int64))
        columns["index"] = pa.array(start + frame_index)
        columns["task_index"] = pa.array(np.full(length, task_index, np.int64))
        meta = {b"huggingface": json.dumps(hf_features(self.info["features"])).encode()}
        table = pa.table(columns).replace_schema_metadata(meta)
        chunk, file, append = self._current("data", self._data_path, float(self.info["data_files_size_in_mb"]))
        self._rewrite_data_file(self._data_path(chunk, file), ep, table, keep_old=append)
        return {"data/chunk_index": chunk, "data/file_index": file}

    def _rewrite_data_file(self, path: Path, keep_below: int, new: pa.Table | None, keep_old: bool) -> None:
        """Replace `path` by (when keep_old) its rows of episodes < keep_below, one row group per
        episode as LeRobot writes, then `new` as one more row group."""
        groups = []
        if keep_old and self._groups is not None and self._groups[0] == path:
            groups = list(self._groups[1])  # what we wrote last: no need to read it back
        elif keep_old and path.exists():
            source = pq.ParquetFile(path)
            for g in range(source.num_row_groups):
                group = source.read_row_group(g)
                groups.append(group.filter(pc.less(group.column("episode_index"), keep_below)))
        if new is not None:
            groups.append(new)
        groups = [g for g in groups if g.num_rows]
        self._groups = None
        if not groups:
            path.unlink(missing_ok=True)
            return
        schema = (new if new is not None else groups[0]).schema

        def write(f) -> None:
            with pq.ParquetWriter(f, schema) as out:
                for group in groups:
                    out.write_table(group.cast(schema), row_group_size=group.num_rows)

        atomic_write(path, write)
        self._groups = (path, groups)

    def _write_video(self, key: str, frames: np.ndarray) -> dict[str, Any]:
        chunk, file, append = self._current(f"videos/{key}", lambda c, f: self._video_path(key, c, f),
                                            float(self.info["video_files_size_in_mb"]))
        start_s = float(self.episodes[-1][f"videos/{key}/to_timestamp"]) if append else 0.0
        path = self._video_path(key, chunk, file)
        atomic_write(path, lambda f: append_mp4(f, path if append else None, start_s, frames, float(self.fps)))
        return {f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                f"videos/{key}/from_timestamp": start_s,
                f"videos/{key}/to_timestamp": start_s + len(frames) / float(self.fps)}

    def _write_meta(self, tasks_changed: bool = True) -> None:
        """tasks.parquet, then the episodes table, then info.json (readers trust the episodes table)."""
        if tasks_changed:
            order = sorted(self.tasks.items(), key=lambda x: x[1])
            table = pa.table({"task_index": pa.array([i for _, i in order], pa.int64()),
                              "__index_level_0__": pa.array([t for t, _ in order], pa.large_string())})
            table = table.replace_schema_metadata({b"pandas": json.dumps(TASKS_PANDAS_META).encode()})
            atomic_write(self.root / TASKS, lambda f: pq.write_table(table, f))
        if self.episodes:
            keys = list(dict.fromkeys(k for e in self.episodes for k in e))
            columns = {k: [e.get(k) for e in self.episodes] for k in keys}
            try:
                table = pa.table({k: pa.array(v) for k, v in columns.items()})
            except (pa.ArrowException, ValueError) as e:
                raise DatasetError(f"the episodes' extra columns have values of different types: {e}") from e
            atomic_write(self.root / EPISODES_PATH, lambda f: pq.write_table(table, f))
        n = len(self.episodes)
        self.info.update(total_episodes=n, total_frames=self.num_frames, total_tasks=len(self.tasks),
                         splits={"train": f"0:{n}"} if n else {})
        atomic_write_text(self.root / INFO, json.dumps(self.info, indent=4) + "\n")

    # ---- statistics ----
    def finalize(self) -> dict[str, dict[str, list]]:
        """Compute the statistics over all frames of all episodes, write stats.json; return them.
        The writer stays open: episodes added afterwards make the stats stale until the next finalize()."""
        self._check_open()
        if not self.episodes:
            raise DatasetError(f"{self.root} has no episodes: nothing to compute statistics over")
        features = self.info["features"]
        numeric = [k for k, ft in features.items() if ft["dtype"] not in ("image", "video")]
        images = [k for k, ft in features.items() if ft["dtype"] == "image"]
        columns: dict[str, list[np.ndarray]] = {k: [] for k in numeric}
        hist = {k: np.zeros((3, 256), np.int64) for k in [*images, *self.video_keys(features)]}
        files = sorted({(e["data/chunk_index"], e["data/file_index"]) for e in self.episodes})
        for chunk, file in files:
            table = pq.read_table(self._data_path(chunk, file), columns=numeric + images)
            for k in numeric:
                col = table.column(k).combine_chunks()
                values = col.flatten() if pa.types.is_fixed_size_list(col.type) else col
                columns[k].append(values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), -1))
            for k in images:
                for value in table.column(k).to_pylist():
                    _count_pixels(hist[k], decode_png(value["bytes"]))
        for k in self.video_keys(features):
            ends: dict[Path, float] = {}  # each file's frames up to its last listed episode's end
            for e in self.episodes:
                path = self._video_path(k, e[f"videos/{k}/chunk_index"], e[f"videos/{k}/file_index"])
                ends[path] = max(ends.get(path, 0.0), float(e[f"videos/{k}/to_timestamp"]))
            for path, end in sorted(ends.items()):
                _count_video_pixels(hist[k], path, end - 0.5 / float(self.fps))
        stats = {k: compute_stats(np.concatenate(v)) for k, v in columns.items()}
        stats.update({k: histogram_stats(h, self.num_frames) for k, h in hist.items()})
        atomic_write_text(self.root / STATS, json.dumps(stats, indent=4) + "\n")
        return stats


def _count_pixels(hist: np.ndarray, rgb: np.ndarray) -> None:
    """Add the pixel values of an (H, W, 3) uint8 image to the (3, 256) per-channel counts."""
    for c in range(3):
        hist[c] += np.bincount(rgb[..., c].reshape(-1), minlength=256)


def _count_video_pixels(hist: np.ndarray, path: Path, end_s: float) -> None:
    """Add the pixels of the frames of an mp4 before `end_s` (later frames belong to no listed episode)."""
    import av

    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if frame.time is not None and frame.time < end_s:
                _count_pixels(hist, frame.to_ndarray(format="rgb24"))
