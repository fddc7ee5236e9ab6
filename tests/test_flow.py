"""The flow math: path, target velocity, time samplers, masked CFM loss."""

from __future__ import annotations

import math

import pytest
import torch

from fmpolicy.flow import (
    compute_cfm_loss,
    interpolate,
    make_valid_mask,
    sample_time,
    target_velocity,
)


def test_path_runs_from_noise_at_t0_to_action_at_t1():
    g = torch.Generator().manual_seed(0)
    action, noise = torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, 2, generator=g)
    assert torch.equal(interpolate(action, noise, torch.zeros(3)), noise)
    assert torch.equal(interpolate(action, noise, torch.ones(3)), action)
    # the path's time derivative is the target velocity, for every t (finite difference)
    t, dt = torch.tensor([0.1, 0.5, 0.9]), 1e-3
    fd = (interpolate(action, noise, t + dt) - interpolate(action, noise, t)) / dt
    torch.testing.assert_close(fd, target_velocity(action, noise), atol=1e-3, rtol=1e-3)


def test_loss_equals_hand_computation():
    # one sample, chunk of 2 steps, action width 2 of a padded width 3; second step padded
    action = torch.tensor([[[1.0, 2.0, 0.0], [5.0, 5.0, 0.0]]])
    noise = torch.tensor([[[0.5, -1.0, 7.0], [0.0, 0.0, 0.0]]])
    v = torch.tensor([[[0.0, 1.0, 9.0], [3.0, 3.0, 3.0]]])
    is_pad = torch.tensor([[False, True]])
    valid = make_valid_mask(is_pad, 1, 2, action_dim=2, max_action_dim=3)
    # target on the valid entries: (1 - 0.5, 2 + 1) = (0.5, 3); errors (0 - 0.5)^2, (1 - 3)^2
    expected = ((0.0 - 0.5) ** 2 + (1.0 - 3.0) ** 2) / 2
    loss = compute_cfm_loss(v, action, noise, valid)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected)
    # without a mask every entry counts
    full = ((v - (action - noise)) ** 2).mean().item()
    assert compute_cfm_loss(v, action, noise).item() == pytest.approx(full)


def test_the_huber_cfm_loss_is_the_squared_error_below_delta_and_linear_beyond():
    # FPO++'s Huber error (fpo.huber_delta): e^2 for |e| <= d, 2 d |e| - d^2 beyond; one sample, 4 entries,
    # the last one masked
    action, noise = torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)
    v = torch.tensor([[[0.3, -0.5], [-2.0, 9.0]]], requires_grad=True)
    valid = torch.tensor([[[True, True], [True, False]]])
    d = 0.5
    expected = (0.3**2 + 0.5**2 + (2 * d * 2.0 - d**2)) / 3
    loss = compute_cfm_loss(v, action, noise, valid, huber_delta=d)
    assert loss.item() == pytest.approx(expected)
    (grad,) = torch.autograd.grad(loss.sum(), v)
    # slope 2e inside, 2d sign(e) outside (the far entry pulls no harder than one at the threshold); masked: 0
    torch.testing.assert_close(grad, torch.tensor([[[0.6, -1.0], [-1.0, 0.0]]]) / 3)
    # a delta above every error gives the squared error exactly
    torch.testing.assert_close(compute_cfm_loss(v, action, noise, valid, huber_delta=100.0),
                               compute_cfm_loss(v, action, noise, valid))


def test_masked_entries_change_neither_loss_nor_gradient():
    g = torch.Generator().manual_seed(1)
    b, h, a, amax = 4, 5, 3, 6
    action, noise = torch.randn(b, h, amax, generator=g), torch.randn(b, h, amax, generator=g)
    is_pad = torch.zeros(b, h, dtype=torch.bool)
    is_pad[0, 3:] = True
    is_pad[2, 1:] = True
    valid = make_valid_mask(is_pad, b, h, a, amax)
    v = torch.randn(b, h, amax, generator=g, requires_grad=True)
    loss = compute_cfm_loss(v, action, noise, valid)
    (grad,) = torch.autograd.grad(loss.sum(), v)

    # garbage (even huge values) in the masked entries of every input
    junk = torch.randn(b, h, amax, generator=g) * 1e6
    v2 = torch.where(valid, v.detach(), junk).requires_grad_(True)
    action2, noise2 = torch.where(valid, action, -junk), torch.where(valid, noise, junk)
    loss2 = compute_cfm_loss(v2, action2, noise2, valid)
    (grad2,) = torch.autograd.grad(loss2.sum(), v2)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(grad2, grad)
    assert torch.all(grad2[~valid] == 0)
    # and the valid entries do matter (so that this test can fail)
    v3 = v.detach().clone()
    v3[0, 0, 0] += 1.0
    assert compute_cfm_loss(v3, action, noise, valid)[0] != loss[0]


def test_sample_with_every_step_padded_has_zero_loss_not_nan():
    valid = make_valid_mask(torch.ones(2, 3, dtype=torch.bool), 2, 3, 2, 4)
    v = torch.randn(2, 3, 4, requires_grad=True)
    loss = compute_cfm_loss(v, torch.randn(2, 3, 4), torch.randn(2, 3, 4), valid)
    assert torch.equal(loss.detach(), torch.zeros(2))
    loss.sum().backward()
    assert torch.isfinite(v.grad).all()


def _ks_distance(samples: torch.Tensor, cdf) -> float:
    x, _ = torch.sort(samples.double())
    n = x.numel()
    emp_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    emp_lo = torch.arange(0, n, dtype=torch.float64) / n
    f = cdf(x)
    return max((emp_hi - f).abs().max().item(), (f - emp_lo).abs().max().item())


@pytest.mark.parametrize(
    "mode, cdf",
    [
        ("uniform", lambda x: x.clamp(0, 1)),
        # pi0's beta: s ~ Beta(1.5, 1) has CDF s^1.5; t = 1 - 0.999 s  =>  P(t <= x) = 1 - ((1 - x) / 0.999)^1.5
        ("beta", lambda x: 1 - ((1 - x) / 0.999).clamp(0, 1) ** 1.5),
        # logit-normal(0, 1): P(t <= x) = Phi(logit(x))
        ("logit_normal", lambda x: 0.5 * (1 + torch.erf(torch.log(x / (1 - x)) / math.sqrt(2)))),
    ],
)
def test_time_samplers_follow_their_distribution(mode, cdf):
    n = 20000
    t = sample_time(n, mode, generator=torch.Generator().manual_seed(3))
    assert t.shape == (n,) and t.min() >= 0 and t.max() <= 1
    # Kolmogorov-Smirnov: the 99.9% critical value at n = 20000 is 1.95 / sqrt(n) = 0.0138
    assert _ks_distance(t, cdf) < 1.95 / math.sqrt(n)


def test_beta_sampler_puts_its_mass_on_the_noisy_end_and_is_seeded():
    t = sample_time(10000, "beta", generator=torch.Generator().manual_seed(4))
    assert (t < 0.5).float().mean() > 0.6  # P(t < 0.5) = 1 - (0.5 / 0.999)^1.5 = 0.646
    assert t.max() <= 1 - 0.001 + 1e-6
    again = sample_time(10000, "beta", generator=torch.Generator().manual_seed(4))
    assert torch.equal(t, again)


def test_unknown_time_sampling_is_rejected():
    with pytest.raises(ValueError, match="gaussian"):
        sample_time(4, "gaussian")
