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


def test_task_weights_draw_each_task_in_proportion():
    # reach (10 windows) weighted 3, push (90 windows) 1: reach's share is 3/4 however few windows it has
    data = {"robot": fake_dataset([10, 30, 30, 30], ["reach", "push"], [0, 1, 1, 1])}
    groups = window_groups(data, "tasks")
    weighted = make_sampler(data, "tasks", 100, seed=0, task_weights={"reach": 3.0})
    assert shares(weighted, groups)[0].item() == pytest.approx(0.75, abs=0.02)  # 20,000 draws: std 0.003
    # within a task every window is still equally likely
    episodes = window_groups(data, "episodes")
    assert shares(weighted, episodes)[1:].tolist() == pytest.approx([0.25 / 3] * 3, abs=0.02)
    # equal weights are the plain balanced draw, batch for batch (older runs' batches are unchanged)
    plain, equal = make_sampler(data, "tasks", 16, seed=5), make_sampler(data, "tasks", 16, seed=5,
                                                                           task_weights={"reach": 2, "push": 2})
    assert all(torch.equal(plain.next(), equal.next()) for _ in range(5))


def test_task_weights_follow_the_task_numbering_across_datasets():
    # "reach" is task 1 of the first robot's dataset and task 0 of the second's: one group, one weight
    a = fake_dataset([5, 5], ["push", "reach"], [0, 1])
    b = fake_dataset([10], ["reach"], [0])
    data = {"a": a, "b": b}
    groups = window_groups(data, "tasks")
    sampler = make_sampler(data, "tasks", 100, seed=1, task_weights={"push": 4})
    assert shares(sampler, groups).tolist() == pytest.approx([0.8, 0.2], abs=0.02)


def test_bad_task_weights_are_refused_with_the_field_and_the_tasks():
    data = {"robot": fake_dataset([4, 4], ["reach", "push"], [0, 1])}
    with pytest.raises(ConfigError, match=r"task_weights names \['pick'\].*'reach', 'push'"):
        make_sampler(data, "tasks", 8, seed=0, task_weights={"pick": 2})
    with pytest.raises(ConfigError, match=r"DataConfig\.task_weights = \{'reach': 0\}.*> 0"):
        DataConfig(root="x", balance="tasks", task_weights={"reach": 0})
    with pytest.raises(ConfigError, match=r"DataConfig\.task_weights .*unless balance is 'tasks'.*'windows'"):
        DataConfig(root="x", task_weights={"reach": 2})
    # a checkpoint drawn with other weights is another run
    groups = torch.tensor([0, 0, 1])
    state = BalancedSampler(groups, 4, seed=0, weights=torch.tensor([3.0, 1.0])).state_dict()
    with pytest.raises(CheckpointError, match=r"weights \[3\.0, 1\.0\].*data\.task_weights"):
        BalancedSampler(groups, 4, seed=0).load_state_dict(state)
    same = BalancedSampler(groups, 4, seed=7, weights=torch.tensor([3.0, 1.0]))
    same.load_state_dict(state)  # the same weights resume


def test_training_reads_task_weights(dataset, tmp_path):  # noqa: F811 (the imported fixture)
    # the trainer passes data.task_weights to its sampler: a weight for a task the dataset lacks stops the run
    with pytest.raises((SystemExit, ConfigError), match=r"task_weights names \['no such task'\]"):
        run_train(dataset, tmp_path / "run", "train.steps=2", "train.batch_size=8", "data.balance=tasks",
                  "data.task_weights={no such task: 2}")
