"""Chunk execution under latency: the queue's aggregations, the threaded runner, the latency
simulation and its script."""

from __future__ import annotations

import json
import math
import threading
import time

import gymnasium as gym
import pytest
import torch

from fmpolicy import FlowPolicy, NormalizationConfig, PolicyConfig, make_expert_config
from fmpolicy.control import AsyncChunkRunner, ChunkQueue, run_with_latency
from fmpolicy.errors import InputError
from tests.helpers import load_script, randomized


def chunk_of(value: float, h: int = 4) -> torch.Tensor:
    """(1, h, 1): position j holds value + j."""
    return (value + torch.arange(h, dtype=torch.float32))[None, :, None]


def test_the_queue_takes_the_latest_chunk_or_averages_or_ensembles_with_acts_weights():
    for aggregation, expected in (("latest", 100.0 + 1), ("average", (2 + 101) / 2)):
        q = ChunkQueue(aggregation)
        q.add(chunk_of(0.0), start=0)
        q.add(chunk_of(100.0), start=1)
        assert float(q.action(2)) == expected  # step 2: position 2 of the first, 1 of the second
    q = ChunkQueue("ensemble", ensemble_m=0.5)
    q.add(chunk_of(0.0), 0)
    q.add(chunk_of(100.0), 1)
    w0, w1 = 1.0, math.exp(-0.5)  # the oldest chunk weighs most (ACT)
    assert float(q.action(2)) == pytest.approx((w0 * 2 + w1 * 101) / (w0 + w1), rel=1e-6)
    assert float(q.action(4)) == 103.0  # only the second chunk reaches step 4; the first is dropped
    assert len(q.chunks) == 1 and q.leftover(4).flatten().tolist() == [103.0]
    with pytest.raises(InputError, match="no chunk plans an action for control step 9"):
        q.action(9)


def test_the_async_runner_asks_early_and_skips_positions_that_passed_meanwhile():
    calls = []

    def predict(obs):  # a chunk planned from `obs` (the step it was taken at): position j -> obs + j
        calls.append(obs)
        time.sleep(0.05)  # the robot keeps acting meanwhile
        return chunk_of(float(obs), h=6)

    runner = AsyncChunkRunner(predict, n_action_steps=4, threshold=2)
    executed = []
    for step in range(12):
        executed.append(float(runner.act(step)))
        time.sleep(0.03 if step % 4 != 3 else 0.06)
    # requests at the steps with 2 of 4 actions left; every executed action is the one planned for its
    # step (chunk position = step - request step), whichever chunk it came from
    assert calls[:3] == [0, 2, 6] or calls[:2] == [0, 2]
    assert executed == [float(s) for s in range(12)]
    with pytest.raises(InputError, match="threshold"):
        AsyncChunkRunner(predict, n_action_steps=4, threshold=4)


def test_the_async_runner_reports_an_inference_error_in_the_control_loop():
    def predict(obs):
        if obs > 0:
            raise RuntimeError("the server went away")
        return chunk_of(0.0, h=4)

    runner = AsyncChunkRunner(predict, n_action_steps=4, threshold=1)
    with pytest.raises(RuntimeError, match="went away"):
        for step in range(8):
            runner.act(step)
            time.sleep(0.01)


def test_the_async_runner_sets_torchs_threads_for_predict_only():
    """`threads` applies to predict on the worker thread; the control loop's thread keeps its setting,
    and torch's default is restored after each chunk."""
    seen = []

    def predict(obs):
        seen.append(torch.get_num_threads())
        return policy.predict_action_chunk(obs)

    policy = point_policy()
    obs = {"observation.state": torch.zeros(1, 4)}
    main_threads = torch.get_num_threads()
    want = main_threads + 1  # differs from the default on any machine
    runner = AsyncChunkRunner(predict, n_action_steps=4, threshold=1, threads=want)
    for _ in range(6):
        assert runner.act(obs).shape == (1, 2)
    runner.wait()
    assert seen and set(seen) == {want}
    assert torch.get_num_threads() == main_threads
    after = []
    t = threading.Thread(target=lambda: after.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert after == [main_threads]  # a thread started later gets torch's default back
    unset = []
    AsyncChunkRunner(lambda o: unset.append(torch.get_num_threads()) or chunk_of(0.0, h=4), 4).act(0)
    assert unset == [main_threads]  # None: torch as it is
    for bad in (0, 1.5, True):
        with pytest.raises(InputError, match="threads"):
            AsyncChunkRunner(predict, n_action_steps=4, threads=bad)


def point_policy() -> FlowPolicy:
    cfg = PolicyConfig(state_dim=4, action_dim=2, chunk_size=8, n_action_steps=4, device="cpu",
                       expert=make_expert_config("tiny"),
                       normalization=NormalizationConfig(state="identity", action="identity"))
    policy = FlowPolicy(cfg)
    randomized(policy.net, 0, scale=0.1)
    return policy.eval()


@pytest.mark.parametrize("mode, delay", [("sync", 0), ("latest", 2), ("ensemble", 2), ("rtc", 2),
                                         ("latest", 4), ("rtc", 4)])
def test_the_latency_simulation_plays_every_mode_and_measures_jerk(mode, delay):
    """delay 4 = n_action_steps: the next inference starts as soon as a chunk starts."""
    import fmpolicy_envs  # noqa: F401

    envs = gym.make_vec("fmpolicy/PointObstacle-v0", num_envs=8, vectorization_mode="vector_entry_point")
    r = run_with_latency(point_policy(), envs, mode, delay=delay, seed=3, generator=torch.Generator().manual_seed(0),
                         max_steps=24)
    assert r.episodes == 8 and 0.0 <= r.success_rate <= 1.0
    assert math.isfinite(r.boundary_jerk_mean) and r.boundary_jerk_max >= r.boundary_jerk_mean >= 0


def test_the_latency_script_writes_its_table(tmp_path):
    point_policy().save_pretrained(tmp_path / "policy")
    rows = load_script("latency_experiment").main(["--policy", str(tmp_path / "policy"), "--delays", "1",
                                                   "--envs", "4", "--out", str(tmp_path / "out"),
                                                   "--timing-repeats", "2"])
    assert [r["mode"] for r in rows] == ["sync", "latest", "ensemble", "rtc"]
    saved = json.loads((tmp_path / "out" / "latency.json").read_text())
    assert saved["rows"] == rows and [c["batch"] for c in saved["rtc_cost"]] == [1, 4]


def test_threads_do_not_leak():
    assert all(t.name != "fmpolicy-chunk" or not t.is_alive() for t in threading.enumerate())


def test_the_latency_simulation_gives_an_instruction_following_policy_its_instruction(tmp_path):
    """Two-goal PointObstacle names its goal only in info["task"]: the simulation passes it as the policy's
    `task` (it used to stop with 'the batch is missing the key task'), and the latency script times RTC
    on such a policy too."""
    import fmpolicy_envs  # noqa: F401

    from tests.test_rl_vl import IMAGE, save_vl_policy, vl_encoder

    path = save_vl_policy(tmp_path / "policy", vl_encoder())
    policy = FlowPolicy.from_pretrained(path).eval()
    seen = []
    encode = policy.encode

    def spy(obs, *args, **kwargs):
        seen.extend(obs["task"])
        return encode(obs, *args, **kwargs)

    policy.encode = spy
    envs = gym.make_vec("fmpolicy/PointObstacle-v0", num_envs=4, vectorization_mode="vector_entry_point",
                        n_goals=2, image_size=IMAGE)
    r = run_with_latency(policy, envs, "rtc", delay=1, seed=3, generator=torch.Generator().manual_seed(0),
                         max_steps=8)
    assert r.episodes == 4 and math.isfinite(r.boundary_jerk_mean)
    assert seen and set(seen) <= {"go to the red goal", "go to the blue goal"}
    rows = load_script("latency_experiment").main(["--policy", path, "--env-kwargs",
                                                   json.dumps({"n_goals": 2, "image_size": IMAGE}), "--delays", "1",
                                                   "--modes", "sync,rtc", "--envs", "2", "--out", str(tmp_path / "out"),
                                                   "--timing-repeats", "1"])
    assert [r["mode"] for r in rows] == ["sync", "rtc"]


def test_jerk_counts_the_actions_the_env_executes_not_how_far_outside_its_box_they_were_asked():
    """A policy that alternates +5 / -5 on both entries: PointObstacle clips to [-1, 1]^2, so every step
    moves by |(2, 2)| = 2.83, not by the asked |(10, 10)| = 14.1."""
    import fmpolicy_envs  # noqa: F401

    class Alternating:
        config = type("Config", (), {"n_action_steps": 2})()

        def predict_action_chunk(self, obs, generator=None, **kwargs):
            b = obs["observation.state"].shape[0]
            return torch.tensor([5.0, -5.0, 5.0, -5.0])[None, :, None].expand(b, 4, 2).clone()

    envs = gym.make_vec("fmpolicy/PointObstacle-v0", num_envs=3, vectorization_mode="vector_entry_point")
    r = run_with_latency(Alternating(), envs, "sync", delay=0, seed=0, max_steps=6)
    assert r.step_jerk_mean == pytest.approx(2 * math.sqrt(2), rel=1e-6)
    assert r.boundary_jerk_max == pytest.approx(2 * math.sqrt(2), rel=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_evaluation_can_execute_fewer_or_more_steps_of_each_chunk_than_the_policy_was_trained_with(k):
    """evaluate_policy(n_action_steps=k) on a policy with 4: a new chunk every k steps (PointObstacle's
    100-step episodes: 100 / k samplings in a round where no episode ends early), each step playing its
    chunk's position step % k; k outside [1, chunk_size] is an error naming the field."""
    import fmpolicy_envs  # noqa: F401

    from fmpolicy.evaluation import evaluate_policy

    policy = point_policy()
    calls = []
    plain = policy.predict_action_chunk

    def still(obs, **kwargs):  # chunk position j moves by 0 (the robot stands still: no episode ends early)
        calls.append(1)
        chunk = plain(obs, **kwargs)
        return torch.zeros_like(chunk)

    policy.predict_action_chunk = still
    envs = gym.make_vec("fmpolicy/PointObstacle-v0", num_envs=2, vectorization_mode="vector_entry_point")
    r = evaluate_policy(policy, envs, 2, seed=0, n_action_steps=k)
    assert r.mean_length == 100 and len(calls) == math.ceil(100 / k)
    with pytest.raises(InputError, match="n_action_steps = 9: expected an int in \\[1, chunk_size = 8\\]"):
        evaluate_policy(policy, envs, 2, n_action_steps=9)


class LoggedEnvs:
    """A vector env that records the actions it is given (everything else passes through)."""

    def __init__(self, envs):
        self.envs, self.actions = envs, []

    def step(self, action):
        self.actions.append(torch.as_tensor(action).clone())
        return self.envs.step(action)

    def __getattr__(self, name):
        return getattr(self.envs, name)


def test_evaluation_with_an_inference_delay_runs_each_chunk_from_its_step_d_sampled_d_steps_early():
    """evaluate_policy(inference_delay=2), 4 steps a chunk: the first chunk runs from its step 0; every
    later one is sampled 2 steps before the previous one runs out and runs from its step 2."""
    import fmpolicy_envs  # noqa: F401

    from fmpolicy.evaluation import evaluate_policy

    envs = LoggedEnvs(gym.make_vec("fmpolicy/PointObstacle-v0", num_envs=2, vectorization_mode="vector_entry_point"))
    sampled_at = []

    class Coded:  # chunk position j of the i-th sampling = 1e-3 (10 i + j): the robot barely moves
        config = type("Config", (), {"n_action_steps": 4, "chunk_size": 6})()

        def eval(self):
            return self

        def predict_action_chunk(self, obs, generator=None, **kwargs):
            i = len(sampled_at)
            sampled_at.append(len(envs.actions))  # the control step whose observation it reads
            h = self.config.chunk_size
            return (1e-3 * (10 * i + torch.arange(float(h))))[None, :, None].expand(2, h, 2).clone()

    evaluate_policy(Coded(), envs, 2, seed=0, inference_delay=2, flag_keys=())
    codes = [round(float(a[0, 0]) * 1e3) for a in envs.actions[:12]]
    assert codes == [0, 1, 2, 3, 12, 13, 14, 15, 22, 23, 24, 25]
    assert sampled_at[:3] == [0, 2, 6]
    with pytest.raises(InputError, match="inference_delay = 5: expected an int in \\[0, n_action_steps = 4\\]"):
        evaluate_policy(Coded(), envs, 2, inference_delay=5)
    Coded.config.chunk_size = 5  # 4 steps from step 2 need 6
    with pytest.raises(InputError, match="fewer than n_action_steps \\+ inference_delay = 6"):
        evaluate_policy(Coded(), envs, 2, inference_delay=2, flag_keys=())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("delay", [1, 2, 4])
def test_evaluation_with_an_inference_delay_executes_what_the_latency_simulation_executes(delay):
    """The same policy, noise stream and start states: evaluate_policy(inference_delay=d) and
    run_with_latency's 'latest' mode (docs/serving.md) send the env the same actions, step for step."""
    import fmpolicy_envs  # noqa: F401

    from fmpolicy.evaluation import evaluate_policy

    runs = []
    for evaluate in (True, False):
        envs = LoggedEnvs(gym.make_vec("fmpolicy/PointObstacle-v0", num_envs=4, vectorization_mode="vector_entry_point",
                                       max_episode_steps=30))
        g = torch.Generator().manual_seed(1)
        if evaluate:
            r = evaluate_policy(point_policy(), envs, 4, seed=3, generator=g, inference_delay=delay, flag_keys=())
            success = r.success_rate
        else:
            success = run_with_latency(point_policy(), envs, "latest", delay=delay, seed=3, generator=g).success_rate
        runs.append((torch.stack(envs.actions), success))
    (a, sa), (b, sb) = runs
    assert a.shape == b.shape and a.shape[0] > 8
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sa == sb
