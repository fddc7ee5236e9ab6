"""FPO fine-tuning of a mixed-arm policy on one of its arms (`rl.embodiment`): the robot named in every
observation, the critic at that arm's width, and exactly zero gradient on the padded dimensions."""

from __future__ import annotations

import pytest
import torch

from fmpolicy import FlowPolicy, PolicyConfig, make_expert_config
from fmpolicy.config import EmbodimentConfig, config_from_dict
from fmpolicy.errors import ConfigError
from fmpolicy.rl.config import RLRunConfig
from fmpolicy.rl.rollout import RolloutCollector, make_vector_env
from fmpolicy.rl.trainer import make_actor, train_rl
from fmpolicy.rl.value import ValueNet
from tests.helpers import randomized

ARMS = (("arm2", 6, 2), ("arm3", 7, 3), ("arm4", 8, 4))


def saved_mixed_policy(tmp_path) -> str:
    """A tiny three-arm policy (padded to state 8, action 4), each arm normalized on its own, saved."""
    cfg = PolicyConfig(state_dim=8, action_dim=4, chunk_size=4, n_action_steps=2, device="cpu",
                       embodiments=tuple(EmbodimentConfig(n, s, a) for n, s, a in ARMS),
                       expert=make_expert_config("tiny", max_state_dim=8, max_action_dim=4))
    policy = FlowPolicy(cfg)
    randomized(policy.net, 0)
    g = torch.Generator().manual_seed(0)
    for name, s, a in ARMS:
        policy.fit_normalization(torch.randn(100, s, generator=g), 0.3 * torch.randn(100, 4, a, generator=g), name)
    policy.save_pretrained(tmp_path / "mixed")
    return str(tmp_path / "mixed")


def arm3_config(tmp_path, init_from: str, **rl) -> RLRunConfig:
    return config_from_dict(RLRunConfig, {
        "init_from": init_from,
        "rl": {"num_envs": 8, "num_macro_steps": 2, "update_epochs": 1, "num_minibatches": 2, "device": "cpu",
               "total_env_steps": 8 * 2 * 2 * 2, "eval_every": 1, "eval_episodes": 4, "out_dir": str(tmp_path / "run"), "progress": False, "save_every": 100,
               "value": {"width": 16, "depth": 1}, "embodiment": "arm3", **rl},
        "env": {"id": "fmpolicy/ArmReach-v0", "kwargs": {"n_links": 3}},
    })


def test_fpo_on_one_arm_gives_exactly_zero_gradient_to_the_padded_dimensions(tmp_path):
    config = arm3_config(tmp_path, saved_mixed_policy(tmp_path))
    torch.manual_seed(0)
    actor, pc = make_actor(config, torch.device("cpu"))
    envs = make_vector_env("fmpolicy/ArmReach-v0", 8, torch.device("cpu"), 0, {"n_links": 3})
    collector = RolloutCollector(envs, actor, ValueNet(7, config.rl.value), 2, 0.99, torch.device("cpu"))
    collector.reset(0)
    rollout = collector.collect(2, torch.Generator().manual_seed(0))
    assert rollout.chunks.shape[-1] == 3  # the arm's own action width reached the env
    assert rollout.obs["embodiment"] == ["arm3"] * 16  # named in what the buffer keeps
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    chunks, store = flat(rollout.chunks), {k: flat(v) for k, v in rollout.store.items()}
    log_ratio, _ = actor.log_ratio(rollout.obs, chunks, store, actor.prepare(rollout.obs))
    assert float(log_ratio.detach().abs().max()) < 1e-5  # the rollout policy is reproduced: ratio 1 before updating
    advantages = torch.randn(log_ratio.shape, generator=torch.Generator().manual_seed(1))
    (-(log_ratio.exp() * advantages).mean()).backward()
    net = actor.policy.net
    # arm3: action entry 3 of 4 and state entry 7 of 8 are padding; state_in reads [state, valid mask]
    assert torch.equal(net.action_in.weight.grad[:, 3], torch.zeros(net.action_in.weight.shape[0]))
    assert torch.equal(net.action_out.weight.grad[3], torch.zeros(net.action_out.weight.shape[1]))
    assert float(net.action_out.bias.grad[3]) == 0.0
    for col in (7, 8 + 7):
        assert torch.equal(net.state_in.weight.grad[:, col], torch.zeros(net.state_in.weight.shape[0]))
    # and the arm's own dimensions do learn (the checks above can fail)
    assert net.action_in.weight.grad[:, :3].abs().max() > 0 and net.action_out.weight.grad[:3].abs().max() > 0
    assert net.state_in.weight.grad[:, :7].abs().max() > 0


def test_a_run_on_one_arm_trains_and_its_robot_must_be_named(tmp_path):
    init_from = saved_mixed_policy(tmp_path)
    result = train_rl(arm3_config(tmp_path, init_from))  # the ratio check of the first update holds
    assert result.history and result.history[-1]["iteration"] == 2
    again = FlowPolicy.from_pretrained(tmp_path / "run" / "policy", device="cpu")
    assert again.embodiments.names == ["arm2", "arm3", "arm4"]
    with pytest.raises(ConfigError, match=r"rl.embodiment is '': the policy serves \['arm2', 'arm3', 'arm4'\]"):
        make_actor(arm3_config(tmp_path, init_from, embodiment=""), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"rl.embodiment = 'arm9' is not one of"):
        make_actor(arm3_config(tmp_path, init_from, embodiment="arm9"), torch.device("cpu"))
