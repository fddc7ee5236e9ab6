"""Replaying a dataset's episodes (fmpolicy/data/replay.py, `collect_demos.py --replay`): the same
demonstrations recorded again with other observations, checked step by step against the recording.
Meta-World tests skip when it is absent; the generic ones run on gymnasium's Pendulum."""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco: headless rendering

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fmpolicy.data import ChunkDataset, DatasetWriter  # noqa: E402
from fmpolicy.data.dataset import DatasetError  # noqa: E402
from fmpolicy.data.replay import ReplayError, ReplayExpert, SourceEpisode, read_source, replay  # noqa: E402
from fmpolicy.gym_adapter import make_vector_env  # noqa: E402

from .helpers import load_script  # noqa: E402

STATE = "observation.state"


def _metaworld():
    try:
        import metaworld  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Meta-World is not importable ({e}); pip install -e '.[metaworld]'")


@pytest.fixture(scope="module")
def mw_source(tmp_path_factory):
    """Two tasks, two scripted demonstrations each, the full 39-d state, a 120-step limit."""
    _metaworld()
    out = tmp_path_factory.mktemp("replay") / "src"
    load_script("collect_demos").main(["--env", "fmpolicy/MetaWorld-v0", "--tasks", "reach,push", "--episodes", "2",
                                       "--num-envs", "2", "--out", str(out), "--seed", "3", "--no-progress",
                                       "--env-kwargs", '{"state": "full", "max_episode_steps": 120}'])
    return out


def _replay_cli(src, out, *extra):
    return load_script("collect_demos").main(["--replay", str(src), "--out", str(out), "--no-progress", *extra])


def test_metaworld_replay_records_the_same_demonstrations_with_cameras_and_another_state(mw_source, tmp_path):
    out = tmp_path / "cams"
    summary = _replay_cli(mw_source, out, "--cameras", "corner", "--image-size", "16",
                          "--env-kwargs", '{"state": "proprio", "environment_state": true}')
    src, new = ChunkDataset(mw_source, 1, image_keys=[]), ChunkDataset(out, 1)
    assert summary["episodes"] == 4 and summary["max_state_deviation"] == 0.0
    assert torch.equal(new.action, src.action)  # the same executed actions
    assert torch.equal(new.state, src.state[:, :4])  # proprio = the hand and gripper entries of the full state
    assert torch.equal(new.extras["observation.environment_state"], src.state)  # the full state, recorded again
    for col in ("length", "variation", "success"):
        np.testing.assert_array_equal(new.episodes[col], src.episodes[col])
    np.testing.assert_array_equal(new.episodes["replay_of"], src.episodes["episode_index"])
    np.testing.assert_allclose(new.episodes["return"], src.episodes["return"], rtol=1e-6)
    assert new.tasks == src.tasks and torch.equal(new.task_index, src.task_index)
    assert new.image_keys == ["observation.images.corner"]
    frames = torch.stack([new[i]["observation.images.corner"] for i in (0, len(new) - 1)])
    assert frames.shape == (2, 3, 16, 16) and frames.std() > 0.01  # a rendered scene, not a blank
    info = json.loads((out / "meta/info.json").read_text())
    assert info["env"]["replay_of"] == str(mw_source) and info["env"]["kwargs"]["max_episode_steps"] == 120  # the source's limit
    assert info["robot_type"] == "sawyer" and info["fps"] == json.loads((mw_source / "meta/info.json").read_text())["fps"]


def test_a_killed_replay_resumes_where_it_stopped(mw_source, tmp_path):
    _replay_cli(mw_source, tmp_path / "once", "--env-kwargs", '{"state": "proprio"}')
    _replay_cli(mw_source, tmp_path / "twice", "--env-kwargs", '{"state": "proprio"}', "--episodes", "1")
    assert ChunkDataset(tmp_path / "twice", 1).num_episodes == 1
    summary = _replay_cli(mw_source, tmp_path / "twice", "--env-kwargs", '{"state": "proprio"}')
    assert summary["new_episodes"] == 3
    a, b = ChunkDataset(tmp_path / "once", 1), ChunkDataset(tmp_path / "twice", 1)
    assert torch.equal(a.state, b.state) and torch.equal(a.action, b.action)
    np.testing.assert_array_equal(a.episodes["replay_of"], b.episodes["replay_of"])


def test_worker_processes_write_the_same_dataset_in_source_order(mw_source, tmp_path):
    args = ("--cameras", "corner", "--image-size", "8", "--env-kwargs", '{"state": "proprio"}')
    _replay_cli(mw_source, tmp_path / "one", *args)
    _replay_cli(mw_source, tmp_path / "two", *args, "--num-envs", "2")
    data = sorted((tmp_path / "one").rglob("data/**/*.parquet"))
    assert data and all(p.read_bytes() == (tmp_path / "two" / p.relative_to(tmp_path / "one")).read_bytes()
                        for p in data)
    assert ChunkDataset(tmp_path / "two", 1).episodes["replay_of"].tolist() == [0, 1, 2, 3]


def test_a_replay_that_leaves_the_recording_stops_at_that_step(mw_source, tmp_path):
    _metaworld()
    import fmpolicy_envs  # noqa: F401
    from fmpolicy_envs.metaworld_env import task_of_instruction

    episodes = read_source(mw_source)
    episodes[0].actions = episodes[0].actions.copy()
    episodes[0].actions[5] = -episodes[0].actions[5]  # one action other than the executed one

    def make(task):
        return make_vector_env("fmpolicy/MetaWorld-v0", 1, kwargs={"state": "full", "max_episode_steps": 120,
                                                                   "task": task_of_instruction(task)})

    features = {STATE: {"dtype": "float32", "shape": [39]}, "action": {"dtype": "float32", "shape": [4]}}
    with DatasetWriter(tmp_path / "bad", fps=12.5, features=features) as writer:
        with pytest.raises(ReplayError, match=r"episode 0 \(start 3\), step 6: .*left the recording"):
            replay(make, episodes, writer)
        assert writer.num_episodes == 0  # nothing of the diverged episode is written

    good = read_source(mw_source)
    good[1].success = not good[1].success
    with DatasetWriter(tmp_path / "flip", fps=12.5, features=features) as writer:
        with pytest.raises(ReplayError, match="episode 1 .*ended with success True, the recording with False"):
            replay(make, good, writer)
        assert writer.num_episodes == 1  # the episode before it was fine


@pytest.mark.parametrize("kwargs, message", [
    ('{"max_episode_steps": 20}', "ended at step 20, before the"),  # a shorter limit
    ('{"terminate_on_success": false}', "goes on after the"),  # no end at the success
])
@pytest.mark.parametrize("workers", ["1", "2"])  # a worker process's error comes back the same
def test_other_episode_ends_are_errors_that_name_the_setting(mw_source, tmp_path, kwargs, message, workers):
    with pytest.raises(SystemExit, match=message):
        _replay_cli(mw_source, tmp_path / "x", "--env-kwargs", kwargs, "--num-envs", workers)


def test_sources_that_cannot_be_replayed_are_refused(mw_source, tmp_path, capsys):
    collect = load_script("collect_demos").main
    clean = tmp_path / "dart"  # DART: the recorded actions are not the executed ones
    collect(["--env", "fmpolicy/MetaWorld-v0", "--tasks", "reach", "--episodes", "1", "--num-envs", "1", "--out",
             str(clean), "--noise-std", "0.2", "--noise-record", "clean", "--no-progress"])
    with pytest.raises(SystemExit, match="clean actions"):
        _replay_cli(clean, tmp_path / "y")
    clips = tmp_path / "clips"
    collect(["--env", "fmpolicy/MetaWorld-v0", "--tasks", "reach", "--episodes", "3", "--num-envs", "1", "--out",
             str(clips), "--clip-frames", "4", "--no-progress"])
    assert (pq.read_table(next((clips / "meta/episodes").rglob("*.parquet"))).column("clip_start").to_numpy() > 0).any()
    with pytest.raises(DatasetError, match="is a clip that starts at step"):
        read_source(clips)
    with pytest.raises(SystemExit):
        _replay_cli(mw_source, tmp_path / "z", "--noise-std", "0.1")
    assert "--noise-std cannot be used with it" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="holds 4 episodes"):
        _replay_cli(mw_source, tmp_path / "z", "--episodes", "5")


# ---- any gymnasium environment: Pendulum, whose reset(seed=s) fixes its start ----

def _pendulum_source(root, starts, steps=15):
    """Episodes of random actions from the given reset seeds, with each seed as the `variation` column."""
    env = make_vector_env("Pendulum-v1", 1, kwargs={"max_episode_steps": steps})
    rng = np.random.default_rng(0)
    features = {STATE: {"dtype": "float32", "shape": [3]}, "action": {"dtype": "float32", "shape": [1]}}
    with DatasetWriter(root, fps=20.0, features=features, env_info={"id": "Pendulum-v1",
                                                                   "kwargs": {"max_episode_steps": steps}}) as writer:
        for s in starts:
            obs, _ = env.reset(seed=s)
            states, actions, rewards = [], [], []
            for _ in range(steps):
                a = rng.uniform(-2, 2, (1, 1)).astype(np.float32)
                states.append(obs[STATE][0].numpy())
                actions.append(a[0])
                obs, r, _, _, _ = env.step(a)
                rewards.append(float(r[0]))
            done = np.zeros(steps, bool)
            done[-1] = True
            writer.add_episode({STATE: np.stack(states), "action": np.stack(actions),
                                "next.reward": np.asarray(rewards, np.float32), "next.done": done,
                                "next.success": np.zeros(steps, bool)}, task="swing up", extra={"variation": s})
        writer.finalize()
    env.close()


def test_replay_on_any_gymnasium_env_with_recorded_starts(tmp_path):
    _pendulum_source(tmp_path / "src", starts=[3, 11])
    summary = _replay_cli(tmp_path / "src", tmp_path / "new")
    src, new = ChunkDataset(tmp_path / "src", 1), ChunkDataset(tmp_path / "new", 1)
    assert summary["episodes"] == 2 and summary["max_state_deviation"] <= 1e-6
    torch.testing.assert_close(new.state, src.state, atol=1e-6, rtol=0)
    assert torch.equal(new.action, src.action)
    np.testing.assert_array_equal(new.episodes["variation"], [3, 11])

    episodes = read_source(tmp_path / "src")
    episodes[1].start = 12  # another start: the first state already differs
    features = {k: new.features[k] for k in (STATE, "action")}
    with DatasetWriter(tmp_path / "other", fps=20.0, features=features) as writer:
        with pytest.raises(ReplayError, match=r"episode 1 \(start 12\), step 0:"):
            replay(lambda task: make_vector_env("Pendulum-v1", 1, kwargs={"max_episode_steps": 15}), episodes,
                   writer)


def test_a_source_without_starts_is_refused_naming_the_column(tmp_path):
    features = {STATE: {"dtype": "float32", "shape": [2]}, "action": {"dtype": "float32", "shape": [2]}}
    with DatasetWriter(tmp_path / "s", fps=10.0, features=features) as writer:
        writer.add_episode({STATE: np.zeros((3, 2), np.float32), "action": np.zeros((3, 2), np.float32)}, task="t")
        writer.finalize()
    with pytest.raises(DatasetError, match="has no column 'variation'"):
        read_source(tmp_path / "s")
    with pytest.raises(DatasetError, match="has no column 'seed_of_episode'"):
        read_source(tmp_path / "s", start_key="seed_of_episode")


def test_replay_expert_checks_its_settings_and_its_length():
    ep = SourceEpisode(index=0, task="t", start=0, actions=np.ones((2, 1), np.float32),
                       states=np.zeros((2, 3), np.float32), success=None)
    for bad in (4, -1, True, 1.5):
        with pytest.raises(ValueError, match="check_dims"):
            ReplayExpert(ep, check_dims=bad)
    with pytest.raises(ValueError, match="atol"):
        ReplayExpert(ep, atol=float("nan"))
    expert = ReplayExpert(ep, check_dims=2, atol=0.1)
    obs = {STATE: np.array([[0.05, -0.05, 9.0]])}  # the third entry is not compared
    assert expert(obs).shape == (1, 1) and expert(obs).shape == (1, 1)
    assert expert.steps == 2 and expert.max_deviation == pytest.approx(0.05)
    with pytest.raises(ReplayError, match="action 3 of 2"):
        expert(obs)
    with pytest.raises(ReplayError, match=r"observation.state\[1\] is -0.2"):
        ReplayExpert(ep, check_dims=2, atol=0.1)({STATE: np.array([[0.0, -0.2, 0.0]])})


def test_in_order_yields_worker_results_in_item_order_and_raises_at_the_failing_item():
    import itertools
    import math

    from fmpolicy.pool import in_order

    got = []
    for r in in_order(math.sqrt, itertools.count(0), 2, ahead=3):  # endless items: consumed lazily
        got.append(r)
        if len(got) == 6:
            break
    assert got == [math.sqrt(k) for k in range(6)]
    results = in_order(math.sqrt, [4.0, 9.0, -1.0, 16.0], 2)
    assert next(results) == 2.0 and next(results) == 3.0
    with pytest.raises(ValueError, match="math domain error"):
        next(results)
    with pytest.raises(ValueError, match="workers"):
        next(in_order(math.sqrt, [1.0], 0))
