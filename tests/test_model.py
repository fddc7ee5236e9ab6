"""Velocity networks: prefix cache equivalence and masking of padded inputs."""

from __future__ import annotations

import pytest
import torch

from fmpolicy.config import make_expert_config
from fmpolicy.errors import ConfigError
from fmpolicy.model import ActionExpert, MLPVelocityNet, make_velocity_net
from tests.helpers import in_float64, randomized

H, S, A, P, DP = 6, 5, 4, 7, 12  # chunk, robot state width, robot action width, prefix tokens, prefix width


def make_inputs(b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(b, H, 32, generator=g)
    t = torch.rand(b, generator=g)
    state = torch.randn(b, 32, generator=g)
    prefix = torch.randn(b, P, DP, generator=g)
    prefix_mask = torch.ones(b, P, dtype=torch.bool)
    prefix_mask[0, 4:] = False
    prefix_mask[1, 1:] = False
    state_valid = torch.arange(32) < S
    action_valid = torch.arange(32) < A
    return x_t, t, state, prefix, prefix_mask, state_valid, action_valid


@pytest.fixture(params=["transformer", "mlp", "mlp_attention_pool"])
def net(request):
    if request.param == "transformer":
        return randomized(make_velocity_net(make_expert_config("tiny", prefix_dim=DP), H))
    pool = "attention" if request.param == "mlp_attention_pool" else "mean"
    return randomized(make_velocity_net(make_expert_config("mlp", prefix_dim=DP, prefix_pool=pool), H))


def test_factory_builds_the_configured_network():
    assert isinstance(make_velocity_net(make_expert_config("tiny"), H), ActionExpert)
    assert isinstance(make_velocity_net(make_expert_config("mlp"), H), MLPVelocityNet)


def test_cached_velocity_equals_uncached(net):
    # float64: the two paths run attention on other shapes, so in float32 they differ by rounding
    net, x_t, t, state, prefix, mask, sv, av = in_float64(net, *make_inputs())
    with torch.no_grad():
        cache = net.encode(state, sv, prefix, mask)
        for step in range(4):  # the same cache serves every integration step
            ts = (t + 0.2 * step) % 1.0
            xs = x_t * (1 + step)
            cached = net.velocity(xs, ts, cache, av)
            uncached = net(xs, ts, state, sv, prefix, mask, av)
            torch.testing.assert_close(cached, uncached)


def test_cache_repeat_matches_repeated_inputs(net):
    # FPO evaluates m (t, noise) pairs per observation by repeating the cache along the batch
    # (float64: a batch of 3 against one of 9 sums in another order, see tests/helpers.in_float64)
    net, x_t, t, state, prefix, mask, sv, av = in_float64(net, *make_inputs())
    m = 3
    with torch.no_grad():
        cache = net.encode(state, sv, prefix, mask).repeat_interleave(m)
        xs, ts = x_t.repeat_interleave(m, 0), t.repeat_interleave(m, 0)
        repeated = net(xs, ts, state.repeat_interleave(m, 0), sv, prefix.repeat_interleave(m, 0),
                       mask.repeat_interleave(m, 0), av)
        torch.testing.assert_close(net.velocity(xs, ts, cache, av), repeated)


def test_a_shared_prefix_gives_what_its_copies_give_forward_and_backward(net):
    # FPO's update: the m pairs of an observation attend to one copy of its prefix keys/values
    # (`share_prefix`, transformer.shared_prefix_attention) instead of m copies; same values and gradients
    net, x_t, t, state, prefix, mask, sv, av = in_float64(net, *make_inputs())
    m, b = 4, x_t.shape[0]
    xs, ts = x_t.repeat_interleave(m, 0) * torch.linspace(0.5, 1.5, m * b)[:, None, None].double(), t.repeat_interleave(m, 0)
    results = {}
    for share in (False, True):
        net.zero_grad()
        cache = net.encode(state, sv, prefix, mask).repeat_interleave(m, share_prefix=share)
        if share and cache.prefix_kv is not None:
            assert cache.prefix_kv[0][0].shape[0] == b and cache.attn_mask.shape[0] == b  # not copied
        v = net.velocity(xs, ts, cache, av)
        (v * torch.cos(v)).sum().backward()
        results[share] = (v.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results[True][0], results[False][0])
    assert results[True][1].keys() == results[False][1].keys()
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, msg=name)
    if isinstance(net, ActionExpert):  # the prefix reaches the output: the comparison is not vacuous
        assert results[True][1]["blocks.0.prefix_kv.weight"].abs().max() > 1e-3


def test_shared_prefix_attention_keeps_each_samples_own_suffix_and_mask():
    # the g samples of a group see their own suffix tokens, never each other's; masked prefix keys stay masked
    from fmpolicy.model.transformer import shared_prefix_attention

    g_ = torch.Generator().manual_seed(0)
    b, grp, n, q, p, e = 2, 3, 2, 4, 5, 8
    qs, ks, vs = (torch.randn(b * grp, n, q, e, generator=g_, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(b, n, p, e, generator=g_, dtype=torch.float64) for _ in range(2))
    for mask_batch in (b, 1):
        mask = torch.rand(mask_batch, 1, q, p + q, generator=g_) > 0.4
        mask[..., torch.arange(q), p + torch.arange(q)] = True  # every query sees itself
        out = shared_prefix_attention(qs, ks, vs, (pk, pv), mask)
        full = mask.repeat_interleave(grp, 0) if mask_batch > 1 else mask
        expect = torch.nn.functional.scaled_dot_product_attention(
            qs, torch.cat([pk.repeat_interleave(grp, 0), ks], 2), torch.cat([pv.repeat_interleave(grp, 0), vs], 2),
            attn_mask=full)
        torch.testing.assert_close(out, expect)
    vs2 = vs.clone()
    vs2[1] += 100.0  # another sample's values of the same group: sample 0 must not see them
    out2 = shared_prefix_attention(qs, ks, vs2, (pk, pv), mask)
    torch.testing.assert_close(out2[0], out[0])
    assert (out2[1] - out[1]).abs().max() > 1.0
    with pytest.raises(ValueError, match="do not split into groups"):
        shared_prefix_attention(qs[:5], ks[:5], vs[:5], (pk, pv), mask)


def test_padded_entries_and_masked_prefix_tokens_change_nothing(net):
    x_t, t, state, prefix, mask, sv, av = make_inputs()
    with torch.no_grad():
        ref = net(x_t, t, state, sv, prefix, mask, av)
        assert torch.all(ref[..., A:] == 0), "padded action dims of the velocity are zero"
        g = torch.Generator().manual_seed(9)
        state2 = torch.where(sv, state, torch.randn(state.shape, generator=g) * 100)
        x_t2 = torch.where(av, x_t, torch.randn(x_t.shape, generator=g) * 100)
        prefix2 = torch.where(mask[..., None], prefix, torch.full_like(prefix, float("nan")))
        out = net(x_t2, t, state2, sv, prefix2, mask, av)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_valid_inputs_do_change_the_output(net):
    # the counterpart of the masking test: the same perturbations on valid entries must matter
    x_t, t, state, prefix, mask, sv, av = make_inputs()
    with torch.no_grad():
        ref = net(x_t, t, state, sv, prefix, mask, av)
        state2 = state.clone()
        state2[:, 0] += 1.0
        prefix2 = prefix.clone()
        prefix2[:, 0] += 1.0  # token 0 is valid in every sample
        x2 = x_t.clone()
        x2[:, :, 0] += 1.0
        for out in (net(x_t, t, state2, sv, prefix, mask, av), net(x_t, t, state, sv, prefix2, mask, av),
                    net(x2, t, state, sv, prefix, mask, av), net(x_t, 1 - t, state, sv, prefix, mask, av)):
            assert (out - ref).abs().amax(dim=(1, 2)).min() > 1e-4


def test_works_on_state_alone(net):
    net, x_t, t, state, _, _, sv, av = in_float64(net, *make_inputs())  # cached against uncached: float64
    with torch.no_grad():
        out = net(x_t, t, state, sv, None, None, av)
        assert out.shape == (3, H, 32) and out.dtype == torch.float64 and torch.isfinite(out).all()
        torch.testing.assert_close(net.velocity(x_t, t, net.encode(state, sv), av), out)


def test_attention_pooling_reads_tokens_that_the_mean_averages_away():
    """Two prefixes with the same tokens in another order (the same mean) and a swap of what two tokens hold:
    mean pooling cannot tell them apart, attention pooling can; a row with every token masked reads zeros,
    as a policy without a prefix does."""
    x_t, t, state, prefix, _, sv, av = make_inputs()
    mask = torch.ones(prefix.shape[:2], dtype=torch.bool)
    swapped = prefix.clone()
    swapped[:, :2] = prefix[:, :2] * torch.tensor([1.0, 3.0])[None, :, None]  # token 1 scaled up ...
    swapped[:, 2] = prefix[:, 2] - 2.0 * prefix[:, 1]  # ... and token 2 down by as much: the sum is unchanged
    torch.testing.assert_close(swapped.sum(1), prefix.sum(1))
    outs = {}
    for pool in ("mean", "attention"):
        torch.manual_seed(0)
        net = randomized(make_velocity_net(make_expert_config("mlp", prefix_dim=DP, prefix_pool=pool,
                                                              prefix_queries=3), H))
        with torch.no_grad():
            outs[pool] = (net(x_t, t, state, sv, prefix, mask, av), net(x_t, t, state, sv, swapped, mask, av))
            none = torch.zeros_like(mask)
            torch.testing.assert_close(net(x_t, t, state, sv, prefix, none, av), net(x_t, t, state, sv, None, None, av))
    torch.testing.assert_close(*outs["mean"], atol=1e-5, rtol=1e-5)
    assert (outs["attention"][0] - outs["attention"][1]).abs().amax(dim=(1, 2)).min() > 1e-3
    assert net.net[0].in_features == H * 32 + 2 * 32 + 3 * DP + 1  # three reads of the prefix, raw t


def test_attention_pooling_is_an_mlp_option():
    with pytest.raises(ConfigError, match=r"ExpertConfig\.prefix_pool = 'attention' is invalid"):
        make_expert_config("tiny", prefix_dim=DP, prefix_pool="attention")
    with pytest.raises(ConfigError, match=r"ExpertConfig\.prefix_queries = 0 is invalid"):
        make_expert_config("mlp", prefix_dim=DP, prefix_pool="attention", prefix_queries=0)


def test_transformer_starts_at_zero_velocity_and_every_parameter_learns():
    # adaLN-Zero gates and a zero-initialised output layer (DiT's): the untrained expert's velocity is
    # exactly 0 at every input, so it samples the noise distribution itself, with no tilt towards any
    # direction (which FPO from scratch would otherwise inherit: docs/rl.md) ...
    net = make_velocity_net(make_expert_config("tiny", prefix_dim=DP), H)
    x_t, t, state, prefix, mask, sv, av = make_inputs()
    for time in (torch.zeros(3), t, torch.ones(3)):
        assert torch.equal(net(x_t, time, state, sv, prefix, mask, av), torch.zeros_like(x_t))
    # ... and yet, regressed onto a target, every parameter has received a gradient within three steps
    target = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5)) * av
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = {n: False for n, _ in net.named_parameters()}
    for _ in range(3):
        opt.zero_grad()
        (net(x_t, t, state, sv, prefix, mask, av) - target).pow(2).sum().backward()
        for n, p in net.named_parameters():
            seen[n] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
        opt.step()
    assert all(seen.values()), [n for n, s in seen.items() if not s]
