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
