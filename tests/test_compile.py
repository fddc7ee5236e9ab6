"""Compiled sampling (the expert step, the whole solve): the same chunks as the eager expert, to float rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from fmpolicy import FlowPolicy, NormalizationConfig, PolicyConfig, SamplerConfig, make_expert_config
from tests.helpers import randomized
from tests.test_policy import make_obs, make_policy


def test_a_compiled_expert_samples_the_chunks_of_the_eager_one_and_saves_the_same(tmp_path):
    cfg = PolicyConfig(state_dim=3, action_dim=2, chunk_size=4, n_action_steps=2, device="cpu",
                       expert=make_expert_config("tiny", prefix_dim=16),
                       normalization=NormalizationConfig(state="identity", action="identity"))
    policy = FlowPolicy(cfg)
    randomized(policy.net, 0)
    policy.eval()
    g = torch.Generator().manual_seed(0)
    obs = {"observation.state": torch.randn(2, 3, generator=g), "observation.prefix": torch.randn(2, 5, 16, generator=g),
           "observation.prefix_mask": torch.tensor([[True] * 5, [True, True, False, False, False]])}
    noise = policy.sample_noise(2, g)
    eager = policy.predict_action_chunk(obs, noise=noise)
    policy.compile_velocity()
    compiled = policy.predict_action_chunk(obs, noise=noise)
    # fused float32 kernels sum in another order: relative 1e-4 after 10 steps leaves 100x headroom over
    # the differences measured (~1e-6); a wrong mask or time input moves the chunk by O(1)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert not torch.equal(policy.predict_action_chunk(obs, noise=noise + 1.0), compiled)
    policy.save_pretrained(tmp_path / "p")
    again = FlowPolicy.from_pretrained(tmp_path / "p", device="cpu").eval()
    assert torch.equal(again.predict_action_chunk(obs, noise=noise), eager)


def solve_calls(policy) -> list:
    """Record the calls that reach the compiled whole solve (what dispatches to it, and what not)."""
    calls, solve = [], policy._compiled_solve.solve

    def counting(*args, **kwargs):
        calls.append(args[3])  # the method
        return solve(*args, **kwargs)

    policy._compiled_solve.solve = counting
    return calls


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_the_compiled_whole_solve_samples_the_eager_chunks_and_sees_weight_updates(kind):
    policy = make_policy(kind).eval()
    obs = make_obs(3, seed=2)  # the last sample's prefix half masked
    noise = policy.sample_noise(3, torch.Generator().manual_seed(5))
    samplers = {"euler": None, "rk4": SamplerConfig(method="rk4", num_steps=3)}
    eager = {m: policy.predict_action_chunk(obs, noise=noise, sampler=s) for m, s in samplers.items()}
    calls = solve_calls(policy.compile_solve())
    methods = ["euler", "rk4"] if kind == "transformer" else ["euler"]  # each compiles: ~10-20 s
    for method in methods:
        sampler = samplers[method]
        # float32 fused kernels against odeint's loop. This random expert (every weight ~0.3) amplifies
        # rounding: the compiled step (compile_velocity) and the compiled solve both land 5e-4 relative
        # from eager on rk4's entries of ~15 (measured, equal to each other); a wrong stage, time or mask
        # moves the chunk by O(1)
        torch.testing.assert_close(policy.predict_action_chunk(obs, noise=noise, sampler=sampler), eager[method],
                                   rtol=2e-3, atol=2e-3)
    assert calls == methods
    assert (eager["euler"] - eager["rk4"]).abs().max() > 0.5  # the methods differ by far more than the tolerance
    # weights changed in place (an optimizer step, load_state_dict) reach the next compiled chunk
    with torch.no_grad():
        for p in policy.net.parameters():
            p.mul_(1.2)
    compiled = policy.predict_action_chunk(obs, noise=noise)
    policy._compiled_solve = None
    updated = policy.predict_action_chunk(obs, noise=noise)
    assert (updated - eager["euler"]).abs().max() > 0.1
    torch.testing.assert_close(compiled, updated, rtol=2e-3, atol=2e-3)


def test_the_compiled_solve_leaves_training_adaptive_methods_and_trajectories_eager_and_copies_apart():
    policy = make_policy().compile_solve()
    obs, noise = make_obs(2), policy.sample_noise(2, torch.Generator().manual_seed(0))
    calls = solve_calls(policy)
    policy.train()
    policy.sample_chunk(obs, noise=noise)
    policy.eval()
    policy.sample_chunk(obs, noise=noise, sampler=SamplerConfig(method="dopri5", num_steps=4))
    assert policy.sample_chunk(obs, noise=noise, return_trajectory=True).trajectory is not None
    assert calls == []
    # a deep copy compiles its own solve of its own weights: changing the copy leaves the original be
    twin = copy.deepcopy(policy)
    assert twin._compiled_solve.net is twin.net and twin._compiled_solve.net is not policy.net
    before = policy.predict_action_chunk(obs, noise=noise)
    with torch.no_grad():
        twin.net.action_out.bias.add_(1.0)
    assert (twin.predict_action_chunk(obs, noise=noise) - before).abs().max() > 0.1
    torch.testing.assert_close(policy.predict_action_chunk(obs, noise=noise), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dopri5.*whole solve"):
        policy._compiled_solve.solve(policy.encode(obs), None, noise, "dopri5", 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_compiled_whole_solve_samples_the_eager_chunks_on_cuda():
    policy = make_policy().to("cuda").eval()
    obs = {k: v.to("cuda") for k, v in make_obs(3, seed=2).items()}
    noise = policy.sample_noise(3, torch.Generator(device="cuda").manual_seed(5))
    eager = policy.predict_action_chunk(obs, noise=noise)
    calls = solve_calls(policy.compile_solve())
    compiled = policy.predict_action_chunk(obs, noise=noise)
    assert calls == ["euler"]
    torch.testing.assert_close(compiled, eager, rtol=2e-3, atol=2e-3)  # as on CPU (TF32 stays off for fp32)
    assert (policy.predict_action_chunk(obs, noise=noise + 1.0) - compiled).abs().max() > 0.1


def test_prepare_inference_sets_the_speed_options_in_order_and_names_a_bad_one():
    from fmpolicy import ConfigError

    policy = make_policy().prepare_inference(compile="solve", bf16=True)
    assert policy._compiled_solve is not None and policy._compiled_solve.net is policy.net
    assert policy.compute_dtype == torch.bfloat16 and policy.dtype == torch.float32  # chunks stay float32
    assert "velocity" in make_policy().prepare_inference(compile="step").net.__dict__  # the compiled step
    assert "velocity" not in policy.net.__dict__
    with pytest.raises(ConfigError, match="compile = 'fast' is invalid"):
        make_policy().prepare_inference(compile="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
            make_policy().prepare_inference(cuda_graphs=True)


def test_the_compiled_whole_solve_runs_rtc_s_guided_solve_and_cuda_graphs_leave_it_to_it():
    """RTC's guided solve (a vector-Jacobian product at every step) compiled as one graph: the eager
    guided chunks to float rounding; with CUDA graphs on too (their bookkeeping on the eager backend), a
    guided solve still goes to the compiled solver, never to a graph of the unguided solve."""
    from fmpolicy.cuda_graphs import GraphedSolver
    from fmpolicy.rtc import sample_chunk_rtc

    policy = make_policy().eval()
    with torch.no_grad():  # tamer weights: at full scale this random expert's Jacobian is so large that
        for p in policy.net.parameters():  # the guided solve is chaotic (float rounding -> chunks apart by O(10))
            p.mul_(0.5)
    obs = make_obs(3, seed=2)  # the last sample's prefix half masked
    noise = policy.sample_noise(3, torch.Generator().manual_seed(5))
    plain = policy.predict_action_chunk(obs, noise=noise)
    leftover = plain[:, 3:] + 2.0  # a previous plan the fresh chunk must be pulled towards
    eager = sample_chunk_rtc(policy, obs, leftover, inference_delay=2, noise=noise)
    policy.compile_solve()
    calls, guided = [], policy._compiled_solve.solve_guided

    def counting(*args, **kwargs):
        calls.append(args[3])
        return guided(*args, **kwargs)

    policy._compiled_solve.solve_guided = counting
    compiled = sample_chunk_rtc(policy, obs, leftover, inference_delay=2, noise=noise)
    assert calls == ["euler"]
    # as the unguided solve above: fused float32 kernels (1e-5 measured between the eager guided solves
    # with and without the time table); a dropped or mis-signed correction moves the guided positions by O(1)
    torch.testing.assert_close(compiled, eager, rtol=2e-3, atol=2e-3)
    gap = (plain[:, :2] - leftover[:, :2]).abs().mean()  # ~7 here: the unguided chunk ignores the leftover
    assert (compiled[:, :2] - leftover[:, :2]).abs().mean() < 0.2 * gap
    policy._graphs = GraphedSolver(policy.net, backend="eager")
    again = sample_chunk_rtc(policy, obs, leftover, inference_delay=2, noise=noise)
    assert calls == ["euler", "euler"] and policy._graphs.captures == 0
    torch.testing.assert_close(again, compiled, rtol=0, atol=0)
