"""Datasets are validated when opened: a bad value or meta file is a DatasetError naming the file, the
episode, the frame and the column; one writer per dataset root; the collection CLI rejects bad options
before it writes anything."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fmpolicy.data import ChunkDataset, DatasetWriter
from fmpolicy.data.dataset import read_v3_info as read_info
from fmpolicy.data.media import encode_png
from fmpolicy.data.writer import EPISODES_PATH
from fmpolicy.errors import ConfigError, DatasetError, LockError
from tests.helpers import load_script

REPO = Path(__file__).resolve().parents[1]
FEATURES = {"observation.state": {"dtype": "float32", "shape": [3]}, "action": {"dtype": "float32", "shape": [2]}}
LENGTHS = (4, 5, 6)

collect_demos = load_script("collect_demos")


def write_episodes(writer: DatasetWriter, lengths=LENGTHS, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for n in lengths:
        writer.add_episode({"observation.state": rng.normal(size=(n, 3)), "action": rng.uniform(-1, 1, size=(n, 2))},
                           task="reach")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("valid") / "ds"
    with DatasetWriter(root, fps=10, features=FEATURES) as writer:
        write_episodes(writer)
        writer.finalize()
    return root


@pytest.fixture
def root(template, tmp_path) -> Path:
    """A fresh copy of a valid 3-episode dataset (state width 3, action width 2), for a test to corrupt."""
    copy = tmp_path / "ds"
    shutil.copytree(template, copy)
    return copy


DATA_FILE = "data/chunk-000/file-000.parquet"  # all three episodes, one after another


def row_of(ep: int, frame: int) -> int:
    return sum(LENGTHS[:ep]) + frame


def replace_column(root: Path, column: str, values: pa.Array | list) -> None:
    path = root / DATA_FILE
    table = pq.read_table(path)
    i = table.column_names.index(column)
    pq.write_table(table.set_column(i, column, values if isinstance(values, pa.Array) else pa.array(values)), path)


def set_value(root: Path, ep: int, column: str, frame: int, dim: int, value: float) -> None:
    rows = pq.read_table(root / DATA_FILE).column(column).to_pylist()
    rows[row_of(ep, frame)][dim] = value
    replace_column(root, column, pa.array(rows, type=pa.list_(pa.float32())))


def set_index_rows(root: Path, column: str, ep: int, values: list[int]) -> None:
    rows = pq.read_table(root / DATA_FILE).column(column).to_pylist()
    rows[row_of(ep, 0): row_of(ep, 0) + len(values)] = values
    replace_column(root, column, pa.array(rows, pa.int64()))


def edit_episodes(root: Path, column: str, ep: int, value) -> None:
    path = root / EPISODES_PATH
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[ep] = value
    i = table.column_names.index(column)
    pq.write_table(table.set_column(i, column, pa.array(values, table.schema.field(column).type)), path)


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def open_error(root: Path, *names: str) -> str:
    """Open `root`, expect a DatasetError, and check that its message names every one of `names`."""
    with pytest.raises(DatasetError) as info:
        ChunkDataset(root, chunk_size=4)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in: {message}"
    return message


# ---- values in the data files ------------------------------------------------------------------

def test_nan_in_a_state_names_file_episode_frame_and_column(root):
    set_value(root, 1, "observation.state", frame=2, dim=0, value=float("nan"))
    message = open_error(root, "file-000.parquet", "episode 1", "frame 2", "'observation.state'")
    assert "finite" in message


def test_inf_in_an_action_is_refused(root):
    set_value(root, 0, "action", frame=3, dim=1, value=float("-inf"))
    open_error(root, "file-000.parquet", "episode 0", "frame 3", "'action'", "finite")


def test_absurd_action_is_refused(root):
    set_value(root, 2, "action", frame=4, dim=0, value=1e7)
    open_error(root, "file-000.parquet", "episode 2", "frame 4", "'action'", "1e+06")


def test_ragged_rows_whose_total_is_right_are_refused(root):
    """Rows of 3 and 1 values where 2 are expected: the total is right, and reshaping would silently
    shift values into the next row."""
    rows = pq.read_table(root / DATA_FILE).column("action").to_pylist()
    r = row_of(1, 1)
    rows[r], rows[r + 1] = rows[r] + rows[r + 1][:1], rows[r + 1][1:]  # widths 2, 3, 1, 2, 2
    replace_column(root, "action", pa.array(rows, type=pa.list_(pa.float32())))
    open_error(root, "file-000.parquet", "episode 1", "frame 1", "'action'", "3 values", "expected 2")


def test_an_image_of_the_wrong_size_or_not_a_png_names_the_frame(tmp_path):
    root = tmp_path / "images"
    features = {**FEATURES, "observation.images.top": {"dtype": "uint8", "shape": [3, 2, 2]}}
    with DatasetWriter(root, fps=10, features=features) as writer:
        writer.add_episode({"observation.state": np.zeros((3, 3)), "action": np.zeros((3, 2)),
                            "observation.images.top": np.arange(36, dtype=np.uint8).reshape(3, 3, 2, 2)}, task="t")
    rows = pq.read_table(root / DATA_FILE).column("observation.images.top").to_pylist()
    rows[1]["bytes"] = encode_png(np.zeros((3, 2, 3), np.uint8))  # 3 pixels wide where info.json says 2
    rows[2]["bytes"] = b"not a png"
    replace_column(root, "observation.images.top", pa.array(rows, pq.read_schema(root / DATA_FILE).field(
        "observation.images.top").type))
    ds = ChunkDataset(root, chunk_size=2)
    assert ds[0]["observation.images.top"].shape == (3, 2, 2)
    with pytest.raises(DatasetError, match=r"file-000.parquet \(episode 0\), frame 1, column "
                                           r"'observation.images.top': the image is 3x2 \(W x H\): expected 2x2"):
        ds[1]
    with pytest.raises(DatasetError, match=r"\(episode 0\), frame 2, column 'observation.images.top': "
                                           r"the image does not decode"):
        ds[2]
    with pytest.raises(DatasetError, match=r"frame 1, column 'observation.images.top'"):
        ds.all_windows()


def test_null_row_is_refused(root):
    rows = pq.read_table(root / DATA_FILE).column("observation.state").to_pylist()
    rows[row_of(0, 2)] = None
    replace_column(root, "observation.state", pa.array(rows, type=pa.list_(pa.float32())))
    open_error(root, "file-000.parquet", "episode 0", "frame 2", "'observation.state'")


def test_frame_index_out_of_order_is_refused(root):
    set_index_rows(root, "frame_index", 2, [0, 1, 2, 2, 4, 5])
    open_error(root, "file-000.parquet", "episode 2", "frame 3", "'frame_index'")


def test_frames_of_another_episode_are_refused(root):
    """A row of episode 0 among episode 1's (row 7 = episode 1, frame 3): LeRobot's frames of an episode
    are consecutive rows, so this names the episode whose rows are split and where."""
    set_index_rows(root, "episode_index", 1, [1, 1, 1, 0, 1])
    open_error(root, "file-000.parquet", "episode 0", "not consecutive", "rows 0.. and 7..")


def test_unknown_task_index_names_the_frame(root):
    set_index_rows(root, "task_index", 0, [0, 0, 7, 0])
    open_error(root, "file-000.parquet", "episode 0", "frame 2", "'task_index'", "tasks.parquet")


def test_length_disagreeing_with_the_episodes_table_names_the_episode(root):
    edit_episodes(root, "length", 2, 9)
    open_error(root, "meta/episodes", "episode 2", "length 9")
    edit_episodes(root, "dataset_to_index", 2, row_of(2, 9))
    open_error(root, "file-000.parquet", "episode 2", "episodes table says 9", "6 frames")


# ---- info.json ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, -1, 2.5, "1000", True, None])
def test_bad_chunks_size_is_refused(root, value):
    edit_json(root / "meta" / "info.json", lambda info: info.update(chunks_size=value))
    open_error(root, "info.json", "chunks_size", repr(value))


@pytest.mark.parametrize("value", [0, -10, "ten", None])
def test_bad_fps_is_refused(root, value):
    edit_json(root / "meta" / "info.json", lambda info: info.update(fps=value))
    open_error(root, "info.json", "fps", repr(value))


def test_missing_action_feature_is_refused(root):
    edit_json(root / "meta" / "info.json", lambda info: info["features"].pop("action"))
    open_error(root, "info.json", "'action'")


@pytest.mark.parametrize("shape", [["a"], [0], [-2], [2.5], "2", [], None])
def test_bad_shape_is_refused(root, shape):
    edit_json(root / "meta" / "info.json", lambda info: info["features"]["action"].update(shape=shape))
    open_error(root, "info.json", "'action'", "shape", repr(shape))


def test_unknown_dtype_is_refused(root):
    edit_json(root / "meta" / "info.json", lambda info: info["features"]["action"].update(dtype="complex64"))
    open_error(root, "info.json", "'action'", "complex64")


def test_an_old_format_dataset_is_refused_with_a_pointer_to_the_converter(root):
    edit_json(root / "meta" / "info.json", lambda info: (info.pop("codebase_version"),
                                                         info.update(format="fmpolicy-lerobot-v1")))
    open_error(root, "info.json", "codebase_version", "convert_dataset.py")


def test_features_not_a_mapping_is_refused(root):
    edit_json(root / "meta" / "info.json", lambda info: info.update(features=["action"]))
    open_error(root, "info.json", "features")


def test_read_info_itself_validates(root):
    edit_json(root / "meta" / "info.json", lambda info: info.update(chunks_size=0))
    with pytest.raises(DatasetError, match="chunks_size"):
        read_info(root)


def test_episodes_table_row_without_length_names_the_episode(root):
    edit_episodes(root, "length", 1, None)
    open_error(root, "meta/episodes", "episode 1", "'length' is null")


# ---- stats.json --------------------------------------------------------------------------------

def test_stats_missing_a_key_is_refused_on_open(root):
    edit_json(root / "meta" / "stats.json", lambda stats: stats["action"].pop("std"))
    open_error(root, "stats.json", "'action'", "'std'")


def test_stats_without_quantiles_are_accepted(root):
    """Older LeRobot data has no quantiles: the dataset opens; the quantile normalizer asks for them."""
    edit_json(root / "meta" / "stats.json", lambda stats: [stats["action"].pop(q) for q in ("q01", "q99")])
    assert "q99" not in ChunkDataset(root, chunk_size=4).stats["action"]


def test_stats_missing_count_is_refused(root):
    edit_json(root / "meta" / "stats.json", lambda stats: stats["observation.state"].pop("count"))
    open_error(root, "stats.json", "'observation.state'", "'count'")


def test_stats_of_the_wrong_length_are_refused(root):
    edit_json(root / "meta" / "stats.json", lambda stats: stats["action"].update(mean=[0.0, 0.0, 0.0]))
    open_error(root, "stats.json", "'action'", "'mean'", "3 entries", "expected 2")


def test_stats_with_nan_are_refused(root):
    edit_json(root / "meta" / "stats.json",
              lambda stats: stats["observation.state"]["std"].__setitem__(1, float("nan")))
    open_error(root, "stats.json", "'observation.state'", "'std'", "finite")


def test_stats_without_a_feature_are_refused(root):
    edit_json(root / "meta" / "stats.json", lambda stats: stats.pop("action"))
    open_error(root, "stats.json", "'action'")


def test_stale_stats_are_not_checked_but_recomputed(root):
    """stats.json older than the episodes (an interrupted collection: its count is not the number of
    frames) is not used, so not checked."""
    edit_json(root / "meta" / "stats.json", lambda stats: (stats["action"].pop("mean"),
                                                          stats["observation.state"].update(count=[1])))
    with pytest.warns(UserWarning, match="stale"):
        assert ChunkDataset(root, chunk_size=4).stats["action"]["q99"].shape == (2,)


def test_a_valid_dataset_still_opens(root):
    ds = ChunkDataset(root, chunk_size=4)
    assert len(ds) == sum(LENGTHS) and ds.stats["action"]["mean"].shape == (2,)


# ---- the writer refuses what the reader would refuse -------------------------------------------

def test_writer_refuses_bad_arguments_before_writing(tmp_path):
    out = tmp_path / "out"
    for kwargs in ({"chunks_size": 0}, {"fps": 0}, {"fps": float("nan")},
                   {"features": {**FEATURES, "action": {"dtype": "float32", "shape": ["a"]}}},
                   {"features": {"observation.state": FEATURES["observation.state"]}}):
        with pytest.raises(DatasetError):
            DatasetWriter(out, **{"fps": 10, "features": FEATURES, **kwargs})
        assert not out.exists(), kwargs


def test_writer_refuses_absurd_values(tmp_path):
    with DatasetWriter(tmp_path / "out", fps=10, features=FEATURES) as writer:
        action = np.zeros((4, 2))
        action[2, 1] = 1e7
        with pytest.raises(DatasetError, match=r"frame 2.*'action'"):
            writer.add_episode({"observation.state": np.zeros((4, 3)), "action": action}, task="t")
        assert writer.num_episodes == 0


# ---- one writer per root -----------------------------------------------------------------------

def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    root = tmp_path / "ds"
    first = DatasetWriter(root, fps=10, features=FEATURES)
    write_episodes(first, lengths=(3,))
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(LockError, match=f"pid {os.getpid()}"):
        DatasetWriter(root, fps=10, features=FEATURES)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"} == before
    write_episodes(first, lengths=(4,))  # the first writer is unaffected
    first.finalize()
    first.close()
    with DatasetWriter(root, fps=10, features=FEATURES) as again:  # released: a new writer appends
        assert again.num_episodes == 2
    assert ChunkDataset(root, chunk_size=2).num_episodes == 2


def test_writer_is_a_context_manager_and_refuses_use_after_close(tmp_path):
    root = tmp_path / "ds"
    with DatasetWriter(root, fps=10, features=FEATURES) as writer:
        write_episodes(writer, lengths=(3,))
        writer.finalize()
        write_episodes(writer, lengths=(2,))  # finalize leaves the writer open
        writer.finalize()
    with pytest.raises(DatasetError, match="closed"):
        write_episodes(writer, lengths=(2,))
    with DatasetWriter(root, fps=10, features=FEATURES) as writer:
        assert writer.num_episodes == 2


def test_lock_is_released_when_opening_an_existing_root_fails(tmp_path):
    root = tmp_path / "ds"
    with DatasetWriter(root, fps=10, features=FEATURES) as writer:
        write_episodes(writer, lengths=(3,))
    with pytest.raises(DatasetError, match="features"):
        DatasetWriter(root, fps=10, features={**FEATURES, "action": {"dtype": "float32", "shape": [4]}})
    with DatasetWriter(root, fps=10, features=FEATURES) as writer:
        assert writer.num_episodes == 1


def test_orphans_are_removed_only_by_the_lock_holder(tmp_path):
    root = tmp_path / "ds"
    with DatasetWriter(root, fps=10, features=FEATURES) as writer:
        write_episodes(writer, lengths=(3,))
    orphans = [root / "meta" / ".info.json.k1ll3d.tmp", root / "data" / "chunk-000" / ".file-000.parquet.x.tmp",
               root / "meta" / "episodes" / "chunk-000" / ".file-000.parquet.y.tmp"]
    for p in orphans:
        p.write_bytes(b"partial")
    ChunkDataset(root, chunk_size=2)  # a reader leaves them alone
    holder = DatasetWriter(root, fps=10, features=FEATURES)
    assert not any(p.exists() for p in orphans)
    for p in orphans:  # now they could be the holder's own temporaries: a refused writer must not touch them
        p.write_bytes(b"in progress")
    with pytest.raises(LockError):
        DatasetWriter(root, fps=10, features=FEATURES)
    assert all(p.exists() for p in orphans)
    holder.close()


def collect_argv(out: Path, episodes: int = 3, *extra: str) -> list[str]:
    return ["--env", "fmpolicy/PointObstacle-v0", "--episodes", str(episodes), "--num-envs", "4",
            "--out", str(out), "--seed", "0", "--no-progress", *extra]


def test_second_collect_demos_process_fails_while_the_first_completes(tmp_path):
    """This process holds the dataset as a writer; a real `collect_demos.py` on the same --out exits
    non-zero at once naming this PID and changes nothing; the first writer then completes."""
    root = tmp_path / "ds"
    writer = DatasetWriter(root, fps=10, features={"observation.state": {"dtype": "float32", "shape": [4]},
                                                    "action": {"dtype": "float32", "shape": [2]}})
    rng = np.random.default_rng(0)
    writer.add_episode({"observation.state": rng.normal(size=(5, 4)), "action": rng.normal(size=(5, 2))}, task="t")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "collect_demos.py"), *collect_argv(root)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode != 0
    assert f"pid {os.getpid()}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"} == before
    writer.add_episode({"observation.state": rng.normal(size=(4, 4)), "action": rng.normal(size=(4, 2))}, task="t")
    writer.finalize()
    writer.close()
    ds = ChunkDataset(root, chunk_size=2)
    assert ds.num_episodes == 2 and len(ds) == 9


HOLDER = """
import sys
import numpy as np
from fmpolicy.data import DatasetWriter
features = {"observation.state": {"dtype": "float32", "shape": [4]}, "action": {"dtype": "float32", "shape": [2]}}
with DatasetWriter(sys.argv[1], fps=10, features=features) as writer:
    print("locked", flush=True)
    sys.stdin.readline()
    for n in (5, 6):
        writer.add_episode({"observation.state": np.zeros((n, 4)), "action": np.zeros((n, 2))}, task="t")
    writer.finalize()
print("done", flush=True)
"""


def test_collect_demos_fails_while_another_process_writes(tmp_path):
    root = tmp_path / "ds"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(LockError, match=f"pid {holder.pid}"):
            collect_demos.main(collect_argv(root))
        out, err = holder.communicate("go\n", timeout=120)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert holder.returncode == 0 and out.strip() == "done", err
    ds = ChunkDataset(root, chunk_size=2)
    assert ds.num_episodes == 2 and len(ds) == 11


# ---- collect_demos.py options ------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--image-size=0", "--image-size=-3", "--image-size=5000",
                                    "--fps=0", "--fps=-1", "--fps=nan", "--fps=inf", "--env-kwargs={bad",
                                    "--env-kwargs=[1, 2]", "--obs-map=nope", "--obs-map=3"])
def test_collect_demos_rejects_bad_options_before_writing(tmp_path, capsys, option):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        collect_demos.main(collect_argv(out, 2, option))
    assert exit_info.value.code == 2
    assert option.split("=")[0] in capsys.readouterr().err
    assert not out.exists()


def test_collect_demos_without_cuda_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        collect_demos.main(collect_argv(out, 2, "--device", "cuda"))
    assert not out.exists()


def test_collect_demos_rejects_an_unknown_device(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="gpu0"):
        collect_demos.main(collect_argv(out, 2, "--device", "gpu0"))
    assert not out.exists()
