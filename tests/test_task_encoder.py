"""encoder kind "task": one multi-task policy without images or a text model, told its task by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmpolicy import ConfigError, FlowPolicy, InputError, NormalizationConfig, PolicyConfig, make_expert_config
from fmpolicy.config import EncoderConfig
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "lerobot_v3" / "png"  # two tasks, state (3,), action (2,)
TASKS = ("go left", "go right")


def make_policy(seed: int = 0) -> FlowPolicy:
    torch.manual_seed(seed)
    cfg = PolicyConfig(state_dim=2, action_dim=1, chunk_size=2, n_action_steps=1, device="cpu",
                       expert=make_expert_config("mlp", width=64, depth=2, prefix_dim=8, max_state_dim=2, max_action_dim=1),
                       encoder=EncoderConfig(kind="task", tasks=TASKS, out_dim=8),
                       normalization=NormalizationConfig(state="identity", action="identity"))
    return FlowPolicy(cfg)


def test_one_policy_learns_each_named_tasks_own_actions_from_the_same_states():
    # the same states, opposite actions: only the instruction tells the two apart (an encoder-less
    # policy could only learn their average, 0)
    policy = make_policy()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(300):
        state = torch.randn(64, 2, generator=g)
        sign = torch.randint(0, 2, (64,), generator=g)
        action = (2.0 * sign - 1.0)[:, None, None].expand(64, 2, 1) + 0.05 * torch.randn(64, 2, 1, generator=g)
        batch = {"observation.state": state, "action": action, "task": [TASKS[int(s)] for s in sign]}
        loss, _ = policy.compute_loss(batch, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    state = torch.randn(200, 2, generator=g)
    for task, want in zip(TASKS, (-1.0, 1.0)):
        chunk = policy.predict_action_chunk({"observation.state": state, "task": [task] * 200}, generator=g)
        assert abs(float(chunk.mean()) - want) < 0.25, (task, float(chunk.mean()))


def test_unknown_missing_and_misconfigured_tasks_are_clear_errors(tmp_path):
    policy = make_policy().eval()
    state = torch.zeros(1, 2)
    with pytest.raises(InputError, match=r"\['open the door'\], which this policy was not trained on: expected one "
                                         r"of \['go left', 'go right'\]"):
        policy.predict_action_chunk({"observation.state": state, "task": ["open the door"]})
    with pytest.raises(InputError, match="missing the key 'task'"):
        policy.predict_action_chunk({"observation.state": state})
    with pytest.raises(ConfigError, match="tasks = \\(\\) is invalid"):
        EncoderConfig(kind="task")
    with pytest.raises(ConfigError, match="distinct instructions"):
        EncoderConfig(kind="task", tasks=("a", "a"))
    with pytest.raises(ConfigError, match="unless kind='task'"):
        EncoderConfig(kind="vision_text", tasks=("a",))
    assert EncoderConfig(kind="task", tasks=("a",)).cameras == ()  # reads no camera
    # the task list travels with the saved policy
    policy.save_pretrained(tmp_path / "p")
    again = FlowPolicy.from_pretrained(tmp_path / "p", device="cpu").eval()
    assert again.config.encoder.tasks == TASKS
    obs = {"observation.state": torch.randn(2, 2), "task": list(TASKS)}
    noise = policy.sample_noise(2, torch.Generator().manual_seed(0))
    assert torch.equal(again.predict_action_chunk(obs, noise=noise), policy.predict_action_chunk(obs, noise=noise))


def test_train_script_takes_the_task_list_from_the_dataset(tmp_path):
    train = load_script("train")
    out = tmp_path / "run"
    policy = train.main(["--config", str(ROOT / "configs" / "point_obstacle.yaml"), f"data.root={FIXTURE}",
                         f"train.out_dir={out}", "policy.state_dim=auto", "policy.action_dim=auto",
                         "policy.chunk_size=2", "policy.n_action_steps=1", "policy.device=cpu",
                         "policy.expert={kind: mlp, width: 32, depth: 1, prefix_dim: 8, max_state_dim: auto, "
                         "max_action_dim: auto}",
                         "policy.encoder={kind: task, tasks: auto, out_dim: 8}", "train.steps=4",
                         "train.save_every=4", "train.warmup_steps=1", "train.progress=false"])
    assert policy.config.encoder.tasks == ("pick the red cube", "push the blue disk to the goal")
    saved = FlowPolicy.from_pretrained(out / "policy", device="cpu").eval()
    obs = {"observation.state": torch.zeros(2, 3), "task": list(saved.config.encoder.tasks)}
    chunk = saved.predict_action_chunk(obs, noise=saved.sample_noise(2, torch.Generator().manual_seed(0)))
    assert chunk.shape == (2, 2, 2) and torch.isfinite(chunk).all()
