"""Streaming training data (fmpolicy/training/stream.py): the batches DataLoader workers read from disk
are the in-memory path's batches, bit for bit, so streamed, in-memory and resumed runs all agree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fmpolicy.config import DataConfig, ImitationConfig, load_config
from fmpolicy.data import ChunkDataset
from fmpolicy.errors import ConfigError
from fmpolicy.training.imitation import EpochSampler, _slice_batch, combine_windows, make_sampler, window_groups
from fmpolicy.training.stream import WindowBatches, should_stream, stream_batches
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "lerobot_v3"
train_script = load_script("train")
collect_demos = load_script("collect_demos")

TINY = ["policy.expert.width=32", "policy.expert.depth=1", "policy.expert.num_heads=2",
        "policy.expert.time_embed_dim=32", "policy.device=cpu", "train.progress=false", "train.warmup_steps=2",
        "policy.expert.prefix_dim=16", "policy.encoder.out_dim=16", "policy.encoder.image_size=16",
        "policy.encoder.vision_hidden_size=16", "policy.encoder.vision_num_hidden_layers=1",
        "policy.encoder.vision_patch_size=8"]


@pytest.fixture(scope="module")
def video_data(tmp_path_factory) -> Path:
    """Two-goal PointObstacle, 16-pixel camera as H.264 video, two instructions: 6 episodes."""
    out = tmp_path_factory.mktemp("stream") / "goals_video"
    collect_demos.main(["--env", "fmpolicy/PointObstacle-v0", "--episodes", "6", "--num-envs", "6", "--out", str(out),
                        "--env-kwargs", json.dumps({"n_goals": 2}), "--image-size", "16", "--video", "--seed", "0",
                        "--no-progress"])
    return out


def _policy_like(state_dim: int, action_dim: int, names: list[str]):
    """What `combine_windows` reads of a policy: its widths and embodiment ids."""
    ids = {name: i for i, name in enumerate(names)}
    return SimpleNamespace(config=SimpleNamespace(state_dim=state_dim, action_dim=action_dim),
                           embodiments=SimpleNamespace(get=ids.__getitem__))


def _assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], list):
            assert a[k] == b[k], k
        else:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["png", "video_h264"])
def test_windows_of_some_rows_equal_those_rows_of_all_windows(name):
    ds = ChunkDataset(FIXTURES / name, chunk_size=6)
    every = ds.all_windows()
    rows = torch.tensor([34, 0, 7, 7, 20, 5, 33])  # out of order, repeated, episode ends
    some = ds.windows(rows)
    assert some.keys() == every.keys()
    for k in every:
        expected = [every[k][i] for i in rows.tolist()] if k == "task" else every[k][rows]
        if k == "task":
            assert some[k] == expected
        else:  # video frames too: seeking to one frame decodes the pixels a full decode gives
            assert some[k].dtype == expected.dtype and torch.equal(some[k], expected), k
    assert some["observation.images.cam"].float().mean() > 10  # real pixels, not zeros
    with pytest.raises(IndexError, match="window 35 out of range for 35 windows"):
        ds.windows([3, 35])


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_are_the_in_memory_batches_for_every_rank(workers):
    # two robots (the PNG and the video fixture as two embodiments, of padded widths), two ranks of a
    # global batch of 8: each rank's streamed rows are its rows of the in-memory global batch
    datasets = {"a": ChunkDataset(FIXTURES / "png", chunk_size=4),
                "b": ChunkDataset(FIXTURES / "video_h264", chunk_size=4, episodes=[1, 3, 4])}
    policy = _policy_like(5, 3, ["a", "b"])
    windows = combine_windows(datasets, policy, torch.device("cpu"))
    source = WindowBatches(datasets, 5, 3, {"a": 0, "b": 1})
    assert len(source) == len(windows["action"]) == 35 + len(datasets["b"])
    for rank in (0, 1):
        rows = slice(rank, None, 2)
        sampler = EpochSampler(len(source), 8, seed=3)
        batches = stream_batches(source, sampler, rows, steps=9, num_workers=workers)  # 9 * 8 > 1 epoch
        for step in range(9):
            idx = sampler.next()
            read, streamed = next(batches)
            assert torch.equal(read, idx[rows])
            _assert_same_batch(_slice_batch(streamed, None, torch.device("cpu")),
                               _slice_batch(windows, idx[rows], torch.device("cpu")))
        assert next(batches, None) is None
        seen = set(read.tolist())
    assert {0, 1} <= set(windows["embodiment"].tolist()) and seen


@pytest.mark.parametrize("balance", ["episodes", "tasks"])
def test_streamed_batches_follow_a_balanced_sampler_too(balance):
    # data.balance: the loader's copy of the sampler draws the windows the trainer's draws
    datasets = {"a": ChunkDataset(FIXTURES / "png", chunk_size=4),
                "b": ChunkDataset(FIXTURES / "video_h264", chunk_size=4, episodes=[1, 3, 4])}
    windows = combine_windows(datasets, _policy_like(5, 3, ["a", "b"]), torch.device("cpu"))
    sampler = make_sampler(datasets, balance, 8, seed=3)
    groups = window_groups(datasets, balance)
    assert len(groups) == len(windows["action"]) and groups.max() >= 1
    batches = stream_batches(WindowBatches(datasets, 5, 3, {"a": 0, "b": 1}), sampler, slice(None), steps=5,
                             num_workers=0)
    for _ in range(5):
        idx = sampler.next()
        read, streamed = next(batches)
        assert torch.equal(read, idx)
        _assert_same_batch(_slice_batch(streamed, None, torch.device("cpu")),
                           _slice_batch(windows, idx, torch.device("cpu")))
    if balance == "episodes":  # every window of an episode maps to it: the frame's own episode_index
        assert torch.equal(groups[: len(datasets["a"])].unique(), datasets["a"].episode_index.unique() * 2)


def test_streamed_training_equals_in_memory_training_and_resumes_bit_for_bit(video_data, tmp_path, capsys):
    common = ["--config", str(ROOT / "configs" / "point_goals_vl.yaml"), *TINY, f"data.root={video_data}",
              "train.steps=6", "train.save_every=3", "train.batch_size=8", "train.log_every=1",
              "policy.expert.dropout=0.1"]

    def run(out: Path, *extra: str, resume: bool = False) -> dict[str, torch.Tensor]:
        train_script.main(common + [f"train.out_dir={out}", *extra] + (["--resume"] if resume else []))
        return load_file(str(out / "policy" / "model.safetensors"))

    memory = run(tmp_path / "memory", "data.stream=false")
    assert "streaming batches" not in capsys.readouterr().out
    streamed = run(tmp_path / "stream", "data.num_workers=2")  # auto: the camera is video
    assert "streaming batches with 2 DataLoader workers (data.stream = auto and the data has video" in \
        capsys.readouterr().out
    inline = run(tmp_path / "inline", "data.stream=true", "data.num_workers=0")
    for k in memory:
        assert torch.equal(memory[k], streamed[k]) and torch.equal(memory[k], inline[k]), k
    # "killed" after the step-3 checkpoint, resumed with streaming (and another worker count)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "stream", cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000006")
    shutil.rmtree(cut / "policy")
    (cut / "checkpoints" / "last.json").write_text(json.dumps({"step": 3, "path": "step_00000003"}))
    resumed = run(cut, "data.num_workers=1", resume=True)
    assert "resumed from" in capsys.readouterr().out
    for k in memory:
        assert torch.equal(memory[k], resumed[k]), k
    first = load_file(str(cut / "checkpoints" / "step_00000003" / "policy" / "model.safetensors"))
    assert any(not torch.equal(first[k], memory[k]) for k in memory)  # training moved the weights
    log = [json.loads(line)["loss"] for line in (cut / "log.jsonl").read_text().splitlines()]
    assert log == [json.loads(line)["loss"] for line in (tmp_path / "memory" / "log.jsonl").read_text().splitlines()]


def test_auto_streams_video_and_datasets_over_the_memory_limit():
    png = {"a": ChunkDataset(FIXTURES / "png", chunk_size=4)}
    video = {"a": ChunkDataset(FIXTURES / "video_h264", chunk_size=4)}
    assert should_stream(DataConfig(), video) == (
        True, "data.stream = auto and the data has video cameras (a: observation.images.cam)")
    assert not should_stream(DataConfig(), png)[0]
    need = png["a"].in_memory_bytes()
    assert need == 35 * (4 * 3 + 4 * 4 * 2 + 4 + 16 + 8 + 3 * 48 * 64)
    assert should_stream(DataConfig(in_memory_max_gb=need / 1024 ** 3 * 0.99), png)[0]
    assert not should_stream(DataConfig(in_memory_max_gb=need / 1024 ** 3 * 1.01), png)[0]
    assert should_stream(DataConfig(stream=True), png) == (True, "data.stream = true")
    assert should_stream(DataConfig(stream=False), video) == (False, "data.stream = false")


@pytest.mark.parametrize("override, message", [
    ("data.stream=maybe", r"DataConfig\.stream = 'maybe' is invalid: expected 'auto', true or false"),
    ("data.stream=1", r"data\.stream = 1 has the wrong type"),
    ("data.num_workers=-1", r"DataConfig\.num_workers = -1 is invalid: expected an int >= 0"),
    ("data.num_workers=1.5", r"data\.num_workers = 1\.5 has the wrong type"),
    ("data.in_memory_max_gb=0", r"DataConfig\.in_memory_max_gb = 0\.0 is invalid: expected a finite number > 0"),
])
def test_bad_stream_settings_are_refused_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ImitationConfig, None, [override])
    assert load_config(ImitationConfig, None, ["data.stream=true"]).data.stream is True
    assert load_config(ImitationConfig, None, ["data.stream=auto", "data.num_workers=0"]).data.num_workers == 0


def test_torchrun_streams_each_process_its_rows_of_the_global_batch(tmp_path):
    # two gloo processes, each streaming its half of every global batch through one worker, against
    # one process with every window in memory: the same training (up to the gradient all-reduce's
    # float rounding, as tests/test_train.py's torchrun test allows)
    data = tmp_path / "point"
    collect_demos.main(["--env", "fmpolicy/PointObstacle-v0", "--episodes", "6", "--num-envs", "6", "--out", str(data),
                        "--seed", "0", "--no-progress"])
    common = ["--config", str(ROOT / "configs" / "point_obstacle.yaml"), f"data.root={data}", *TINY[:7],
              "train.steps=3", "train.batch_size=16", "train.ema_decay=0", "train.save_every=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "scripts" / "train.py"), *common, f"train.out_dir={tmp_path / 'ddp'}",
                          "data.stream=true", "data.num_workers=1"], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "streaming batches with 1 DataLoader workers (data.stream = true)" in ddp.stdout
    train_script.main(common + [f"train.out_dir={tmp_path / 'single'}", "data.stream=false"])
    a = load_file(str(tmp_path / "ddp" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "policy" / "model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    log = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["local_batch"] == 8


def test_bench_data_refuses_an_unknown_section(capsys):
    bench_data = load_script("bench_data")
    with pytest.raises(SystemExit) as exit_info:
        bench_data.main(["--only", "speed,nope", "--work", "/tmp/fmpolicy_bench_data_unused"])
    assert exit_info.value.code == 2
    assert "--only: unknown sections ['nope']: expected some of ['speed', 'memory']" in capsys.readouterr().err
