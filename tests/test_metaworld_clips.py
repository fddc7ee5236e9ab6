"""Clips of Meta-World demonstrations (envs/metaworld_clips.py, collect_demos.py --clip-frames): the window
covers every step equally, a clip is exactly the stretch of the demonstration it was cut from (states,
actions, the images live rendering gives), workers change nothing, and the script writes, resumes and
keeps to the demonstration variations. Skips when metaworld is absent."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco: headless rendering

import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:
    import metaworld  # noqa: F401
except ImportError as e:
    pytest.skip(f"Meta-World is not importable ({e}); pip install -e '.[metaworld]'", allow_module_level=True)

from fmpolicy_envs import metaworld_clips as clips  # noqa: E402
from fmpolicy_envs import metaworld_env as mw  # noqa: E402

ENV_ID = "fmpolicy/MetaWorld-v0"
STATE = "observation.state"
CAM = "observation.images.corner"


@pytest.mark.parametrize("length", [3, 20])
def test_the_window_covers_every_step_equally(length):
    """Each step is inside the window with probability W / (T + W - 1), the first and last included."""
    w, n = 8, 20000
    rng = np.random.default_rng(0)
    counts = np.zeros(length)
    for _ in range(n):
        lo, hi = clips.draw_window(length, w, rng)
        assert 0 <= lo < hi <= length and hi - lo <= w
        counts[lo:hi] += 1
    p = w / (length + w - 1)
    sd = np.sqrt(n * p * (1 - p))
    assert np.abs(counts - n * p).max() < 5 * sd, (counts / n, p)
    with pytest.raises(ValueError, match="clip_frames"):
        clips.draw_window(5, 0, rng)


def test_a_clip_is_the_stretch_of_the_demonstration_it_was_cut_from():
    """The noisy expert's episode of variation 7 played live with the camera, against the clip of the same
    variation played blind and replayed: the same states, actions and (byte for byte) images."""
    variation, seed, size = 7, 3, 24
    expert = mw.MetaWorldExpert(noise_std=0.3)
    frames, extra = clips.expert_clip(mw.MetaWorldEnv(task="push"), expert, variation, 6, ["corner"], size, seed=seed)

    live = mw.MetaWorldEnv(task="push", cameras=("corner",), image_size=size)
    expert.rng = np.random.default_rng([seed, variation, 0])
    obs, _ = live.reset(seed=variation)
    states, actions, images, done = [], [], [], False
    while not done:
        action = expert(live)
        states.append(obs[STATE])
        actions.append(action)
        images.append(np.round(obs[CAM] * 255).astype(np.uint8))
        obs, _, terminated, truncated, info = live.step(action)
        done = terminated or truncated
    live.close()
    lo, hi = extra["clip_start"], extra["clip_start"] + len(frames["action"])
    assert extra["episode_length"] == len(actions) and extra["variation"] == variation
    assert extra["success"] == bool(info["is_success"]) and 1 <= hi - lo <= 6 and hi <= len(actions)
    np.testing.assert_array_equal(frames[STATE], np.stack(states[lo:hi]))
    np.testing.assert_array_equal(frames["action"], np.stack(actions[lo:hi]))
    np.testing.assert_array_equal(frames[CAM], np.stack(images[lo:hi]))
    assert frames[CAM].dtype == np.uint8 and frames[CAM].shape[1:] == (3, size, size)
    assert frames["next.done"][-1] == (hi == len(actions)) and not frames["next.done"][:-1].any()


def test_workers_change_nothing():
    one = list(clips.clip_episodes("reach", iter(range(3)), 4, ["corner"], 16, seed=1, workers=1))
    two = list(clips.clip_episodes("reach", iter(range(3)), 4, ["corner"], 16, seed=1, workers=2))
    assert [e for _, e in one] == [e for _, e in two]
    for (a, _), (b, _) in zip(one, two):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert len({e["clip_start"] for _, e in one} | {e["episode_length"] for _, e in one}) > 1  # not one window
    with pytest.raises(ValueError, match="clip_frames"):
        next(clips.clip_episodes("reach", iter(range(1)), 0, ["corner"], 16))


def _episodes(root):
    import pyarrow.parquet as pq

    return pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()


def test_collect_demos_clips_per_task_counts_and_resume(tmp_path, monkeypatch, capsys):
    """--clip-frames with --task-episodes: reach 3 clips then drawer-close 2, each at most 4 frames, goal
    variations 0.. of each task; a run killed after two clips resumes with the next variations (no goal
    twice, none from the held-out range); the chunks pad past a clip's end."""
    from fmpolicy.data import ChunkDataset, DatasetWriter

    from .helpers import load_script

    script = load_script("collect_demos")
    out = tmp_path / "clips"
    argv = ["--env", ENV_ID, "--tasks", "reach,drawer-close", "--episodes", "2", "--task-episodes", '{"reach": 3}',
            "--clip-frames", "4", "--num-envs", "1", "--out", str(out), "--cameras", "corner", "--image-size", "16",
            "--no-progress"]
    add = DatasetWriter.add_episode

    def killed_after_two(self, *args, **kwargs):
        if self.num_episodes == 2:
            raise KeyboardInterrupt  # a kill in the middle of the collection
        return add(self, *args, **kwargs)

    monkeypatch.setattr(DatasetWriter, "add_episode", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        script.main(argv)
    monkeypatch.setattr(DatasetWriter, "add_episode", add)
    assert len(_episodes(out)) == 2
    summary = script.main(argv)
    assert summary["episodes"] == 5 and summary["new_episodes"] == 3
    rows = _episodes(out)
    assert [r["tasks"][0] for r in rows] == [mw.INSTRUCTIONS["reach-v3"]] * 3 + [mw.INSTRUCTIONS["drawer-close-v3"]] * 2
    assert [r["variation"] for r in rows] == [0, 1, 2, 0, 1]
    assert all(1 <= r["length"] <= 4 and r["length"] <= r["episode_length"] for r in rows)
    ds = ChunkDataset(out, chunk_size=8)
    assert len(ds) == sum(r["length"] for r in rows)
    item = ds[rows[0]["length"] - 1]  # the first clip's last frame: its chunk runs past the clip
    assert item["action_is_pad"][1:].all() and not item["action_is_pad"][0]
    assert item[CAM].shape == (3, 16, 16)
    assert "reach-v3: expert success" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="--task-episodes names"):
        script.main([*argv[:7], '{"push": 3}', *argv[8:]])
    with pytest.raises(SystemExit, match="Meta-World options"):
        script.main(["--env", "CartPole-v1", "--expert", "math:sqrt", "--clip-frames", "4", "--out", str(tmp_path / "x")])


def test_a_resumed_collection_goes_on_with_the_next_goal_variations(tmp_path):
    """Full demonstrations too: --episodes 1, then 3 on the same --out: variations 0, 1, 2 (a re-drawn seed
    would have landed anywhere in [0, 2**32), the held-out range included)."""
    from .helpers import load_script

    script = load_script("collect_demos")
    argv = ["--env", ENV_ID, "--tasks", "reach", "--num-envs", "1", "--out", str(tmp_path / "r"), "--no-progress"]
    script.main([*argv, "--episodes", "1"])
    script.main([*argv, "--episodes", "3"])
    assert [r["variation"] for r in _episodes(tmp_path / "r")] == [0, 1, 2]


def test_the_expert_leaves_the_env_observation_alone():
    """Door-open's scripted policy shifts the handle's x in the array it is given by -0.05: the expert
    passes a copy, so the env's raw observation (and a clip's replay check) stays what MuJoCo gave."""
    env = mw.MetaWorldEnv(task="door-open")
    env.reset(seed=0)
    before = env.raw_obs.copy()
    mw.MetaWorldExpert()(env)
    np.testing.assert_array_equal(env.raw_obs, before)
    frames, extra = clips.expert_clip(env, mw.MetaWorldExpert(), 0, 4, [], 16)  # replays without complaint
    assert 1 <= len(frames["action"]) <= 4 and extra["variation"] == 0
    env.close()


def test_only_success_clips_give_up_on_an_expert_that_never_succeeds(tmp_path):
    """Five steps are too few to reach the goal: with --only-success every clip is dropped and the run ends
    with the expert-failing error after 20 x episodes + workers attempts, not in an endless loop."""
    from .helpers import load_script

    argv = ["--env", ENV_ID, "--tasks", "reach", "--episodes", "1", "--clip-frames", "4", "--num-envs", "1",
            "--out", str(tmp_path / "never"), "--only-success", "--env-kwargs", '{"max_episode_steps": 5}',
            "--no-progress"]
    with pytest.raises(SystemExit, match="rarely succeeds"):
        load_script("collect_demos").main(argv)
    assert not list((tmp_path / "never").glob("meta/episodes/*/*.parquet"))  # no clip was written


def test_the_environment_state_is_meta_worlds_full_observation():
    env = mw.MetaWorldEnv(task="push", environment_state=True)
    obs, _ = env.reset(seed=4)
    assert env.observation_space[mw.ENV_STATE_KEY].shape == (39,)
    np.testing.assert_array_equal(obs[mw.ENV_STATE_KEY], env.raw_obs.astype(np.float32))
    np.testing.assert_allclose(obs[mw.ENV_STATE_KEY][36:39], env.goal, atol=1e-6)  # the goal: privileged
    assert obs[STATE].shape == (4,)  # the policy's input is unchanged
    assert mw.ENV_STATE_KEY not in mw.MetaWorldEnv(task="push").reset(seed=4)[0]
    with pytest.raises(ValueError, match="environment_state"):
        mw.MetaWorldEnv(task="push", environment_state="yes")
    env.close()


@pytest.mark.parametrize("clip", [False, True])
def test_collections_record_the_environment_state_and_windows_carry_it(tmp_path, clip):
    """Full demonstrations and clips: `observation.environment_state` (39,) per frame, its first four entries
    the proprio state, its goal constant within an episode; the training windows carry it like __getitem__."""
    import torch

    from fmpolicy.data import ChunkDataset

    from .helpers import load_script

    out = tmp_path / "es"
    argv = ["--env", ENV_ID, "--tasks", "reach", "--episodes", "2", "--num-envs", "1", "--out", str(out), "--no-progress",
            "--env-kwargs", '{"state": "proprio", "environment_state": true}', *(["--clip-frames", "5"] if clip else [])]
    load_script("collect_demos").main(argv)
    ds = ChunkDataset(out, chunk_size=4)
    key = mw.ENV_STATE_KEY
    assert ds.features[key]["shape"] == [39]
    env_state = torch.stack([ds[i][key] for i in range(len(ds))])
    torch.testing.assert_close(env_state[:, :4], ds.state, rtol=0, atol=0)
    first_episode = env_state[ds.episode_index == 0]
    assert (first_episode[:, 36:39] == first_episode[0, 36:39]).all() and len(first_episode) <= (5 if clip else 500)
    rows = torch.tensor([len(ds) - 1, 0])
    torch.testing.assert_close(ds.windows(rows)[key], env_state[rows])
    torch.testing.assert_close(ds.all_windows()[key], env_state)
