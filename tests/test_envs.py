"""API tests of the fmpolicy_envs environments: gymnasium contract, vector env, autoreset, seeding."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import fmpolicy_envs as fe
from fmpolicy_envs import IMAGE_KEY, STATE_KEY

VECTOR = [
    (fe.PointObstacleVectorEnv, {}, 4, 2),
    (fe.PointObstacleVectorEnv, {"n_goals": 2}, 2, 2),
    (fe.ArmReachVectorEnv, {"n_links": 3}, 7, 3),
    (fe.PushVectorEnv, {}, 6, 2),
]


@pytest.mark.parametrize(
    "env_id, kwargs",
    [
        ("fmpolicy/PointObstacle-v0", {}),
        ("fmpolicy/PointObstacle-v0", {"image_size": 32, "render_mode": "rgb_array"}),
        ("fmpolicy/PointObstacle-v0", {"n_goals": 2, "image_size": 32}),
        ("fmpolicy/ArmReach-v0", {}),
        ("fmpolicy/ArmReach-v0", {"n_links": 3}),
        ("fmpolicy/ArmReach-v0", {"n_links": 4, "image_size": 24, "render_mode": "rgb_array"}),
        ("fmpolicy/Push-v0", {}),
        ("fmpolicy/Push-v0", {"image_size": 32, "render_mode": "rgb_array"}),
    ],
)
def test_check_env_passes_without_warnings(env_id, kwargs):
    env = gym.make(env_id, **kwargs)
    assert env.spec.max_episode_steps is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # check_env reports problems as warnings: make them fail
        check_env(env.unwrapped)
    env.close()


@pytest.mark.parametrize(
    "env_id, kwargs, state_dim, action_dim",
    [
        ("fmpolicy/PointObstacle-v0", {}, 4, 2),
        ("fmpolicy/PointObstacle-v0", {"n_goals": 2}, 2, 2),
        ("fmpolicy/ArmReach-v0", {}, 6, 2),
        ("fmpolicy/ArmReach-v0", {"n_links": 4}, 8, 4),
        ("fmpolicy/Push-v0", {}, 6, 2),
    ],
)
def test_single_env_spaces_and_info(env_id, kwargs, state_dim, action_dim):
    env = gym.make(env_id, **kwargs)
    assert env.observation_space[STATE_KEY].shape == (state_dim,)
    assert env.action_space.shape == (action_dim,) and env.action_space.dtype == np.float32
    obs, info = env.reset(seed=0)
    assert obs[STATE_KEY].dtype == np.float32 and obs[STATE_KEY].shape == (state_dim,)
    assert info["is_success"] is False
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert isinstance(info["is_success"], bool) and isinstance(reward, float)
    assert info["is_success"] == terminated  # every task terminates exactly on success


def test_two_goal_task_names_the_drawn_goal():
    env = gym.make("fmpolicy/PointObstacle-v0", n_goals=2)
    seen = set()
    for seed in range(20):
        _, info = env.reset(seed=seed)
        core = env.unwrapped.core
        colour = ("red", "blue")[int(core.goal_index[0])]
        assert info["task"] == f"go to the {colour} goal"
        seen.add(info["task"])
        _, _, _, _, info = env.step(np.zeros(2, np.float32))
        assert info["task"] == f"go to the {colour} goal"
    assert seen == {"go to the red goal", "go to the blue goal"}


def test_all_ids_registered_on_import():
    assert set(fe.TASKS) == {"fmpolicy/PointObstacle-v0", "fmpolicy/ArmReach-v0", "fmpolicy/Push-v0"}
    for env_id in fe.TASKS:
        spec = gym.spec(env_id)
        assert spec.max_episode_steps == 100 and spec.vector_entry_point is not None


def test_time_limit_from_registration():
    env = gym.make("fmpolicy/ArmReach-v0", max_episode_steps=3)
    env.reset(seed=1)
    flags = [env.step(np.zeros(2, np.float32))[3] for _ in range(3)]
    assert flags == [False, False, True]


@pytest.mark.parametrize("vec_cls, kwargs, state_dim, action_dim", VECTOR)
def test_vector_env_shapes_dtypes_device(vec_cls, kwargs, state_dim, action_dim):
    env = vec_cls(num_envs=64, seed=0, image_size=16, **kwargs)
    assert env.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    assert env.single_action_space.shape == (action_dim,)
    obs, info = env.reset(seed=0)
    assert obs[STATE_KEY].shape == (64, state_dim) and obs[STATE_KEY].dtype == torch.float32
    assert obs[IMAGE_KEY].shape == (64, 3, 16, 16) and obs[IMAGE_KEY].dtype == torch.float32
    actions = env.action_space.sample()  # numpy actions are accepted too
    obs, reward, terminated, truncated, info = env.step(actions)
    for tensor, shape, dtype in [
        (obs[STATE_KEY], (64, state_dim), torch.float32),
        (reward, (64,), torch.float32),
        (terminated, (64,), torch.bool),
        (truncated, (64,), torch.bool),
        (info["is_success"], (64,), torch.bool),
        (info["_final_obs"], (64,), torch.bool),
        (info["final_obs"][STATE_KEY], (64, state_dim), torch.float32),
        (info["final_info"]["episode_return"], (64,), torch.float32),
    ]:
        assert tensor.shape == shape and tensor.dtype == dtype and tensor.device.type == "cpu"
    assert env.single_observation_space[STATE_KEY].contains(obs[STATE_KEY][0].numpy())
    if "n_goals" in kwargs:
        assert len(info["task"]) == 64 and all(t.startswith("go to the ") for t in info["task"])


def test_make_vec_uses_the_vector_entry_point():
    env = gym.make_vec("fmpolicy/ArmReach-v0", num_envs=5, vectorization_mode="vector_entry_point", n_links=3)
    assert isinstance(env.unwrapped, fe.ArmReachVectorEnv)
    assert env.unwrapped.max_episode_steps == gym.spec("fmpolicy/ArmReach-v0").max_episode_steps
    obs, _ = env.reset(seed=0)
    assert obs[STATE_KEY].shape == (5, 7)


def test_autoreset_same_step_returns_reset_obs_and_final_obs():
    env = fe.PointObstacleVectorEnv(num_envs=64, seed=0)
    expert = fe.PointObstacleExpert(seed=0)
    obs, _ = env.reset(seed=0)
    ended = torch.zeros(64, dtype=torch.bool)
    for _ in range(80):
        obs, reward, terminated, truncated, info = env.step(expert(env.core))
        done = terminated | truncated
        assert torch.equal(info["_final_obs"], done)
        if terminated.any():
            final_pos = info["final_obs"][STATE_KEY][terminated, :2]
            goal = info["final_obs"][STATE_KEY][terminated, 2:]
            # the final observation is the successful one ...
            assert ((final_pos - goal).norm(dim=-1) < 0.05).all()
            assert info["final_info"]["is_success"][terminated].all()
            assert (reward[terminated] > 5).all()  # success bonus
            # ... and the returned one is a fresh start near (-0.7, 0)
            assert (obs[STATE_KEY][terminated, 0] < -0.6).all()
            assert not info["is_success"][terminated].any()
            assert (info["elapsed_steps"][terminated] == 0).all()
        # where the episode goes on, final_obs is the returned obs
        assert torch.equal(info["final_obs"][STATE_KEY][~done], obs[STATE_KEY][~done])
        ended |= terminated
    assert ended.all()


def test_truncation_at_max_episode_steps():
    env = fe.ArmReachVectorEnv(num_envs=64, seed=0, max_episode_steps=5)
    env.reset(seed=0)
    zeros = torch.zeros(64, 2)
    for t in range(1, 6):
        obs, _, terminated, truncated, info = env.step(zeros)
        assert not terminated.any()
        assert truncated.all() == (t == 5) and truncated.any() == (t == 5)
    assert (info["final_info"]["episode_length"] == 5).all()
    assert (info["elapsed_steps"] == 0).all()
    # the arm did not move during the episode, but the reset drew new targets
    assert not torch.equal(info["final_obs"][STATE_KEY][:, -2:], obs[STATE_KEY][:, -2:])
    _, _, _, truncated, info = env.step(zeros)
    assert not truncated.any() and (info["elapsed_steps"] == 1).all()


def test_reset_mask_resets_only_selected_envs():
    env = fe.PushVectorEnv(num_envs=8, seed=0)
    before, _ = env.reset(seed=0)
    mask = torch.tensor([True, False] * 4)
    after, info = env.reset(options={"reset_mask": mask})
    same = (before[STATE_KEY] == after[STATE_KEY]).all(dim=-1)
    assert torch.equal(same, ~mask)


def _rollout(vec_cls, seed, steps=60, **kwargs):
    env = vec_cls(num_envs=16, seed=seed, max_episode_steps=30, **kwargs)
    expert = fe.make_expert(_id_of(vec_cls), seed=seed)
    obs, _ = env.reset(seed=seed)
    states = [obs[STATE_KEY]]
    for _ in range(steps):
        obs, reward, *_ = env.step(expert(env.core))
        states.append(obs[STATE_KEY])
    return torch.stack(states)


def _id_of(vec_cls):
    return next(k for k, v in fe.TASKS.items() if v[1] is vec_cls)


@pytest.mark.parametrize("vec_cls", [fe.PointObstacleVectorEnv, fe.ArmReachVectorEnv, fe.PushVectorEnv])
def test_seeded_determinism(vec_cls):
    a = _rollout(vec_cls, seed=7)
    b = _rollout(vec_cls, seed=7)
    c = _rollout(vec_cls, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_single_env_seeded_determinism():
    def run(seed):
        env = gym.make("fmpolicy/Push-v0")
        obs, _ = env.reset(seed=seed)
        out = [obs[STATE_KEY]]
        rng = np.random.default_rng(0)
        for _ in range(20):
            out.append(env.step(rng.uniform(-1, 1, 2).astype(np.float32))[0][STATE_KEY])
        return np.stack(out)

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.allclose(run(3), run(4))


def test_bad_action_shape_is_a_clear_error():
    env = fe.PushVectorEnv(num_envs=4, seed=0)
    env.reset()
    with pytest.raises(ValueError, match="actions of shape"):
        env.step(torch.zeros(4, 3))


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="n_goals"):
        fe.PointObstacleCore(n_goals=3)
    with pytest.raises(ValueError, match="n_links"):
        fe.ArmReachCore(n_links=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("vec_cls, kwargs, state_dim, action_dim", VECTOR)
def test_vector_env_on_cuda(vec_cls, kwargs, state_dim, action_dim):
    env = vec_cls(num_envs=256, device="cuda", seed=0, image_size=16, **kwargs)
    expert = fe.make_expert(_id_of(vec_cls), seed=0)
    obs, _ = env.reset(seed=0)
    for _ in range(50):
        obs, reward, terminated, truncated, info = env.step(expert(env.core))
    for t in (obs[STATE_KEY], obs[IMAGE_KEY], reward, terminated, truncated, info["is_success"]):
        assert t.device.type == "cuda"
    assert obs[STATE_KEY].shape == (256, state_dim)


# ---- the RL test beds (bandit, GridWorld) ----------------------------------------------------------


@pytest.mark.parametrize("env_id, kwargs, state_dim", [
    ("fmpolicy/TwoOptimaBandit-v0", {}, 1),
    ("fmpolicy/TwoOptimaBandit-v0", {"context": True}, 1),
    ("fmpolicy/TwoGoalGridWorld-v0", {"size": 9, "max_steps": 20}, 2),
])
def test_rl_test_beds_are_registered_single_and_vector_envs(env_id, kwargs, state_dim):
    env = gym.make(env_id, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    obs, _ = env.reset(seed=3)
    assert obs[STATE_KEY].shape == (state_dim,) and obs[STATE_KEY].dtype == np.float32
    again, _ = env.reset(seed=3)
    np.testing.assert_array_equal(obs[STATE_KEY], again[STATE_KEY])
    ended, steps = False, 0
    while not ended:  # an episode ends by itself (the bandit after one step, the grid by its limit)
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        ended, steps = terminated or truncated, steps + 1
    assert steps <= kwargs.get("max_steps", 1) and isinstance(reward, float)
    vec = gym.make_vec(env_id, num_envs=6, vectorization_mode="vector_entry_point", seed=0, **kwargs)
    assert isinstance(vec.unwrapped, fe.RL_TEST_BEDS[env_id][1]) and vec.num_envs == 6
    vobs, _ = vec.reset(seed=0)
    assert vobs[STATE_KEY].shape == (6, state_dim) and isinstance(vobs[STATE_KEY], torch.Tensor)
    assert vec.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP


def test_the_package_and_the_envs_do_not_import_each_other():
    """envs/ never imports fmpolicy; fmpolicy never imports the envs (scripts and tests wire them)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def imported(path):
        mods = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods.add(node.module)
            elif isinstance(node, ast.Import):
                mods.update(a.name for a in node.names)
        return mods

    for path in (root / "envs").glob("*.py"):
        assert not {m for m in imported(path) if m.split(".")[0] == "fmpolicy"}, path
    for path in (root / "fmpolicy").rglob("*.py"):
        assert not {m for m in imported(path) if m.split(".")[0] == "fmpolicy_envs"}, path
