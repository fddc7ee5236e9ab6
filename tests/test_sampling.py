"""Samplers against an analytic field: the marginal flow between N(0, I) and N(mu, sigma^2 I).

With x_t = t x1 + (1 - t) x0, x0 ~ N(0, I), x1 ~ N(mu, sigma^2 I) independent, the marginal x_t is
N(t mu, s_t^2 I) with s_t^2 = t^2 sigma^2 + (1 - t)^2, and the marginal velocity field is

    u(x, t) = mu + (t sigma^2 - (1 - t)) / s_t^2 * (x - t mu),

whose flow carries x0 to exactly mu + sigma x0 at t = 1. (On this field the midpoint rule happens to
converge at order 3, a cancellation of its leading error term, so the *order* test uses a generic
non-linear field with a closed form, the logistic equation with a time-varying rate:
x' = c(t) x (1 - x), c(t) = 3 (1 + t), x(1) = 1 / (1 + (1 - x0) / x0 * exp(-4.5)).)
"""

from __future__ import annotations

import math

import pytest
import torch

from fmpolicy.sampling import integrate_divergence, sample_noise, sample_ode

MU, SIGMA = 2.0, 0.5


def gaussian_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    assert t.shape == (x.shape[0],), "the sampler must hand the network a per-sample time (b,)"
    t = t.reshape(-1, *([1] * (x.dim() - 1)))
    s2 = t**2 * SIGMA**2 + (1 - t) ** 2
    return MU + (t * SIGMA**2 - (1 - t)) / s2 * (x - t * MU)


def exact(x0: torch.Tensor) -> torch.Tensor:
    return MU + SIGMA * x0


def logistic_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 3.0 * (1.0 + t[:, None]) * x * (1.0 - x)


def logistic_exact(x0: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + (1.0 - x0) / x0 * math.exp(-4.5))


def error(field, exact_fn, method: str, steps: int, x0: torch.Tensor) -> float:
    x1 = sample_ode(field, x0, method=method, num_steps=steps).x1
    return (x1 - exact_fn(x0)).abs().max().item()


@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_samplers_converge_at_their_order(method, order):
    x0 = 0.05 + 0.9 * torch.rand(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = [error(logistic_field, logistic_exact, method, k, x0) for k in (16, 32, 64)]
    rates = [math.log2(e1 / e2) for e1, e2 in zip(errors, errors[1:])]
    # the observed order over the last doublings is the theoretical one
    assert abs(rates[-1] - order) < 0.2, (errors, rates)
    assert abs(rates[-2] - order) < 0.35, (errors, rates)


def test_every_sampler_converges_on_the_gaussian_marginal_field():
    x0 = sample_noise((64, 3, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for method in ("euler", "midpoint", "rk4"):
        errors = [error(gaussian_field, exact, method, k, x0) for k in (4, 8, 16, 32)]
        assert all(e2 < e1 / 1.8 for e1, e2 in zip(errors, errors[1:])), (method, errors)
    # at equal step count, a higher order is more accurate
    e = {m: error(gaussian_field, exact, m, 10, x0) for m in ("euler", "midpoint", "rk4")}
    assert e["rk4"] < e["midpoint"] < e["euler"] < 0.3


def test_dopri5_matches_the_exact_solution_to_its_tolerance():
    x0 = sample_noise((32, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for tol in (1e-4, 1e-8):
        res = sample_ode(gaussian_field, x0, method="dopri5", atol=tol, rtol=tol)
        err = (res.x1 - exact(x0)).abs().max().item()
        assert err < 10 * tol * (1 + exact(x0).abs().max().item())
    # a tighter tolerance costs more evaluations
    loose = sample_ode(gaussian_field, x0, method="dopri5", atol=1e-3, rtol=1e-3).nfe
    tight = sample_ode(gaussian_field, x0, method="dopri5", atol=1e-9, rtol=1e-9).nfe
    assert tight > loose


@pytest.mark.parametrize("method, per_step", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_evaluation_count_and_trajectory(method, per_step):
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = sample_ode(gaussian_field, x0, method=method, num_steps=7, return_trajectory=True)
    assert res.nfe == 7 * per_step
    assert res.trajectory.shape == (8, 5, 3)
    torch.testing.assert_close(res.times, torch.linspace(0, 1, 8, dtype=torch.float64))
    assert torch.equal(res.trajectory[0], x0)
    assert torch.equal(res.trajectory[-1], res.x1)
    # the trajectory follows the exact flow x_t = t mu + s_t x0 at every grid point (loosely for euler)
    s_t = torch.sqrt(res.times**2 * SIGMA**2 + (1 - res.times) ** 2)
    exact_path = res.times[:, None, None] * MU + s_t[:, None, None] * x0
    assert (res.trajectory - exact_path).abs().max() < 0.2


def test_euler_is_the_plain_loop():
    # 3 Euler steps of dt = 1/3 by hand
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = x0.clone()
    for i in range(3):
        t = torch.full((4,), i / 3, dtype=torch.float64)
        x = x + gaussian_field(x, t) / 3
    torch.testing.assert_close(sample_ode(gaussian_field, x0, method="euler", num_steps=3).x1, x)


def test_sampling_is_deterministic_under_a_seeded_generator():
    a = sample_noise((8, 4, 2), generator=torch.Generator().manual_seed(5))
    b = sample_noise((8, 4, 2), generator=torch.Generator().manual_seed(5))
    c = sample_noise((8, 4, 2), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    ya = sample_ode(gaussian_field, a, method="midpoint", num_steps=5).x1
    yb = sample_ode(gaussian_field, b, method="midpoint", num_steps=5).x1
    assert torch.equal(ya, yb)


def test_bad_sampler_arguments_are_rejected():
    x0 = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="heun"):
        sample_ode(gaussian_field, x0, method="heun")
    with pytest.raises(ValueError, match="num_steps"):
        sample_ode(gaussian_field, x0, num_steps=0)


# ---- the divergence integral (entropy of a flow's samples) ----------------------------------------


def test_divergence_integral_converges_to_the_exact_log_det_at_first_order():
    # the Gaussian field carries x0 to mu + sigma x0: log p1(x1) = log p0(x0) - D log sigma, so the
    # divergence integral along every path is D log sigma (here D = 6 entries of a (b, 2, 3) chunk)
    x0 = torch.randn(8, 2, 3, generator=torch.Generator().manual_seed(0))
    want = 6 * math.log(SIGMA)
    errors = []
    for steps in (16, 32, 64, 128):
        x1, div = integrate_divergence(gaussian_field, x0, steps)
        assert div.shape == (8,) and torch.allclose(div, div[0].expand(8), atol=1e-4)  # the same for every path
        errors.append(abs(float(div[0]) - want))
    assert torch.allclose(x1, MU + SIGMA * x0, atol=0.05)  # the path is the sampler's Euler path
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(0.85 < p < 1.15 for p in orders), (errors, orders)
    assert errors[-1] < 0.06  # measured 0.047 at 128 steps


def test_divergence_is_differentiable_in_the_field_parameters():
    # v = a x: the integral is D a exactly, whatever the step count; its gradient in a is D
    a = torch.tensor(0.3, requires_grad=True)
    _, div = integrate_divergence(lambda x, t: a * x, torch.randn(4, 1, 2), 5)
    div.mean().backward()
    assert float(div[0].detach()) == pytest.approx(0.6, abs=1e-6) and float(a.grad) == pytest.approx(2.0, abs=1e-5)


def test_hutchinson_estimate_is_unbiased_and_masking_drops_entries():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(4, 4, generator=gen)
    linear = lambda x, t: x @ A.T  # noqa: E731  (divergence tr(A) everywhere)
    x0 = torch.randn(40_000, 4, generator=gen)
    probe = torch.randint(0, 2, x0.shape, generator=gen).float() * 2 - 1
    _, div = integrate_divergence(linear, x0, 1, probe=probe, exact_max_dim=2)
    assert float(div.mean()) == pytest.approx(float(torch.trace(A)), abs=4 * float(div.std()) / 200)
    _, exact = integrate_divergence(linear, x0[:3], 1)  # 4 entries: exact
    assert torch.allclose(exact, torch.trace(A).expand(3), atol=1e-5)
    valid = torch.tensor([True, False, True, False]).expand(3, 4)
    _, masked = integrate_divergence(linear, x0[:3], 1, valid=valid)
    assert torch.allclose(masked, (A[0, 0] + A[2, 2]).expand(3), atol=1e-5)
    with pytest.raises(ValueError, match="pass a probe"):
        integrate_divergence(linear, x0[:3], 1, exact_max_dim=2)


def test_euler_log_det_is_the_exact_log_volume_change_of_the_euler_map_at_any_step_count():
    # v = c(t) x with c(t) = (sigma - 1) / (1 + t (sigma - 1)) (the straight path x_t = (1 + t (sigma - 1)) x0):
    # each Euler step multiplies x by (1 + t_{k+1} (sigma - 1)) / (1 + t_k (sigma - 1)), so the Euler map
    # is x0 -> sigma x0 at any step count and its log-volume change is D log sigma exactly
    scaling = lambda x, t: ((SIGMA - 1) / (1 + t * (SIGMA - 1)))[:, None, None] * x  # noqa: E731
    x0 = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    x1, first_order = integrate_divergence(scaling, x0, 3)
    _, log_det = integrate_divergence(scaling, x0, 3, euler_log_det=True)
    assert torch.allclose(x1, SIGMA * x0, atol=1e-6)
    assert torch.allclose(log_det, torch.full((5,), 6 * math.log(SIGMA)), atol=1e-5)
    assert (first_order - 6 * math.log(SIGMA)).abs().min() > 0.3  # the first-order sum is far off at 3 steps
    # a non-linear field in 2-D: against the determinant of the Euler map's Jacobian by autograd
    W = torch.tensor([[0.5, -1.2], [0.8, 0.3]])
    field = lambda x, t: torch.tanh(x @ W.T) * (1 + t[:, None])  # noqa: E731

    def euler(x):
        for k in range(4):
            x = x + 0.25 * field(x, torch.full((x.shape[0],), k * 0.25))
        return x

    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    _, log_det = integrate_divergence(field, x0, 4, euler_log_det=True)
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda x: euler(x[None])[0], x0[i])
        assert float(log_det[i].detach()) == pytest.approx(float(torch.linalg.slogdet(J).logabsdet), abs=1e-5)
