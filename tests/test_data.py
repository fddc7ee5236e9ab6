"""Datasets: the collection script writes the documented layout, ChunkDataset windows it, bad input fails clearly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from fmpolicy import FlowPolicy, PolicyConfig, make_expert_config
from fmpolicy.data import FORMAT, ChunkDataset, DatasetWriter
from fmpolicy.errors import DatasetError
from tests.helpers import load_script

ENV = "fmpolicy/PointObstacle-v0"
COLUMNS = {"observation.state", "action", "timestamp", "frame_index", "episode_index", "index", "task_index",
           "next.reward", "next.done", "next.success"}


collect_demos = load_script("collect_demos")


def collect(out: Path, episodes: int, *extra: str) -> dict:
    return collect_demos.main(["--env", ENV, "--episodes", str(episodes), "--num-envs", "4", "--out", str(out),
                               "--seed", "0", "--no-progress", *extra])


def episode_file(root: Path, ep: int) -> Path:
    return root / "data" / "chunk-000" / f"episode_{ep:06d}.parquet"


def read_all(root: Path) -> list:
    n = json.loads((root / "meta" / "info.json").read_text())["total_episodes"]
    return [pq.read_table(episode_file(root, e)).to_pydict() for e in range(n)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "point"
    summary = collect(out, 6)
    assert summary["episodes"] == 6 and summary["frames"] > 6 * 20
    return out


def test_layout(root):
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["format"] == FORMAT and info["fps"] == 10.0
    assert info["env"]["id"] == ENV and info["env"]["kwargs"] == {}
    assert info["total_episodes"] == 6 and info["chunks_size"] == 1000 and info["robot_type"]
    assert info["features"]["observation.state"] == {"dtype": "float32", "shape": [4]}
    assert info["features"]["action"] == {"dtype": "float32", "shape": [2]}
    episodes = [json.loads(line) for line in (root / "meta" / "episodes.jsonl").read_text().splitlines()]
    assert [e["episode_index"] for e in episodes] == list(range(6))
    assert all(e["success"] and e["mode"] in (0, 1) and e["tasks"] for e in episodes)
    tasks = [json.loads(line) for line in (root / "meta" / "tasks.jsonl").read_text().splitlines()]
    assert tasks == [{"task_index": 0, "task": collect_demos.DEFAULT_TASKS[ENV]}]
    stats = json.loads((root / "meta" / "stats.json").read_text())
    assert set(stats["observation.state"]) == {"mean", "std", "min", "max", "q01", "q99", "count"}

    tables = read_all(root)
    assert sum(len(t["index"]) for t in tables) == info["total_frames"]
    start = 0
    for e, (t, meta) in enumerate(zip(tables, episodes)):
        assert set(t) == COLUMNS
        n = len(t["frame_index"])
        assert n == meta["length"]
        assert t["frame_index"] == list(range(n)) and t["episode_index"] == [e] * n
        assert t["index"] == list(range(start, start + n))
        np.testing.assert_allclose(t["timestamp"], np.arange(n) / 10.0, rtol=1e-6)
        assert t["next.done"] == [False] * (n - 1) + [True] and t["next.success"][-1]
        assert len(t["observation.state"][0]) == 4 and len(t["action"][0]) == 2
        start += n
    # atomic writes leave no temporary files behind (`.lock` is the writer lock's file, kept on purpose)
    assert not [p for p in root.rglob("*") if p.name != ".lock" and (p.name.startswith(".") or p.suffix == ".tmp")]


def test_windows_match_recorded_actions_and_pad(root):
    tables = read_all(root)
    for h in (1, 5, 16, 80):
        ds = ChunkDataset(root, chunk_size=h)
        assert len(ds) == sum(len(t["index"]) for t in tables) and ds.num_episodes == 6
        assert (ds.state_dim, ds.action_dim) == (4, 2)
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
                    "q01": np.quantile(data, 0.01, axis=0), "q99": np.quantile(data, 0.99, axis=0)}
        for name, value in expected.items():
            got = ds.stats[key][name]
            assert got.dtype == torch.float32 and got.shape == (data.shape[1],)
            np.testing.assert_allclose(got.numpy(), value, rtol=1e-5, atol=1e-6, err_msg=f"{key} {name}")


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
    episodes = [json.loads(line) for line in (out / "meta" / "episodes.jsonl").read_text().splitlines()]
    assert [e["episode_index"] for e in episodes] == list(range(6))
    tables = read_all(out)
    index = np.concatenate([t["index"] for t in tables])
    np.testing.assert_array_equal(index, np.arange(len(index)))
    # the resumed run draws new episodes instead of recording the first ones again
    assert tables[3]["observation.state"][0] != tables[0]["observation.state"][0]
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["total_episodes"] == 6 and info["stats_episodes"] == 6 and info["total_frames"] == len(index)
    assert collect(out, 6)["new_episodes"] == 0  # complete: nothing to do
    assert not [p for p in out.rglob("*") if p.name != ".lock" and (p.name.startswith(".") or p.suffix == ".tmp")]


def test_killed_script_resumes(tmp_path, monkeypatch):
    """Interrupt the real script after 3 episodes (and leave a stray temp file, as a kill inside a
    write would): the 3 episodes are readable, and a second run completes the dataset to 6."""
    out = tmp_path / "killed"

    class Interrupted(collect_demos.DatasetWriter):
        def add_episode(self, *args, **kwargs):
            if self.num_episodes == 3:
                (self.root / "data" / "chunk-000" / ".episode_000003.parquet.x.tmp").write_bytes(b"partial")
                raise KeyboardInterrupt
            return super().add_episode(*args, **kwargs)

    monkeypatch.setattr(collect_demos, "DatasetWriter", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect(out, 6)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="stale"):
        partial = ChunkDataset(out, chunk_size=4)
        assert partial.num_episodes == 3 and partial.stats["action"]["mean"].shape == (2,)
    assert collect(out, 6)["new_episodes"] == 3
    ds = ChunkDataset(out, chunk_size=4)
    assert ds.num_episodes == 6 and sorted(set(ds.episode_index.tolist())) == list(range(6))
    assert not [p for p in out.rglob("*") if p.name != ".lock" and (p.name.startswith(".") or p.suffix == ".tmp")]


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

    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "meta" / "info.json").unlink()
    with pytest.raises(DatasetError, match="info.json"):
        ChunkDataset(copy, chunk_size=4)

    shutil.rmtree(copy)
    shutil.copytree(root, copy)
    corrupt = episode_file(copy, 2)
    corrupt.write_bytes(b"this is not a parquet file" * 10)
    with pytest.raises(DatasetError, match="episode_000002.parquet"):
        ChunkDataset(copy, chunk_size=4)

    shutil.rmtree(copy)
    shutil.copytree(root, copy)
    episode_file(copy, 4).unlink()
    with pytest.raises(DatasetError, match="episode_000004.parquet"):
        ChunkDataset(copy, chunk_size=4)


def test_image_dataset(tmp_path):
    out = tmp_path / "images"
    collect(out, 2, "--image-size", "16")
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["features"]["observation.images.top"] == {"dtype": "uint8", "shape": [3, 16, 16]}
    raw = pq.read_table(episode_file(out, 0)).column("observation.images.top")
    assert len(raw[0].as_py()) == 3 * 16 * 16
    ds = ChunkDataset(out, chunk_size=4)
    img = ds[3]["observation.images.top"]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.std()) > 0
    assert ds.stats["observation.images.top"]["mean"].shape == (3,)
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
