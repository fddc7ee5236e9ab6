"""RL math: GAE against a hand computation with truncation, FPO ratio, the clipped surrogate."""

from __future__ import annotations

import pytest
import torch

from fmpolicy.rl.gae import compute_gae
from fmpolicy.rl.objectives import (
    compute_clipped_surrogate,
    compute_policy_surrogate,
    compute_fpo_log_ratio,
    explained_variance,
    straight_through_clamp,
)


def test_gae_matches_a_hand_computation_with_termination_and_truncation():
    g, lam = 0.9, 0.8
    # one environment, 4 steps: step 1 terminates, step 3 is truncated (time limit)
    r = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    v = torch.tensor([[0.5], [0.6], [0.7], [0.8]])
    term = torch.tensor([[False], [True], [False], [False]])
    trunc = torch.tensor([[False], [False], [False], [True]])
    final_v = torch.tensor([[0.0], [0.0], [0.0], [10.0]])  # V(state reached at the time limit)
    next_v = torch.tensor([99.0])  # value after the last step: a new episode, must not leak in
    adv, ret = compute_gae(r, v, term, trunc, next_v, final_v, gamma=g, lam=lam)
    d3 = 4.0 + g * 10.0 - 0.8  # truncated: bootstrap from the final state, not from next_v
    d2 = 3.0 + g * 0.8 - 0.7
    d1 = 2.0 - 0.6  # terminated: no future
    d0 = 1.0 + g * 0.6 - 0.5
    a3, a2 = d3, d2 + g * lam * d3
    a1 = d1
    a0 = d0 + g * lam * a1
    torch.testing.assert_close(adv[:, 0], torch.tensor([a0, a1, a2, a3]))
    torch.testing.assert_close(ret, adv + v)


def test_gae_bootstraps_from_the_next_value_in_the_middle_of_an_episode():
    r, v = torch.ones(3, 2), torch.zeros(3, 2)
    no = torch.zeros(3, 2, dtype=torch.bool)
    adv, _ = compute_gae(r, v, no, no, torch.tensor([5.0, 0.0]), gamma=0.5, lam=1.0)
    # lambda = 1: discounted sum of rewards + discounted bootstrap
    torch.testing.assert_close(adv[0], torch.tensor([1 + 0.5 + 0.25 + 0.125 * 5, 1.75]))


def test_fpo_ratio_is_exactly_one_when_the_policy_has_not_moved():
    old = torch.rand(16, 8) * 3
    for mode in ("mean", "per_pair"):
        log_ratio = compute_fpo_log_ratio(old, old.clone().requires_grad_(True), mode=mode,
                                          clamp_old=1.0, clamp_log_ratio=0.5)
        assert torch.equal(log_ratio.exp().detach(), torch.ones_like(log_ratio))


def test_a_pair_above_the_old_loss_cap_gets_no_gradient_the_clip_could_not_stop():
    # per-pair ratios; pair 0 below the cap of 2, pair 1 above it (old 5, new 6: its ratio reads 1)
    old = torch.tensor([[1.0, 5.0]])
    new = torch.tensor([[1.0, 6.0]], requires_grad=True)
    log_ratio = compute_fpo_log_ratio(old, new, mode="per_pair", clamp_old=2.0)
    assert torch.equal(log_ratio.detach(), torch.tensor([[0.0, 0.0]]))
    # a negative advantage on both: PPO's surrogate would push both losses up; the capped pair's ratio
    # never leaves the clip range, so only a zero gradient keeps its loss from growing without bound
    compute_clipped_surrogate(log_ratio.exp(), torch.tensor([[-1.0, -1.0]]), 0.05).sum().backward()
    assert new.grad[0, 0] != 0 and new.grad[0, 1] == 0


def test_fpo_ratio_rises_where_the_new_loss_falls():
    old = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    new = torch.tensor([[0.5, 1.5], [1.2, 1.4]], requires_grad=True)
    log_ratio = compute_fpo_log_ratio(old, new)
    torch.testing.assert_close(log_ratio.detach(), torch.tensor([0.5, -0.3]))
    log_ratio.sum().backward()
    torch.testing.assert_close(new.grad, torch.full((2, 2), -0.5))  # d mean(old - new) / d new = -1/m
    with pytest.raises(ValueError, match="geometric"):
        compute_fpo_log_ratio(old, new, mode="geometric")


def test_straight_through_clamp_bounds_values_but_keeps_the_gradient():
    x = torch.tensor([-3.0, 0.2, 4.0], requires_grad=True)
    y = straight_through_clamp(x, -1.0, 1.0)
    assert torch.equal(y.detach(), torch.tensor([-1.0, 0.2, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_clipped_surrogate_gradient_vanishes_outside_the_clip_range_as_ppo():
    clip = 0.2
    ratio = torch.tensor([0.7, 0.95, 1.1, 1.5, 0.7, 1.5], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0])
    loss = compute_clipped_surrogate(ratio, adv, clip)
    loss.sum().backward()
    # A > 0: clipped above 1 + c (no push further up); A < 0: clipped below 1 - c
    expected = torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(ratio.grad, expected)
    torch.testing.assert_close(loss.detach(), torch.tensor([-0.7, -0.95, -1.1, -1.2, 0.8, 1.5]))


def test_aspo_is_ppo_for_good_actions_and_pulls_bad_ones_back_into_the_trust_region():
    clip = 0.2
    ratio = torch.tensor([0.7, 1.5, 0.5, 0.9, 1.1], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -2.0, -2.0, -2.0])
    loss = compute_policy_surrogate(ratio, adv, clip, "aspo")
    loss.sum().backward()
    # A >= 0: PPO's clipped gradient (-A inside, 0 above 1 + c). A < 0: d/dr [-(r A - |A|/(2c)(r-1)^2)]
    # = -A + |A| (r - 1) / c: zero at r = 1 - c, negative below it (descent raises r back), so a bad
    # action's likelihood is not pushed down without bound as it can be under clipping's zero gradient
    expected = torch.tensor([-1.0, 0.0, 2.0 + 2.0 * (0.5 - 1.0) / clip, 2.0 + 2.0 * (0.9 - 1.0) / clip,
                             2.0 + 2.0 * (1.1 - 1.0) / clip])
    torch.testing.assert_close(ratio.grad, expected)
    assert ratio.grad[2] < 0 and ratio.grad[3] > 0  # below 1 - c: pulled up; inside: pushed down


def test_every_surrogate_starts_as_the_policy_gradient_at_ratio_one():
    adv = torch.tensor([1.5, -0.5, -2.0, 0.0])
    grads = []
    for kind in ("clip", "aspo"):
        ratio = torch.ones(4, requires_grad=True)
        loss = compute_policy_surrogate(ratio, adv, 0.05, kind)
        torch.testing.assert_close(loss.detach(), -adv)
        loss.sum().backward()
        grads.append(ratio.grad)
    torch.testing.assert_close(grads[0], -adv)
    torch.testing.assert_close(grads[1], -adv)
    with pytest.raises(ValueError, match="aspo"):
        compute_policy_surrogate(torch.ones(2), torch.ones(2), 0.1, "spo")


def test_per_pair_ratios_share_their_actions_advantage():
    ratio = torch.ones(3, 4)
    adv = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(compute_clipped_surrogate(ratio, adv, 0.1), -adv)


def test_explained_variance():
    y = torch.randn(100)
    assert explained_variance(y, y) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(y, y.mean().item()), y) == pytest.approx(0.0, abs=1e-6)
