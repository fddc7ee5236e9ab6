"""The real training and evaluation entry points: train, resume, torchrun, evaluate, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fmpolicy.evaluation import wilson_interval
from tests.helpers import cut_after_checkpoint, load_script

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "point_obstacle.yaml")
train_script = load_script("train")
evaluate_script = load_script("evaluate")
collect_demos = load_script("collect_demos")

TINY = ["policy.expert.width=32", "policy.expert.depth=1", "policy.expert.num_heads=2",
        "policy.expert.time_embed_dim=32", "policy.device=cpu", "train.progress=false", "train.warmup_steps=2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "point"
    collect_demos.main(["--env", "fmpolicy/PointObstacle-v0", "--episodes", "8", "--num-envs", "8", "--out", str(out),
                        "--seed", "0", "--no-progress"])
    return out


def run_train(dataset: Path, out: Path, *overrides: str, resume: bool = False):
    argv = ["--config", CONFIG, f"data.root={dataset}", f"train.out_dir={out}", *TINY, *overrides]
    return train_script.main(argv + (["--resume"] if resume else []))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "policy" / "model.safetensors"))


def test_resume_gives_the_same_result_as_an_uninterrupted_run(dataset, tmp_path):
    common = ("train.steps=6", "train.save_every=3", "train.batch_size=16", "train.log_every=1", "policy.expert.dropout=0.1")
    run_train(dataset, tmp_path / "full", *common)
    # the same run, "killed" after its step-3 checkpoint: drop everything written after it
    cut = tmp_path / "cut"
    run_train(dataset, cut, *common)
    cut_after_checkpoint(cut, 3, 6)
    run_train(dataset, cut, *common, resume=True)
    full, resumed = weights(tmp_path / "full"), weights(cut)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # and training did change the weights (so the equality is not vacuous)
    first = load_file(str(cut / "checkpoints" / "step_00000003" / "policy" / "model.safetensors"))
    assert any(not torch.equal(first[k], full[k]) for k in full)
    log = [json.loads(line) for line in (cut / "log.jsonl").read_text().splitlines()]
    # the lines the killed run wrote after its checkpoint are dropped: every step is logged once,
    # with the values of the resumed run (equal to the uninterrupted run's, whose log it matches)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    full_log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == [r["loss"] for r in full_log]
    assert all(r["loss"] > 0 and r["lr"] > 0 for r in log)


def test_resume_refuses_a_checkpoint_of_another_model(dataset, tmp_path):
    run_train(dataset, tmp_path, "train.steps=2", "train.save_every=1")
    with pytest.raises(SystemExit, match=r"cannot resume with a different config.*expert\.width: saved 32, now 48"):
        run_train(dataset, tmp_path, "train.steps=2", "policy.expert.width=48", resume=True)
    (tmp_path / "checkpoints" / "step_00000002" / "training_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"training_state\.pt cannot be read"):
        run_train(dataset, tmp_path, "train.steps=2", resume=True)


def test_bad_training_input_is_reported(dataset, tmp_path):
    with pytest.raises(SystemExit, match=r"unknown key\(s\) \['stepz'\] in .*train"):
        run_train(dataset, tmp_path, "train.stepz=3")
    with pytest.raises(SystemExit, match=r"does not exist"):
        run_train(tmp_path / "nowhere", tmp_path / "run")
    with pytest.raises(SystemExit, match=r"policy\.state_dim = 5 does not match the dataset"):
        run_train(dataset, tmp_path / "run", "policy.state_dim=5")


def test_torchrun_two_gloo_processes_equal_one_process_with_the_combined_batch(dataset, tmp_path):
    common = ["--config", CONFIG, f"data.root={dataset}", *TINY, "train.steps=3", "train.batch_size=16",
              "train.ema_decay=0", "train.save_every=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # --standalone: a free port of its own (a fixed one clashes with another test run on the machine)
    ddp_run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(ROOT / "scripts" / "train.py"), *common, f"train.out_dir={tmp_path / 'ddp'}"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert ddp_run.returncode == 0, ddp_run.stderr[-3000:]
    run_train(dataset, tmp_path / "single", *common[4:], "train.ema_decay=0")
    ddp, single = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    # two half-batch gradients averaged against one full-batch gradient: float32 rounding, which 3 AdamW
    # steps carry into the weights (measured <= 4.5e-7 apart on three CPU kernel sets; allowed >= 1e-5)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=1e-5, rtol=1e-4, msg=k)
    # only rank 0 wrote (one log line), and each process took its half of the global batch
    log = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert len(log) == 1 and json.loads(log[0])["local_batch"] == 8


def test_the_mean_loss_is_logged_beside_the_total(dataset, tmp_path):
    run_train(dataset, tmp_path / "run", "train.steps=4", "train.log_every=2", "policy.flow.mean_loss_weight=0.5")
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:  # its share: at most the total over the weight (the CFM term is >= 0)
        assert 0 < 0.5 * r["mean_loss"] <= r["loss"]


def test_evaluate_script_reports_success_with_an_interval(dataset, tmp_path):
    run_train(dataset, tmp_path / "run", "train.steps=2")
    summary = evaluate_script.main(["--policy", str(tmp_path / "run" / "policy"), "--env", "fmpolicy/PointObstacle-v0",
                                    "--episodes", "6", "--num-envs", "3", "--device", "cpu", "--record", "2",
                                    "--render-size", "16", "--out", str(tmp_path / "eval")])
    assert summary["episodes"] == 6
    lo, hi = summary["ci95"]
    assert 0 <= lo <= summary["success_rate"] <= hi <= 1
    assert summary["mean_length"] > 0
    for name in ("eval.json", "trajectories.png", "frames.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["episodes"] == 6
    assert 0 <= saved["passed_above"] + saved["passed_below"] <= 1  # PointObstacle: which way round


def test_evaluation_reports_how_far_outside_the_imitation_data_the_states_lie(dataset, tmp_path, capsys):
    """`state_z_max`: per state entry, the largest |normalized state| the policy was given. A normalizer
    fitted on a dimension that barely varied (here: offset 5, spread 0.01) puts PointObstacle's states
    hundreds of its standard deviations out, and the script prints a warning naming the entries."""
    from fmpolicy import FlowPolicy
    from fmpolicy.evaluation import evaluate_policy

    run_train(dataset, tmp_path / "run", "train.steps=2")
    policy = FlowPolicy.from_pretrained(tmp_path / "run" / "policy", device="cpu")
    fitted = policy.state_normalizer
    envs = evaluate_script.make_envs("fmpolicy/PointObstacle-v0", 3, "cpu", 0, {})
    result = evaluate_policy(policy, envs, 3, seed=0, generator=torch.Generator().manual_seed(0))
    z_reset = np.abs((result.paths[:, 0] - fitted.offset.numpy()) / fitted.scale.numpy()).max(0)  # all given
    z_all = np.nanmax(np.abs((result.paths - fitted.offset.numpy()) / fitted.scale.numpy()), axis=(0, 1))
    assert len(result.state_z_max) == result.paths.shape[-1]
    assert np.all(np.array(result.state_z_max) >= z_reset * (1 - 1e-5))  # the reset states were given
    assert np.all(np.array(result.state_z_max) < 100) and z_all.max() < 100  # the fitted normalizer: inside
    plain = evaluate_script.main(["--policy", str(tmp_path / "run" / "policy"), "--env", "fmpolicy/PointObstacle-v0",
                                  "--episodes", "3", "--num-envs", "3", "--device", "cpu", "--out", str(tmp_path / "e1")])
    assert "warning" not in capsys.readouterr().out and len(plain["state_z_max"]) == result.paths.shape[-1]
    fitted.offset.fill_(5.0)
    fitted.scale.fill_(0.01)
    policy.save_pretrained(tmp_path / "narrow")
    narrow = evaluate_script.main(["--policy", str(tmp_path / "narrow"), "--env", "fmpolicy/PointObstacle-v0",
                                   "--episodes", "3", "--num-envs", "3", "--device", "cpu", "--out", str(tmp_path / "e2")])
    bound = np.abs(result.paths[:, 0]).max(0)  # |state| at the resets (the same seeds)
    assert np.all(np.array(narrow["state_z_max"]) >= (5 - bound) / 0.01 * (1 - 1e-5))
    out = capsys.readouterr().out
    entries = list(range(result.paths.shape[-1]))
    assert f"warning: in this evaluation observation.state entries {entries} reached up to" in out
    assert json.loads((tmp_path / "e2" / "eval.json").read_text())["state_z_max"] == narrow["state_z_max"]


def test_obstacle_sides_take_the_sign_of_y_where_the_path_first_reaches_the_obstacle():
    from fmpolicy.evaluation import EvalResult

    nan = float("nan")
    paths = np.array([
        [[-0.7, 0.0], [-0.2, 0.3], [0.1, 0.4], [0.4, -0.2]],  # above at x >= 0 (later below: not counted)
        [[-0.7, 0.0], [0.05, -0.3], [0.3, 0.1], [nan, nan]],  # below, then ended
        [[-0.7, 0.0], [-0.3, 0.1], [nan, nan], [nan, nan]],  # crashed before the obstacle: neither
        [[-0.7, 0.0], [-0.2, -0.4], [0.0, -0.35], [0.5, 0.0]],  # reaches x = 0 exactly: below
    ])
    result = EvalResult(episodes=4, successes=0, success_rate=0.0, ci95=(0.0, 0.0), mean_return=0.0,
                        mean_length=0.0, paths=paths)
    assert evaluate_script.obstacle_sides(result, "fmpolicy/PointObstacle-v0") == {"passed_above": 0.25,
                                                                                 "passed_below": 0.5}
    assert evaluate_script.obstacle_sides(result, "fmpolicy/Push-v0") is None


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(200, 200)
    assert hi == 1 and lo == pytest.approx(0.9812, abs=1e-4)


def test_one_policy_trains_on_a_mix_of_arm_sizes(tmp_path):
    roots = {}
    for n in (2, 3):
        roots[f"arm{n}"] = str(tmp_path / f"arm{n}")
        collect_demos.main(["--env", "fmpolicy/ArmReach-v0", "--episodes", "4", "--num-envs", "4", "--out",
                            roots[f"arm{n}"], "--env-kwargs", json.dumps({"n_links": n}), "--no-progress"])
    embodiments = "[{name: arm2, state_dim: 6, action_dim: 2}, {name: arm3, state_dim: 7, action_dim: 3}]"
    argv = ["--config", str(ROOT / "configs" / "arm_mix.yaml"), *TINY, "train.steps=3", "train.batch_size=8",
            f"train.out_dir={tmp_path / 'run'}", f"data.roots={json.dumps(roots)}", f"policy.embodiments={embodiments}",
            "policy.state_dim=7", "policy.action_dim=3"]
    policy = train_script.main(argv)
    assert policy.embodiments.names == ["arm2", "arm3"]
    # each robot's normalizer holds its own dataset's statistics
    for name in ("arm2", "arm3"):
        stats = json.loads((Path(roots[name]) / "meta" / "stats.json").read_text())["observation.state"]
        i = policy.embodiments.get(name)
        torch.testing.assert_close(policy.embodiments.state[i].offset, torch.tensor(stats["mean"]), atol=1e-5, rtol=0)
    for n in (2, 3):
        summary = evaluate_script.main(["--policy", str(tmp_path / "run" / "policy"), "--env", "fmpolicy/ArmReach-v0",
                                        "--env-kwargs", json.dumps({"n_links": n}), "--embodiment", f"arm{n}",
                                        "--episodes", "4", "--device", "cpu", "--render-size", "0",
                                        "--out", str(tmp_path / f"eval{n}")])
        assert summary["episodes"] == 4 and summary["embodiment"] == f"arm{n}"
    with pytest.raises(SystemExit, match=r"policy\.embodiments\[arm3\]\.state_dim = 8 does not match the dataset"):
        train_script.main(argv + ["policy.embodiments=[{name: arm2, state_dim: 6, action_dim: 2}, "
                                  "{name: arm3, state_dim: 8, action_dim: 3}]", "policy.state_dim=8"])


class _ConstantPolicy:
    """Drives every robot with one fixed action: enough to check the evaluation's bookkeeping."""

    def __init__(self, action):
        self.action = torch.tensor(action)
        self.config = type("C", (), {"n_action_steps": 4})()

    def eval(self):
        return self

    def predict_action_chunk(self, obs, generator=None):
        b = obs["observation.state"].shape[0]
        return self.action.expand(b, 4, 2)


def test_evaluation_counts_crashes_and_successes_on_the_ending_step():
    import fmpolicy_envs
    from fmpolicy.evaluation import evaluate_policy

    envs = fmpolicy_envs.PointObstacleVectorEnv(num_envs=8, seed=0)
    straight = evaluate_policy(_ConstantPolicy([1.0, 0.0]), envs, episodes=12, seed=0)
    # straight right from (-0.7, 0): every episode ends on the obstacle, none at the goal
    assert straight.successes == 0 and straight.flags["collision"] == 1.0
    assert straight.mean_length == pytest.approx(12.0, abs=1.5)  # 0.45 / 0.04 steps to the disk
    envs = fmpolicy_envs.PointObstacleVectorEnv(num_envs=8, seed=0, collision_terminates=False)
    stuck = evaluate_policy(_ConstantPolicy([1.0, 0.0]), envs, episodes=8, seed=0)
    assert stuck.successes == 0 and stuck.mean_length == envs.max_episode_steps  # pinned until the time limit


class _InstructedPolicy:
    """Goes round the obstacle to the goal its *instruction* names: a stand-in that reads obs["task"]."""

    config = type("C", (), {"n_action_steps": 1})()

    def eval(self):
        return self

    def predict_action_chunk(self, obs, generator=None):
        pos = obs["observation.state"][:, :2]
        sign = torch.tensor([1.0 if "red" in t else -1.0 for t in obs["task"]])
        goal = torch.stack([torch.full_like(sign, 0.7), 0.45 * sign], dim=-1)
        waypoint = torch.stack([torch.zeros_like(sign), 0.5 * sign], dim=-1)
        target = torch.where((pos[:, :1] < -0.05), waypoint, goal)
        step = (target - pos) / 0.04
        return (step / step.norm(dim=-1, keepdim=True).clamp_min(1.0))[:, None, :]


def test_swapped_instructions_are_followed_and_measured(tmp_path):
    import fmpolicy_envs

    evaluate = evaluate_script
    envs = fmpolicy_envs.PointObstacleVectorEnv(num_envs=10, seed=0, n_goals=2)
    from fmpolicy.evaluation import evaluate_policy

    plain = evaluate_policy(_InstructedPolicy(), envs, episodes=10, seed=0)
    assert plain.success_rate >= 0.9 and evaluate.instruction_followed(plain, envs) >= 0.9
    swapped = evaluate_policy(_InstructedPolicy(), envs, episodes=10, seed=0, task_map=evaluate.swap_words("red", "blue"))
    assert swapped.success_rate == 0.0  # it went to the other goal, as told
    assert evaluate.instruction_followed(swapped, envs) >= 0.9
    assert all(("red" in a) != ("red" in b) for a, b in zip(plain.tasks, swapped.tasks))


def test_a_frozen_encoder_is_cached_once_per_frame_with_the_same_result(tmp_path, capsys):
    data = tmp_path / "goals"
    collect_demos.main(["--env", "fmpolicy/PointObstacle-v0", "--episodes", "4", "--num-envs", "4", "--out", str(data),
                        "--env-kwargs", json.dumps({"n_goals": 2}), "--image-size", "16", "--no-progress"])
    common = ["--config", str(ROOT / "configs" / "point_goals_vl.yaml"), *TINY, f"data.root={data}",
              "policy.expert.prefix_dim=16", "policy.encoder.out_dim=16", "policy.encoder.image_size=16",
              "policy.encoder.freeze_vision=true", "policy.encoder.freeze_text=true", "train.steps=3",
              "train.batch_size=8", "train.ema_decay=0"]
    before = train_script.main(common + [f"train.out_dir={tmp_path / 'zero'}", "train.steps=1", "train.lr=1e-30"])
    capsys.readouterr()
    cached = train_script.main(common + [f"train.out_dir={tmp_path / 'cached'}"])
    assert "cached the frozen encoder's outputs" in capsys.readouterr().out
    fresh = train_script.main(common + [f"train.out_dir={tmp_path / 'fresh'}", "data.cache_encoder=false"])
    assert "cached the frozen encoder's outputs" not in capsys.readouterr().out
    a, b, init = cached.state_dict(), fresh.state_dict(), before.state_dict()
    for k in a:  # the cache changes where the backbone runs, not what training computes
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    head = {n for n, p in cached.encoder.named_parameters() if p.requires_grad}
    frozen = {n for n, p in cached.encoder.named_parameters() if not p.requires_grad}
    assert head and frozen
    assert any(not torch.allclose(a[f"encoder.{n}"], init[f"encoder.{n}"]) for n in head)  # the projections learn
    assert all(torch.equal(a[f"encoder.{n}"], init[f"encoder.{n}"]) for n in frozen)  # the towers do not


def test_zero_noise_evaluation_samples_the_flows_deterministic_chunks():
    import fmpolicy_envs
    from fmpolicy import FlowPolicy, NormalizationConfig, PolicyConfig, make_expert_config
    from fmpolicy.evaluation import evaluate_policy

    from .helpers import randomized

    cfg = PolicyConfig(state_dim=4, action_dim=2, chunk_size=8, n_action_steps=4, device="cpu",
                       expert=make_expert_config("tiny"),
                       normalization=NormalizationConfig(state="identity", action="identity"))
    policy = FlowPolicy(cfg)
    randomized(policy.net, 0, scale=0.1)

    def run(**kwargs):
        envs = fmpolicy_envs.PointObstacleVectorEnv(num_envs=4, seed=0)
        return evaluate_policy(policy.eval(), envs, episodes=4, seed=0, **kwargs).final_states

    zero = [run(zero_noise=True, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    np.testing.assert_array_equal(zero[0], zero[1])  # the generator is not used
    by_hand = run(act=lambda q: policy.predict_action_chunk(q, noise=torch.zeros(4, 8, policy.config.expert.max_action_dim)),
                  n_action_steps=4)
    np.testing.assert_allclose(zero[0], by_hand, atol=1e-6)
    noisy = [run(generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert np.abs(noisy[0] - noisy[1]).max() > 1e-3  # random noise does move the episodes
    with pytest.raises(ValueError, match="zero_noise"):
        run(act=lambda q: None, n_action_steps=4, zero_noise=True)


def test_evaluation_integrates_with_the_sampler_it_is_given(dataset, tmp_path):
    """`sampler=` (and `--sampler METHOD[:STEPS]`) replaces the policy's own integration: the episodes
    equal a run whose chunks are sampled by hand with that sampler, and differ from the default's."""
    import fmpolicy_envs
    from fmpolicy import FlowPolicy, NormalizationConfig, PolicyConfig, SamplerConfig, make_expert_config
    from fmpolicy.evaluation import evaluate_policy

    from .helpers import randomized

    cfg = PolicyConfig(state_dim=4, action_dim=2, chunk_size=8, n_action_steps=4, device="cpu",
                       expert=make_expert_config("tiny"), sampler=SamplerConfig(method="euler", num_steps=2),
                       normalization=NormalizationConfig(state="identity", action="identity"))
    policy = FlowPolicy(cfg)
    randomized(policy.net, 0, scale=0.1)
    rk4 = SamplerConfig(method="rk4", num_steps=7)
    noise = torch.zeros(4, 8, policy.config.expert.max_action_dim)

    def run(**kwargs):
        envs = fmpolicy_envs.PointObstacleVectorEnv(num_envs=4, seed=0)
        return np.nan_to_num(evaluate_policy(policy.eval(), envs, episodes=4, seed=0, **kwargs).paths, nan=9.0)

    given = run(zero_noise=True, sampler=rk4)
    by_hand = run(act=lambda q: policy.predict_action_chunk(q, noise=noise, sampler=rk4), n_action_steps=4)
    np.testing.assert_allclose(given, by_hand, atol=1e-6)
    assert np.abs(given - run(zero_noise=True)).max() > 1e-4  # every state of every episode: 2 Euler steps differ from rk4
    with pytest.raises(ValueError, match="sampler"):
        run(act=lambda q: None, n_action_steps=4, sampler=rk4)

    run_train(dataset, tmp_path / "run", "train.steps=2")
    args = ["--policy", str(tmp_path / "run" / "policy"), "--env", "fmpolicy/PointObstacle-v0", "--episodes", "2",
            "--num-envs", "2", "--device", "cpu", "--render-size", "0", "--out", str(tmp_path / "eval")]
    summary = evaluate_script.main(args + ["--sampler", "midpoint:3"])
    assert summary["sampler"]["method"] == "midpoint" and summary["sampler"]["num_steps"] == 3
    for bad, words in (("euler:x", "not an int"), ("leapfrog:3", "leapfrog")):
        with pytest.raises(SystemExit, match=words):
            evaluate_script.main(args + ["--sampler", bad])
