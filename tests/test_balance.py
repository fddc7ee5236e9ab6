"""data.balance: windows drawn so that every episode or every task is drawn equally often."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fmpolicy.config import DataConfig
from fmpolicy.errors import CheckpointError, ConfigError
from fmpolicy.training.imitation import BalancedSampler, EpochSampler, make_sampler, window_groups

from tests.helpers import cut_after_checkpoint
from tests.test_train import dataset, run_train  # noqa: F401 (the fixture: 8 PointObstacle demonstrations)


class FakeDataset(SimpleNamespace):
    """What the samplers read of a `ChunkDataset`: one window per frame, its episode and task."""

    def __len__(self) -> int:
        return len(self.episode_index)


def fake_dataset(episode_lengths: list[int], tasks: list[str], task_of_episode: list[int]) -> FakeDataset:
    episode = torch.cat([torch.full((n,), e) for e, n in enumerate(episode_lengths)])
    task = torch.cat([torch.full((n,), task_of_episode[e]) for e, n in enumerate(episode_lengths)])
    return FakeDataset(episode_index=episode, task_index=task, tasks=tasks)


def shares(sampler, groups: torch.Tensor, draws: int = 200) -> torch.Tensor:
    idx = torch.cat([sampler.next() for _ in range(draws)])
    return torch.bincount(groups[idx], minlength=int(groups.max()) + 1).double() / len(idx)


def test_each_task_is_drawn_equally_often_whatever_its_windows():
    # task "reach" has 1 short episode (10 windows), "push" 3 long ones (90): drawn per window, reach gets 10%
    data = {"robot": fake_dataset([10, 30, 30, 30], ["reach", "push"], [0, 1, 1, 1])}
    groups = window_groups(data, "tasks")
    assert groups.tolist() == [0] * 10 + [1] * 90
    balanced = BalancedSampler(groups, 100, seed=0)
    plain = EpochSampler(100, 100, seed=0)
    assert shares(plain, groups)[0].item() == pytest.approx(0.1, abs=1e-12)  # whole epochs: exactly 10%
    assert shares(balanced, groups)[0].item() == pytest.approx(0.5, abs=0.02)  # 20,000 draws: std 0.0035
    # within a task every window is equally likely: the 3 push episodes share push's half equally
    episodes = window_groups(data, "episodes")
    per_episode = shares(balanced, episodes)
    assert per_episode[1:].tolist() == pytest.approx([1 / 6] * 3, abs=0.02)


def test_groups_are_numbered_across_datasets_as_the_windows_are_concatenated():
    a = fake_dataset([2, 3], ["push", "reach"], [0, 1])
    b = fake_dataset([4], ["reach"], [0])  # the same task string in another robot's dataset: one task
    tasks = window_groups({"a": a, "b": b}, "tasks")
    assert tasks.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1]
    episodes = window_groups({"a": a, "b": b}, "episodes")
    assert len(set(episodes.tolist())) == 3  # episode 0 of a and episode 0 of b are different episodes
    assert episodes[:2].unique().numel() == 1 and episodes[5] != episodes[0]
    assert window_groups({"a": a}, "windows") is None
    assert isinstance(make_sampler({"a": a}, "windows", 4, 0), EpochSampler)


def test_the_balanced_sampler_resumes_where_it_stopped_and_refuses_another_sampler():
    groups = torch.tensor([0, 0, 0, 1, 2, 2])
    s = BalancedSampler(groups, 8, seed=3)
    s.next()
    state = s.state_dict()
    expected = [s.next() for _ in range(3)]
    t = BalancedSampler(groups, 8, seed=99)
    t.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [t.next() for _ in range(3)]))
    with pytest.raises(CheckpointError, match=r"drew every window equally .* balances 3 groups"):
        t.load_state_dict(EpochSampler(6, 8, 0).state_dict())
    with pytest.raises(CheckpointError, match=r"balanced episodes or tasks"):
        EpochSampler(6, 8, 0).load_state_dict(state)


def test_a_bad_balance_is_refused_with_its_name():
    with pytest.raises(ConfigError, match=r"DataConfig\.balance = 'task' .*'windows', 'episodes', 'tasks'"):
        DataConfig(root="x", balance="task")


def test_balanced_training_resumes_bit_for_bit(dataset, tmp_path):  # noqa: F811 (the imported fixture)
    common = ("train.steps=6", "train.save_every=3", "train.batch_size=16", "data.balance=episodes")
    run_train(dataset, tmp_path / "full", *common)
    cut = tmp_path / "cut"
    run_train(dataset, cut, *common)
    cut_after_checkpoint(cut, 3, 6)
    run_train(dataset, cut, *common, resume=True)
    full = load_file(str(tmp_path / "full" / "policy" / "model.safetensors"))
    resumed = load_file(str(cut / "policy" / "model.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # a different balance is a different run: refused on resume
    with pytest.raises(SystemExit, match=r"data\.balance"):
        run_train(dataset, cut, *common[:-1], "data.balance=windows", resume=True)
