"""The dataset reader: training windows over a LeRobot v3.0 dataset on local disk, as LeRobot's
`delta_timestamps` gives them. One reader for every dataset: those `DatasetWriter` writes
(fmpolicy/data/writer.py) and those LeRobot writes or the hub serves.

The layout (what lerobot 0.4 to 0.6 write):

    meta/info.json                 codebase_version "v3.0", fps, features, data_path / video_path templates
    meta/stats.json                per feature: min, max, mean, std, count (and q01 .. q99 in newer data)
    meta/tasks.parquet             one row per task: task_index, the task string as the pandas index column
    meta/episodes/chunk-*/file-*.parquet   one row per episode: length, tasks, data/chunk_index,
                                   data/file_index, dataset_from_index, dataset_to_index and, per video key,
                                   videos/<key>/chunk_index, file_index, from_timestamp, to_timestamp
    data/chunk-*/file-*.parquet    one row per frame, many episodes per file (one row group per episode
                                   when LeRobot records): state/action as fixed_size_list<float32>,
                                   `image` features as struct<bytes: PNG, path>, timestamp, frame_index,
                                   episode_index, index (global frame number), task_index
    videos/<key>/chunk-*/file-*.mp4   `video` features, many episodes per file one after another: the
                                   frame at `timestamp` of an episode is at `from_timestamp + timestamp`

`ChunkDataset(root, chunk_size=h)` (alias `LeRobotV3Dataset`) yields, for window i = frame t of its episode (length L):

    observation.state        (s,) float32, the state at frame t
    action                   (h, a) float32, actions t .. t+h-1; steps past the episode end repeat the
                             episode's last action (LeRobot clamps the index to the episode)
    action_is_pad            (h,) bool, True exactly where t + k >= L
    observation.images.<cam> (3, H, W) float32 in [0, 1], PNG or video frame at t
    task                     str
    index, episode_index, frame_index   int64 scalars;  timestamp   float32 scalar
    (any other numeric feature of the data, e.g. next.reward, at frame t)

which is what `lerobot.datasets.LeRobotDataset(repo_id, root=..., delta_timestamps={"action":
[k / fps for k in range(h)]})` returns for the same frame (tests/test_lerobot_v3.py checks it against
values LeRobot itself produced), and what `FlowPolicy.compute_loss` reads after the default collate.

Memory: the state, action and index columns are loaded at open (small); images are not. PNG images are
read per item from the row group that holds the frame (LeRobot writes one per episode), with a small
per-process cache of row groups; video frames are decoded per item with PyAV, with a small per-process
cache of open containers (rebuilt after a fork, so DataLoader workers each open their own).

Statistics (`ds.stats`) come from meta/stats.json when its `count` is the dataset's number of frames;
when it is missing or stale (an interrupted collection, episodes added since) they are computed from
the loaded states and actions, with a warning. `ds.all_windows(device)` gives every window at once
(images decoded once, kept uint8; the other numeric features at frame t too, e.g.
`observation.environment_state`), the fast path for small datasets; `ds.windows(rows)` the same
for some rows only, what the streaming trainer's DataLoader workers read per batch.

Frames are decoded in fmpolicy/data/media.py (PNG with Pillow, video with PyAV: why PyAV is said there).

Opening checks the dataset (fmpolicy/data/checks.py) and fails with a `DatasetError` naming the file,
the episode, the frame and the column: codebase_version, fps, features, the episodes table (lengths
against from/to indices), and every loaded frame (rows of the declared width, finite states and
actions with |x| <= 1e6, frame_index 0..L-1, episode_index, index, known task_index). Video and image
files are checked to exist at open; their content is checked when a frame is read.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fmpolicy.data.checks import check_equal, check_known, check_shape, check_values, list_column_to_numpy
from fmpolicy.data.media import (VIDEO_TOLERANCE_S, ProcessCache, close_video, decode_all_frames, decode_png,
                                 decode_video_frame,
                                 image_hw, open_video, to_chw_float)
from fmpolicy.data.stats import compute_stats
from fmpolicy.errors import DatasetError

CODEBASE_VERSION = "v3.0"
INFO, STATS, TASKS = "meta/info.json", "meta/stats.json", "meta/tasks.parquet"
EPISODES_GLOB = "meta/episodes/chunk-*/file-*.parquet"
STATE, ACTION = "observation.state", "action"
# Columns every v3 data file has besides the features (LeRobot's DEFAULT_FEATURES).
INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
# What meta/stats.json must hold for state, action and the loaded cameras (quantiles are optional:
# older LeRobot data lacks them; the quantile normalizer says so when it needs them).
REQUIRED_STATS = ("mean", "std", "min", "max", "count")
# dtypes a feature may have in info.json (LeRobot's, and what `datasets` stores).
DTYPES = frozenset({"float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool",
                    "string", "image", "video"})


# ---- meta files ----------------------------------------------------------------------------------

def _read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist") from None
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{path} is not readable parquet: {e}") from e


def read_v3_info(root: str | os.PathLike) -> dict[str, Any]:
    """meta/info.json of a LeRobot v3.0 dataset, checked: codebase_version, fps, chunks_size, the path
    templates, and features ({key: {"dtype", "shape"}}, shapes lists of positive ints)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist")
    path = root / INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist: {root} is not a LeRobot dataset") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(info, dict):
        raise DatasetError(f"{path} holds {type(info).__name__}: expected an object")
    version = info.get("codebase_version")
    if version != CODEBASE_VERSION:
        hint = (" (LeRobot v2.x: convert it with lerobot's `lerobot.datasets.v30.convert_dataset_v21_to_v30`)"
                if isinstance(version, str) and version.startswith("v2") else
                " (fmpolicy's old layout: convert it with `python scripts/convert_dataset.py OLD_ROOT NEW_ROOT`)"
                if info.get("format") == "fmpolicy-lerobot-v1" else "")
        raise DatasetError(f"{path}: codebase_version is {version!r}: expected {CODEBASE_VERSION!r}{hint}")
    fps = info.get("fps")
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
        raise DatasetError(f"{path}: fps is {fps!r}: expected a finite number > 0")
    for key in ("data_path", "features"):
        if key not in info:
            raise DatasetError(f"{path} lacks the key {key!r}")
    chunks = info.get("chunks_size", 1)
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise DatasetError(f"{path}: chunks_size is {chunks!r}: expected an int >= 1")
    features = info["features"]
    if not isinstance(features, Mapping):
        raise DatasetError(f"{path}: features is {type(features).__name__}: expected a mapping")
    for key, ft in features.items():
        at = f"{path} features[{key!r}]"
        if not isinstance(ft, Mapping) or not isinstance(ft.get("dtype"), str) or "shape" not in ft:
            raise DatasetError(f"{at} is {ft!r}: expected {{'dtype': ..., 'shape': [...]}}")
        if ft["dtype"] not in DTYPES:
            raise DatasetError(f"{at}.dtype is {ft['dtype']!r}: expected one of {sorted(DTYPES)}")
        check_shape(list(ft["shape"]) if isinstance(ft["shape"], (list, tuple)) else ft["shape"], at)
        if ft["dtype"] == "video" and "video_path" not in info:
            raise DatasetError(f"{path}: {key!r} is a video feature but info.json has no 'video_path'")
    return info


def read_v3_tasks(root: str | os.PathLike) -> list[str]:
    """meta/tasks.parquet as a list: tasks[task_index] is the task string. LeRobot writes it from a
    pandas DataFrame indexed by the task, so the string is the index column (`__index_level_0__`, or
    the index's name, as the parquet's pandas metadata says)."""
    path = Path(root) / TASKS
    table = _read_parquet(path)
    meta = table.schema.pandas_metadata or {}
    candidates = [c for c in meta.get("index_columns", []) if isinstance(c, str)] + ["task", "__index_level_0__"]
    name = next((c for c in candidates if c in table.column_names), None)
    if name is None or "task_index" not in table.column_names:
        raise DatasetError(f"{path} has columns {table.column_names}: expected task_index and the task "
                           "string (the pandas index column)")
    index = table.column("task_index").to_numpy(zero_copy_only=False)
    text = table.column(name).to_pylist()
    if sorted(index.tolist()) != list(range(len(index))):
        raise DatasetError(f"{path} has task indices {sorted(index.tolist())}: expected 0..{len(index) - 1}, once each")
    tasks = [""] * len(index)
    for i, s in zip(index.tolist(), text):
        if not isinstance(s, str):
            raise DatasetError(f"{path}: task {i} is {s!r}: expected a string")
        tasks[i] = s
    return tasks


def read_v3_episodes(root: str | os.PathLike) -> dict[str, np.ndarray]:
    """The episodes table (every meta/episodes file, without the per-episode stats columns) as
    {column: (E,) array}, sorted by episode_index, checked: each episode once, length >= 1 and equal
    to dataset_to_index - dataset_from_index."""
    root = Path(root)
    files = sorted(root.glob(EPISODES_GLOB))
    if not files:
        raise DatasetError(f"{root} has zero episodes ({EPISODES_GLOB} matches no file)")
    parts = []
    for f in files:
        schema = _read_parquet_schema(f)
        parts.append(_read_parquet(f, [c for c in schema.names if not c.startswith("stats/") and c != "tasks"]))
    try:
        table = pa.concat_tables(parts, promote_options="default")
    except pa.ArrowException as e:
        raise DatasetError(f"the episodes files {files[0].parent.parent} do not share columns: {e}") from e
    where = f"{root / 'meta/episodes'}"
    need = ("episode_index", "length", "data/chunk_index", "data/file_index", "dataset_from_index", "dataset_to_index")
    for c in need:
        if c not in table.column_names:
            raise DatasetError(f"the episodes table {where} lacks the column {c!r}")
    for c in need:
        nulls = table.column(c).is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            k = int(np.flatnonzero(nulls)[0])
            raise DatasetError(f"the episodes table {where}, row {k} (episode "
                               f"{table.column('episode_index')[k].as_py()}): {c!r} is null: expected an int")
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    order = np.argsort(cols["episode_index"], kind="stable")
    cols = {c: v[order] for c, v in cols.items()}
    ep = cols["episode_index"]
    twice = ep[1:][ep[1:] == ep[:-1]]
    if twice.size:
        raise DatasetError(f"the episodes table {where} lists episode {int(twice[0])} twice")
    span = cols["dataset_to_index"] - cols["dataset_from_index"]
    bad = np.flatnonzero((cols["length"] < 1) | (span != cols["length"]))
    if bad.size:
        k = int(bad[0])
        raise DatasetError(f"the episodes table {where}, episode {int(ep[k])}: length {int(cols['length'][k])}, "
                           f"dataset_from_index {int(cols['dataset_from_index'][k])}, dataset_to_index "
                           f"{int(cols['dataset_to_index'][k])}: expected length >= 1 and to - from == length")
    return cols


def _read_parquet_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{path} is not readable parquet: {e}") from e


def read_v3_stats(root: str | os.PathLike, widths: Mapping[str, int], required: Sequence[str],
                  total_frames: int) -> dict[str, dict[str, Tensor]] | None:
    """meta/stats.json as {feature: {name: float32 tensor (d,)}} for the features in `widths` that it
    has (image statistics, stored (3, 1, 1), come out (3,)); None when the file is missing or stale
    (the `count` of `required[0]` is not `total_frames`: an interrupted collection). Checked: the
    `required` features are there with all of REQUIRED_STATS, every statistic a list of finite
    numbers of the feature's width, count a list of one int."""
    path = Path(root) / STATS
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(raw, Mapping):
        raise DatasetError(f"{path} holds {type(raw).__name__}: expected a mapping of feature -> statistics")
    count = raw.get(required[0], {}).get("count") if isinstance(raw.get(required[0]), Mapping) else None
    if isinstance(count, list) and len(count) == 1 and isinstance(count[0], (int, float)) and count[0] != total_frames:
        return None  # stale: not used, so not checked
    missing = [k for k in required if not isinstance(raw.get(k), Mapping)]
    if missing:
        raise DatasetError(f"{path} lacks the statistics of {missing[0]!r} (it has {sorted(raw)})")
    out: dict[str, dict[str, Tensor]] = {}
    for key, width in widths.items():
        entry = raw.get(key)
        if not isinstance(entry, Mapping):
            continue
        absent = [name for name in REQUIRED_STATS if name not in entry]
        if absent:
            raise DatasetError(f"{path}: the statistics of {key!r} lack {absent[0]!r} "
                               f"(expected all of {list(REQUIRED_STATS)})")
        out[key] = {}
        for name, value in entry.items():
            try:
                arr = np.asarray(value, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise DatasetError(f"{path}: {key!r} {name!r} is {value!r}: expected a list of numbers") from None
            expected = 1 if name == "count" else width
            if arr.shape[0] != expected:
                raise DatasetError(f"{path}: {key!r} {name!r} has {arr.shape[0]} entries: expected {expected}")
            bad = np.flatnonzero(~np.isfinite(arr))
            if bad.size:
                raise DatasetError(f"{path}: {key!r} {name!r}[{int(bad[0])}] is {arr[bad[0]]}: "
                                   "expected a finite number")
            if name != "count":
                out[key][name] = torch.tensor(arr, dtype=torch.float32)
    return out


# ---- the dataset ---------------------------------------------------------------------------------

class ChunkDataset(Dataset):
    """Action-chunk windows of length `chunk_size` over a local LeRobot v3.0 dataset.

    Args:
        root: the dataset directory (holding meta/info.json).
        chunk_size: h, the number of actions per window (>= 1); LeRobot's
            `delta_timestamps={"action": [k / fps for k in range(h)]}`.
        episodes: optional subset of episode indices (sorted; frames keep the dataset's order).
        rename_map: {dataset key: our key}, LeRobot's feature renaming, e.g.
            {"observation.images.top": "observation.images.cam0", "observation.joints": "observation.state"}.
            Applied to every feature (and to stats); keys refer to the dataset's own names.
        image_keys: None for every image / video feature, [] for none, or a list of (renamed) keys.
        video_tolerance_s: how far a decoded video frame may be from the frame's timestamp.
    """

    def __init__(self, root: str | os.PathLike, chunk_size: int, episodes: Sequence[int] | None = None,
                 rename_map: Mapping[str, str] | None = None, image_keys: Sequence[str] | None = None,
                 video_tolerance_s: float = VIDEO_TOLERANCE_S):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise DatasetError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.root = Path(root)
        self.chunk_size = int(chunk_size)
        self.video_tolerance_s = float(video_tolerance_s)
        self.info = read_v3_info(self.root)
        self.fps = float(self.info["fps"])
        raw_features: dict[str, dict[str, Any]] = dict(self.info["features"])

        # ---- renaming: dataset key -> our key ----
        rename_map = dict(rename_map or {})
        unknown = [k for k in rename_map if k not in raw_features]
        if unknown:
            raise DatasetError(f"rename_map names {unknown}, which are not features of {self.root} "
                               f"(it has {sorted(raw_features)})")
        self.rename_map = {k: rename_map.get(k, k) for k in raw_features}
        ours = list(self.rename_map.values())
        twice = sorted({k for k in ours if ours.count(k) > 1})
        if twice:
            raise DatasetError(f"rename_map maps two features of {self.root} onto {twice[0]!r}")
        self.features = {self.rename_map[k]: ft for k, ft in raw_features.items()}
        self._source = {v: k for k, v in self.rename_map.items()}  # our key -> dataset column

        for key in (STATE, ACTION):
            ft = self.features.get(key)
            if ft is None:
                raise DatasetError(f"{self.root / INFO} has no feature {key!r} (features: {sorted(self.features)}); "
                                   "name the dataset's key in rename_map")
            if ft["dtype"] not in ("float32", "float64") or len(ft["shape"]) != 1:
                found = {"dtype": ft["dtype"], "shape": ft["shape"]}
                raise DatasetError(f"{self.root / INFO} features[{self._source[key]!r}] is {found}: "
                                   "expected float32 (or float64) of shape [d]")
        cameras = [k for k, ft in self.features.items() if ft["dtype"] in ("image", "video")]
        if image_keys is None:
            image_keys = cameras
        for k in image_keys:
            if k not in cameras:
                raise DatasetError(f"image key {k!r} is not in {self.root}: it has {cameras}")
        self.image_keys = list(image_keys)
        self.video_keys = [k for k in self.image_keys if self.features[k]["dtype"] == "video"]
        # Other per-frame numbers (e.g. next.reward) come along at frame t, as LeRobot gives them.
        self.extra_keys = [k for k, ft in self.features.items()
                           if k not in (STATE, ACTION) and self._source[k] not in INDEX_COLUMNS
                           and ft["dtype"] in ("float32", "float64", "int64", "int32", "bool")]

        # ---- meta ----
        eps = read_v3_episodes(self.root)  # first: a dataset without episodes says so
        self.tasks = read_v3_tasks(self.root)
        all_eps = eps["episode_index"]
        if episodes is None:
            keep = np.arange(len(all_eps))
        else:
            wanted = [int(e) for e in episodes]
            if not wanted:
                raise DatasetError("the episodes subset is empty")
            if len(set(wanted)) != len(wanted):
                raise DatasetError(f"the episodes subset {wanted} names an episode twice")
            pos = {int(e): i for i, e in enumerate(all_eps)}
            absent = [e for e in wanted if e not in pos]
            if absent:
                raise DatasetError(f"episodes {absent} are not in {self.root} (it has {len(all_eps)} episodes, "
                                   f"{int(all_eps.min())}..{int(all_eps.max())})")
            keep = np.array(sorted(pos[e] for e in wanted))
        self.episodes = {c: v[keep] for c, v in eps.items()}
        for key in self.video_keys:
            for c in ("chunk_index", "file_index", "from_timestamp"):
                if f"videos/{self._source[key]}/{c}" not in self.episodes:
                    raise DatasetError(f"the episodes table of {self.root} lacks 'videos/{self._source[key]}/{c}' "
                                       f"for the video feature {self._source[key]!r}")
        self._load_frames()
        self._check_media_files()
        widths = {STATE: self.state_dim, ACTION: self.action_dim}
        widths.update({k: 3 for k in self.image_keys})
        raw_widths = {self._source[k]: w for k, w in widths.items()}
        stored = read_v3_stats(self.root, raw_widths, [self._source[STATE], self._source[ACTION],
                                                       *(self._source[k] for k in self.image_keys)],
                               int(eps["length"].sum()))
        self._stats = None if stored is None else {self.rename_map[k]: v for k, v in stored.items()}
        self._row_groups = ProcessCache(8)
        self._containers = ProcessCache(4, close=close_video)

    # ---- loading and checking the frames ----
    def _data_path(self, chunk: int, file: int) -> Path:
        return self.root / self.info["data_path"].format(chunk_index=chunk, file_index=file)

    def _load_frames(self) -> None:
        e = self.episodes
        files = sorted({(int(c), int(f)) for c, f in zip(e["data/chunk_index"], e["data/file_index"])})
        number_cols = [STATE, ACTION, *self.extra_keys]
        columns = [self._source[k] for k in number_cols] + list(INDEX_COLUMNS)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in [*number_cols, *INDEX_COLUMNS]}
        frames_file, frames_row, wheres, starts_in = [], [], [], []
        self._files: list[Path] = []
        for chunk, file in files:
            path = self._data_path(chunk, file)
            schema = _read_parquet_schema(path) if path.exists() else None
            if schema is None:
                raise DatasetError(f"data file {path} does not exist (the episodes table lists episodes in it)")
            missing = [c for c in columns + [self._source[k] for k in self.image_keys
                                             if self.features[k]["dtype"] == "image"] if c not in schema.names]
            if missing:
                raise DatasetError(f"data file {path} lacks the column {missing[0]!r} (it has {schema.names})")
            table = _read_parquet(path, columns)
            runs = _episode_runs(table.column("episode_index").to_numpy(zero_copy_only=False), path)
            in_file = np.flatnonzero((e["data/chunk_index"] == chunk) & (e["data/file_index"] == file))
            for k in in_file:
                ep = int(e["episode_index"][k])
                first, n = runs.get(ep, (0, 0))
                length = int(e["length"][k])
                where = f"data file {path} (episode {ep})"
                if n != length:
                    raise DatasetError(f"{where} has {n} frames but the episodes table says {length}")
                rows = np.arange(first, first + n)
                sub = table.slice(first, length)
                for key in number_cols:
                    col, ft = sub.column(self._source[key]), self.features[key]
                    if _is_list(col.type):
                        width = int(np.prod(ft["shape"]))
                        values = list_column_to_numpy(col, width, self._source[key], where)  # (L, width)
                        parts[key].append(values if key in (STATE, ACTION) else values.reshape(length, *ft["shape"]))
                    elif key in (STATE, ACTION):
                        raise DatasetError(f"{where}, column {self._source[key]!r} has arrow type {col.type}: "
                                           f"expected a list of {ft['shape'][0]} numbers per frame")
                    else:
                        parts[key].append(col.to_numpy(zero_copy_only=False))
                for c in INDEX_COLUMNS:
                    parts[c].append(sub.column(c).to_numpy(zero_copy_only=False))
                frames_file.append(np.full(length, len(self._files)))
                frames_row.append(rows)
                wheres.append(where)
                starts_in.append(k)
            self._files.append(path)
        # episodes come out in file order; put them back in episode order
        order = np.argsort(starts_in, kind="stable")
        lengths = self.episodes["length"].astype(np.int64)
        flat = {k: np.concatenate([v[j] for j in order]) for k, v in parts.items()}
        wheres = [wheres[j] for j in order]
        self._frame_file = np.concatenate([frames_file[j] for j in order])  # (N,) which data file
        self._frame_row = np.concatenate([frames_row[j] for j in order])  # (N,) row within that file
        ends = np.cumsum(lengths)
        starts = np.repeat(ends - lengths, lengths)  # (N,) first row of each row's episode
        self._ends, self._wheres = ends, wheres
        locate = self._locate

        for k in (STATE, ACTION):
            check_values(flat[k], self._source[k], locate)
        frame = np.arange(len(starts)) - starts
        check_equal(flat["frame_index"], frame, "frame_index", locate)
        check_equal(flat["episode_index"], np.repeat(self.episodes["episode_index"], lengths), "episode_index", locate)
        check_equal(flat["index"], np.repeat(self.episodes["dataset_from_index"], lengths) + frame, "index", locate)
        check_known(flat["task_index"], range(len(self.tasks)), "task_index", locate, str(self.root / TASKS))
        # timestamps: finite, and 1 / fps apart within each episode (LeRobot's check_timestamps_sync)
        ts = flat["timestamp"].astype(np.float64)
        check_values(ts.reshape(-1, 1), "timestamp", locate)
        step = np.diff(ts) - 1.0 / self.fps
        bad = np.flatnonzero((np.abs(step) > self.video_tolerance_s) & (frame[1:] != 0))
        if bad.size:
            where, f = locate(int(bad[0]) + 1)
            raise DatasetError(f"{where}, frame {f}, column 'timestamp': is {ts[bad[0] + 1]:.6f} s, "
                               f"{ts[bad[0] + 1] - ts[bad[0]]:.6f} s after the previous frame: expected 1 / fps = "
                               f"{1.0 / self.fps:.6f} s (within {self.video_tolerance_s} s)")

        self.state = torch.from_numpy(flat[STATE].astype(np.float32, copy=False))  # (N, s)
        self.action = torch.from_numpy(flat[ACTION].astype(np.float32, copy=False))  # (N, a)
        self.extras = {k: torch.from_numpy(np.ascontiguousarray(flat[k])) for k in self.extra_keys}
        self.index = torch.from_numpy(flat["index"].astype(np.int64))
        self.episode_index = torch.from_numpy(flat["episode_index"].astype(np.int64))
        self.frame_index = torch.from_numpy(flat["frame_index"].astype(np.int64))
        self.timestamp = torch.from_numpy(flat["timestamp"].astype(np.float32))
        self.task_index = torch.from_numpy(flat["task_index"].astype(np.int64))
        self.episode_end = torch.from_numpy(np.repeat(ends, lengths))  # (N,) one past its episode's last frame

    def _locate(self, row: int) -> tuple[str, int]:
        """(the episode's file and episode, the frame within the episode) of loaded frame `row`."""
        k = int(np.searchsorted(self._ends, row, side="right"))
        return self._wheres[k], row - int(self._ends[k] - self.episodes["length"][k])

    def _video_path(self, key: str, k: int) -> Path:
        src = self._source[key]
        chunk = int(self.episodes[f"videos/{src}/chunk_index"][k])
        file = int(self.episodes[f"videos/{src}/file_index"][k])
        return self.root / self.info["video_path"].format(video_key=src, chunk_index=chunk, file_index=file)

    def _check_media_files(self) -> None:
        for key in self.video_keys:
            for k in range(len(self.episodes["episode_index"])):
                path = self._video_path(key, k)
                if not path.is_file():
                    raise DatasetError(f"video file {path} of {self._source[key]!r}, episode "
                                       f"{int(self.episodes['episode_index'][k])}, does not exist")

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
        return len(self.episodes["episode_index"])

    @property
    def num_frames(self) -> int:
        return len(self)

    # ---- statistics ----
    @property
    def stats(self) -> dict[str, dict[str, Tensor]]:
        """{feature: {mean, std, min, max, q01, ...: float32 tensors (d,)}} of the *whole* dataset
        (renamed), from meta/stats.json. When it is missing or stale (an interrupted collection) the
        statistics of state and action are computed from the loaded frames instead, with a warning."""
        if self._stats is None:
            warnings.warn(f"{self.root / STATS} is missing or stale (an unfinished collection?): computing "
                          f"statistics from the {self.num_episodes} loaded episodes", stacklevel=2)
            self._stats = {key: {name: torch.tensor(v, dtype=torch.float32) for name, v in compute_stats(x).items()
                                 if name != "count"}
                           for key, x in ((STATE, self.state.numpy()), (ACTION, self.action.numpy()))}
        return self._stats

    # ---- items ----
    def _image(self, key: str, i: int) -> Tensor:
        """(3, H, W) float32 in [0, 1]: the PNG of frame i from its row group, or its video frame."""
        return to_chw_float(self._rgb(key, i))

    def _rgb(self, key: str, i: int) -> np.ndarray:
        """(H, W, 3) uint8 image of loaded frame i, checked against the feature's shape."""
        where, frame = self._locate(i)
        src, ft = self._source[key], self.features[key]
        if ft["dtype"] == "video":
            k = int(np.searchsorted(self._ends, i, side="right"))
            path = self._video_path(key, k)
            ts = float(self.episodes[f"videos/{src}/from_timestamp"][k]) + float(self.timestamp[i])
            try:
                container = self._containers.get_or(path, lambda: open_video(path))
                rgb, got = decode_video_frame(container, ts, self.video_tolerance_s)
            except DatasetError:
                raise
            except Exception as e:  # PyAV raises its own error types (av.error.*)
                raise DatasetError(f"video file {path}: cannot decode {src!r} at {ts:.4f} s "
                                   f"({where}, frame {frame}): {e}") from e
            if rgb is None or abs(got - ts) >= self.video_tolerance_s:
                raise DatasetError(f"video file {path}, {where}, frame {frame}, column {src!r}: the nearest "
                                   f"frame to {ts:.4f} s is at {got:.4f} s, beyond the tolerance "
                                   f"{self.video_tolerance_s} s")
        else:
            file, row = int(self._frame_file[i]), int(self._frame_row[i])
            group, offset = self._row_group_of(file, row)
            column = self._row_groups.get_or((file, group, src), lambda: self._read_group(file, group, src))
            value = column[offset].as_py()
            data = value.get("bytes") if isinstance(value, dict) else value
            if not data:
                path = value.get("path") if isinstance(value, dict) else None
                raise DatasetError(f"{where}, frame {frame}, column {src!r}: no image bytes (images kept as "
                                   f"separate files, here {path!r}, are not supported)")
            try:
                rgb = decode_png(data)
            except Exception as e:  # PIL raises several types for corrupt data
                raise DatasetError(f"{where}, frame {frame}, column {src!r}: the image does not decode: {e}") from e
        return self._check_hw(rgb, key, where, frame)

    def _check_hw(self, rgb: np.ndarray, key: str, where: str, frame: int) -> np.ndarray:
        h, w = image_hw(self.features[key])
        if rgb.shape != (h, w, 3):
            raise DatasetError(f"{where}, frame {frame}, column {self._source[key]!r}: the image is "
                               f"{rgb.shape[1]}x{rgb.shape[0]} (W x H): expected {w}x{h} as info.json says")
        return rgb

    def _all_rgb(self, key: str) -> np.ndarray:
        """(N, H, W, 3) uint8: the image of every loaded frame, each file read (or decoded) once."""
        h, w = image_hw(self.features[key])
        out = np.empty((len(self), h, w, 3), np.uint8)
        src = self._source[key]
        if self.features[key]["dtype"] == "image":
            for file in np.unique(self._frame_file).tolist():
                rows = np.flatnonzero(self._frame_file == file)
                column = self._read_column(file, src)
                for i in rows.tolist():
                    value = column[int(self._frame_row[i])].as_py()
                    data = value.get("bytes") if isinstance(value, dict) else value
                    where, frame = self._locate(i)
                    if not data:
                        raise DatasetError(f"{where}, frame {frame}, column {src!r}: no image bytes")
                    try:
                        out[i] = self._check_hw(decode_png(data), key, where, frame)
                    except DatasetError:
                        raise
                    except Exception as e:  # PIL raises several types for corrupt data
                        raise DatasetError(f"{where}, frame {frame}, column {src!r}: the image does not decode: "
                                           f"{e}") from e
            return out
        starts = self._ends - self.episodes["length"]
        by_file: dict[Path, list[int]] = {}
        for k in range(self.num_episodes):
            by_file.setdefault(self._video_path(key, k), []).append(k)
        for path, episodes in by_file.items():
            times, frames = decode_all_frames(path)  # (F,) seconds, list of (H, W, 3)
            for k in episodes:
                rows = np.arange(int(starts[k]), int(self._ends[k]))
                ts = float(self.episodes[f"videos/{src}/from_timestamp"][k]) + self.timestamp[rows].double().numpy()
                nearest = _nearest(times, ts)
                gap = np.abs(times[nearest] - ts) if len(times) else np.full(len(ts), np.inf)
                bad = np.flatnonzero(gap >= self.video_tolerance_s)
                if bad.size:
                    where, frame = self._locate(int(rows[bad[0]]))
                    raise DatasetError(f"video file {path}, {where}, frame {frame}, column {src!r}: no frame within "
                                       f"{self.video_tolerance_s} s of {ts[bad[0]]:.4f} s")
                for i, j in zip(rows.tolist(), nearest.tolist()):
                    out[i] = self._check_hw(frames[j], key, *self._locate(i))
        return out

    def _read_column(self, file: int, column: str) -> pa.Array:
        try:
            return pq.read_table(self._files[file], columns=[column]).column(0).combine_chunks()
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"data file {self._files[file]}: cannot read {column!r}: {e}") from e

    # ---- every window at once ----
    def _window(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Frame indices (b, h) of the chunks starting at frames t (b,), clamped to each episode, and pad (b, h)."""
        idx = t[:, None] + torch.arange(self.chunk_size)  # (b, h)
        last = (self.episode_end[t] - 1)[:, None]  # (b, 1)
        return torch.minimum(idx, last), idx > last

    def all_windows(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """Every window at once, batched like a DataLoader batch (b = len(self)): the fast path for
        training on small datasets (index it with a random permutation). Images are decoded once and
        stay uint8 (b, 3, H, W) to save memory: divide by 255 after indexing."""
        t = torch.arange(len(self))
        idx, pad = self._window(t)
        out: dict[str, Any] = {STATE: self.state, ACTION: self.action[idx], "action_is_pad": pad,
                               "episode_index": self.episode_index, "frame_index": self.frame_index}
        for key in self.image_keys:
            out[key] = torch.from_numpy(self._all_rgb(key)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
        out.update(self.extras)  # other numeric features at frame t (observation.environment_state, next.reward)
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        out["task"] = [self.tasks[j] for j in self.task_index.tolist()]
        return out

    def windows(self, rows: Sequence[int] | Tensor) -> dict[str, Any]:
        """The windows starting at frames `rows` as one batch: the same keys, values and dtypes as
        `all_windows()` indexed with `rows` (images uint8 (b, 3, H, W)), reading only their frames.
        The streaming trainer's unit of work: a DataLoader worker builds a whole batch with one call,
        so that state and action windows are gathered with one indexing each, not per item."""
        t = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        n = len(self)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            bad = int(t[(t < 0) | (t >= n)][0])
            raise IndexError(f"window {bad} out of range for {n} windows")
        idx, pad = self._window(t)
        out: dict[str, Any] = {STATE: self.state[t], ACTION: self.action[idx], "action_is_pad": pad,
                               "episode_index": self.episode_index[t], "frame_index": self.frame_index[t]}
        # frames in dataset order: consecutive frames of one episode share a row group or a video file
        order = sorted(range(len(t)), key=lambda j: int(t[j]))
        for key in self.image_keys:
            h, w = image_hw(self.features[key])
            rgb = np.empty((len(t), h, w, 3), np.uint8)
            for j in order:
                rgb[j] = self._rgb(key, int(t[j]))
            out[key] = torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous()  # (b, 3, H, W)
        out.update({key: values[t] for key, values in self.extras.items()})
        out["task"] = [self.tasks[int(self.task_index[int(i)])] for i in t]
        return out

    def in_memory_bytes(self) -> int:
        """About how many bytes `all_windows()` holds: per window the state, the action chunk, its pad
        flags, two int64 indices, a task reference and every loaded camera image (uint8, decoded)."""
        h, per = self.chunk_size, 4 * self.state_dim + 4 * self.chunk_size * self.action_dim + 2 * 8 + 8
        per += h + sum(3 * math.prod(image_hw(self.features[k])) for k in self.image_keys)
        return len(self) * per

    def _row_group_of(self, file: int, row: int) -> tuple[int, int]:
        bounds = self._row_groups.get_or(("bounds", file), lambda: _row_group_bounds(self._files[file]))
        g = int(np.searchsorted(bounds, row, side="right")) - 1
        return g, row - int(bounds[g])

    def _read_group(self, file: int, group: int, column: str) -> pa.Array:
        try:
            return pq.ParquetFile(self._files[file]).read_row_group(group, columns=[column]).column(0).combine_chunks()
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"data file {self._files[file]}: cannot read row group {group} "
                               f"of {column!r}: {e}") from e

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        i = int(i) % n
        steps = i + torch.arange(self.chunk_size)  # (h,) frames of the window
        last = int(self.episode_end[i]) - 1
        item: dict[str, Any] = {
            STATE: self.state[i],
            ACTION: self.action[steps.clamp(max=last)],  # (h, a): past the end, the last action again
            "action_is_pad": steps > last,  # (h,)
        }
        for key in self.image_keys:
            item[key] = self._image(key, i)
        for key, values in self.extras.items():
            item[key] = values[i]
        item["task"] = self.tasks[int(self.task_index[i])]
        item["index"] = self.index[i]
        item["episode_index"] = self.episode_index[i]
        item["frame_index"] = self.frame_index[i]
        item["timestamp"] = self.timestamp[i]
        return item


def _episode_runs(episode_index: np.ndarray, path: Path) -> dict[int, tuple[int, int]]:
    """{episode: (first row, number of rows)} of a data file whose rows hold each episode's frames
    consecutively (as LeRobot writes them)."""
    starts = np.concatenate([[0], np.flatnonzero(np.diff(episode_index)) + 1])
    counts = np.diff(np.append(starts, len(episode_index)))
    runs: dict[int, tuple[int, int]] = {}
    for ep, first, n in zip(episode_index[starts].tolist(), starts.tolist(), counts.tolist()):
        if ep in runs:
            raise DatasetError(f"data file {path} (episode {ep}): the episode's frames are not consecutive rows "
                               f"(rows {runs[ep][0]}.. and {first}..)")
        runs[ep] = (first, n)
    return runs


def _nearest(times: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """(n,) index of the entry of the sorted `times` (F,) nearest to each of `ts` (n,) (0 when F = 0)."""
    if len(times) < 2:
        return np.zeros(len(ts), np.int64)
    right = np.clip(np.searchsorted(times, ts), 1, len(times) - 1)
    return np.where(np.abs(times[right - 1] - ts) <= np.abs(times[right] - ts), right - 1, right)


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind)


def _row_group_bounds(path: Path) -> np.ndarray:
    """(g + 1,) first row of each row group of a parquet file, and its row count at the end."""
    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{path} is not readable parquet: {e}") from e
    return np.concatenate([[0], np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])])


# The name this reader had while it read only LeRobot's datasets (docs and user code may use it).
LeRobotV3Dataset = ChunkDataset
