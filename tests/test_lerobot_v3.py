"""LeRobot v3.0 datasets written by LeRobot itself read back with the values LeRobot's own reader gives.

The fixtures under tests/fixtures/lerobot_v3/ and the reference values in reference.json were made by
lerobot 0.4.4 in a side env (make_fixtures.py there; lerobot is not needed here): `png/` has an `image`
camera (PNG bytes in the parquet), `video/` a `video` camera (AV1 mp4, lerobot 0.4.4's default codec,
several episodes per file), `video_h264/` the same in H.264; all with the same frames, two tasks, six
episodes over two data files, float32 state (3,) and action (2,).
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from fmpolicy.data.dataset import LeRobotV3Dataset, read_v3_tasks
from fmpolicy.errors import DatasetError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lerobot_v3"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())
CAM = "observation.images.cam"
# Image channel means against LeRobot's. PNG is lossless and both sides divide the same uint8 pixels by
# 255, so the means agree to float32 rounding. Video is lossy, and the RGB pixels depend on the decoder
# build: AV1 decoding itself is exact, but the YUV 4:2:0 -> RGB conversion (FFmpeg's swscale) differs
# by a level or two between FFmpeg versions and CPU code paths; 1e-2 allows ~2.5 levels on every pixel,
# while the neighbouring frame (the white square moves 5 pixels) is further away (checked below).
MEAN_TOL = {"png": 1e-6, "video": 1e-2, "video_h264": 1e-2}


@pytest.fixture(scope="module", params=["png", "video", "video_h264"])
def fixture(request) -> tuple[str, LeRobotV3Dataset]:
    name = request.param
    return name, LeRobotV3Dataset(FIXTURES / name, chunk_size=REFERENCE[name]["chunk_size"])


def assert_item_matches(item: dict, ref: dict, name: str) -> None:
    assert int(item["index"]) == ref["index"]
    assert int(item["episode_index"]) == ref["episode_index"]
    assert int(item["frame_index"]) == ref["frame_index"]
    assert item["timestamp"].dtype == torch.float32 and float(item["timestamp"]) == ref["timestamp"]
    assert item["task"] == ref["task"]
    # float32 on disk, float32 out, exactly
    assert torch.equal(item["observation.state"], torch.tensor(ref["observation.state"], dtype=torch.float32))
    assert torch.equal(item["action"], torch.tensor(ref["action"], dtype=torch.float32))
    assert item["action_is_pad"].dtype == torch.bool
    assert item["action_is_pad"].tolist() == ref["action_is_pad"]
    img = item[CAM]
    assert list(img.shape) == ref["image_shape"] and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    means = img.double().mean(dim=(1, 2))
    torch.testing.assert_close(means, torch.tensor(ref["image_channel_mean"], dtype=torch.float64),
                               atol=MEAN_TOL[name], rtol=0)
    if name == "png":  # lossless: the very pixels
        assert int(torch.round(img.double() * 255).sum()) == ref["image_uint8_sum"]


def test_items_equal_what_lerobot_returned(fixture):
    name, ds = fixture
    ref = REFERENCE[name]
    assert len(ds) == ref["num_frames"] and ds.num_episodes == ref["num_episodes"]
    assert ds.tasks == ref["tasks"]
    assert (ds.state_dim, ds.action_dim) == (3, 2)
    for r in ref["items"]:
        assert_item_matches(ds[r["index"]], r, name)


def test_windows_past_the_episode_end_are_padded_with_the_last_action(fixture):
    _, ds = fixture
    h = ds.chunk_size
    for i in range(len(ds)):
        item = ds[i]
        end = int(ds.episode_end[i])
        n_valid = min(h, end - i)
        assert item["action_is_pad"].tolist() == [False] * n_valid + [True] * (h - n_valid)
        assert torch.equal(item["action"][:n_valid], ds.action[i:i + n_valid])
        assert (item["action"][n_valid:] == ds.action[end - 1]).all()


@pytest.mark.parametrize("name", ["video", "video_h264"])
def test_video_tolerance_tells_neighbouring_frames_apart(name):
    ref = {r["index"]: r for r in REFERENCE[name]["items"]}
    for i in (0, 3, 11):
        a, b = np.array(ref[i]["image_channel_mean"]), np.array(ref[i + 1]["image_channel_mean"])
        assert np.abs(a - b).max() > 3 * MEAN_TOL[name]


@pytest.mark.parametrize("name", ["video", "video_h264"])
def test_every_video_frame_is_the_png_frame_of_the_same_index(name):
    # The fixtures hold the same frames: each decoded video frame is closest to its own PNG frame.
    png = LeRobotV3Dataset(FIXTURES / "png", chunk_size=1)
    video = LeRobotV3Dataset(FIXTURES / name, chunk_size=1)
    frames_png = torch.stack([png[i][CAM] for i in range(len(png))])  # (N, 3, H, W)
    for i in range(len(video)):
        err = (video[i][CAM] - frames_png).abs().mean(dim=(1, 2, 3))  # (N,) against every PNG frame
        assert int(err.argmin()) == i and float(err[i]) < 0.02, (i, err[i])


def test_an_episode_subset_gives_lerobots_items(fixture):
    name, ds_all = fixture
    sub = REFERENCE[name]["subset"]
    ds = LeRobotV3Dataset(FIXTURES / name, chunk_size=REFERENCE[name]["chunk_size"], episodes=sub["episodes"][::-1])
    assert len(ds) == sub["num_frames"] and ds.num_episodes == len(sub["episodes"])
    assert sorted(set(ds.episode_index.tolist())) == sub["episodes"]
    for r in sub["items"]:
        assert_item_matches(ds[r["position"]], r, name)
    # stats describe the whole dataset, as LeRobot's meta does
    assert torch.equal(ds.stats["action"]["mean"], ds_all.stats["action"]["mean"])


def test_stats_come_from_stats_json_per_dimension(fixture):
    name, ds = fixture
    raw = json.loads((FIXTURES / name / "meta/stats.json").read_text())
    for key, width in (("observation.state", 3), ("action", 2), (CAM, 3)):
        for stat in ("mean", "std", "min", "max"):
            assert ds.stats[key][stat].shape == (width,)
            np.testing.assert_allclose(ds.stats[key][stat].numpy(), np.ravel(raw[key][stat]), rtol=1e-6)
    # the statistics match the frames (LeRobot computes them over all frames)
    np.testing.assert_allclose(ds.stats["action"]["mean"].numpy(), ds.action.double().mean(0).numpy(), rtol=1e-5)


def test_rename_map_renames_features_and_stats():
    ds = LeRobotV3Dataset(FIXTURES / "png", chunk_size=2,
                          rename_map={CAM: "observation.images.top", "observation.state": "observation.state"})
    item = ds[0]
    assert "observation.images.top" in item and CAM not in item
    assert ds.image_keys == ["observation.images.top"] and "observation.images.top" in ds.stats
    ref = REFERENCE["png"]["items"][0]
    assert int(torch.round(item["observation.images.top"].double() * 255).sum()) == ref["image_uint8_sum"]
    with pytest.raises(DatasetError, match="rename_map names .*'observation.images.nope'"):
        LeRobotV3Dataset(FIXTURES / "png", chunk_size=2, rename_map={"observation.images.nope": "x"})
    with pytest.raises(DatasetError, match="no feature 'action'.*rename_map"):
        LeRobotV3Dataset(FIXTURES / "png", chunk_size=2, rename_map={"action": "actions"})
    with pytest.raises(DatasetError, match="onto 'action'"):
        LeRobotV3Dataset(FIXTURES / "png", chunk_size=2, rename_map={"observation.state": "action"})


def test_image_keys_empty_skips_images_and_a_dataloader_batches_items():
    ds = LeRobotV3Dataset(FIXTURES / "video", chunk_size=3, image_keys=[])
    assert CAM not in ds[0]
    ds = LeRobotV3Dataset(FIXTURES / "video", chunk_size=3)
    batch = next(iter(DataLoader(ds, batch_size=5, shuffle=False)))
    assert batch["action"].shape == (5, 3, 2) and batch["action_is_pad"].shape == (5, 3)
    assert batch[CAM].shape == (5, 3, 48, 64) and batch["observation.state"].shape == (5, 3)
    assert batch["task"] == [REFERENCE["video"]["tasks"][0]] * 5


def test_video_decodes_in_dataloader_workers_and_the_dataset_pickles():
    ds = LeRobotV3Dataset(FIXTURES / "video", chunk_size=2)
    ds[3]  # opens a container in this process: workers must open their own
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker receives
    torch.testing.assert_close(clone[20][CAM], ds[20][CAM], atol=0, rtol=0)
    # forked workers (the default), after the parent has opened the video: in a subprocess with a time
    # limit, so that a worker hanging on a lock inherited from FFmpeg's threads fails instead of hanging
    code = f"""
import torch
from torch.utils.data import DataLoader
from fmpolicy.data import LeRobotV3Dataset
torch.set_num_threads(2)
ds = LeRobotV3Dataset({str(FIXTURES / "video")!r}, chunk_size=2)
for _ in range(3):
    ds[3]  # the parent holds an open container (and FFmpeg's threads) when the workers fork
    frames = torch.cat([b[{CAM!r}] for b in DataLoader(ds, batch_size=12, num_workers=2, shuffle=False)])
    torch.testing.assert_close(frames, torch.stack([ds[i][{CAM!r}] for i in range(len(ds))]), atol=0, rtol=0)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_tasks_are_the_pandas_index_column_of_tasks_parquet():
    table = pq.read_table(FIXTURES / "png" / "meta/tasks.parquet")
    assert table.schema.pandas_metadata["index_columns"] == ["__index_level_0__"]
    assert read_v3_tasks(FIXTURES / "png") == REFERENCE["png"]["tasks"]


def test_unknown_episode_or_image_key_or_chunk_size_is_an_error():
    with pytest.raises(DatasetError, match=r"episodes \[9\] are not in"):
        LeRobotV3Dataset(FIXTURES / "png", chunk_size=2, episodes=[1, 9])
    with pytest.raises(DatasetError, match="image key 'observation.images.top'"):
        LeRobotV3Dataset(FIXTURES / "png", chunk_size=2, image_keys=["observation.images.top"])
    with pytest.raises(DatasetError, match="chunk_size"):
        LeRobotV3Dataset(FIXTURES / "png", chunk_size=0)


# ---- corrupted copies ------------------------------------------------------------------------------

@pytest.fixture
def copy_of(tmp_path):
    def make(name: str) -> Path:
        root = tmp_path / name
        shutil.copytree(FIXTURES / name, root)
        return root
    return make


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_a_missing_meta_file_is_named(copy_of):
    root = copy_of("png")
    (root / "meta/tasks.parquet").unlink()
    with pytest.raises(DatasetError, match=r"meta/tasks.parquet does not exist"):
        LeRobotV3Dataset(root, chunk_size=2)
    (root / "meta/info.json").unlink()
    with pytest.raises(DatasetError, match=r"meta/info.json does not exist: .* is not a LeRobot dataset"):
        LeRobotV3Dataset(root, chunk_size=2)
    with pytest.raises(DatasetError, match="does not exist"):
        LeRobotV3Dataset(root / "nowhere", chunk_size=2)


def test_a_v2_dataset_is_refused_with_its_version(copy_of):
    root = copy_of("png")
    edit_json(root / "meta/info.json", codebase_version="v2.1")
    with pytest.raises(DatasetError, match=r"info.json: codebase_version is 'v2.1': expected 'v3.0' .*convert"):
        LeRobotV3Dataset(root, chunk_size=2)


def test_bad_fps_is_refused(copy_of):
    root = copy_of("png")
    edit_json(root / "meta/info.json", fps=0)
    with pytest.raises(DatasetError, match="fps is 0"):
        LeRobotV3Dataset(root, chunk_size=2)


def test_a_nan_state_names_file_episode_frame_and_column(copy_of):
    root = copy_of("png")
    path = root / "data/chunk-000/file-001.parquet"  # episodes 4 (8 frames) and 5
    table = pq.read_table(path)
    state = table.column("observation.state").to_pylist()
    state[10][1] = float("nan")  # episode 5, frame 2
    col = pa.array(state, type=table.schema.field("observation.state").type)
    pq.write_table(table.set_column(table.schema.get_field_index("observation.state"), "observation.state", col), path)
    with pytest.raises(DatasetError, match=r"file-001.parquet \(episode 5\), frame 2, column 'observation.state', "
                                           r"dimension 1: the value nan is not finite"):
        LeRobotV3Dataset(root, chunk_size=2)
    LeRobotV3Dataset(root, chunk_size=2, episodes=[0, 4])  # the other episodes still open


def test_a_missing_data_or_video_file_is_named(copy_of):
    root = copy_of("png")
    (root / "data/chunk-000/file-001.parquet").unlink()
    with pytest.raises(DatasetError, match=r"data file .*file-001.parquet does not exist"):
        LeRobotV3Dataset(root, chunk_size=2)
    root = copy_of("video")
    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    last = len(episodes["episode_index"]) - 1
    chunk, file = (episodes[f"videos/{CAM}/{c}_index"][last] for c in ("chunk", "file"))
    (root / "videos" / CAM / f"chunk-{chunk:03d}/file-{file:03d}.mp4").unlink()
    with pytest.raises(DatasetError, match=rf"video file .*chunk-{chunk:03d}/file-{file:03d}.mp4 of "
                                           rf"'observation.images.cam', episode \d+, does not exist"):
        LeRobotV3Dataset(root, chunk_size=2)


def test_a_corrupt_png_is_named_when_read(copy_of):
    root = copy_of("png")
    path = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    images = table.column(CAM).to_pylist()
    images[6]["bytes"] = b"not a png"  # episode 1, frame 1
    col = pa.array(images, type=table.schema.field(CAM).type)
    pq.write_table(table.set_column(table.schema.get_field_index(CAM), CAM, col), path, row_group_size=5)
    ds = LeRobotV3Dataset(root, chunk_size=2)
    ds[5]
    with pytest.raises(DatasetError, match=r"\(episode 1\), frame 1, column 'observation.images.cam': "
                                           r"the image does not decode"):
        ds[6]


def test_episode_lengths_must_match_the_data(copy_of):
    root = copy_of("video")
    path = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 1), path)  # drop the last frame of episode 2
    with pytest.raises(DatasetError, match=r"file-000.parquet \(episode 2\) has 3 frames "
                                           r"but the episodes table says 4"):
        LeRobotV3Dataset(root, chunk_size=2)


def test_timestamps_must_be_one_over_fps_apart(copy_of):
    root = copy_of("video")
    path = root / "data/chunk-000/file-001.parquet"  # episodes 3, 4, 5
    table = pq.read_table(path)
    ts = table.column("timestamp").to_pylist()
    ts[8] += 0.05  # episode 4, frame 2
    i = table.schema.get_field_index("timestamp")
    pq.write_table(table.set_column(i, "timestamp", pa.array(ts, pa.float32())), path)
    with pytest.raises(DatasetError, match=r"file-001.parquet \(episode 4\), frame 2, column 'timestamp': "
                                           r"is 0.250000 s, 0.150000 s after the previous frame"):
        LeRobotV3Dataset(root, chunk_size=2)
