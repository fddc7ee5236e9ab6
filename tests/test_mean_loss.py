"""flow.mean_loss_weight: the CFM loss at the single point noise = 0, t = 0 added with a weight. It is exactly
that point's CFM loss, it teaches the velocity there the conditional mean chunk (the regression head's
target), and the flow's samples keep both modes of a bimodal target."""

from __future__ import annotations

import pytest
import torch

from fmpolicy import FlowPolicy, NormalizationConfig, PolicyConfig, make_expert_config
from fmpolicy.config import FlowConfig
from fmpolicy.errors import ConfigError


def make_policy(weight: float) -> FlowPolicy:
    cfg = PolicyConfig(state_dim=1, action_dim=1, chunk_size=2, n_action_steps=1, device="cpu",
                       expert=make_expert_config("mlp", max_state_dim=1, max_action_dim=1, width=64, depth=2),
                       flow=FlowConfig(mean_loss_weight=weight),
                       normalization=NormalizationConfig(state="identity", action="identity"))
    torch.manual_seed(0)
    return FlowPolicy(cfg)


def bimodal(n: int, g: torch.Generator) -> dict:
    """state s = +-1; the chunk's two steps both s + 0.6 or both s - 0.6, equally likely: mean chunk (s, s)."""
    s = torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1
    mode = torch.randint(0, 2, (n, 1, 1), generator=g).float() * 1.2 - 0.6
    return {"observation.state": s, "action": s[:, :, None].expand(n, 2, 1) + mode}


def test_the_added_term_is_the_cfm_loss_at_noise_zero_and_time_zero():
    g = torch.Generator().manual_seed(0)
    batch = bimodal(16, g)
    plain, weighted = make_policy(0.0).double(), make_policy(2.5).double()
    weighted.load_state_dict(plain.state_dict())
    t, noise = torch.rand(16, generator=g).double(), torch.randn(16, 2, 1, generator=g).double()
    total, info = weighted.compute_loss(batch, t=t, noise=noise)
    own, own_info = plain.compute_loss(batch, t=t, noise=noise)
    at_zero, _ = plain.compute_loss(batch, t=torch.zeros(16).double(), noise=torch.zeros(16, 2, 1).double())
    assert "mean_loss" in info and "mean_loss" not in own_info
    torch.testing.assert_close(info["mean_loss"], at_zero, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total, own + 2.5 * at_zero, rtol=1e-12, atol=1e-12)


def test_the_velocity_at_zero_learns_the_mean_chunk_and_samples_keep_both_modes():
    """The term's minimiser is the conditional mean, which the CFM loss alone also gives v(0, 0) (so it adds a
    signal, not a new target); what could go wrong is a flow pulled towards the mean: it is not."""
    g = torch.Generator().manual_seed(1)
    policy = make_policy(1.0)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(1500):
        loss, _ = policy.compute_loss(bimodal(128, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    states = torch.tensor([[-1.0], [1.0]])
    with torch.no_grad():
        at_zero = policy._regress(policy.encode({"observation.state": states}))
        obs = {"observation.state": states.repeat_interleave(400, 0)}
        samples = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(2))[:, 0, 0]
    # the mean chunk (s, s), to what 1,500 steps fit (measured 0.14 off with the weight, 0.12-0.15 without)
    torch.testing.assert_close(at_zero[:, :, 0], states.expand(2, 2), atol=0.25, rtol=0)
    drawn = samples - obs["observation.state"][:, 0]  # each sample's offset from its mean: +-0.6 at the modes
    upper = (drawn > 0).float().mean()
    assert 0.35 < upper < 0.65, upper  # both modes, about equally often
    near_modes = ((drawn.abs() - 0.6).abs() < 0.3).float().mean()
    middle = (drawn.abs() < 0.2).float().mean()
    # measured 0.65-0.69 near the modes, 0.16-0.20 in the middle (weight 0: 0.75-0.77, 0.13-0.15); a flow
    # collapsed to the mean would put nearly all samples in the middle
    assert near_modes > 0.5 and middle < 0.3, (near_modes, middle)


def test_a_negative_weight_names_the_field():
    with pytest.raises(ConfigError, match="mean_loss_weight"):
        FlowConfig(mean_loss_weight=-1.0)
