"""The two-goal GridWorld: moves, goals, time limit and autoreset, start cells, middle-row stats, resume."""

from __future__ import annotations

import pytest
import torch

from fmpolicy_envs.gridworld import TwoGoalGridWorld, vertical_split


def test_actions_are_clipped_and_rounded_to_moves():
    a = torch.tensor([[0.6, -0.6], [0.4, 0.2], [3.0, -7.0], [-0.51, 0.49]])
    assert TwoGoalGridWorld.moves(a).tolist() == [[1, -1], [0, 0], [1, -1], [-1, 0]]


def test_entering_a_goal_row_pays_ends_the_episode_and_restarts_off_the_goals():
    env = TwoGoalGridWorld(2, size=9, max_steps=50, goal_reward=2.0, seed=0)
    env.pos[:] = torch.tensor([[4, 2], [0, 4]])  # env 0 one row above the bottom goal rows
    obs, reward, term, trunc, info = env.step(torch.tensor([[0.0, -1.0], [-1.0, 0.0]]))
    assert reward.tolist() == [2.0, 0.0] and term.tolist() == [True, False] and not trunc.any()
    # the reached cell of env 0 is reported, its new episode starts off the goal rows
    assert info["final_obs"]["observation.state"][0].tolist() == [0.0, -0.75]  # (4, 1): ((4, 1) - 4) / 4
    assert info["final_info"]["is_success"].tolist() == [True, False]
    assert info["final_info"]["episode_return"][0].item() == 2.0 and info["_final_obs"].tolist() == [True, False]
    assert 2 <= env.pos[0, 1] <= 6 and env.elapsed[0] == 0
    # env 1 was pushed against the left wall: clamped, the episode goes on
    assert env.pos[1].tolist() == [0, 4] and obs["observation.state"][1].tolist() == [-1.0, 0.0]


def test_the_time_limit_truncates_and_bootstraps_from_the_reached_cell():
    env = TwoGoalGridWorld(1, size=9, max_steps=3)
    env.pos[:] = torch.tensor([[4, 4]])
    for i in range(3):
        obs, reward, term, trunc, info = env.step(torch.tensor([[1.0, 0.0]]))
    assert trunc.tolist() == [True] and not term.any() and reward.item() == 0.0
    assert info["final_obs"]["observation.state"][0].tolist() == [0.75, 0.0]  # (7, 4)
    assert info["final_info"]["episode_length"].tolist() == [3] and not info["final_info"]["is_success"].any()


def test_start_cells_cover_every_non_goal_row_and_no_goal_row():
    env = TwoGoalGridWorld(4096, size=9, seed=1)
    rows = env.pos[:, 1]
    assert set(rows.tolist()) == {2, 3, 4, 5, 6} and set(env.pos[:, 0].tolist()) == set(range(9))
    first = env.reset(seed=7)[0]["observation.state"]
    env.step(torch.zeros(4096, 2))
    assert torch.equal(env.reset(seed=7)[0]["observation.state"], first)  # a seed re-plays the starts


def test_middle_row_stats_count_only_actions_taken_on_the_middle_row():
    env = TwoGoalGridWorld(4)
    actions = torch.tensor([[0.0, 0.9], [0.0, -0.9], [0.0, 0.2], [0.0, 0.9]])
    states = torch.tensor([[0.3, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 0.5]])  # the last one is off the row
    assert env.action_stats(actions, states) == pytest.approx({"center_up": 1 / 3, "center_down": 1 / 3})
    assert env.action_stats(actions[3:], states[3:]) == {}
    assert vertical_split(actions) == (0.5, 0.25)


def test_state_dict_restores_positions_and_the_next_starts_exactly():
    a, b = TwoGoalGridWorld(16, size=9, seed=1), TwoGoalGridWorld(16, size=9, seed=2)
    moves = torch.tensor([0.0, -1.0]).expand(16, 2)
    a.step(moves)
    b.load_state_dict(a.state_dict())
    for _ in range(6):  # long enough for episodes to end and restart
        oa, ra, ta, _, _ = a.step(moves)
        ob, rb, tb, _, _ = b.step(moves)
        assert torch.equal(oa["observation.state"], ob["observation.state"]) and torch.equal(ra, rb)


@pytest.mark.parametrize("kwargs,match", [({"size": 8}, "size = 8"), ({"size": 5}, "size = 5"),
                                          ({"max_steps": 0}, "max_steps = 0"), ({"goal_reward": 0}, "goal_reward = 0")])
def test_bad_gridworld_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwoGoalGridWorld(2, **kwargs)


def test_the_gridworld_config_trains_and_logs_the_middle_row_split(tmp_path):
    from fmpolicy.rl.config import load_rl_config
    from fmpolicy.rl.trainer import train_rl

    config = load_rl_config("configs/fpo_gridworld.yaml", [
        "rl.num_envs=32", "rl.num_macro_steps=16", "rl.total_env_steps=1024", "rl.progress=false",
        "rl.device=cpu", "rl.eval_every=0", f"rl.out_dir={tmp_path}", "policy.expert.width=32",
        "rl.value.width=16"])
    history = train_rl(config).history
    assert len(history) == 2
    assert any("center_up" in h for h in history)  # 32 x 16 steps always visit the middle row
    for h in history:
        if "center_up" in h:
            assert 0 <= h["center_up"] + h["center_down"] <= 1
        assert h["episodes"] > 0 and h["ratio_first_max_dev"] < 1e-6


def test_a_resumed_gridworld_run_with_the_entropy_bonus_equals_an_uninterrupted_one(tmp_path):
    from fmpolicy.rl.config import load_rl_config
    from fmpolicy.rl.trainer import train_rl

    def run(out, iterations, resume=False):
        config = load_rl_config("configs/fpo_gridworld.yaml", [
            "rl.num_envs=16", "rl.num_macro_steps=8", f"rl.total_env_steps={16 * 8 * iterations}",
            "rl.progress=false", "rl.device=cpu", "rl.eval_every=0", "rl.save_every=1", "rl.ent_coef=0.01",
            f"rl.out_dir={out}", "policy.expert.width=32", "rl.value.width=16"])
        # a longer run than the checkpoint's: accepted knowingly (with anneal_lr the lr of the iterations
        # already run depended on the length; here only iteration 0 ran, whose lr is rl.lr whatever it is)
        return train_rl(config, resume=resume, allow_changes=("rl.total_env_steps",) if resume else ())

    full = run(tmp_path / "a", 3)
    run(tmp_path / "b", 1)
    resumed = run(tmp_path / "b", 3, resume=True)
    assert [h["entropy"] for h in resumed.history] == [h["entropy"] for h in full.history]
    assert [h["macro_reward_mean"] for h in resumed.history] == [h["macro_reward_mean"] for h in full.history]
    for a, b in zip(full.actor.parameters(), resumed.actor.parameters()):
        assert torch.equal(a, b)
