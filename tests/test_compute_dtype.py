"""An action expert computing in bfloat16 around float32 normalization, noise, time and integration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmpolicy import ConfigError
from fmpolicy.cuda_graphs import GraphedSolver
from fmpolicy.rtc import sample_chunk_rtc
from fmpolicy.scripting import load_script

bench = load_script("bench", Path(__file__).resolve().parents[1] / "scripts")


def make_case(preset: str = "tiny", batch: int = 3, device: str = "cpu"):
    """scripts/bench.py's policy (modulation layers given small random weights, so that time, state and
    prefix reach the chunk) with an observation and two noises."""
    policy = bench.make_policy(preset, torch.device(device), seed=0)
    obs = bench.make_obs(policy, batch, 16, torch.Generator().manual_seed(0), ragged=True)
    noises = [policy.sample_noise(batch, torch.Generator(device=device).manual_seed(s)) for s in (1, 2)]
    return policy, obs, noises


@pytest.mark.parametrize("preset", ["tiny", "mlp"])
def test_a_bf16_expert_samples_the_float32_chunks_to_bf16_rounding(preset):
    if preset == "mlp":  # the MLP preset has no prefix: the bench observation's prefix is left out
        policy = bench.make_policy("mlp", torch.device("cpu"), seed=0, prefix_dim=0)
        torch.manual_seed(0)
        with torch.no_grad():  # outputs of order 1, as a trained policy's
            for p in policy.net.parameters():
                p.normal_(0.0, 0.5 / max(1, p.shape[-1]) ** 0.5)
        obs = {"observation.state": torch.randn(3, bench.STATE_DIM, generator=torch.Generator().manual_seed(0))}
        noises = [policy.sample_noise(3, torch.Generator().manual_seed(s)) for s in (1, 2)]
    else:
        policy, obs, noises = make_case(preset)
    full = [policy.predict_action_chunk(obs, noise=n) for n in noises]
    policy.set_compute_dtype(torch.bfloat16)
    assert policy.compute_dtype == torch.bfloat16 and policy.dtype == torch.float32
    assert all(b.dtype == torch.float32 for b in policy.embodiments.buffers() if b.is_floating_point())
    half = [policy.predict_action_chunk(obs, noise=n) for n in noises]
    assert all(h.dtype == torch.float32 for h in half)
    scale = float(full[0].abs().max())
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.002 per operation): measured 0.2% of the
    # chunk's scale after 10 steps; 3% leaves room across CPUs while another noise moves it by ~100%
    for f, h in zip(full, half):
        assert float((h - f).abs().max()) < 0.03 * scale
    assert float((full[0] - full[1]).abs().max()) > 0.3 * scale
    # FPO's per-pair CFM losses run through the same casts
    b, m = 3, 4
    g = torch.Generator().manual_seed(3)
    t, noise = torch.rand(b, m, generator=g), torch.randn(b, m, policy.config.chunk_size, policy.config.action_dim, generator=g)
    losses_half = policy.compute_cfm_losses(obs, full[0], t, noise)
    losses_full = policy.set_compute_dtype(torch.float32).compute_cfm_losses(obs, full[0], t, noise)
    assert losses_half.dtype == torch.float32
    torch.testing.assert_close(losses_half, losses_full, rtol=0.05, atol=1e-3)


def test_rtc_and_graph_bookkeeping_work_with_a_bf16_expert():
    policy, obs, (noise, _) = make_case()
    leftover = policy.predict_action_chunk(obs, noise=noise)[:, 2:]
    full = sample_chunk_rtc(policy, obs, leftover, inference_delay=2, noise=noise)
    policy.set_compute_dtype(torch.bfloat16)
    half = sample_chunk_rtc(policy, obs, leftover, inference_delay=2, noise=noise)  # guidance backpropagates through the casts
    assert float((half - full).abs().max()) < 0.03 * float(full.abs().max())
    eager = policy.predict_action_chunk(obs, noise=noise)
    policy._graphs = GraphedSolver(policy.net, backend="eager")
    torch.testing.assert_close(policy.predict_action_chunk(obs, noise=noise), eager, rtol=1e-3, atol=1e-3)
    assert len(policy._graphs) == 1
    policy.set_compute_dtype(torch.float32)  # new weights' memory: the graphs are dropped
    assert len(policy._graphs) == 0


def test_unsupported_compute_dtypes_are_clear_errors():
    policy, _, _ = make_case()
    for dtype in (torch.float64, torch.int8):
        with pytest.raises(ConfigError, match=f"dtype = {dtype} is not supported"):
            policy.set_compute_dtype(dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_with_cuda_graphs_on_the_gpu_samples_the_float32_chunks():
    policy, obs, (noise, _) = make_case("cpu", device="cuda")
    full = policy.predict_action_chunk(obs, noise=noise)
    policy.set_compute_dtype(torch.bfloat16).enable_cuda_graphs()
    replayed = [policy.predict_action_chunk(obs, noise=noise) for _ in range(2)]
    assert policy._graphs.captures == 1 and torch.equal(replayed[0], replayed[1])
    assert float((replayed[0] - full).abs().max()) < 0.03 * float(full.abs().max())
