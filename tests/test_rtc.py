"""Real-time chunking: the prefix weights, the guidance weight, inpainting on a flow whose velocity is
known in closed form, and the policy-level entry point."""

from __future__ import annotations

import math

import pytest
import torch

from fmpolicy import FlowPolicy, NormalizationConfig, PolicyConfig, make_expert_config
from fmpolicy.errors import InputError
from fmpolicy.rtc import PrefixGuidedVelocity, guidance_weight, prefix_weights, sample_chunk_rtc
from fmpolicy.sampling import sample_ode
from tests.helpers import randomized

MU, SIGMA = 0.0, 0.5


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact marginal velocity E[a - noise | x_t = x] of the linear path when every action entry is
    N(MU, SIGMA^2), independently: x_t ~ N(t MU, t^2 SIGMA^2 + (1 - t)^2)."""
    t, x = t[:, None, None].double(), x.double()
    var = t**2 * SIGMA**2 + (1 - t) ** 2
    centred = x - t * MU
    return ((MU + t * SIGMA**2 / var * centred) - (1 - t) / var * centred).float()


def test_prefix_weights_are_one_then_decay_then_zero():
    w = prefix_weights(inference_delay=2, execution_horizon=7, chunk_size=10)
    assert w[:2].tolist() == [1.0, 1.0] and w[7:].tolist() == [0.0, 0.0, 0.0]
    ramp = torch.linspace(1, 0, 7)[1:-1]
    torch.testing.assert_close(w[2:7], ramp * torch.expm1(ramp) / (math.e - 1))
    assert torch.all(w[1:7] <= w[:6])  # never increases
    torch.testing.assert_close(prefix_weights(2, 7, 10, "linear")[2:7], ramp)
    assert prefix_weights(3, 20, 10)[:3].tolist() == [1.0] * 3 and prefix_weights(0, 0, 5).sum() == 0
    with pytest.raises(InputError, match="schedule"):
        prefix_weights(1, 2, 3, "cosine")


def test_the_guidance_weight_is_the_papers_and_clipped_at_the_ends():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    w = guidance_weight(t, max_weight=5.0)
    # (1 - t) / (t r^2), r^2 = (1 - t)^2 / (t^2 + (1 - t)^2): at 0.5 it is 2, at 0.25 it is 10/3
    torch.testing.assert_close(w, torch.tensor([5.0, 10 / 3, 2.0, 5.0], dtype=torch.float64))


def test_guidance_inpaints_the_committed_prefix_and_leaves_unguided_positions_alone():
    """Independent Gaussian entries: guiding positions 0-2 must not move positions 6-9 at all."""
    b, h, a = 512, 10, 2
    noise = torch.randn(b, h, a, generator=torch.Generator().manual_seed(0))
    target = torch.full((b, h, a), 1.0)  # two prior standard deviations away
    plain = sample_ode(gaussian_velocity, noise, method="euler", num_steps=10).x1
    weights = prefix_weights(inference_delay=3, execution_horizon=6, chunk_size=h)
    errors = {}
    for beta in (1.0, 5.0, 20.0):
        guided = sample_ode(PrefixGuidedVelocity(gaussian_velocity, target, weights, beta), noise,
                            method="euler", num_steps=10).x1
        errors[beta] = float((guided[:, :3] - 1.0).abs().mean())
        assert torch.equal(guided[:, 6:], plain[:, 6:])
        # the decaying positions move part of the way
        assert 0.0 < float(guided[:, 3:6].mean()) < float(guided[:, :3].mean())
    unguided = float((plain[:, :3] - 1.0).abs().mean())  # ~1: the prior knows nothing of the target
    assert errors[5.0] < 0.2 * unguided and errors[20.0] < errors[5.0] < errors[1.0] < unguided


def make_policy() -> FlowPolicy:
    cfg = PolicyConfig(state_dim=3, action_dim=2, chunk_size=8, n_action_steps=4, device="cpu",
                       expert=make_expert_config("tiny"), normalization=NormalizationConfig(state="identity",
                                                                                              action="mean_std"))
    policy = FlowPolicy(cfg)
    randomized(policy.net, 0)
    g = torch.Generator().manual_seed(1)
    policy.fit_normalization(torch.randn(32, 3, generator=g), 2.0 + torch.randn(32, 8, 2, generator=g))
    return policy.eval()


def test_the_policy_entry_point_without_weights_is_plain_sampling_and_checks_its_input():
    policy = make_policy()
    obs = {"observation.state": torch.randn(4, 3, generator=torch.Generator().manual_seed(2))}
    noise = policy.sample_noise(4, torch.Generator().manual_seed(3))
    plain = policy.predict_action_chunk(obs, noise=noise)
    leftover = plain[:, 4:]
    same = sample_chunk_rtc(policy, obs, leftover, inference_delay=0, execution_horizon=0, noise=noise)
    assert torch.equal(same, plain)
    guided = sample_chunk_rtc(policy, obs, leftover + 1.0, inference_delay=2, noise=noise)
    assert guided.shape == plain.shape and torch.isfinite(guided).all() and not torch.equal(guided, plain)
    with pytest.raises(InputError, match="leftover has shape"):
        sample_chunk_rtc(policy, obs, leftover[:, :, :1], inference_delay=1)
    with pytest.raises(InputError, match="inference_delay = 5"):
        sample_chunk_rtc(policy, obs, leftover, inference_delay=5)


def test_the_functional_vector_jacobian_product_guides_as_autograd_does():
    """`functional=True` (torch.func.vjp, what torch.compile traces) gives autograd's guided velocity: the
    same operations, so in float64 the same numbers (float32 differs in the last bits between the two
    backward kernels, amplified by this random expert's large Jacobian)."""
    net = make_policy().net.double()
    g = torch.Generator().manual_seed(4)
    cache = net.encode(torch.randn(3, net.config.max_state_dim, generator=g, dtype=torch.float64))
    x = torch.randn(3, 8, net.config.max_action_dim, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    target, weights = torch.randn(x.shape, generator=g, dtype=torch.float64), prefix_weights(2, 6, 8).double()

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net.velocity(x, t, cache)

    with torch.no_grad():
        plain = velocity(x, t)
        by_autograd = PrefixGuidedVelocity(velocity, target, weights)(x, t)
        by_func = PrefixGuidedVelocity(velocity, target, weights, functional=True)(x, t)
    torch.testing.assert_close(by_func, by_autograd, rtol=1e-12, atol=1e-12)
    assert (by_autograd - plain).abs().max() > 0.1  # the correction is there to compare
    assert not by_func.requires_grad
