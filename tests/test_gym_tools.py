"""Our tools on any gymnasium environment (fmpolicy.gym_adapter): a flat float64 observation becomes a
float32 `observation.state`, success is read from a named info key, `collect` takes an
observation -> action expert, the frame rate comes from the env or a flag (else a clear error), and
expert presets are nameable in YAML."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from fmpolicy.config import ExpertConfig, PolicyConfig, config_from_dict, make_expert_config
from fmpolicy.errors import ConfigError
from fmpolicy.gym_adapter import env_fps, make_vector_env

from .helpers import load_script

LINE = "fmpolicytest/Line-v0"


class LineEnv(gym.Env):
    """A point on a line goes to x = 1: float64 observation [x, 1 - x], success as info["reached"], no
    render_fps (the case that needs --fps)."""

    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = spaces.Box(-5.0, 5.0, (2,), np.float64)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.x = 0.0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-0.5, 0.5))
        return np.array([self.x, 1 - self.x]), {"reached": False}

    def step(self, action):
        self.x += 0.2 * float(np.clip(action[0], -1, 1))
        reached = abs(self.x - 1.0) < 0.1
        return np.array([self.x, 1 - self.x]), float(reached), reached, False, {"reached": reached}


if LINE not in gym.registry:
    gym.register(id=LINE, entry_point=LineEnv, max_episode_steps=30)


def line_expert(obs):
    """observation dict -> actions (e, 1): full speed towards x = 1."""
    return torch.sign(obs["observation.state"][:, 1:2]).float()


def test_flat_float64_env_maps_to_float32_state_and_success_key():
    envs = make_vector_env(LINE, 3, success_key="reached")
    obs, info = envs.reset(seed=0)
    assert envs.single_observation_space["observation.state"].dtype == np.float32
    assert envs.single_observation_space["observation.state"].shape == (2,)
    assert set(obs) == {"observation.state"} and obs["observation.state"].dtype == torch.float32
    assert obs["observation.state"].shape == (3, 2) and info["is_success"].tolist() == [False] * 3
    ended = torch.zeros(3, dtype=torch.bool)
    for _ in range(12):
        obs, reward, terminated, truncated, info = envs.step(line_expert(obs))
        ended |= info["_final_info"]
        assert (info["final_info"]["is_success"] <= info["_final_info"]).all()  # success only where it ended
    assert ended.all()
    envs.close()


def test_collect_from_an_observation_expert(tmp_path):
    from fmpolicy.data import ChunkDataset, DatasetWriter, collect

    envs = make_vector_env(LINE, 2, success_key="reached")
    features = {"observation.state": {"dtype": "float32", "shape": [2]}, "action": {"dtype": "float32", "shape": [1]}}
    with DatasetWriter(tmp_path / "line", fps=10, features=features) as writer:
        summary = collect(envs, line_expert, writer, 4, seed=0, expert_input="obs", task="go right")
    assert summary["episodes"] == 4 and summary["success_rate"] == 1.0
    ds = ChunkDataset(tmp_path / "line", chunk_size=2)
    assert ds[0]["observation.state"].dtype == torch.float32 and ds[0]["task"] == "go right"
    with pytest.raises(ValueError, match="expert_input"):
        collect(envs, line_expert, writer, 5, expert_input="state")
    envs.close()


def test_collect_names_a_missing_success_key(tmp_path):
    from fmpolicy.data import DatasetWriter, collect

    envs = make_vector_env(LINE, 1)  # success_key "is_success" is mapped from nothing: use collect's own key
    features = {"observation.state": {"dtype": "float32", "shape": [2]}, "action": {"dtype": "float32", "shape": [1]}}
    with DatasetWriter(tmp_path / "x", fps=10, features=features) as writer:
        with pytest.raises(KeyError, match="done_flag"):
            collect(envs, line_expert, writer, 1, expert_input="obs", success_key="done_flag")
    envs.close()


def test_evaluate_policy_on_a_generic_env_counts_successes():
    from fmpolicy.evaluation import evaluate_policy

    envs = make_vector_env(LINE, 2, success_key="reached")
    result = evaluate_policy(None, envs, 4, act=lambda obs: line_expert(obs)[:, None], n_action_steps=1)
    assert result.episodes == 4 and result.successes == 4 and result.success_reported
    stay = evaluate_policy(None, envs, 2, act=lambda obs: torch.zeros(2, 1, 1), n_action_steps=1)
    assert stay.successes == 0 and stay.mean_length == 30  # the registered time limit ends them
    envs.close()


def test_fps_from_metadata_flag_or_a_clear_error(tmp_path):
    envs = make_vector_env(LINE, 1)
    with pytest.raises(ValueError, match="--fps"):
        env_fps(envs)
    assert env_fps(envs, 12.5) == 12.5
    envs.envs.metadata["render_fps"] = 25  # what MuJoCo tasks state
    assert env_fps(envs) == 25.0
    envs.close()
    with pytest.raises(SystemExit, match="--fps"):
        load_script("collect_demos").main(["--env", LINE, "--expert", "math:sqrt", "--episodes", "1",
                                            "--num-envs", "1", "--out", str(tmp_path / "d"), "--no-progress"])
    assert not (tmp_path / "d" / "meta" / "info.json").exists()


def test_expert_preset_named_in_yaml():
    import yaml

    data = yaml.safe_load("state_dim: 39\naction_dim: 4\nexpert: {preset: cpu, max_state_dim: 48}\n")
    config = config_from_dict(PolicyConfig, data)
    assert config.expert == make_expert_config("cpu", max_state_dim=48)
    assert config_from_dict(ExpertConfig, {"preset": "tiny"}) == make_expert_config("tiny")
    with pytest.raises(ConfigError, match=r"expert\.preset = 'huge'.*expected one of"):
        config_from_dict(PolicyConfig, {"state_dim": 4, "action_dim": 2, "expert": {"preset": "huge"}})
    with pytest.raises(ConfigError, match="widht"):
        config_from_dict(ExpertConfig, {"preset": "cpu", "widht": 64})
    with pytest.raises(ConfigError, match="state_dim"):  # the cpu preset alone caps the state at 32
        config_from_dict(PolicyConfig, {"state_dim": 39, "action_dim": 4, "expert": {"preset": "cpu"}})


def test_collect_demos_script_on_a_generic_env(tmp_path, monkeypatch):
    import json
    import sys
    import types

    module = types.ModuleType("fmpolicytest_experts")
    module.line_expert = line_expert
    monkeypatch.setitem(sys.modules, "fmpolicytest_experts", module)
    out = tmp_path / "line"
    summary = load_script("collect_demos").main(
        ["--env", LINE, "--expert", "fmpolicytest_experts:line_expert", "--success-key", "reached", "--fps", "10",
         "--episodes", "3", "--num-envs", "2", "--out", str(out), "--no-progress"])
    assert summary["episodes"] == 3 and summary["success_rate"] == 1.0
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["fps"] == 10 and info["features"]["observation.state"]["shape"] == [2]


@pytest.mark.parametrize("record", ["executed", "clean"])
def test_collect_demos_adds_action_noise_to_any_expert(tmp_path, monkeypatch, record):
    """--noise-std on an expert callable: the env executes expert + noise (clipped to the action space); the
    dataset records those (a weaker expert) or, with --noise-record clean, the expert's own (DART)."""
    import sys
    import types

    from fmpolicy.data import ChunkDataset

    module = types.ModuleType("fmpolicytest_experts")
    module.line_expert = line_expert
    monkeypatch.setitem(sys.modules, "fmpolicytest_experts", module)
    out = tmp_path / record
    load_script("collect_demos").main(
        ["--env", LINE, "--expert", "fmpolicytest_experts:line_expert", "--success-key", "reached", "--fps", "10",
         "--episodes", "4", "--num-envs", "2", "--out", str(out), "--no-progress", "--noise-std", "0.5",
         "--noise-record", record])
    ds = ChunkDataset(out, 1)
    x, a = ds.state[:, 0].double(), ds.action[:, 0].double()
    same_episode = ds.episode_index[1:] == ds.episode_index[:-1]
    moved = (x[1:] - x[:-1])[same_episode]  # the env moves x by 0.2 x the executed action
    assert a.abs().max() <= 1.0
    if record == "executed":  # recorded = executed: noisy, and exactly what moved the point
        torch.testing.assert_close(moved, 0.2 * a[:-1][same_episode], atol=1e-6, rtol=0)
        assert ((a.abs() - 1).abs() > 1e-3).float().mean() > 0.3
    else:  # recorded = the expert's clean action (+-1), while the point moved by the noisy one
        assert torch.equal(a.abs(), torch.ones_like(a))
        assert (moved - 0.2 * a[:-1][same_episode]).abs().max() > 0.01
    env = __import__("json").loads((out / "meta" / "info.json").read_text())["env"]
    assert env["noise_std"] == 0.5 and env["noise_record"] == record


def test_noisy_expert_noise_bounds_labels_and_devices():
    from fmpolicy.data.noisy import NoisyExpert

    class Moded:
        mode = np.array([1, 0])

        def __call__(self, obs):
            return np.tile(obs, (1, 1)).astype(np.float32)

    expert = NoisyExpert(lambda obs: np.full((20000, 2), 0.25, np.float32), 0.1, seed=0)
    a = expert(None)
    assert a.dtype == np.float32 and expert.label is None
    np.testing.assert_allclose(a.mean(0), 0.25, atol=0.005)
    np.testing.assert_allclose(a.std(0), 0.1, rtol=0.05)
    bounded = NoisyExpert(lambda obs: np.zeros((1000, 2)), 3.0, seed=1, record="clean", low=[-1, -0.5], high=[1, 0.5])
    b = bounded(None)
    assert b[:, 0].min() == -1 and b[:, 1].max() == 0.5 and np.abs(b[:, 1]).max() <= 0.5
    np.testing.assert_array_equal(bounded.label, np.zeros((1000, 2)))  # the clean labels
    again = NoisyExpert(lambda obs: np.zeros((1000, 2)), 3.0, seed=1, record="clean", low=[-1, -0.5], high=[1, 0.5])
    np.testing.assert_array_equal(again(None), b)  # the seed fixes the noise
    t = NoisyExpert(lambda obs: torch.zeros(5, 3, dtype=torch.float64), 0.5, seed=0, record="clean")(None)
    assert t.dtype == torch.float64 and t.std() > 0.1
    assert NoisyExpert(Moded(), 0.1).mode.tolist() == [1, 0]  # the wrapped expert's modes pass through
    for kwargs, message in (({"noise_std": -1.0}, "noise_std"), ({"noise_std": float("nan")}, "noise_std"),
                            ({"noise_std": 0.1, "record": "both"}, "record"), ({"noise_std": 0.1, "low": 1, "high": 0},
                                                                                "exceeds")):
        with pytest.raises(ValueError, match=message):
            NoisyExpert(lambda obs: obs, **kwargs)
    with pytest.raises(TypeError, match="not callable"):
        NoisyExpert(3, 0.1)


def test_collect_demos_noise_on_our_own_envs_expert(tmp_path):
    """Our batched scripted experts take --noise-std too: same seed, same starts, other actions; with
    --noise-record clean the labels are the expert's own while the states leave its path."""
    import json

    from fmpolicy.data import ChunkDataset

    def run(name, *extra):
        load_script("collect_demos").main(["--env", "fmpolicy/PointObstacle-v0", "--episodes", "4", "--num-envs", "4",
                                           "--out", str(tmp_path / name), "--no-progress", *extra])
        return ChunkDataset(tmp_path / name, 1)

    plain, noisy = run("plain"), run("noisy", "--noise-std", "0.3")
    clean = run("clean", "--noise-std", "0.3", "--noise-record", "clean")
    def starts(ds):
        s = ds.state[ds.frame_index == 0]
        return s[s[:, 0].argsort()]

    assert torch.equal(starts(plain), starts(noisy))  # the same starts (episodes written as they finish)
    n = min(len(plain), len(noisy))
    assert not torch.allclose(plain.action[:n], noisy.action[:n], atol=0.05)
    assert torch.equal(noisy.state[:n], clean.state[:n])  # the same executed actions ...
    assert not torch.allclose(noisy.action[:n], clean.action[:n], atol=0.05)  # ... recorded otherwise
    assert "noise_std" not in json.loads((tmp_path / "plain/meta/info.json").read_text())["env"]
