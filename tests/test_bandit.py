"""The two-optima bandit: reward shapes, the contextual variant (tilt, saddle probes), exact resume."""

from __future__ import annotations

import pytest
import torch

from fmpolicy_envs.bandit import OPTIMA, TwoOptimaBandit, mode_fractions

POS, NEG = torch.tensor(OPTIMA[0]), torch.tensor(OPTIMA[1])


def test_bump_reward_peaks_at_each_optimum_and_falls_off_with_the_width():
    env = TwoOptimaBandit(3, width=0.3)
    r = env.reward(torch.stack([POS, NEG, torch.zeros(2)]))
    assert torch.allclose(r[:2], torch.ones(2))
    # (0, 0) is 0.6 * sqrt(2) from both optima: exp(-0.72 / (2 * 0.09)) = exp(-4)
    assert r[2].item() == pytest.approx(float(torch.exp(torch.tensor(-4.0))), rel=1e-5)


def test_goal_reward_is_flat_inside_either_disk_and_zero_outside():
    env = TwoOptimaBandit(4, width=0.3, reward_shape="goal")
    inside_pos, inside_neg = POS + torch.tensor([0.2, -0.2]), NEG + torch.tensor([0.0, 0.29])
    outside = POS + torch.tensor([0.0, 0.31])
    r = env.reward(torch.stack([POS, inside_pos, inside_neg, outside]))
    assert r.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_context_tilts_the_optima_and_the_probes_sit_at_the_saddle():
    env = TwoOptimaBandit(64, seed=3, context=True, tilt=5.0)
    obs, _ = env.reset()
    s = obs["observation.state"][:, 0]
    assert (s[:16] == 0).all() and (s[16:] != 0).all() and s.abs().max() <= 1  # 64 // 4 probes
    # at s = 0 both optima earn 1; at s = 0.1 the positive one still 1, the negative 1 - 5 * 0.1;
    # past s = 0.2 the negative one earns nothing, and the mirror image for s < 0
    states = torch.tensor([0.0, 0.0, 0.1, 0.1, 0.5, -0.5, -0.1])
    r = env.reward(torch.stack([POS, NEG, POS, NEG, NEG, NEG, POS]), states)
    assert torch.allclose(r, torch.tensor([1.0, 1.0, 1.0, 0.5, 0.0, 1.0, 0.5]), atol=1e-6)  # + the far bump's tail
    with pytest.raises(ValueError, match="5 actions and no states"):
        env.reward(torch.zeros(5, 2))  # states it cannot guess
    # every step draws fresh states for the non-probe envs and reports the old ones as final_obs
    _, reward, done, _, info = env.step(torch.zeros(64, 2))
    assert done.all() and torch.equal(info["final_obs"]["observation.state"][:, 0], s)
    s2 = env._obs()["observation.state"][:, 0]
    assert (s2[:16] == 0).all() and not torch.equal(s2[16:], s[16:])
    # reset with a seed draws the same states every time
    first = env.reset(seed=5)[0]["observation.state"]
    env.step(torch.zeros(64, 2))
    assert torch.equal(env.reset(seed=5)[0]["observation.state"], first)


def test_context_state_dict_restores_the_next_states_exactly():
    a, b = TwoOptimaBandit(16, seed=1, context=True), TwoOptimaBandit(16, seed=2, context=True)
    a.step(torch.zeros(16, 2))
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        obs_a = a.step(torch.zeros(16, 2))[0]["observation.state"]
        obs_b = b.step(torch.zeros(16, 2))[0]["observation.state"]
        assert torch.equal(obs_a, obs_b)


def test_action_stats_count_the_saddle_actions_only_when_states_are_given():
    env = TwoOptimaBandit(4, context=True)
    actions = torch.stack([POS, NEG, POS, POS])
    states = torch.tensor([[0.0], [0.0], [0.7], [-0.2]])
    assert env.action_stats(actions, states) == {"near_optimum_pos": 0.5, "near_optimum_neg": 0.5}
    assert env.action_stats(actions) == {"near_optimum_pos": 0.75, "near_optimum_neg": 0.25}
    assert mode_fractions(torch.stack([POS + 0.25, NEG])) == (0.0, 0.5)  # 0.35 from the optimum: outside 0.3


@pytest.mark.parametrize("kwargs,match", [({"reward_shape": "ring"}, "reward_shape = 'ring'"),
                                          ({"width": 0.0}, "width = 0.0"), ({"tilt": -1.0}, "tilt = -1.0")])
def test_bad_bandit_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwoOptimaBandit(4, **kwargs)


def test_the_contextual_config_trains_and_logs_the_saddle_modes(tmp_path):
    from fmpolicy.rl.config import load_rl_config
    from fmpolicy.rl.trainer import train_rl

    config = load_rl_config("configs/fpo_bandit_context.yaml", [
        "rl.num_envs=32", "rl.total_env_steps=64", "rl.progress=false", "rl.device=cpu",
        f"rl.out_dir={tmp_path}", "policy.expert.width=32", "rl.value.width=16"])
    history = train_rl(config).history
    assert len(history) == 2
    for h in history:  # fractions over the 8 saddle envs: multiples of 1/8
        assert all(abs(h[k] * 8 - round(h[k] * 8)) < 1e-6 for k in ("near_optimum_pos", "near_optimum_neg"))
