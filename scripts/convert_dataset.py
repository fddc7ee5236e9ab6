#!/usr/bin/env python
"""Convert a dataset of fmpolicy's old layout (`fmpolicy-lerobot-v1`, one parquet file per episode and
JSON-lines meta) into LeRobot v3.0, the package's one format (docs/datasets.md).

    python scripts/convert_dataset.py OLD_ROOT NEW_ROOT [--video]

Every frame is copied as it is: states, actions, rewards, done and success flags, tasks, fps,
robot_type and the `env` record; the episodes' extra facts (success, mode, seed, return) become
columns of the episodes table; raw uint8 images (3, H, W) become PNG images (or video with --video).
Statistics are recomputed over all frames. NEW_ROOT must not exist yet. The old layout is read here
and nowhere else: the package itself no longer reads it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from fmpolicy.data import DatasetWriter
from fmpolicy.errors import DatasetError, FmPolicyError

OLD_FORMAT = "fmpolicy-lerobot-v1"
OLD_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
# Columns of the old episode files that the writer makes itself or takes as the step's results.
INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
STEP_COLUMNS = ("next.reward", "next.done", "next.success")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not readable JSON lines: {e}") from e


def read_old_info(root: Path) -> dict[str, Any]:
    path = root / "meta" / "info.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not readable: {e} (expected a dataset of the {OLD_FORMAT} layout)") from e
    if not isinstance(info, dict) or info.get("format") != OLD_FORMAT:
        got = info.get("format", info.get("codebase_version")) if isinstance(info, dict) else None
        raise DatasetError(f"{path} has format {got!r}: expected {OLD_FORMAT!r} (a LeRobot v3.0 dataset needs no "
                           "conversion)")
    return info


def old_episode_frames(root: Path, info: dict[str, Any], episode: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """The frames of one old episode file as the writer takes them, and its task index."""
    ep = int(episode["episode_index"])
    path = root / OLD_DATA_PATH.format(episode_chunk=ep // int(info["chunks_size"]), episode_index=ep)
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:
        raise DatasetError(f"episode file {path} is missing or unreadable: {e}") from e
    if table.num_rows != int(episode["length"]):
        raise DatasetError(f"episode file {path} has {table.num_rows} frames but episodes.jsonl says {episode['length']}")
    frames: dict[str, np.ndarray] = {}
    for key, ft in info["features"].items():
        if key in INDEX_COLUMNS:
            continue
        column = table.column(key).to_pylist()
        if key.startswith("observation.images."):  # raw C-order bytes of (3, H, W) uint8
            frames[key] = np.stack([np.frombuffer(v, np.uint8).reshape(ft["shape"]) for v in column])
        elif key in STEP_COLUMNS:
            frames[key] = np.asarray(column)
        else:
            frames[key] = np.asarray(column, np.float32)
    task_index = table.column("task_index").to_pylist()
    return frames, int(task_index[0])


def convert(old: Path, new: Path, video: bool = False) -> dict[str, int]:
    """Write the old dataset `old` as a LeRobot v3.0 dataset at `new`; returns episode and frame counts."""
    info = read_old_info(old)
    if new.exists():
        raise DatasetError(f"{new} exists: convert into a new directory")
    episodes = sorted(read_jsonl(old / "meta" / "episodes.jsonl"), key=lambda e: int(e["episode_index"]))
    tasks = {int(t["task_index"]): t["task"] for t in read_jsonl(old / "meta" / "tasks.jsonl")}
    features = {k: {"dtype": ft["dtype"], "shape": ft["shape"]} for k, ft in info["features"].items()
                if k not in INDEX_COLUMNS and k not in STEP_COLUMNS}
    with DatasetWriter(new, fps=info["fps"], features=features, robot_type=info.get("robot_type"),
                       env_info=info.get("env") or {}, video=video) as writer:
        for episode in episodes:
            frames, task_index = old_episode_frames(old, info, episode)
            task = tasks.get(task_index) or (episode.get("tasks") or [""])[0]
            extra = {k: v for k, v in episode.items() if k not in ("episode_index", "length", "tasks")}
            writer.add_episode(frames, task=task, extra=extra)
        writer.finalize()
        return {"episodes": writer.num_episodes, "frames": writer.num_frames}


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old_root", help=f"a dataset of the old {OLD_FORMAT} layout")
    p.add_argument("new_root", help="where to write the LeRobot v3.0 dataset (must not exist)")
    p.add_argument("--video", action="store_true", help="store cameras as mp4 video instead of PNG images")
    args = p.parse_args(argv)
    summary = convert(Path(args.old_root), Path(args.new_root), video=args.video)
    print(f"{args.new_root}: {summary['episodes']} episodes, {summary['frames']} frames (LeRobot v3.0)")
    return summary


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except FmPolicyError as e:
        raise SystemExit(f"convert_dataset.py: error: {e}") from None
