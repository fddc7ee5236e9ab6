"""scripts/bandit_mixture_probe.py: PPO with an exact-likelihood Gaussian mixture on the two-optima bandit."""

from __future__ import annotations

import math

import torch

from tests.helpers import load_script


def test_mixture_log_prob_and_entropy_are_the_mixtures():
    script = load_script("bandit_mixture_probe")
    torch.manual_seed(0)
    m = script.Mixture(3, dim=2)
    with torch.no_grad():
        m.logits.copy_(torch.tensor([0.2, -0.5, 1.0]))
        m.mean.copy_(torch.randn(3, 2))
        m.log_std.copy_(0.3 * torch.randn(3, 2))
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=m.logits.detach()),
        torch.distributions.Independent(torch.distributions.Normal(m.mean.detach(), m.log_std.exp().detach()), 1))
    a = 2 * torch.randn(500, 2)
    torch.testing.assert_close(m.log_prob(a), ref.log_prob(a), rtol=1e-5, atol=1e-5)
    # far-apart components: the entropy is the weighted components' plus the weights' own
    with torch.no_grad():
        m.mean.copy_(torch.tensor([[-20.0, 0.0], [0.0, 20.0], [20.0, 0.0]]))
        m.log_std.zero_()
    w = m.weights.detach()
    exact = 1 + math.log(2 * math.pi) - float((w * w.log()).sum())
    estimate = float(m.entropy(20000, torch.Generator().manual_seed(0)).detach())
    assert abs(estimate - exact) < 0.03, (estimate, exact)
    # its gradient reaches the weights: towards equal weights
    m.logits.grad = None
    m.entropy(2000, torch.Generator().manual_seed(1)).backward()
    assert m.logits.grad[2] < 0 < m.logits.grad[1]  # the heaviest component loses, the lightest gains


def test_ppo_on_the_mixture_learns_and_the_entropy_bonus_keeps_it_broad():
    script = load_script("bandit_mixture_probe")
    base = ["--seeds", "0", "--iterations", "30", "--lr", "3e-3", "--log-every", "30"]
    plain = script.main(base)["final"][0]
    assert plain["reward"] > 0.45  # from 0.18 at the broad start
    broad = script.main(base + ["--ent-coef", "3.0"])["final"][0]
    std = lambda row: sum(sum(s) for s in row["stds"])  # noqa: E731
    assert std(broad) > 1.5 * std(plain)
