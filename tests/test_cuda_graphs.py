"""CUDA-graph sampling: the captured fixed-grid solve, its bookkeeping (on CPU), and the graphs (on CUDA)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fmpolicy import ConfigError
from fmpolicy.cuda_graphs import GraphedSolver, solve_expert
from fmpolicy.sampling import NFE_PER_STEP, fixed_grid, sample_ode, solve_fixed_grid, stage_times
from tests.test_policy import DP, S, make_obs, make_policy

METHODS = tuple(NFE_PER_STEP)
CUDA = torch.cuda.is_available()


def ragged_obs(b: int, p: int, seed: int) -> dict:
    """b observations with p prefix tokens each, the last sample's prefix half masked."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, p, dtype=torch.bool)
    mask[-1, p // 2:] = False
    return {"observation.state": torch.randn(b, S, generator=g), "observation.prefix": torch.randn(b, p, DP, generator=g),
            "observation.prefix_mask": mask}


@pytest.mark.parametrize("method", METHODS)
def test_the_capturable_solve_takes_torchdiffeqs_steps(method):
    # float64 and a nonlinear, time-dependent field: the same operations in the same order agree to
    # rounding (1e-12), while a wrong stage weight or stage time moves x1 by far more than that
    def velocity(x, t):
        return torch.sin(3.0 * x) * (1.0 + t[:, None, None]) - x * t[:, None, None] ** 2

    x0 = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (1, 3, 10):
        ours = solve_fixed_grid(velocity, x0, method, steps)
        ref = sample_ode(velocity, x0, method=method, num_steps=steps).x1
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    # and it converges at the method's order: the error against a fine rk4 solve shrinks by ~2^order
    exact = solve_fixed_grid(velocity, x0, "rk4", 512)
    errors = [float((solve_fixed_grid(velocity, x0, method, n) - exact).abs().max()) for n in (16, 32)]
    order = {"euler": 1, "midpoint": 2, "rk4": 4}[method]
    assert math.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.35)


def test_the_capturable_solve_rejects_adaptive_methods_and_bad_step_counts():
    x0 = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="dopri5.*fixed grid"):
        solve_fixed_grid(lambda x, t: x, x0, "dopri5", 10)
    with pytest.raises(ValueError, match="num_steps = 0"):
        solve_fixed_grid(lambda x, t: x, x0, "euler", 0)


@pytest.mark.parametrize("method", METHODS)
def test_the_expert_solve_reads_the_time_table_in_call_order(method):
    # float64: the time conditioning of every evaluation time from one projection, each step reading its
    # row, against the network computing it at each step: equal to rounding (1e-10), while a row read
    # for another stage's time moves x1 by far more
    policy = make_policy().eval().to(torch.float64)
    cache = policy.encode({k: v.double() if v.is_floating_point() else v for k, v in ragged_obs(3, 5, 0).items()})
    x0 = policy.sample_noise(3, torch.Generator().manual_seed(2)).double()
    valid = policy.action_valid
    per_step = solve_fixed_grid(lambda x, t: policy.net.velocity(x, t, cache, valid), x0, method, 4)
    table = solve_expert(policy.net, x0, valid, cache, method, 4)
    torch.testing.assert_close(table, per_step, rtol=0, atol=1e-10)
    times = stage_times(method, fixed_grid(4, x0))
    assert len(times) == 4 * NFE_PER_STEP[method] and times[0] == 0
    shifted = policy.net.time_conditioning(times.roll(1))
    assert max(float((a - b).abs().max()) for a, b in zip(shifted, policy.net.time_conditioning(times))) > 0.1


def eager_graphs(policy, max_graphs: int = 8) -> GraphedSolver:
    """The graph bookkeeping without CUDA: static inputs copied in, the solve re-run on them."""
    policy._graphs = GraphedSolver(policy.net, max_graphs, backend="eager")
    return policy._graphs


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_static_inputs_are_refreshed_and_outputs_are_never_shared(kind):
    policy = make_policy(kind).eval()
    obs_a, obs_b = make_obs(4, seed=1), make_obs(4, seed=2)
    noise_a, noise_b = (policy.sample_noise(4, torch.Generator().manual_seed(s)) for s in (3, 4))
    want_a = policy.predict_action_chunk(obs_a, noise=noise_a)
    want_b = policy.predict_action_chunk(obs_b, noise=noise_b)
    graphs = eager_graphs(policy)
    got_a = policy.predict_action_chunk(obs_a, noise=noise_a)
    kept_a = got_a.clone()
    got_b = policy.predict_action_chunk(obs_b, noise=noise_b)  # same signature: the same static tensors
    assert graphs.captures == 1 and len(graphs) == 1
    # float32, 10 Euler steps, our loop against odeint's: the same operations up to rounding (the time
    # conditioning of all steps in one projection: test_the_expert_solve_reads_the_time_table_in_call_order)
    torch.testing.assert_close(got_a, want_a, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got_b, want_b, rtol=1e-3, atol=1e-3)
    assert torch.equal(got_a, kept_a)  # the second call did not overwrite the first chunk
    assert (want_a - want_b).abs().max() > 0.1  # the two observations give different chunks
    got_a.add_(100.0)  # nor does writing into a returned chunk reach the next one
    torch.testing.assert_close(policy.predict_action_chunk(obs_a, noise=noise_a), want_a, rtol=1e-3, atol=1e-3)


def test_a_new_batch_size_or_prefix_length_captures_again_and_old_graphs_are_dropped():
    policy = make_policy().eval()
    graphs = eager_graphs(policy, max_graphs=2)
    for b, p in ((1, 5), (3, 5), (3, 7)):
        obs = ragged_obs(b, p, seed=b + p)
        noise = policy.sample_noise(b, torch.Generator().manual_seed(0))
        want = policy.disable_cuda_graphs().predict_action_chunk(obs, noise=noise)
        policy._graphs = graphs
        # the solve computes the time conditioning of all its steps in one projection, odeint's loop one
        # per step: float32 rounding that this random expert (weights ~0.3) amplifies to ~2e-4 relative
        torch.testing.assert_close(policy.predict_action_chunk(obs, noise=noise), want, rtol=1e-3, atol=1e-3)
    assert graphs.captures == 3 and len(graphs) == 2  # the least recently used (batch 1) was dropped
    policy.predict_action_chunk(ragged_obs(1, 5, seed=0))
    assert graphs.captures == 4
    # the other fixed-grid methods and step counts are signatures of their own; dopri5 and
    # trajectories run eagerly, as does a policy in train mode
    from fmpolicy import SamplerConfig

    obs, noise = ragged_obs(1, 5, seed=0), policy.sample_noise(1, torch.Generator().manual_seed(1))
    for sampler in (SamplerConfig(method="rk4", num_steps=3), SamplerConfig(method="midpoint", num_steps=4)):
        r = policy.sample_chunk(obs, noise=noise, sampler=sampler)
        assert r.nfe == NFE_PER_STEP[sampler.method] * sampler.num_steps
    assert graphs.captures == 6
    policy.sample_chunk(obs, noise=noise, sampler=SamplerConfig(method="dopri5"))
    policy.sample_chunk(obs, noise=noise, return_trajectory=True)
    policy.train().sample_chunk(obs, noise=noise)
    assert graphs.captures == 6


def test_enabling_graphs_without_cuda_is_a_clear_error_and_copies_get_their_own_network():
    policy = make_policy().eval()
    if not CUDA:
        with pytest.raises(ConfigError, match="device 'cpu'.*CUDA graphs need a CUDA device"):
            policy.enable_cuda_graphs()
    with pytest.raises(ValueError, match="backend = 'tpu'"):
        GraphedSolver(policy.net, backend="tpu")
    with pytest.raises(ValueError, match="max_graphs = 0"):
        GraphedSolver(policy.net, max_graphs=0)
    with pytest.raises(ValueError, match="dopri5.*cannot be captured"):
        GraphedSolver(policy.net).solve(policy.encode(make_obs(1)), None, torch.zeros(1, 6, 2), "dopri5", 5)
    graphs = eager_graphs(policy)
    policy.predict_action_chunk(make_obs(2))
    twin = copy.deepcopy(policy)
    assert twin._graphs is not graphs and twin._graphs.net is twin.net and len(twin._graphs) == 0
    policy.to(torch.float64)  # moving or converting the weights drops every graph
    assert len(graphs) == 0


def test_weights_updated_in_place_are_seen_by_the_next_solve():
    policy = make_policy().eval()
    obs, noise = make_obs(2), policy.sample_noise(2, torch.Generator().manual_seed(0))
    graphs = eager_graphs(policy)
    before = policy.predict_action_chunk(obs, noise=noise)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.mul_(1.1)
    after = policy.predict_action_chunk(obs, noise=noise)
    assert graphs.captures == 1 and (after - before).abs().max() > 0.1
    torch.testing.assert_close(after, policy.disable_cuda_graphs().predict_action_chunk(obs, noise=noise),
                               rtol=1e-3, atol=1e-3)  # float32 rounding, as above


# ---- on a GPU: the graphs themselves ----------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["transformer", "mlp"])
@pytest.mark.parametrize("method", METHODS)
def test_graph_replays_give_the_eager_chunks_on_cuda(kind, method):
    from fmpolicy import SamplerConfig

    policy = make_policy(kind).to("cuda").eval()
    sampler = SamplerConfig(method=method, num_steps=5)
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = [(ragged_obs(b, 5, seed=b + 10 * i), policy.sample_noise(b, g)) for b in (1, 3) for i in range(2)]
    want = [policy.predict_action_chunk(o, noise=n, sampler=sampler) for o, n in cases]
    policy.enable_cuda_graphs()
    got = [policy.predict_action_chunk(o, noise=n, sampler=sampler) for o, n in cases]
    assert policy._graphs.captures == 2  # batch 1 and batch 3
    for a, b in zip(got, want):
        # float32 on a GPU: kernels may differ from the eager run's (TF32 is off by default for fp32
        # matmuls; cuBLAS may still pick another algorithm inside a capture): relative 1e-4
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (want[0] - want[1]).abs().max() > 0.1  # the replays of one graph gave different chunks
    with torch.no_grad():  # an in-place update reaches the next replay
        for p in policy.net.parameters():
            p.mul_(0.9)
    o, n = cases[0]
    replayed = policy.predict_action_chunk(o, noise=n, sampler=sampler)
    eager = policy.disable_cuda_graphs().predict_action_chunk(o, noise=n, sampler=sampler)
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
    assert (replayed - want[0]).abs().max() > 1e-3
