"""scripts/convert_dataset.py: a dataset of the old `fmpolicy-lerobot-v1` layout (a committed fixture
written by the old DatasetWriter) becomes a LeRobot v3.0 dataset with the same frames."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fmpolicy.data import ChunkDataset
from fmpolicy.data.writer import EPISODES_PATH
from fmpolicy.errors import DatasetError
from tests.helpers import load_script

REPO = Path(__file__).resolve().parents[1]
OLD = Path(__file__).resolve().parent / "fixtures" / "fmpolicy_v1"
CAM = "observation.images.top"
convert_dataset = load_script("convert_dataset")


def old_frames() -> list[dict]:
    return [pq.read_table(OLD / f"data/chunk-000/episode_{e:06d}.parquet").to_pydict() for e in range(3)]


@pytest.mark.parametrize("video", [False, True])
def test_converted_dataset_has_the_old_frames(tmp_path, video):
    new = tmp_path / "new"
    assert convert_dataset.main([str(OLD), str(new), *(["--video"] if video else [])]) == {"episodes": 3, "frames": 16}
    info = json.loads((new / "meta/info.json").read_text())
    old_info = json.loads((OLD / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10 and info["robot_type"] == "fixture_bot"
    assert info["env"] == old_info["env"] and info["features"][CAM]["shape"] == [4, 6, 3]
    ds = ChunkDataset(new, chunk_size=3)
    frames = old_frames()
    old_episodes = [json.loads(line) for line in (OLD / "meta/episodes.jsonl").read_text().splitlines()]
    episodes = pq.read_table(new / EPISODES_PATH).to_pylist()
    windows = ds.all_windows()
    i = 0
    for e, (t, meta) in enumerate(zip(frames, old_episodes)):
        for key in ("success", "mode", "seed", "return"):
            assert episodes[e][key] == meta[key]
        assert episodes[e]["tasks"] == meta["tasks"]
        for f in range(len(t["frame_index"])):
            item = ds[i]
            assert item["task"] == meta["tasks"][0] and int(item["frame_index"]) == f
            assert torch.equal(item["observation.state"], torch.tensor(t["observation.state"][f], dtype=torch.float32))
            assert torch.equal(item["action"][0], torch.tensor(t["action"][f], dtype=torch.float32))
            assert float(item["next.reward"]) == pytest.approx(t["next.reward"][f], abs=1e-7)
            assert bool(item["next.success"]) == t["next.success"][f]
            image = torch.from_numpy(np.frombuffer(t[CAM][f], np.uint8).reshape(3, 4, 6).copy())
            if video:  # random pixels in 4x6 frames: lossy, but still the frame of this index
                assert (windows[CAM][i].float() - image.float()).abs().mean() < 60
            else:  # PNG is lossless: the very pixels
                assert torch.equal(windows[CAM][i], image)
                assert torch.equal(item[CAM], image.float() / 255)
            i += 1
    # statistics are recomputed over all frames in LeRobot's names
    state = np.concatenate([np.asarray(t["observation.state"], np.float64) for t in frames])
    np.testing.assert_allclose(ds.stats["observation.state"]["q50"].numpy(), np.median(state, 0), rtol=1e-6)


def test_a_v3_dataset_or_an_existing_target_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="expected 'fmpolicy-lerobot-v1'"):
        convert_dataset.main([str(REPO / "tests/fixtures/lerobot_v3/png"), str(tmp_path / "x")])
    (tmp_path / "exists").mkdir()
    with pytest.raises(DatasetError, match="exists"):
        convert_dataset.main([str(OLD), str(tmp_path / "exists")])
    proc = subprocess.run([sys.executable, str(REPO / "scripts/convert_dataset.py"), str(tmp_path / "nowhere"),
                           str(tmp_path / "y")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1 and "convert_dataset.py: error:" in proc.stderr and "Traceback" not in proc.stderr
