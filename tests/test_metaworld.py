"""The Meta-World adapter (envs/metaworld_env.py): spaces and keys, goal variations fixed by seed,
success, images the right way up, the scripted expert, and our tools on it (collect -> ChunkDataset,
evaluate_policy). Each test uses one or two tasks and few steps; all skip when metaworld is absent."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco: headless rendering

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import metaworld  # noqa: F401
except ImportError as e:  # not installed (or not importable): these tests have nothing to run on
    pytest.skip(f"Meta-World is not importable ({e}); pip install -e '.[metaworld]'", allow_module_level=True)

import fmpolicy_envs  # noqa: E402
from fmpolicy_envs import metaworld_env as mw  # noqa: E402

ENV_ID = "fmpolicy/MetaWorld-v0"
STATE = "observation.state"


@pytest.fixture(scope="module")
def reach():
    """One reach env, reused (making one costs ~0.6 s)."""
    env = gym.make(ENV_ID, task="reach")
    yield env
    env.close()


def test_spaces_keys_and_info(reach):
    obs, info = reach.reset(seed=0)
    assert set(obs) == {STATE}
    assert obs[STATE].dtype == np.float32 and obs[STATE].shape == (4,)
    assert reach.observation_space[STATE].shape == (4,)
    assert reach.action_space.shape == (4,) and reach.action_space.dtype == np.float32
    assert info["task"] == mw.INSTRUCTIONS["reach-v3"] and info["variation"] == 0 and info["is_success"] is False
    # proprio = the first 4 entries of Meta-World's 39-d observation, cast to float32
    np.testing.assert_allclose(obs[STATE], reach.unwrapped.raw_obs[:4].astype(np.float32))
    obs, reward, terminated, truncated, info = reach.step(np.zeros(4, np.float32))
    assert isinstance(reward, float) and terminated is False and truncated is False
    assert {"is_success", "success", "task", "task_name"} <= set(info)

    full = gym.make(ENV_ID, task="push", state="full")
    obs, _ = full.reset(seed=0)
    assert obs[STATE].shape == (39,) and obs[STATE].dtype == np.float32
    np.testing.assert_allclose(obs[STATE][-3:], full.unwrapped.goal, atol=1e-6)  # the goal is the last 3
    full.close()


def test_full_relative_state_appends_goal_and_object_offsets():
    env = gym.make(ENV_ID, task="pick-place", state="full_relative")
    assert env.observation_space[STATE].shape == (48,)
    obs, _ = env.reset(seed=3)
    for _ in range(2):  # after a step too: the hand has moved, the offsets follow it
        state, raw = obs[STATE], env.unwrapped.raw_obs
        assert state.shape == (48,) and state.dtype == np.float32
        np.testing.assert_array_equal(state[:39], raw.astype(np.float32))
        hand, puck, goal = raw[0:3], raw[4:7], env.unwrapped.goal
        # goal - hand, object - hand, goal - object, taken in float64 then cast
        for got, want in ((state[39:42], goal - hand), (state[42:45], puck - hand), (state[45:48], goal - puck)):
            np.testing.assert_allclose(got, want, atol=1e-6)
        assert np.abs(state[39:42]).max() > 0.01  # the hand does not start at the goal: a real offset
        obs, *_ = env.step(np.array([1.0, 0.0, 0.0, 0.0], np.float32))
    env.close()
    with pytest.raises(ValueError, match="full_relative"):  # the error lists the modes
        gym.make(ENV_ID, task="reach", state="relative")


def test_every_mt10_task_has_an_instruction():
    assert set(mw.MT10) == set(mw.INSTRUCTIONS)
    assert mw.task_names(tasks="mt10") == mw.MT10
    assert mw.task_names(task="door-open") == ("door-open-v3",)


@pytest.mark.parametrize("kwargs, field", [({"task": "fly-v3"}, "task"), ({"state": "joints"}, "state"),
                                          ({"cameras": ("nowhere",)}, "camera"), ({"image_size": 0}, "image_size"),
                                          ({"task": "reach", "tasks": "mt10"}, "task"), ({"reward": "sparse"}, "reward")])
def test_bad_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        mw.MetaWorldEnv(**kwargs)


def test_variation_fixes_the_goal(reach):
    """Same seed -> same goal, on the same env (unlike Meta-World's own reset) and on a fresh one;
    reset() without a seed moves to the next variation, with another goal."""
    reach.reset(seed=3)
    g3 = reach.unwrapped.goal
    reach.reset()
    assert reach.unwrapped.variation == 4
    g4 = reach.unwrapped.goal
    assert np.linalg.norm(g3 - g4) > 1e-3
    reach.reset(seed=3)
    np.testing.assert_allclose(reach.unwrapped.goal, g3, atol=1e-12)
    fresh = mw.MetaWorldEnv(task="reach")
    fresh.reset(seed=3)
    np.testing.assert_allclose(fresh.goal, g3, atol=1e-12)
    # the held-out range gives goals unseen in a few demonstration variations
    goals = []
    for v in (0, 1, 2, mw.EVAL_VARIATION_START):
        fresh.reset(seed=v)
        goals.append(fresh.goal)
    assert min(np.linalg.norm(goals[-1] - g) for g in goals[:-1]) > 1e-3
    fresh.close()


def test_expert_succeeds_on_reach_and_success_terminates(reach):
    expert = mw.MetaWorldExpert(seed=0)
    for seed in (0, 1):
        reach.reset(seed=seed)
        for step in range(500):
            obs, reward, terminated, truncated, info = reach.step(expert(reach))
            if terminated or truncated:
                break
        assert terminated and not truncated and info["is_success"] is True, f"variation {seed}: no success"
        assert step < 150  # the scripted reach needs ~45 steps


def _play_expert(env, variation: int, max_steps: int) -> tuple[list[bool], bool, bool]:
    """The scripted expert on one variation until the episode ends (or max_steps): each step's is_success,
    and whether the last step terminated / truncated."""
    env.reset(seed=variation)
    expert = mw.MetaWorldExpert()
    flags, terminated, truncated = [], False, False
    for _ in range(max_steps):
        _, _, terminated, truncated, info = env.step(expert(env))
        flags.append(info["is_success"])
        if terminated or truncated:
            break
    env.close()
    return flags, terminated, truncated


def test_without_early_termination_the_time_limit_ends_it():
    env = mw.MetaWorldEnv(task="reach", terminate_on_success=False, max_episode_steps=60)
    successes, terminated, truncated = _play_expert(env, 0, 100)
    assert len(successes) == 60 and truncated and not terminated and any(successes)


def test_steps_after_success_ends_that_many_steps_later_and_keeps_the_success():
    lengths = {}
    for tail in (0, 12):
        flags, terminated, truncated = _play_expert(mw.MetaWorldEnv(task="reach", steps_after_success=tail), 2, 200)
        assert terminated and not truncated
        first = flags.index(True)
        assert all(flags[first:]), "is_success must stay True after the first success"
        lengths[tail] = (first, len(flags))
    (first0, n0), (first12, n12) = lengths[0], lengths[12]
    assert first0 == first12 == n0 - 1  # the same expert reaches the goal at the same step
    assert n12 == n0 + 12
    with pytest.raises(ValueError, match="steps_after_success"):
        mw.MetaWorldEnv(task="reach", steps_after_success=-1)


def test_success_reward_pays_exactly_the_steps_that_end_solved():
    dense = mw.MetaWorldEnv(task="reach", terminate_on_success=False, max_episode_steps=80)
    sparse = mw.MetaWorldEnv(task="reach", terminate_on_success=False, max_episode_steps=80, reward="success")
    dense.reset(seed=3)
    sparse.reset(seed=3)
    expert = mw.MetaWorldExpert()
    for _ in range(80):  # the same goal and actions: the same states; only the reward differs
        action = expert(dense)
        obs_d, r_dense, *_ = dense.step(action)
        obs_s, r_success, _, _, info = sparse.step(action)
        np.testing.assert_array_equal(obs_d[STATE], obs_s[STATE])
        assert r_success == float(info["is_success"])
        assert r_dense > 0 and r_dense != r_success
    assert info["is_success"]  # the expert got there: both rewards were seen
    dense.close()
    sparse.close()


def test_images_shape_and_right_way_up():
    """Corner cameras are mounted upside down in Meta-World's model; ours come out with the wooden
    table in the lower part of the image and the grey wall above it."""
    env = mw.MetaWorldEnv(task="reach", cameras=("corner", "corner2"), image_size=32)
    obs, _ = env.reset(seed=0)
    for cam in ("corner", "corner2"):
        img = obs[f"observation.images.{cam}"]
        assert img.shape == (3, 32, 32) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
        r, g, b = img * 255
        wood = (r - b > 25) & (r - g > 10) & (r < 200) & (g > 50)  # the table top's brown
        rows = np.nonzero(wood)[0]
        assert len(rows) > 20, f"{cam}: no table visible"
        assert rows.mean() > 0.55 * 32, f"{cam}: the table is in the upper half (upside down?)"
    env.close()


def test_vector_env_same_step_autoreset():
    envs = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", tasks="reach,push",
                        max_episode_steps=5)
    obs, info = envs.reset(seed=10)
    assert obs[STATE].shape == (2, 4) and obs[STATE].dtype == torch.float32
    assert info["task"] == [mw.INSTRUCTIONS["reach-v3"], mw.INSTRUCTIONS["push-v3"]]
    assert info["variation"].tolist() == [10, 11]
    for _ in range(5):
        obs, reward, terminated, truncated, info = envs.step(torch.zeros(2, 4))
    assert truncated.all() and info["_final_info"].all()
    assert info["final_info"]["episode_length"].tolist() == [5, 5]
    assert info["variation"].tolist() == [12, 13]  # the next episodes, already reset, stride num_envs
    assert info["elapsed_steps"].tolist() == [0, 0]
    assert not torch.equal(info["final_obs"][STATE], obs[STATE])
    envs.close()


def test_a_task_list_with_repeats_weights_the_envs():
    """tasks[v % len(tasks)] with a repeated name: that task gets more of the envs, each env keeps its task
    across episodes (num_envs a multiple of the list), and the instruction is the task's own."""
    tasks = ["push", "reach", "push", "push"]
    envs = gym.make_vec(ENV_ID, num_envs=8, vectorization_mode="vector_entry_point", tasks=tasks, max_episode_steps=2)
    _, info = envs.reset(seed=4)
    first = list(envs.task_names)
    assert first == [f"{t}-v3" for t in ["push", "reach", "push", "push"] * 2]  # variation 4 + i
    assert info["task"].count(mw.INSTRUCTIONS["push-v3"]) == 6 and info["task"].count(mw.INSTRUCTIONS["reach-v3"]) == 2
    assert info["variation"].tolist() == list(range(4, 12))
    for _ in range(2):
        _, _, _, truncated, info = envs.step(torch.zeros(8, 4))
    assert truncated.all() and info["variation"].tolist() == list(range(12, 20))  # the next episodes
    assert list(envs.task_names) == first
    envs.close()


def test_make_expert_with_noise():
    expert = fmpolicy_envs.make_expert(ENV_ID, seed=0, noise_std=0.3)
    env = mw.MetaWorldEnv(task="reach")
    env.reset(seed=0)
    clean = mw.MetaWorldExpert()(env)
    noisy = expert(env)
    assert noisy.shape == (4,) and np.abs(noisy).max() <= 1.0
    assert np.abs(noisy - clean).max() > 1e-3
    with pytest.raises(ValueError, match="noise_std"):
        mw.MetaWorldExpert(noise_std=-1)
    env.close()


@pytest.mark.filterwarnings("ignore:Constant")  # Meta-World's own policies, clipped here as in the expert
def test_dart_collection_executes_the_noise_and_records_the_experts_own_actions(tmp_path):
    """--noise-record clean: the states come from the noisy rollout, each action in the dataset is what the
    clean expert does in that state (so the data teach recoveries); executed: the noisy actions."""
    from fmpolicy.data import ChunkDataset, DatasetWriter, collect

    features = {STATE: {"dtype": "float32", "shape": [39]}, "action": {"dtype": "float32", "shape": [4]}}
    recorded = {}
    for record in ("clean", "executed"):
        envs = gym.make_vec(ENV_ID, num_envs=1, vectorization_mode="vector_entry_point", task="reach", state="full",
                            max_episode_steps=30)
        with DatasetWriter(tmp_path / record, fps=envs.metadata["render_fps"], features=features) as writer:
            collect(envs, mw.MetaWorldExpert(noise_std=0.5, seed=0, record=record), writer, 1, seed=0)
        envs.close()
        ds = ChunkDataset(tmp_path / record, chunk_size=1)
        recorded[record] = (ds.state, ds.action)
    # the same seeds: the same noisy rollout (states) either way
    torch.testing.assert_close(recorded["clean"][0], recorded["executed"][0])
    states, clean_actions = recorded["clean"]
    policy = mw.MetaWorldExpert()._policy("reach-v3")  # the expert reads the full 39-d observation
    expert_actions = torch.tensor(np.clip(np.stack([policy.get_action(s.double().numpy()) for s in states]), -1, 1))
    torch.testing.assert_close(clean_actions, expert_actions.float(), atol=1e-4, rtol=0)
    assert (recorded["executed"][1] - expert_actions.float()).abs().max() > 0.1  # the noise, recorded
    with pytest.raises(ValueError, match="record"):
        mw.MetaWorldExpert(record="noisy")


def test_collect_to_chunk_dataset_and_evaluate_policy(tmp_path):
    """Scripted reach demonstrations -> LeRobot v3 dataset -> ChunkDataset -> a tiny policy evaluated
    by evaluate_policy on the same vector env (2 episodes each; nothing here is about learning)."""
    from fmpolicy import FlowPolicy, PolicyConfig, make_expert_config
    from fmpolicy.data import ChunkDataset, DatasetWriter, collect
    from fmpolicy.evaluation import evaluate_policy

    envs = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", task="reach",
                        cameras=("corner2",), image_size=16)
    cam = "observation.images.corner2"
    features = {STATE: {"dtype": "float32", "shape": [4]}, "action": {"dtype": "float32", "shape": [4]},
                cam: {"dtype": "uint8", "shape": [3, 16, 16]}}
    with DatasetWriter(tmp_path / "mw", fps=envs.metadata["render_fps"], features=features) as writer:
        summary = collect(envs, mw.MetaWorldExpert(seed=0), writer, 2, seed=0, image_key=cam)
    assert summary["episodes"] == 2 and summary["success_rate"] == 1.0
    assert summary["success_by_task"] == {mw.INSTRUCTIONS["reach-v3"]: 1.0}
    ds = ChunkDataset(tmp_path / "mw", chunk_size=4)
    item = ds[0]
    assert item[STATE].shape == (4,) and item[STATE].dtype == torch.float32
    assert item[cam].shape == (3, 16, 16) and 0.0 <= float(item[cam].min()) and float(item[cam].max()) <= 1.0
    assert item["task"] == mw.INSTRUCTIONS["reach-v3"]
    assert len(ds) == summary["frames"] and 20 < len(ds) < 400  # two reach episodes of ~45 steps

    cfg = PolicyConfig(state_dim=4, action_dim=4, chunk_size=4, n_action_steps=4,
                       expert=make_expert_config("tiny"), device="cpu")
    policy = FlowPolicy(cfg).fit_normalization(ds.state, ds.action)
    envs_eval = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", task="reach",
                             max_episode_steps=8)
    result = evaluate_policy(policy, envs_eval, 2, seed=mw.EVAL_VARIATION_START, generator=torch.Generator().manual_seed(0))
    assert result.episodes == 2 and result.success_reported and result.mean_length == 8
    assert result.tasks == [mw.INSTRUCTIONS["reach-v3"]] * 2
    assert set(result.success_by_task()) == {mw.INSTRUCTIONS["reach-v3"]}
    envs.close()
    envs_eval.close()


def test_collect_demos_script_two_tasks_one_dataset(tmp_path, capsys):
    from fmpolicy.data import ChunkDataset

    from .helpers import load_script

    out = tmp_path / "mt"
    summary = load_script("collect_demos").main(
        ["--env", ENV_ID, "--tasks", "reach,drawer-close", "--episodes", "1", "--num-envs", "1", "--out", str(out),
         "--no-progress"])
    printed = capsys.readouterr().out
    assert "reach-v3: expert success 100.0%" in printed and "drawer-close-v3: expert success" in printed
    assert summary["episodes"] == 2
    ds = ChunkDataset(out, chunk_size=4)
    tasks = {ds[i]["task"] for i in (0, len(ds) - 1)}
    assert tasks == {mw.INSTRUCTIONS["reach-v3"], mw.INSTRUCTIONS["drawer-close-v3"]}
    import json

    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["fps"] == mw.CONTROL_FPS and info["robot_type"] == "sawyer"


def _mean_nearest(points: np.ndarray, chosen: np.ndarray) -> float:
    """Mean distance (scaled coordinates) from each of `points` to its nearest row of `chosen`."""
    return float(np.linalg.norm(points[:, None] - chosen[None], axis=-1).min(axis=1).mean())


def test_spread_variations_cover_held_out_starts_better_than_random_draws():
    task, n = "drawer-close", 8  # its handle's start varies in x and y: the k-medoids of a 100-variation pool
    chosen = mw.spread_variations(task, n, start=100, pool=100)
    assert chosen == sorted(set(chosen)) and len(chosen) == n and all(100 <= v < 200 for v in chosen)
    assert mw.spread_variations(task, n, start=100, pool=100) == chosen  # deterministic
    pool = mw.start_positions(task, range(100, 200))
    scale = pool.std(axis=0)
    live = scale > 1e-9
    x = pool[:, live] / scale[live]
    held = mw.start_positions(task, range(10_000, 10_100))[:, live] / scale[live]  # starts the choice never saw
    rng = np.random.default_rng(0)
    draws = [_mean_nearest(held, x[rng.choice(100, n, replace=False)]) for _ in range(50)]
    spread = _mean_nearest(held, x[[v - 100 for v in chosen]])
    assert spread < 0.85 * float(np.mean(draws)) and sum(d < spread for d in draws) <= 2
    with pytest.raises(ValueError, match="n = 7 is more than pool = 6"):
        mw.spread_variations("reach", 7, pool=6)
    with pytest.raises(ValueError, match="start = -1"):
        mw.spread_variations("reach", 2, start=-1)
    with pytest.raises(ValueError, match="pool = 5001 is too large"):
        mw.spread_variations("reach", 2, pool=mw.MAX_SPREAD_POOL + 1)


def test_collect_demos_spread_plays_the_chosen_variations(tmp_path, capsys):
    from fmpolicy.data import ChunkDataset

    from .helpers import load_script

    out = tmp_path / "spread"
    cmd = ["--env", ENV_ID, "--tasks", "reach,drawer-close", "--episodes", "3", "--spread", "20", "--num-envs", "4",
           "--out", str(out), "--no-progress"]
    summary = load_script("collect_demos").main(cmd)
    assert summary["episodes"] == 6 and summary["success_rate"] == 1.0
    ds = ChunkDataset(out, chunk_size=4)
    want = mw.spread_variations("reach", 3, pool=20) + mw.spread_variations("drawer-close", 3, pool=20)
    assert [int(v) for v in ds.episodes["variation"]] == want
    assert want[:3] != [0, 1, 2]  # not the plain run's variations
    # the episodes on disk must be the same choice: another pool (the dataset's env info) or another seed is refused
    from fmpolicy.errors import DatasetError

    with pytest.raises(DatasetError, match="'spread_pool': 25"):
        load_script("collect_demos").main(cmd[:7] + ["25"] + cmd[8:])
    with pytest.raises(SystemExit, match="played goal variations"):
        load_script("collect_demos").main(cmd + ["--seed", "1"])
    with pytest.raises(SystemExit):
        load_script("collect_demos").main(cmd + ["--only-success", "--clip-frames", "4"])
    assert "--spread, --only-success and --clip-frames do not go together" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="held-out ones start at 10000"):  # the pool must stay in the demo range
        load_script("collect_demos").main(cmd[:-2] + [str(tmp_path / "other"), "--seed", "9990", "--no-progress"])
    assert not (tmp_path / "other").exists()


def test_spread_with_only_success_replaces_a_failed_demonstration_by_the_nearest_of_its_cluster(tmp_path):
    """With a step limit some medoids' demonstrations fail: each is replaced by the first variation of its cluster
    (nearest first) whose demonstration succeeds within the limit; a cluster where none does is an error."""
    from fmpolicy.data import ChunkDataset

    from .helpers import load_script

    limit = 47
    clusters = mw.spread_clusters("reach", 3, pool=20)
    assert sorted(c[0] for c in clusters) == mw.spread_variations("reach", 3, pool=20)
    assert sorted(v for c in clusters for v in c) == list(range(20))  # the clusters split the pool
    env, expert = mw.MetaWorldEnv(task="reach", state="full", max_episode_steps=limit), mw.MetaWorldExpert()

    def succeeds(v: int) -> bool:
        env.reset(seed=v)
        for _ in range(limit):
            _, _, terminated, truncated, info = env.step(expert(env))
            if terminated or truncated:
                return bool(info["is_success"])
        return False

    want = [next(v for v in c if succeeds(v)) for c in clusters]
    env.close()
    assert want != [c[0] for c in clusters]  # the limit makes at least one medoid fail: a replacement happens
    out = tmp_path / "clean"
    cmd = ["--env", ENV_ID, "--tasks", "reach", "--episodes", "3", "--spread", "20", "--only-success", "--out", str(out),
           "--no-progress", "--env-kwargs", json.dumps({"state": "full", "max_episode_steps": limit})]
    summary = load_script("collect_demos").main(cmd)
    ds = ChunkDataset(out, chunk_size=4)
    assert [int(v) for v in ds.episodes["variation"]] == want and summary["episodes"] == 3
    assert all(int(n) <= limit for n in ds.episodes["length"]) and summary["new_episodes"] == 3
    assert summary["attempts"] > 3 and summary["success_rate"] < 1  # the failed attempts are counted
    assert load_script("collect_demos").main(cmd)["new_episodes"] == 0  # a resume finds them all there
    with pytest.raises(SystemExit, match="no demonstration of reach-v3 succeeded at any of the 9 goal variations of the cluster of 8"):
        load_script("collect_demos").main([*cmd[:-4], str(tmp_path / "none"), "--no-progress", "--env-kwargs",
                                           json.dumps({"state": "full", "max_episode_steps": 20})])


@pytest.mark.parametrize("processes", [True, 2])
def test_process_vector_env_matches_the_in_process_one(processes):
    """Same variations, observations, rewards and autoreset whether the envs run here, one process each, or
    three envs on two worker processes (a block of two and one)."""
    kwargs = dict(num_envs=3, tasks="reach,push,pick-place", max_episode_steps=3)
    here = mw.MetaWorldVectorEnv(**kwargs)
    procs = mw.MetaWorldVectorEnv(processes=processes, **kwargs)
    try:
        assert procs.processes == (3 if processes is True else 2)
        a, ia = here.reset(seed=7)
        b, ib = procs.reset(seed=7)
        assert ia["task"] == ib["task"] and torch.equal(ia["variation"], ib["variation"])
        assert procs.task_names == ["push-v3", "pick-place-v3", "reach-v3"]  # variations 7, 8, 9 of three tasks
        torch.testing.assert_close(a[STATE], b[STATE])
        expert = mw.MetaWorldExpert()
        for _ in range(4):
            np.testing.assert_array_equal(here.raw_obs, procs.raw_obs)
            act = expert(here)
            torch.testing.assert_close(act, expert(procs))
            a, ra, ta, tra, ia = here.step(act)
            b, rb, tb, trb, ib = procs.step(act)
            torch.testing.assert_close(a[STATE], b[STATE])
            torch.testing.assert_close(ia["final_obs"][STATE], ib["final_obs"][STATE])
            torch.testing.assert_close(ra, rb)
            assert torch.equal(tra, trb) and torch.equal(ia["variation"], ib["variation"])
            for k in ("is_success", "episode_length", "variation"):
                assert torch.equal(ia["final_info"][k], ib["final_info"][k]), k
        assert ia["variation"].tolist() == [10, 11, 12]  # the second episodes after a 3-step limit
    finally:
        here.close()
        procs.close()


def test_worker_processes_fail_loudly_and_are_checked():
    """A bad `processes` is named; more workers than envs are capped; a worker's exception or death comes back
    as an error naming the worker and its envs (no hang), and the workers are then closed."""
    for bad in (-1, "2", 1.5):
        with pytest.raises(ValueError, match="processes"):
            mw.MetaWorldVectorEnv(num_envs=2, task="reach", processes=bad)
    envs = mw.MetaWorldVectorEnv(num_envs=2, task="reach", processes=5)
    try:
        assert envs.processes == 2
        envs.reset(seed=0)
        with pytest.raises(RuntimeError, match=r"worker 0 \(envs 0-0\) failed(.|\n)*AttributeError"):
            envs._get("no_such_attribute")
        with pytest.raises(RuntimeError, match="closed"):
            envs.step(np.zeros((2, 4), np.float32))
    finally:
        envs.close()
    envs = mw.MetaWorldVectorEnv(num_envs=3, task="reach", processes=2)
    try:
        envs.reset(seed=0)
        envs._workers.procs[1].kill()
        envs._workers.procs[1].join()
        with pytest.raises(RuntimeError, match=r"worker 1 \(envs 1-2\) failed(.|\n)*exited"):
            envs.step(np.zeros((3, 4), np.float32))
    finally:
        envs.close()


def test_evaluate_policy_counts_expert_successes():
    """The scripted expert as `act` (chunks of one action): every reach episode counts as a success."""
    from fmpolicy.evaluation import evaluate_policy

    envs = mw.MetaWorldVectorEnv(num_envs=2, task="reach", max_episode_steps=150)
    expert = mw.MetaWorldExpert()
    result = evaluate_policy(None, envs, 2, seed=mw.EVAL_VARIATION_START, act=lambda obs: expert(envs)[:, None],
                             n_action_steps=1)
    assert result.successes == 2 and result.success_reported and 20 < result.mean_length < 150
    envs.close()


def test_bench_expert_plays_the_starts_evaluate_policy_plays():
    """`bench_metaworld.py --evaluate-starts N`: the expert's variations per task are those evaluate_policy
    resets the multi-task vector env to (so the expert's success is on the policy's own starts)."""
    from fmpolicy.evaluation import evaluate_policy

    from .helpers import load_script

    played: list[tuple[str, int]] = []  # (task, variation) in the order of the envs, round after round

    class Recording(mw.MetaWorldVectorEnv):
        def reset(self, *, seed=None, options=None):
            obs, info = super().reset(seed=seed, options=options)
            played.extend(zip(self.task_names, info["variation"].tolist()))
            return obs, info

    envs = Recording(num_envs=3, tasks="reach,push", max_episode_steps=2)
    evaluate_policy(None, envs, 5, seed=mw.EVAL_VARIATION_START, act=lambda obs: torch.zeros(3, 1, 4),
                    n_action_steps=1)
    envs.close()
    assert len(played) == 6  # 2 rounds of 3 envs; evaluate_policy counts the first 5 episodes
    counted: dict[str, list[int]] = {}
    for name, v in played[:5]:
        counted.setdefault(name, []).append(v)
    starts = load_script("bench_metaworld").evaluate_starts(list(mw.task_names(tasks="reach,push")), 5, 3,
                                                              mw.EVAL_VARIATION_START)
    assert starts == counted
    assert sum(len(v) for v in starts.values()) == 5 and set(starts) == {"reach-v3", "push-v3"}


def test_pipeline_collects_with_collect_kwargs_and_evaluates_with_kwargs(tmp_path):
    """env.collect_kwargs reach the demonstrations only: here they run 7 steps past the success (and past the
    evaluation's time limit of 30), while the evaluation keeps env.kwargs; --spread reaches the collection."""
    import pyarrow.parquet as pq

    from tests.helpers import load_script

    config = tmp_path / "reach.yaml"
    config.write_text("""
policy:
  state_dim: 4
  action_dim: 4
  chunk_size: 4
  n_action_steps: 2
  expert: {kind: mlp, width: 32, depth: 2, max_state_dim: 4, max_action_dim: 4}
  device: cpu
data: {root: unused}
train: {steps: 2, batch_size: 8, log_every: 1, save_every: 2, progress: false}
env:
  id: fmpolicy/MetaWorld-v0
  kwargs: {task: reach, state: proprio, max_episode_steps: 30}
  collect_kwargs: {max_episode_steps: 300, steps_after_success: 7}
""")
    out = tmp_path / "run"
    result = load_script("pipeline").main(["--config", str(config), "--demos", "2", "--eval-episodes", "2",
                                           "--heads", "flow", "--out", str(out), "--spread", "12"])
    (row,) = result["results"]
    assert row["env_kwargs"] == {"task": "reach", "state": "proprio", "max_episode_steps": 30}
    episodes = pq.read_table(next((out / "data").rglob("meta/episodes/*/*.parquet"))).to_pylist()
    assert [ep["variation"] for ep in episodes] == mw.spread_variations("reach", 2, pool=12)
    for ep in episodes:  # the same variation without the tail: the expert's first success ends it
        flags, terminated, _ = _play_expert(mw.MetaWorldEnv(task="reach"), ep["variation"], 300)
        assert terminated and ep["success"] and ep["length"] == len(flags) + 7 > 30


def test_the_pipeline_passes_only_success_to_the_collection(tmp_path, monkeypatch):
    from tests.helpers import load_script

    pipeline = load_script("pipeline")
    seen = []

    def collect(argv):
        seen.append(argv)
        raise SystemExit("stop after the collection")

    monkeypatch.setattr(pipeline.collect_demos, "main", collect)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "metaworld_mt10_state.yaml")
    for extra in ([], ["--only-success"]):
        with pytest.raises(SystemExit, match="stop after the collection"):
            pipeline.main(["--config", config, "--demos", "2", "--out", str(tmp_path), "--spread", "12", *extra])
    assert ["--only-success" in argv for argv in seen] == [False, True]
    assert all(argv[argv.index("--spread") + 1] == "12" for argv in seen)


def test_the_shipped_configs_weight_only_tasks_the_adapter_names():
    """data.task_weights keys are task strings: in a Meta-World config each must be one of the adapter's
    instructions (a typo would stop training only once the dataset is read)."""
    from pathlib import Path

    import yaml

    instructions = set(mw.INSTRUCTIONS.values())
    configs = Path(__file__).resolve().parents[1] / "configs"
    weighted = 0
    for path in sorted(configs.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        if (raw.get("env") or {}).get("id") != ENV_ID:
            continue
        for task in ((raw.get("data") or {}).get("task_weights") or {}):
            assert task in instructions, f"{path.name}: data.task_weights names {task!r}, not an MT10 instruction"
            weighted += 1
    assert weighted > 0  # configs/metaworld_mt10_state.yaml weights its weak tasks
    # the docs reproduce the runs that drew every task equally with 'data.task_weights={}': it replaces the map
    from fmpolicy.config import ImitationConfig, load_config

    config = load_config(ImitationConfig, str(configs / "metaworld_mt10_state.yaml"), ["data.task_weights={}"])
    assert config.data.task_weights == {}
