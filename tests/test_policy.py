"""FlowPolicy: save/load, action queue, normalization, FPO losses, and errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch

from fmpolicy import (
    CheckpointError,
    ConfigError,
    FlowPolicy,
    InputError,
    NormalizationConfig,
    PolicyConfig,
    make_expert_config,
)
from fmpolicy.normalize import Normalizer
from tests.helpers import in_float64, randomized

S, A, H, DP = 3, 2, 6, 8


def make_policy(kind: str = "transformer", seed: int = 0, **overrides) -> FlowPolicy:
    preset = "tiny" if kind == "transformer" else "mlp"
    cfg = PolicyConfig(state_dim=S, action_dim=A, chunk_size=H, n_action_steps=4,
                       expert=make_expert_config(preset, prefix_dim=DP), device="cpu", **overrides)
    policy = FlowPolicy(cfg)
    randomized(policy.net, seed)
    g = torch.Generator().manual_seed(seed)
    policy.fit_normalization(torch.randn(200, S, generator=g) * 3 + 1, torch.randn(200, H, A, generator=g) * 2 - 5)
    return policy


def make_obs(b: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "observation.state": torch.randn(b, S, generator=g),
        "observation.prefix": torch.randn(b, 5, DP, generator=g),
        "observation.prefix_mask": torch.tensor([[True] * 5] * (b - 1) + [[True, True, False, False, False]]),
    }


def make_batch(b: int = 4, seed: int = 1) -> dict:
    obs = make_obs(b, seed)
    obs["action"] = torch.randn(b, H, A, generator=torch.Generator().manual_seed(seed + 1))
    return obs


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_save_load_round_trip_gives_identical_chunks(kind, tmp_path):
    policy = make_policy(kind)
    obs = make_obs()
    noise = policy.sample_noise(4, torch.Generator().manual_seed(3))
    before = policy.predict_action_chunk(obs, noise=noise)
    path = policy.save_pretrained(tmp_path / "policy")
    meta = json.loads((path / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["config"]["expert"]["prefix_dim"] == DP
    loaded = FlowPolicy.from_pretrained(path)
    assert loaded.config == policy.config
    assert torch.equal(loaded.predict_action_chunk(obs, noise=noise), before)
    # the normalizer statistics travel with the weights
    assert torch.equal(loaded.action_normalizer.scale, policy.action_normalizer.scale)
    # a different noise gives a different chunk (so the equality above is not vacuous)
    assert not torch.equal(policy.predict_action_chunk(obs, noise=noise + 1), before)


def test_save_replaces_an_existing_directory_atomically(tmp_path):
    a, b = make_policy(seed=0), make_policy(seed=1)
    a.save_pretrained(tmp_path / "p")
    b.save_pretrained(tmp_path / "p")
    loaded = FlowPolicy.from_pretrained(tmp_path / "p")
    obs, noise = make_obs(), b.sample_noise(4, torch.Generator().manual_seed(0))
    assert torch.equal(loaded.predict_action_chunk(obs, noise=noise), b.predict_action_chunk(obs, noise=noise))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary or old copies left


def test_predict_is_deterministic_under_a_seeded_generator():
    policy, obs = make_policy(), make_obs()
    c1 = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(5))
    c2 = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(5))
    c3 = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(6))
    assert c1.shape == (4, H, A)
    assert torch.equal(c1, c2) and not torch.equal(c1, c3)


def test_select_action_replans_every_n_action_steps():
    policy, obs = make_policy(), make_obs()
    calls = []
    encode = policy.encode
    policy.encode = lambda o: calls.append(1) or encode(o)
    expected = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(7))
    calls.clear()
    g = torch.Generator().manual_seed(7)
    actions = [policy.select_action(obs, generator=g) for _ in range(9)]
    assert len(calls) == 3  # re-planned at calls 1, 5 and 9 (n_action_steps = 4)
    for i in range(4):  # the first chunk is executed in order
        torch.testing.assert_close(actions[i], expected[:, i])
    assert actions[0].shape == (4, A)
    policy.reset()  # a new episode re-plans at once
    policy.select_action(obs, generator=g)
    assert len(calls) == 4


def test_cfm_losses_per_pair_match_the_network_directly():
    policy, batch = make_policy(), make_batch()
    g = torch.Generator().manual_seed(2)
    t = torch.rand(4, 3, generator=g)
    noise = torch.randn(4, 3, H, 32, generator=g)
    losses = policy.compute_cfm_losses(batch, batch["action"], t, noise)
    assert losses.shape == (4, 3)
    target = policy.pad_action(batch["action"])
    state = policy.pad_state(batch["observation.state"])
    for j in range(3):
        x_t = t[:, j, None, None] * target + (1 - t[:, j, None, None]) * noise[:, j]
        v = policy.net(x_t, t[:, j], state, policy.state_valid, batch["observation.prefix"],
                       batch["observation.prefix_mask"], policy.action_valid)
        u = (target - noise[:, j])[..., :A]
        expected = (v[..., :A] - u).pow(2).mean(dim=(1, 2))
        # float32 (the policy reads prefixes as float32, so no float64 run): the prefix encoded once for
        # 12 pairs against the network on 4 rows sums in other orders; losses of 31-700, means of squares
        # (no cancellation), differ by <= 2.4e-7 relative (measured: default, avx2, avx512; 1-2 threads).
        # rtol 1e-5 leaves 40x for other CPUs; a wrong pair or mask moves a loss by O(1) relative.
        torch.testing.assert_close(losses[:, j], expected, atol=0, rtol=1e-5)


def test_compute_loss_trains_both_heads():
    for head in ("flow", "regression"):
        policy = make_policy(head=head)
        loss, info = policy.compute_loss(make_batch())
        assert loss.ndim == 0 and info["per_sample"].shape == (4,)
        loss.backward()
        # the regression head's one pass reads x = 0, so action_in's weight is the one parameter it cannot train
        idle = {"action_in.weight"} if head == "regression" else set()
        untrained = [n for n, p in policy.net.named_parameters()
                     if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
        assert set(untrained) == idle, (head, untrained)


@pytest.mark.parametrize("mode", ["mean_std", "min_max", "quantile", "identity"])
def test_normalizer_round_trip_and_constant_dimensions(mode):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(500, 3, generator=g) * torch.tensor([5.0, 0.1, 1.0]) + torch.tensor([10.0, -2.0, 0.0])
    data[:, 2] = 0.7  # a dimension that never moves (a gripper that stayed open)
    norm = Normalizer(3, mode).fit(data)
    torch.testing.assert_close(norm.unnormalize(norm.normalize(data)), data, atol=1e-5, rtol=1e-5)
    y = norm.normalize(data)
    if mode == "mean_std":
        torch.testing.assert_close(y[:, :2].mean(0), torch.zeros(2), atol=1e-4, rtol=0)
        torch.testing.assert_close(y[:, :2].std(0), torch.ones(2), atol=1e-2, rtol=0)
    if mode == "min_max":
        assert y[:, :2].min() >= -1 - 1e-5 and y[:, :2].max() <= 1 + 1e-5
    if mode == "quantile":
        assert ((y[:, :2].abs() <= 1).float().mean() - 0.98).abs() < 0.02
    # an unseen value of the constant dimension stays of its own size, never ~1e4 times larger
    probe = data[:1].clone()
    probe[0, 2] = 0.9
    assert norm.normalize(probe)[0, 2].abs() < 1.0


def test_a_dimension_that_barely_varied_around_a_large_value_is_not_blown_up():
    """The normaliser trap (Meta-World reach: the gripper opening 0.9976 +- 0.0012 in the demonstrations):
    dividing by that spread puts an opening of 0.95 at deployment ~40 deviations out. `relative_min_scale`
    (0.05 by default) divides such a dimension by 5% of its offset instead; dimensions that move over a good
    part of their magnitude, a constant one, and one jittering around 0 are fitted as before."""
    g = torch.Generator().manual_seed(0)
    n = 2000
    data = torch.stack([0.9976 + 0.0012 * torch.randn(n, generator=g, dtype=torch.float64),  # a gripper held open
                        0.74 + 0.078 * torch.randn(n, generator=g, dtype=torch.float64),  # hand y: moves
                        torch.full((n,), 0.7, dtype=torch.float64),  # never moved
                        0.002 * torch.randn(n, generator=g, dtype=torch.float64)], dim=1)  # jitter around 0
    std = data.std(0, unbiased=False)
    for mode in ("mean_std", "min_max", "quantile"):
        default = Normalizer(4, mode).fit(data)
        off = Normalizer(4, mode, relative_min_scale=0.0).fit(data)
        offset = default.offset.double()
        assert default.scale[0].item() == pytest.approx(0.05 * abs(offset[0].item()), rel=1e-6)
        assert off.scale[0] < 0.1 * default.scale[0]  # without the rule: the spread itself, 12-40x smaller
        assert default.floored == [0] and off.floored == []
        torch.testing.assert_close(default.scale[1:], off.scale[1:], rtol=0, atol=0)  # the rest: as before
        assert default.scale[2] == 1.0
        if mode == "mean_std":
            assert default.scale[1].item() == pytest.approx(std[1].item(), rel=1e-6)
        probe = data[:1].clone().float()
        probe[0, 0] = 0.95  # the gripper closes a little at deployment
        assert default.normalize(probe)[0, 0].abs() < 1.2 and off.normalize(probe)[0, 0].abs() > 10
        torch.testing.assert_close(default.unnormalize(default.normalize(data.float())), data.float(),
                                   atol=1e-5, rtol=1e-5)
    # the setting reaches the policy's state normalizers from its config; actions (outputs) fit as before
    policy = make_policy("mlp", normalization=NormalizationConfig(relative_min_scale=0.2))
    assert policy.embodiments.state[0].relative_min_scale == 0.2 and policy.embodiments.action[0].relative_min_scale == 0
    # training names the entries it floored
    from fmpolicy.training.imitation import floored_state_notes
    assert floored_state_notes(policy) == []  # make_policy's states vary over their magnitude
    states = torch.randn(300, S, generator=g)
    states[:, 1] = 2.0 + 0.01 * torch.randn(300, generator=g)
    policy.fit_normalization(states, torch.randn(300, H, A, generator=g))
    notes = floored_state_notes(policy)
    assert len(notes) == 1 and "entries [1] of 'default' varied by less than 20% of" in notes[0]
    assert f"({0.2 * policy.embodiments.state[0].offset[1].item():.3g})" in notes[0]
    with pytest.raises(ConfigError, match=r"relative_min_scale = -0.1"):
        NormalizationConfig(relative_min_scale=-0.1)


def test_bad_inputs_raise_clear_errors():
    policy = make_policy()
    batch = make_batch()
    cases = [
        ({**batch, "observation.state": torch.randn(4, S + 1)}, r"observation\.state.*width 4.*state_dim=3"),
        ({**batch, "observation.state": torch.randn(4, 40)}, r"observation\.state.*40.*max_state_dim=32"),
        ({**batch, "action": torch.randn(4, H, A + 1)}, r"'action'.*width 3.*action_dim=2"),
        ({**batch, "action": torch.randn(4, H, 33)}, r"'action'.*33.*max_action_dim=32"),
        ({**batch, "action": torch.randn(4, H + 1, A)}, r"'action' has shape \(4, 7, 2\): expected \(4, 6, a\)"),
        ({k: v for k, v in batch.items() if k != "action"}, r"missing the key 'action'"),
        ({k: v for k, v in batch.items() if k != "observation.state"}, r"missing the key 'observation\.state'"),
        ({**batch, "observation.prefix": torch.randn(4, 5, DP + 1)}, r"observation\.prefix.*expected \(4, p, 8\)"),
    ]
    nan_state = batch["observation.state"].clone()
    nan_state[2, 1] = float("nan")
    cases.append(({**batch, "observation.state": nan_state}, r"observation\.state.*NaN.*\(2, 1\)"))
    nan_prefix = batch["observation.prefix"].clone()
    nan_prefix[0, 0, 0] = float("nan")  # a valid token: an error
    cases.append(({**batch, "observation.prefix": nan_prefix}, r"observation\.prefix.*NaN"))
    for bad, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            policy.compute_loss(bad)
    with pytest.raises(InputError, match="state_dim"):
        policy.predict_action_chunk({"observation.state": torch.randn(4, 7)})
    with pytest.raises(InputError, match="'noise' has shape"):
        policy.predict_action_chunk(make_obs(), noise=torch.randn(4, H, A))
    # NaN in a *masked* prefix token is ignored, as the token is
    masked = batch["observation.prefix"].clone()
    masked[3, 4] = float("nan")
    assert torch.isfinite(policy.compute_loss({**batch, "observation.prefix": masked})[0])


def test_unfitted_normalization_is_an_error_not_silent():
    cfg = PolicyConfig(state_dim=S, action_dim=A, chunk_size=H, n_action_steps=2, expert=make_expert_config("tiny"))
    with pytest.raises(InputError, match="not fitted.*fit_normalization"):
        FlowPolicy(cfg).predict_action_chunk({"observation.state": torch.zeros(1, S)})
    ident = PolicyConfig(state_dim=S, action_dim=A, chunk_size=H, n_action_steps=2, expert=make_expert_config("tiny"),
                         normalization=NormalizationConfig(state="identity", action="identity"))
    assert FlowPolicy(ident).predict_action_chunk({"observation.state": torch.zeros(1, S)}).shape == (1, H, A)


def test_bad_configs_and_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="state_dim = 40.*max_state_dim=32"):
        PolicyConfig(state_dim=40)
    with pytest.raises(ConfigError, match="n_action_steps = 9.*chunk_size=8"):
        PolicyConfig(chunk_size=8, n_action_steps=9)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        FlowPolicy.from_pretrained(tmp_path / "nothing")
    path = make_policy().save_pretrained(tmp_path / "p")
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        FlowPolicy.from_pretrained(path)
    meta["config"]["expert"]["bogus"] = 1
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bogus'\].*expert"):
        FlowPolicy.from_pretrained(path)
    meta["config"]["expert"].pop("bogus")
    meta["config"]["expert"]["width"] = 32  # weights no longer match the config
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match its config"):
        FlowPolicy.from_pretrained(path)


def make_two_arm_policy() -> FlowPolicy:
    from fmpolicy.config import EmbodimentConfig

    cfg = PolicyConfig(state_dim=8, action_dim=4, chunk_size=H, n_action_steps=2, device="cpu",
                       expert=make_expert_config("tiny"),
                       embodiments=(EmbodimentConfig("arm2", 6, 2), EmbodimentConfig("arm4", 8, 4)))
    policy = FlowPolicy(cfg)
    randomized(policy.net, 3)
    g = torch.Generator().manual_seed(0)
    policy.fit_normalization(torch.randn(100, 6, generator=g) + 5, torch.randn(100, H, 2, generator=g) * 3, "arm2")
    policy.fit_normalization(torch.randn(100, 8, generator=g) - 2, torch.randn(100, H, 4, generator=g) / 2, "arm4")
    return policy


def test_a_batch_can_mix_robots_of_several_widths(tmp_path):
    policy = make_two_arm_policy()
    g = torch.Generator().manual_seed(1)
    s2, a2 = torch.randn(3, 6, generator=g) + 5, torch.randn(3, H, 2, generator=g) * 3
    s4, a4 = torch.randn(2, 8, generator=g) - 2, torch.randn(2, H, 4, generator=g) / 2
    t, noise = torch.rand(5, generator=g), torch.randn(5, H, 32, generator=g)
    # a mixed batch is padded to the widest robot; the padding of the 2-link rows holds junk
    mixed = {"observation.state": torch.cat([torch.nn.functional.pad(s2, (0, 2), value=99.0), s4]),
             "action": torch.cat([torch.nn.functional.pad(a2, (0, 2), value=-99.0), a4]),
             "embodiment": ["arm2"] * 3 + ["arm4"] * 2}
    # each robot's rows give the same loss as a batch of that robot alone, at its own width (in float64:
    # a batch of 5 and batches of 3 and 2 sum in other orders, tests/helpers.in_float64; the junk in
    # the padding, were it to leak, would move a loss by far more than the float64 tolerance)
    p64, mixed64, s2_64, a2_64, s4_64, a4_64, t64, noise64 = in_float64(policy, mixed, s2, a2, s4, a4, t, noise)
    _, info = p64.compute_loss(mixed64, t=t64, noise=noise64)
    _, only2 = p64.compute_loss({"observation.state": s2_64, "action": a2_64, "embodiment": "arm2"},
                                t=t64[:3], noise=noise64[:3])
    _, only4 = p64.compute_loss({"observation.state": s4_64, "action": a4_64, "embodiment": "arm4"},
                                t=t64[3:], noise=noise64[3:])
    assert info["per_sample"].dtype == torch.float64
    torch.testing.assert_close(info["per_sample"], torch.cat([only2["per_sample"], only4["per_sample"]]))
    # each robot is normalized with its own statistics
    assert not torch.equal(policy.embodiments.state[0].offset, policy.embodiments.state[1].offset[:6])
    # sampling: (b, h, widest) with zeros past each robot's own action width
    x0 = policy.sample_noise(5, torch.Generator().manual_seed(2))
    chunk = policy.predict_action_chunk(mixed, noise=x0)
    assert chunk.shape == (5, H, 4) and torch.all(chunk[:3, :, 2:] == 0) and torch.all(chunk[3:, :, 2:] != 0)
    # a robot alone samples what it samples in the mixed batch (float64 again: a batch of 3 against 5)
    alone = p64.predict_action_chunk({"observation.state": s2_64, "embodiment": "arm2"}, noise=in_float64(x0[:3]))
    assert alone.shape == (3, H, 2)
    torch.testing.assert_close(alone, p64.predict_action_chunk(mixed64, noise=in_float64(x0))[:3, :, :2])
    # the embodiments travel with save/load
    loaded = FlowPolicy.from_pretrained(policy.save_pretrained(tmp_path / "p"))
    assert torch.equal(loaded.predict_action_chunk(mixed, noise=x0), chunk)


def test_embodiment_errors_are_clear():
    policy = make_two_arm_policy()
    state = torch.zeros(2, 8)
    with pytest.raises(InputError, match=r"no 'embodiment' key.*\['arm2', 'arm4'\]"):
        policy.predict_action_chunk({"observation.state": state})
    with pytest.raises(InputError, match=r"names \['arm3'\]"):
        policy.predict_action_chunk({"observation.state": state, "embodiment": "arm3"})
    with pytest.raises(InputError, match=r"width 7: this policy expects state_dim=6 or 8"):
        policy.predict_action_chunk({"observation.state": torch.zeros(2, 7), "embodiment": "arm2"})
    with pytest.raises(ConfigError, match=r"state_dim = 6.*widest embodiment's state_dim = 8"):
        PolicyConfig(state_dim=6, action_dim=4, embodiments=policy.config.embodiments)


def test_the_time_input_default_follows_the_expert_and_old_mlp_checkpoints_load_as_trained(tmp_path):
    from fmpolicy import ExpertConfig

    assert ExpertConfig(kind="mlp").time_input == "raw"  # keeps FPO's modes (docs/rl.md, issue 14)
    assert ExpertConfig().time_input == "sinusoidal" and make_expert_config("mlp").time_input == "raw"
    assert ExpertConfig(time_input="raw").time_input == "raw"  # the transformer's time MLP can take t itself
    # a policy saved before the field existed has no `time_input` in its config: it was sinusoidal
    cfg = PolicyConfig(state_dim=S, action_dim=A, chunk_size=H, n_action_steps=4, device="cpu",
                       expert=make_expert_config("mlp", prefix_dim=DP, time_input="sinusoidal"),
                       normalization=NormalizationConfig(state="identity", action="identity"))
    policy = FlowPolicy(cfg)
    randomized(policy.net, 0)
    policy.eval()
    policy.save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "config.json"
    meta = json.loads(path.read_text())
    del meta["config"]["expert"]["time_input"]
    path.write_text(json.dumps(meta))
    again = FlowPolicy.from_pretrained(tmp_path / "p", device="cpu").eval()
    assert again.config.expert.time_input == "sinusoidal"
    obs, noise = make_obs(2), policy.sample_noise(2, torch.Generator().manual_seed(0))
    assert torch.equal(again.predict_action_chunk(obs, noise=noise), policy.predict_action_chunk(obs, noise=noise))
