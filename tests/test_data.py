"""Datasets: the collection script writes LeRobot's v3.0 layout, ChunkDataset windows it, bad input fails clearly."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from fmpolicy import FlowPolicy, PolicyConfig, make_expert_config
from fmpolicy.data import CODEBASE_VERSION, ChunkDataset, DatasetWriter
from fmpolicy.data.writer import EPISODES_PATH
from fmpolicy.errors import DatasetError
from tests.helpers import load_script

ENV = "fmpolicy/PointObstacle-v0"
COLUMNS = {"observation.state", "action", "timestamp", "frame_index", "episode_index", "index", "task_index",
           "next.reward", "next.done", "next.success"}
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lerobot_v3"

collect_demos = load_script("collect_demos")


def collect(out: Path, episodes: int, *extra: str) -> dict:
    return collect_demos.main(["--env", ENV, "--episodes", str(episodes), "--num-envs", "4", "--out", str(out),
                               "--seed", "0", "--no-progress", *extra])


def read_episodes(root: Path) -> list[dict]:
    return pq.read_table(root / EPISODES_PATH).to_pylist()


def read_all(root: Path) -> list[dict]:
    """Every episode's rows (a dict of columns), found through the episodes table as LeRobot finds them."""
    out = []
    for e in read_episodes(root):
        table = pq.read_table(root / f"data/chunk-{e['data/chunk_index']:03d}/file-{e['data/file_index']:03d}.parquet")
        rows = table.slice(e["dataset_from_index"] - table.column("index")[0].as_py(), e["length"])
        out.append(rows.to_pydict())
    return out


def no_temporaries(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name != ".lock" and (p.name.startswith(".") or p.suffix == ".tmp")]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "point"
    summary = collect(out, 6)
    assert summary["episodes"] == 6 and summary["frames"] > 6 * 20
    return out


def test_layout_is_lerobots(root):
    """The files, keys and column types LeRobot 0.4.4 writes (compared with its own fixture)."""
    info = json.loads((root / "meta" / "info.json").read_text())
    lerobot = json.loads((FIXTURES / "png" / "meta" / "info.json").read_text())
    assert info["codebase_version"] == CODEBASE_VERSION and info["fps"] == 10
    assert set(lerobot) <= set(info) and info["data_path"] == lerobot["data_path"]
    assert info["env"]["id"] == ENV and info["env"]["kwargs"] == {}
    assert info["total_episodes"] == 6 and info["chunks_size"] == 1000 and info["robot_type"]
    assert info["features"]["observation.state"] == {"dtype": "float32", "shape": [4], "names": None}
    assert info["features"]["action"] == {"dtype": "float32", "shape": [2], "names": None}
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert {k: v for k, v in info["features"][key].items()} == lerobot["features"][key]
    episodes = read_episodes(root)
    assert [e["episode_index"] for e in episodes] == list(range(6))
    assert all(e["success"] and e["mode"] in (0, 1) and e["tasks"] and e["seed"] == 0 for e in episodes)
    ours = pq.read_schema(root / EPISODES_PATH)
    theirs = pq.read_schema(FIXTURES / "png" / "meta/episodes/chunk-000/file-000.parquet")
    for name in ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                 "dataset_to_index", "meta/episodes/chunk_index", "meta/episodes/file_index"):
        assert ours.field(name).type == theirs.field(name).type, name
    tasks = pq.read_table(root / "meta/tasks.parquet")
    lerobot_tasks = pq.read_table(FIXTURES / "png" / "meta/tasks.parquet")
    assert tasks.schema.remove_metadata() == lerobot_tasks.schema.remove_metadata()
    assert tasks.schema.pandas_metadata["index_columns"] == ["__index_level_0__"]
    assert tasks.to_pydict() == {"task_index": [0], "__index_level_0__": [collect_demos.DEFAULT_TASKS[ENV]]}
    stats = json.loads((root / "meta" / "stats.json").read_text())
    lerobot_stats = json.loads((FIXTURES / "png" / "meta" / "stats.json").read_text())
    assert set(stats["observation.state"]) == set(lerobot_stats["observation.state"])

    data = pq.ParquetFile(root / "data/chunk-000/file-000.parquet")
    assert data.metadata.num_row_groups == 6  # one per episode, many episodes per file
    schema = data.schema_arrow
    lerobot_schema = pq.read_schema(FIXTURES / "png" / "data/chunk-000/file-000.parquet")
    for name in ("observation.state", "timestamp", "frame_index", "episode_index", "index", "task_index"):
        if name == "observation.state":
            assert schema.field(name).type.value_type == lerobot_schema.field(name).type.value_type
        else:
            assert schema.field(name).type == lerobot_schema.field(name).type, name
    tables = read_all(root)
    assert sum(len(t["index"]) for t in tables) == info["total_frames"]
    start = 0
    for e, (t, meta) in enumerate(zip(tables, episodes)):
        assert set(t) == COLUMNS
        n = len(t["frame_index"])
        assert n == meta["length"] and meta["dataset_from_index"] == start and meta["dataset_to_index"] == start + n
        assert t["frame_index"] == list(range(n)) and t["episode_index"] == [e] * n
        assert t["index"] == list(range(start, start + n))
        np.testing.assert_allclose(t["timestamp"], np.arange(n) / 10.0, rtol=1e-6)
        assert t["next.done"] == [False] * (n - 1) + [True] and t["next.success"][-1]
        assert len(t["observation.state"][0]) == 4 and len(t["action"][0]) == 2
        start += n
    # atomic writes leave no temporary files behind (`.lock` is the writer lock's file, kept on purpose)
    assert no_temporaries(root)


def test_windows_match_recorded_actions_and_pad(root):
    tables = read_all(root)
    for h in (1, 5, 16, 80):
        ds = ChunkDataset(root, chunk_size=h)
        assert len(ds) == sum(len(t["index"]) for t in tables) and ds.num_episodes == 6
        assert (ds.state_dim, ds.action_dim) == (4, 2) and ds.num_frames == len(ds)
        offset = 0
        for e, t in enumerate(tables):
            actions = np.asarray(t["action"], np.float32)
            n = len(actions)
            for f in (0, n // 2, n - 2, n - 1):
                item = ds[offset + f]
                assert item["observation.state"].shape == (4,) and item["action"].shape == (h, 2)
                assert item["action"].dtype == torch.float32 and item["action_is_pad"].dtype == torch.bool
                assert int(item["episode_index"]) == e and int(item["frame_index"]) == f
                np.testing.assert_array_equal(item["observation.state"].numpy(), np.asarray(t["observation.state"][f], np.float32))
                valid = min(h, n - f)
                np.testing.assert_array_equal(item["action"][:valid].numpy(), actions[f:f + valid])
                expected_pad = np.arange(h) >= n - f
                np.testing.assert_array_equal(item["action_is_pad"].numpy(), expected_pad)
                # padded steps repeat the episode's last action
                np.testing.assert_array_equal(item["action"][valid:].numpy(), np.broadcast_to(actions[-1], (h - valid, 2)))
            offset += n
        windows = ds.all_windows()
        for i in (0, 7, len(ds) - 1):
            torch.testing.assert_close(windows["action"][i], ds[i]["action"])
            assert torch.equal(windows["action_is_pad"][i], ds[i]["action_is_pad"])


def test_stats_match_numpy(root):
    ds = ChunkDataset(root, chunk_size=4)
    tables = read_all(root)
    for key in ("observation.state", "action"):
        data = np.concatenate([np.asarray(t[key], np.float64) for t in tables])
        expected = {"mean": data.mean(0), "std": data.std(0), "min": data.min(0), "max": data.max(0),
                    **{f"q{round(100 * q):02d}": np.quantile(data, q, axis=0) for q in (0.01, 0.1, 0.5, 0.9, 0.99)}}
        for name, value in expected.items():
            got = ds.stats[key][name]
            assert got.dtype == torch.float32 and got.shape == (data.shape[1],)
            np.testing.assert_allclose(got.numpy(), value, rtol=1e-5, atol=1e-6, err_msg=f"{key} {name}")
    stats = json.loads((root / "meta" / "stats.json").read_text())
    assert stats["action"]["count"] == [len(ds)] and stats["next.reward"]["count"] == [len(ds)]


def test_episode_subset(root):
    ds = ChunkDataset(root, chunk_size=3, episodes=[4, 1])
    assert ds.num_episodes == 2 and set(ds.episode_index.tolist()) == {1, 4}
    with pytest.raises(DatasetError, match="9"):
        ChunkDataset(root, chunk_size=3, episodes=[9])


def test_resume_appends_consecutive_episodes(tmp_path):
    out = tmp_path / "resume"
    first = collect(out, 3)
    assert first["episodes"] == 3
    second = collect(out, 6)
    assert second["episodes"] == 6 and second["new_episodes"] == 3
    assert [e["episode_index"] for e in read_episodes(out)] == list(range(6))
    tables = read_all(out)
    index = np.concatenate([t["index"] for t in tables])
    np.testing.assert_array_equal(index, np.arange(len(index)))
    # the resumed run draws new episodes instead of recording the first ones again
    assert tables[3]["observation.state"][0] != tables[0]["observation.state"][0]
    info = json.loads((out / "meta" / "info.json").read_text())
    stats = json.loads((out / "meta" / "stats.json").read_text())
    assert info["total_episodes"] == 6 and info["total_frames"] == len(index) == stats["action"]["count"][0]
    assert collect(out, 6)["new_episodes"] == 0  # complete: nothing to do
    # asking for fewer than it holds is refused: a run saying "3 demonstrations" would train on 6
    with pytest.raises(SystemExit, match=r"already holds 6 episodes, more than the 3 asked for"):
        collect(out, 3)
    assert [e["episode_index"] for e in read_episodes(out)] == list(range(6))  # untouched
    assert no_temporaries(out)


def test_killed_script_resumes(tmp_path, monkeypatch):
    """Interrupt the real script inside the 4th episode, after its frames reached the data file but
    before the meta lists it (and leave a stray temp file, as a kill inside a write would): the 3
    episodes are readable, and a second run removes the unlisted frames and completes the dataset to 6."""
    out = tmp_path / "killed"

    def interrupted_meta(self, tasks_changed=True):
        if self.num_episodes == 4:
            (self.root / "data" / "chunk-000" / ".file-000.parquet.x.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        return original(self, tasks_changed)

    original = DatasetWriter._write_meta
    monkeypatch.setattr(DatasetWriter, "_write_meta", interrupted_meta)
    with pytest.raises(KeyboardInterrupt):
        collect(out, 6)
    monkeypatch.undo()
    rows = pq.read_table(out / "data/chunk-000/file-000.parquet", columns=["episode_index"]).column(0).to_pylist()
    assert set(rows) == {0, 1, 2, 3}  # episode 3's frames are on disk, listed by no episode
    with pytest.warns(UserWarning, match="stale"):
        partial = ChunkDataset(out, chunk_size=4)
        assert partial.num_episodes == 3 and partial.stats["action"]["mean"].shape == (2,)
    assert collect(out, 6)["new_episodes"] == 3
    ds = ChunkDataset(out, chunk_size=4)
    assert ds.num_episodes == 6 and sorted(set(ds.episode_index.tolist())) == list(range(6))
    rows = pq.read_table(out / "data/chunk-000/file-000.parquet", columns=["index"]).column(0).to_pylist()
    assert rows == list(range(len(ds)))  # the unlisted frames are gone
    assert no_temporaries(out)


def test_interrupted_collection_is_readable(tmp_path):
    """A run killed after some episodes leaves them readable; stats then come from the frames."""
    features = {"observation.state": {"dtype": "float32", "shape": [3]}, "action": {"dtype": "float32", "shape": [2]}}
    writer = DatasetWriter(tmp_path / "killed", fps=10, features=features)
    rng = np.random.default_rng(0)
    for n in (5, 7):
        writer.add_episode({"observation.state": rng.normal(size=(n, 3)), "action": rng.normal(size=(n, 2))}, task="t")
    # no finalize(): as if the process died here (which would release its lock)
    writer.close()
    with pytest.warns(UserWarning, match="stale"):
        ds = ChunkDataset(tmp_path / "killed", chunk_size=4)
        stats = ds.stats
    assert len(ds) == 12
    torch.testing.assert_close(stats["action"]["mean"], ds.action.double().mean(0).float())
    # reopening appends; a different feature set is refused
    assert DatasetWriter(tmp_path / "killed", fps=10, features=features).num_episodes == 2
    with pytest.raises(DatasetError, match="features"):
        DatasetWriter(tmp_path / "killed", fps=10, features={**features, "action": {"dtype": "float32", "shape": [4]}})


def test_bad_inputs_raise_dataset_error(root, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ChunkDataset(tmp_path / "nowhere", chunk_size=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="info.json"):
        ChunkDataset(tmp_path / "empty", chunk_size=4)
    for bad in (0, -1, 2.5):
        with pytest.raises(DatasetError, match="chunk_size"):
            ChunkDataset(root, chunk_size=bad)
    with pytest.raises(DatasetError, match="observation.images.wrist"):
        ChunkDataset(root, chunk_size=4, image_keys=["observation.images.wrist"])

    features = {"observation.state": {"dtype": "float32", "shape": [3]}, "action": {"dtype": "float32", "shape": [2]}}
    DatasetWriter(tmp_path / "zero", fps=10, features=features)
    with pytest.raises(DatasetError, match="zero episodes"):
        ChunkDataset(tmp_path / "zero", chunk_size=4)
    with pytest.raises(DatasetError, match="'action' has shape"):
        DatasetWriter(tmp_path / "zero", fps=10, features=features).add_episode(
            {"observation.state": np.zeros((4, 3)), "action": np.zeros((4, 3))}, task="t")

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "meta" / "info.json").unlink()
    with pytest.raises(DatasetError, match="info.json"):
        ChunkDataset(copy, chunk_size=4)

    shutil.rmtree(copy)
    shutil.copytree(root, copy)
    (copy / "data/chunk-000/file-000.parquet").write_bytes(b"this is not a parquet file" * 10)
    with pytest.raises(DatasetError, match="file-000.parquet"):
        ChunkDataset(copy, chunk_size=4)

    shutil.rmtree(copy)
    shutil.copytree(root, copy)
    (copy / "data/chunk-000/file-000.parquet").unlink()
    with pytest.raises(DatasetError, match="file-000.parquet does not exist"):
        ChunkDataset(copy, chunk_size=4)


@pytest.mark.parametrize("video", [False, True])
def test_image_dataset(tmp_path, video):
    out = tmp_path / "images"
    collect(out, 2, "--image-size", "16", *(["--video"] if video else []))
    info = json.loads((out / "meta" / "info.json").read_text())
    feature = info["features"]["observation.images.top"]
    assert feature["dtype"] == ("video" if video else "image") and feature["shape"] == [16, 16, 3]
    assert feature["names"] == ["height", "width", "channels"]
    columns = pq.read_schema(out / "data/chunk-000/file-000.parquet").names
    assert ("observation.images.top" in columns) != video
    if video:
        assert sorted(p.name for p in (out / "videos/observation.images.top/chunk-000").iterdir()) == ["file-000.mp4"]
        episodes = read_episodes(out)
        assert episodes[1]["videos/observation.images.top/from_timestamp"] == pytest.approx(episodes[0]["length"] / 10)
    ds = ChunkDataset(out, chunk_size=4)
    img = ds[3]["observation.images.top"]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.std()) > 0
    assert ds.stats["observation.images.top"]["mean"].shape == (3,)
    stats = json.loads((out / "meta" / "stats.json").read_text())
    assert np.asarray(stats["observation.images.top"]["q50"]).shape == (3, 1, 1)  # LeRobot's image shape
    windows = ds.all_windows()
    assert windows["observation.images.top"].dtype == torch.uint8
    for i in (0, 3, len(ds) - 1):  # one decoding path for items and for all windows
        torch.testing.assert_close(windows["observation.images.top"][i].float() / 255, ds[i]["observation.images.top"])
    assert "observation.images.top" not in ChunkDataset(out, chunk_size=4, image_keys=[])[0]


def test_dataloader_batch_feeds_compute_loss(root):
    ds = ChunkDataset(root, chunk_size=8)
    batch = next(iter(DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert batch["observation.state"].shape == (8, 4)
    assert batch["action"].shape == (8, 8, 2) and batch["action_is_pad"].shape == (8, 8)
    assert batch["action_is_pad"].dtype == torch.bool
    assert isinstance(batch["task"], list) and len(batch["task"]) == 8 and isinstance(batch["task"][0], str)
    cfg = PolicyConfig(state_dim=ds.state_dim, action_dim=ds.action_dim, chunk_size=8, n_action_steps=4,
                       expert=make_expert_config("tiny"), device="cpu")
    policy = FlowPolicy(cfg).fit_normalization(ds.state, ds.action)
    loss, info = policy.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and info["per_sample"].shape == (8,)


def test_data_config_selects_episodes_renames_features_and_refuses_both_subsets():
    from fmpolicy.config import DataConfig
    from fmpolicy.errors import ConfigError

    train = load_script("train")
    data = DataConfig(root=str(FIXTURES / "png"), episodes=(4, 0), image_keys=("observation.images.top",),
                      rename_map={"observation.images.cam": "observation.images.top"})
    ds = train.open_dataset(data, data.root, chunk_size=3)
    assert sorted(set(ds.episode_index.tolist())) == [0, 4] and ds.image_keys == ["observation.images.top"]
    assert ds[0]["observation.images.top"].shape == (3, 48, 64)
    assert train.open_dataset(DataConfig(num_episodes=2), str(FIXTURES / "png"), 3).num_episodes == 2
    with pytest.raises(ConfigError, match="episodes"):
        DataConfig(episodes=(1,), num_episodes=2)
    with pytest.raises(ConfigError, match="episodes"):
        DataConfig(episodes=(1, 1))
    with pytest.raises(ConfigError, match="rename_map"):
        DataConfig(rename_map={"a": 1})


CAM = "observation.images.top"
IMAGE_FEATURES = {"observation.state": {"dtype": "float32", "shape": [3]}, "action": {"dtype": "float32", "shape": [2]},
                  CAM: {"dtype": "uint8", "shape": [3, 16, 20]}}


def smooth_episode(n: int, seed: int) -> dict:
    """An episode whose camera shows a bright square moving 2 pixels a frame over a brightness gradient:
    frames a video codec keeps close (yuv420p halves the colour resolution, so colour edges in tiny
    frames would come back blurred by several levels), and neighbouring frames differ clearly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:20]
    images = np.empty((n, 3, 16, 20), np.uint8)
    for t in range(n):
        square = (np.abs(xx - (2 * (seed + t)) % 20) < 3) & (np.abs(yy - 8) < 3)
        images[t] = np.stack([3 * xx + 60, 3 * xx + 50, 3 * xx + 90]) + 120 * square
    return {"observation.state": rng.normal(size=(n, 3)), "action": rng.uniform(-1, 1, (n, 2)), CAM: images}


def assert_frames_match(decoded: torch.Tensor, written: np.ndarray, lengths: list[int], video: bool) -> None:
    """decoded (N, 3, H, W) uint8 against the written frames: equal for PNG; for video each frame
    nearer its own frame than the neighbouring frames of its episode, and within a few levels."""
    written_t = torch.from_numpy(written).float()
    err = (decoded.float() - written_t).abs().mean(dim=(1, 2, 3))  # (N,) mean levels
    if not video:
        assert float(err.max()) == 0.0
        return
    assert float(err.max()) < 6, err
    start = 0
    for n in lengths:
        for t in range(start, start + n):
            for u in (t - 1, t + 1):
                if start <= u < start + n:
                    assert float(err[t]) < float((decoded[t].float() - written_t[u]).abs().mean()), (t, u)
        start += n


@pytest.mark.parametrize("video", [False, True])
def test_files_roll_over_within_and_across_chunks(tmp_path, video):
    """3 episodes per file and 2 files per chunk: 8 episodes make chunk-000/file-000, file-001 and
    chunk-001/file-000 (data and video alike); every frame reads back from the right file."""
    root = tmp_path / "ds"
    episodes = [smooth_episode(n, seed) for seed, n in enumerate((5, 7, 4, 6, 8, 5, 3, 6))]
    with DatasetWriter(root, fps=10, features=IMAGE_FEATURES, video=video, chunks_size=2, episodes_per_file=3) as writer:
        for seed, frames in enumerate(episodes):
            writer.add_episode(frames, task=f"task {seed % 2}")
        writer.finalize()
    names = sorted(str(p.relative_to(root / "data")) for p in (root / "data").rglob("*.parquet"))
    assert names == ["chunk-000/file-000.parquet", "chunk-000/file-001.parquet", "chunk-001/file-000.parquet"]
    assert [pq.ParquetFile(root / "data" / n).metadata.num_row_groups for n in names] == [3, 3, 2]
    if video:
        videos = sorted(str(p.relative_to(root / "videos" / CAM)) for p in (root / "videos" / CAM).rglob("*.mp4"))
        assert videos == ["chunk-000/file-000.mp4", "chunk-000/file-001.mp4", "chunk-001/file-000.mp4"]
        starts = [e[f"videos/{CAM}/from_timestamp"] for e in read_episodes(root)]
        np.testing.assert_allclose(starts, [0, 0.5, 1.2, 0, 0.6, 1.4, 0, 0.3], atol=1e-9)
    ds = ChunkDataset(root, chunk_size=4)
    images = np.concatenate([e[CAM] for e in episodes])
    windows = ds.all_windows()
    assert ds.tasks == ["task 0", "task 1"] and len(ds) == len(images)
    np.testing.assert_array_equal(ds.state.numpy(), np.concatenate([e["observation.state"] for e in episodes]).astype(np.float32))
    assert_frames_match(windows[CAM], images, [len(e["action"]) for e in episodes], video)
    for i in (0, 11, len(ds) - 1):
        torch.testing.assert_close(ds[i][CAM], windows[CAM][i].float() / 255)


@pytest.mark.parametrize("video", [False, True])
def test_a_writer_killed_inside_an_episode_leaves_nothing_listed_and_resumes_cleanly(tmp_path, monkeypatch, video):
    """Kill after the 3rd episode's frames reached the data (and video) file but before the meta lists
    them: the dataset reads as 2 episodes; the next writer removes the unlisted rows, appends after the
    listed frames, and every frame reads back as written."""
    root = tmp_path / "ds"
    episodes = [smooth_episode(n, seed) for seed, n in enumerate((5, 7, 4, 6))]
    with DatasetWriter(root, fps=10, features=IMAGE_FEATURES, video=video) as writer:
        for frames in episodes[:2]:
            writer.add_episode(frames, task="t")
        writer.finalize()
        monkeypatch.setattr(DatasetWriter, "_write_meta", lambda self, tasks_changed=True: (_ for _ in ()).throw(
            KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            writer.add_episode(episodes[2], task="t")
        monkeypatch.undo()
    assert set(pq.read_table(root / "data/chunk-000/file-000.parquet").column("episode_index").to_pylist()) == {0, 1, 2}
    partial = ChunkDataset(root, chunk_size=2)
    assert partial.num_episodes == 2 and len(partial) == 12
    partial.all_windows()
    with DatasetWriter(root, fps=10, features=IMAGE_FEATURES, video=video) as writer:
        assert writer.num_episodes == 2
        assert set(pq.read_table(root / "data/chunk-000/file-000.parquet").column("episode_index").to_pylist()) == {0, 1}
        writer.add_episode(episodes[3], task="t")
        writer.finalize()
    ds = ChunkDataset(root, chunk_size=2)
    kept = [episodes[0], episodes[1], episodes[3]]
    assert len(ds) == 18 and ds.stats["action"]["mean"].shape == (2,)
    np.testing.assert_array_equal(ds.action.numpy(), np.concatenate([e["action"] for e in kept]).astype(np.float32))
    images = torch.from_numpy(np.concatenate([e[CAM] for e in kept])).float()
    assert_frames_match(ds.all_windows()[CAM], images.numpy().astype(np.uint8), [5, 7, 6], video)
    if video:
        assert read_episodes(root)[2][f"videos/{CAM}/from_timestamp"] == pytest.approx(1.2)
    stats = json.loads((root / "meta/stats.json").read_text())
    assert stats[CAM]["count"] == [18]
    np.testing.assert_allclose(np.ravel(stats[CAM]["mean"]), (images / 255).mean(dim=(0, 2, 3)).numpy(), atol=0.03 if video else 1e-6)


def test_image_stats_from_the_histogram_equal_numpy_over_all_pixels(tmp_path):
    from fmpolicy.data.stats import QUANTILES, histogram_stats

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)  # (frames, H, W, channels)
    hist = np.stack([np.bincount(pixels[..., c].ravel(), minlength=256) for c in range(3)])
    stats = histogram_stats(hist, frames=7)
    x = pixels.reshape(-1, 3) / 255.0
    expected = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0),
                **{name: np.quantile(x, q, axis=0) for name, q in QUANTILES.items()}}
    for name, value in expected.items():
        assert np.asarray(stats[name]).shape == (3, 1, 1)
        np.testing.assert_allclose(np.ravel(stats[name]), value, rtol=1e-12, atol=1e-12, err_msg=name)
    assert stats["count"] == [7]


def test_writer_refuses_an_odd_video_size_and_a_different_image_storage_on_append(tmp_path):
    odd = {**IMAGE_FEATURES, CAM: {"dtype": "uint8", "shape": [3, 16, 9]}}
    with pytest.raises(DatasetError, match="even height and width"):
        DatasetWriter(tmp_path / "odd", fps=10, features=odd, video=True)
    assert not (tmp_path / "odd").exists()
    with DatasetWriter(tmp_path / "png", fps=10, features=IMAGE_FEATURES) as writer:
        writer.add_episode(smooth_episode(3, 0), task="t")
    with pytest.raises(DatasetError, match="PNG images.*video"):
        DatasetWriter(tmp_path / "png", fps=10, features=IMAGE_FEATURES, video=True)
    with pytest.raises(DatasetError, match="extra.*length"):
        with DatasetWriter(tmp_path / "png", fps=10, features=IMAGE_FEATURES) as writer:
            writer.add_episode(smooth_episode(3, 0), task="t", extra={"length": 2})


def test_an_episode_that_fails_to_write_leaves_the_writer_usable(tmp_path, monkeypatch):
    """A failure after the frames reached the data file (here the meta write): the writer forgets the
    episode, and the next one takes its index and replaces its rows."""
    root = tmp_path / "ds"
    episodes = [smooth_episode(n, seed) for seed, n in enumerate((5, 7, 4))]
    with DatasetWriter(root, fps=10, features=IMAGE_FEATURES) as writer:
        writer.add_episode(episodes[0], task="a")
        original = DatasetWriter._write_meta
        monkeypatch.setattr(DatasetWriter, "_write_meta", lambda self, tasks_changed=True: (_ for _ in ()).throw(
            OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            writer.add_episode(episodes[1], task="b")
        monkeypatch.setattr(DatasetWriter, "_write_meta", original)
        assert writer.num_episodes == 1 and writer.tasks == {"a": 0}
        assert writer.add_episode(episodes[2], task="c") == 1
        writer.finalize()
    ds = ChunkDataset(root, chunk_size=2)
    assert ds.tasks == ["a", "c"] and len(ds) == 9
    np.testing.assert_array_equal(ds.action.numpy(), np.concatenate([episodes[0]["action"], episodes[2]["action"]])
                                  .astype(np.float32))
    assert pq.read_table(root / "data/chunk-000/file-000.parquet").column("index").to_pylist() == list(range(9))


class CountingEnv:
    """A batched env of e counters: env i's episodes last 2 + (i + episode) % 3 steps; success when even."""

    def __init__(self, num_envs: int):
        self.num_envs = num_envs
        self.t = torch.zeros(num_envs, dtype=torch.long)
        self.episode = torch.zeros(num_envs, dtype=torch.long)

    def _obs(self):
        return {"observation.state": torch.stack([self.t.float(), self.episode.float()], 1)}

    def reset(self, seed=None):
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        length = 2 + (torch.arange(self.num_envs) + self.episode) % 3
        done = self.t >= length
        success = done & (self.episode % 2 == 0)
        self.episode = torch.where(done, self.episode + 1, self.episode)
        self.t = torch.where(done, 0, self.t)
        return self._obs(), torch.ones(self.num_envs), done, torch.zeros_like(done), {"final_info": {"is_success": success}}


class ConstantExpert:
    def __init__(self):
        self.mode = None

    def __call__(self, env):
        self.mode = env.episode % 2
        return torch.full((env.num_envs, 1), 0.5)


def test_collect_runs_any_batched_env_and_expert_passed_in(tmp_path):
    """The library's collector on a toy env (no fmpolicy_envs): episodes in the order they start,
    the expert's mode and the run's seed per episode, --only-success, and a clear failure when the
    expert rarely succeeds."""
    from fmpolicy.data import collect
    from fmpolicy.data.collection import ExpertFailing

    features = {"observation.state": {"dtype": "float32", "shape": [2]}, "action": {"dtype": "float32", "shape": [1]}}
    with DatasetWriter(tmp_path / "toy", fps=5, features=features) as writer:
        summary = collect(CountingEnv(3), ConstantExpert(), writer, 5, seed=7, task="count")
    assert summary["episodes"] == 5 and summary["new_episodes"] == 5
    ds = ChunkDataset(tmp_path / "toy", chunk_size=2)
    rows = read_episodes(tmp_path / "toy")
    # the first wave is episode 0 of envs 0, 1, 2 (lengths 2, 3, 4), then the next to start
    assert [r["length"] for r in rows[:3]] == [2, 3, 4]
    assert [r["mode"] for r in rows] == [0, 0, 0, 1, 1] and {r["seed"] for r in rows} == {7}
    assert [r["success"] for r in rows] == [True, True, True, False, False]
    assert ds.tasks == ["count"] and float(ds.action[0, 0]) == 0.5
    with DatasetWriter(tmp_path / "good", fps=5, features=features) as writer:
        collect(CountingEnv(3), ConstantExpert(), writer, 4, only_success=True)
        assert all(r["success"] for r in writer.episodes)
    with DatasetWriter(tmp_path / "bad", fps=5, features=features) as writer:
        with pytest.raises(ExpertFailing, match="successful episodes"):
            collect(CountingEnv(3), ConstantExpert(), writer, 20, only_success=True, max_attempts=6)
