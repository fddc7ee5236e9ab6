"""The FPO paper's GridWorld settings (configs/fpo_gridworld_paper.yaml): the raw-t ReLU MLP, the per-pair
and hard log-ratio clamps, whole-batch advantage normalisation, one Adam = two Adams, their config
errors, and the paper's result on a short seeded run: the middle row's actions go both up and down."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from torch import nn

from fmpolicy import FlowPolicy
from fmpolicy.batch import STATE
from fmpolicy.config import ExpertConfig, PolicyConfig, config_from_dict, config_to_dict
from fmpolicy.errors import ConfigError
from fmpolicy.model.layers import sinusoidal_time_features
from fmpolicy.model.mlp import MLPVelocityNet
from fmpolicy.rl.config import FPOConfig, RLConfig, ValueConfig, load_rl_config
from fmpolicy.rl.objectives import compute_fpo_log_ratio, normalize_advantages
from tests.helpers import load_script

PAPER = "configs/fpo_gridworld_paper.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- the raw-t ReLU MLP -----------------------------------------------------------------------------


def test_raw_time_mlp_takes_t_as_one_input_and_uses_relu():
    cfg = ExpertConfig(kind="mlp", width=64, depth=2, time_input="raw", activation="relu", max_state_dim=2,
                       max_action_dim=2)
    net = MLPVelocityNet(cfg, chunk_size=1)
    first = net.net[0]
    assert first.in_features == 1 * 2 + 2 * 2 + 1  # x_t, state and its mask, t
    assert sum(isinstance(m, nn.ReLU) for m in net.net) == 2 and not any(isinstance(m, nn.SiLU) for m in net.net)
    x_t, state = torch.randn(5, 1, 2), torch.randn(5, 2)
    t = torch.rand(5)
    v = net(x_t, t, state)
    assert v.shape == (5, 1, 2)
    # t enters as itself: the first layer's pre-activation is affine in t with the last input column's weights
    cache = net.encode(state)
    inp = lambda tt: torch.cat([x_t.reshape(5, 2), cache.cond, tt[:, None]], -1)  # noqa: E731
    dt = first(inp(t + 0.1)) - first(inp(t))
    torch.testing.assert_close(dt, 0.1 * first.weight[:, -1].expand(5, -1), rtol=1e-4, atol=1e-5)


def test_a_raw_time_policy_round_trips_through_save_and_load(tmp_path):
    expert = {"kind": "mlp", "width": 16, "depth": 2, "time_input": "raw", "activation": "relu",
              "max_state_dim": 2, "max_action_dim": 2}
    pc = config_from_dict(PolicyConfig, {"state_dim": 2, "action_dim": 2, "chunk_size": 1, "n_action_steps": 1,
                                         "expert": expert,
                                         "normalization": {"state": "identity", "action": "identity"}})
    torch.manual_seed(0)
    policy = FlowPolicy(pc)
    policy.save_pretrained(tmp_path / "p")
    loaded = FlowPolicy.from_pretrained(tmp_path / "p")
    assert loaded.config.expert.time_input == "raw" and loaded.config.expert.activation == "relu"
    obs = {"observation.state": torch.randn(4, 2)}
    noise = policy.sample_noise(4, torch.Generator().manual_seed(1))
    assert torch.equal(policy.predict_action_chunk(obs, noise=noise), loaded.predict_action_chunk(obs, noise=noise))


def test_mlp_configs_without_the_new_fields_get_raw_time_and_silu_and_sinusoidal_when_asked():
    # raw t is the MLP's default since issue 14 (it keeps FPO's modes); saved checkpoints without the
    # field load as sinusoidal (tests/test_policy.py); the activation default is unchanged
    new = config_from_dict(ExpertConfig, {"kind": "mlp", "width": 32, "depth": 2, "time_embed_dim": 8})
    assert (new.time_input, new.activation) == ("raw", "silu")
    net = MLPVelocityNet(new, chunk_size=1)
    assert net.net[0].in_features == 32 + 2 * 32 + 1 and isinstance(net.net[1], nn.SiLU)
    old = config_from_dict(ExpertConfig, {"kind": "mlp", "width": 32, "depth": 2, "time_embed_dim": 8,
                                          "time_input": "sinusoidal"})
    assert MLPVelocityNet(old, chunk_size=1).net[0].in_features == 32 + 2 * 32 + 8


def test_sinusoidal_features_span_exactly_the_configured_periods():
    t = torch.rand(7, dtype=torch.float64)
    feats = sinusoidal_time_features(t, 8, min_period=0.5, max_period=4.0)
    periods = 0.5 * 8.0 ** (torch.arange(4, dtype=torch.float64) / 3)  # 0.5, 1, 2, 4
    angle = 2 * torch.pi * t[:, None] / periods
    # the features are computed in float32 (angles up to 2 pi / 0.5): float32 rounding of the angle
    torch.testing.assert_close(feats, torch.cat([angle.sin(), angle.cos()], -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_both_experts_use_the_configured_time_periods(kind):
    base = dict(kind=kind, width=16, depth=1, num_heads=2, time_embed_dim=8, max_state_dim=2, max_action_dim=2,
                time_input="sinusoidal")  # the MLP's default is raw t, which has no periods
    nets = {}
    for periods in [(4e-3, 4.0), (0.5, 4.0)]:
        torch.manual_seed(0)  # the same weights: only the time features differ
        nets[periods] = FlowPolicy(PolicyConfig(state_dim=2, action_dim=2, chunk_size=2, n_action_steps=1,
                                                expert=ExpertConfig(**base, time_min_period=periods[0],
                                                                    time_max_period=periods[1]))).net
        with torch.no_grad():  # the transformer's modulation starts at zero (time has no effect): randomise
            for p in nets[periods].parameters():
                p.normal_(0.0, 0.3)
    x_t, state, t = torch.randn(3, 2, 2), torch.randn(3, 2), torch.tensor([0.1, 0.5, 0.9])
    fine, coarse = (nets[p](x_t, t, state) for p in nets)
    assert (fine - coarse).abs().max() > 1e-4
    # with the coarse periods a tiny change of t changes the velocity by less than with the fine ones
    dt = 1e-3
    d_fine = (nets[(4e-3, 4.0)](x_t, t + dt, state) - fine).abs().max()
    d_coarse = (nets[(0.5, 4.0)](x_t, t + dt, state) - coarse).abs().max()
    assert d_coarse < d_fine


@pytest.mark.parametrize("fields,match", [
    ({"time_min_period": 0.0}, r"ExpertConfig.time_min_period = 0.0"),
    ({"time_min_period": 5.0}, r"ExpertConfig.time_min_period = 5.0.*at most time_max_period=4.0"),
])
def test_bad_time_periods_raise_clear_errors(fields, match):
    with pytest.raises(ConfigError, match=match):
        ExpertConfig(**fields)


@pytest.mark.parametrize("fields,match", [
    ({"kind": "mlp", "time_input": "fourier"}, r"ExpertConfig.time_input = 'fourier'"),
    ({"kind": "mlp", "activation": "gelu"}, r"ExpertConfig.activation = 'gelu'"),
    ({"kind": "transformer", "activation": "relu"}, r"ExpertConfig.activation = 'relu'.*transformer"),
])
def test_bad_expert_time_input_or_activation_raise_clear_errors(fields, match):
    with pytest.raises(ConfigError, match=match):
        ExpertConfig(**fields)


# ---- the new FPO / RL fields --------------------------------------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda: FPOConfig(clamp_pair_log_ratio=0.0), r"FPOConfig.clamp_pair_log_ratio = 0.0"),
    (lambda: FPOConfig(clamp_pair_log_ratio=float("nan")), r"FPOConfig.clamp_pair_log_ratio = nan"),
    (lambda: FPOConfig(hard_clamps="yes"), r"FPOConfig.hard_clamps = 'yes'"),
    (lambda: RLConfig(normalize_advantages_over="epoch"), r"RLConfig.normalize_advantages_over = 'epoch'"),
    (lambda: RLConfig(adam_eps=0.0), r"RLConfig.adam_eps = 0.0"),
    (lambda: ValueConfig(activation="gelu"), r"ValueConfig.activation = 'gelu'"),
])
def test_bad_paper_setting_values_raise_clear_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_the_paper_config_maps_onto_the_fields_and_the_defaults_stay_as_before():
    cfg = load_rl_config(PAPER)
    e, rl = cfg.policy.expert, cfg.rl
    assert (e.width, e.depth, e.time_input, e.activation) == (64, 2, "raw", "relu")
    assert (rl.fpo.num_pairs, rl.fpo.clamp_pair_log_ratio, rl.fpo.clamp_log_ratio, rl.fpo.hard_clamps) == (50, 3.0, 3.0, True)
    assert (rl.clip, rl.update_epochs, rl.num_minibatches, rl.gae_lambda, rl.anneal_lr) == (0.2, 10, 6, 0.98, False)
    assert (rl.normalize_advantages_over, rl.adam_eps, rl.value.activation) == ("batch", 1e-8, "relu")
    assert cfg.env.kwargs["goal_reward"] == 20.0
    d = RLConfig()
    assert (d.normalize_advantages_over, d.adam_eps, d.value.activation, d.fpo.clamp_pair_log_ratio, d.fpo.hard_clamps) \
        == ("minibatch", 1e-5, "tanh", None, False)
    assert load_rl_config("configs/fpo_gridworld.yaml").policy.expert.time_input == "sinusoidal"


# ---- the math -----------------------------------------------------------------------------------------


def test_per_pair_clamp_bounds_each_difference_before_the_mean_then_the_mean_is_clamped():
    old = torch.tensor([[5.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    new = torch.tensor([[0.0, 1.0, 1.0, 1.0], [9.0, 8.0, 7.0, 0.0]])
    # differences (5, 0, 0, 0) and (-9, -8, -7, 0): clamped to 3 -> means 0.75 and -2.25
    lr = compute_fpo_log_ratio(old, new, clamp_pair_log_ratio=3.0)
    torch.testing.assert_close(lr, torch.tensor([0.75, -2.25]))
    assert torch.equal(compute_fpo_log_ratio(old, new), torch.tensor([1.25, -6.0]))  # off: the plain mean
    torch.testing.assert_close(compute_fpo_log_ratio(old, new, clamp_pair_log_ratio=3.0, clamp_log_ratio=2.0),
                               torch.tensor([0.75, -2.0]))


def test_hard_clamps_zero_the_gradient_outside_the_bounds_and_straight_through_keeps_it():
    old = torch.tensor([[5.0, 1.0], [4.0, 4.0]])
    for hard, expect in ((True, [[0.0, -0.5], [0.0, 0.0]]), (False, [[-0.5, -0.5], [-0.5, -0.5]])):
        new = torch.tensor([[0.0, 1.0], [0.0, 0.0]], requires_grad=True)
        # row 0: pair 0's difference 5 is clamped (hard: no gradient there); row 1: both differences 4 are
        # (hard: none at all; straight-through: -1/m each, as unclamped)
        compute_fpo_log_ratio(old, new, clamp_pair_log_ratio=3.0, clamp_log_ratio=3.0,
                              hard_clamps=hard).sum().backward()
        assert torch.equal(new.grad, torch.tensor(expect)), hard
    # an unmoved policy still has log-ratio 0 (ratio 1) with every clamp on
    same = torch.rand(3, 50)
    assert torch.equal(compute_fpo_log_ratio(same, same.clone(), clamp_pair_log_ratio=3.0, clamp_log_ratio=3.0,
                                             hard_clamps=True), torch.zeros(3))


def test_batch_normalisation_standardises_the_whole_rollout_once():
    adv = torch.tensor([0.0, 0.0, 0.0, 10.0, 1.0, 2.0])
    whole = normalize_advantages(adv)
    assert abs(float(whole.mean())) < 1e-6 and abs(float(whole.std()) - 1.0) < 1e-5
    # a minibatch of it keeps the whole batch's scale: its first half is all equal (and stays equal, not 0/0)
    assert torch.equal(whole[:3], whole[:1].expand(3)) and float(whole[0]) < 0
    per_mb = normalize_advantages(adv[:3])
    assert torch.equal(per_mb, adv[:3])  # all equal: (x - mean) = 0


def test_one_adam_over_actor_and_critic_equals_two_separate_adams_exactly():
    """The paper code's two Adams are the same update as our one (state per parameter, gradients of
    disjoint nets, clipped per net): so there is no `separate_optimizers` field."""
    torch.manual_seed(0)
    actor, critic = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 2)), nn.Linear(2, 1)
    a2, c2 = copy.deepcopy(actor), copy.deepcopy(critic)
    one = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=3e-4, eps=1e-8)
    two = [torch.optim.Adam(a2.parameters(), lr=3e-4, eps=1e-8), torch.optim.Adam(c2.parameters(), lr=3e-4, eps=1e-8)]
    for _ in range(30):
        x, s = torch.randn(16, 5), torch.randn(16, 2)
        one.zero_grad()
        (actor(x).pow(2).mean() + 2.0 * critic(s).sin().mean()).backward()
        nn.utils.clip_grad_norm_(actor.parameters(), 0.5)
        nn.utils.clip_grad_norm_(critic.parameters(), 0.5)
        one.step()
        for o in two:
            o.zero_grad()
        a2(x).pow(2).mean().backward()  # the paper: actor loss backward, clip, step; then the critic's
        nn.utils.clip_grad_norm_(a2.parameters(), 0.5)
        two[0].step()
        (2.0 * c2(s).sin().mean()).backward()
        nn.utils.clip_grad_norm_(c2.parameters(), 0.5)
        two[1].step()
    for p, q in zip([*actor.parameters(), *critic.parameters()], [*a2.parameters(), *c2.parameters()]):
        assert torch.equal(p, q)


# ---- the trainer with the paper's settings ------------------------------------------------------------

SHORT = ["rl.device=cpu", "rl.progress=false", "rl.eval_every=0", "rl.num_envs=32", "rl.num_macro_steps=16",
         "rl.update_epochs=2", "rl.fpo.num_pairs=8", "rl.save_every=1"]


def test_the_paper_settings_resume_bit_exactly(tmp_path):
    script = load_script("train_fpo")
    steps = lambda iterations: f"rl.total_env_steps={32 * 16 * iterations}"  # noqa: E731
    full = script.main(["--config", PAPER, f"rl.out_dir={tmp_path / 'a'}", steps(3), *SHORT])
    script.main(["--config", PAPER, f"rl.out_dir={tmp_path / 'b'}", steps(1), *SHORT])
    resumed = script.main(["--config", PAPER, f"rl.out_dir={tmp_path / 'b'}", steps(3), "--resume", *SHORT])
    assert [h["macro_reward_mean"] for h in resumed.history] == [h["macro_reward_mean"] for h in full.history]
    for (name, a), (_, b) in zip(full.actor.state_dict().items(), resumed.actor.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(full.critic.parameters(), resumed.critic.parameters()):
        assert torch.equal(a, b)
    assert all(h["ratio_first_max_dev"] <= 1e-6 for h in full.history)


# ---- the measure (scripts/gridworld_modes.py) ----------------------------------------------------------
# A short run of the paper config does not show the split yet (measured: 15-40 iterations at 512-2,048
# steps each, 11-33 s on the shared CPU, 0-1 split cells); the full 200 iterations (docs/rl.md) do. So
# the measure is tested on its own here.


def test_count_peaks_separates_two_modes_and_not_one_mode_or_a_flat_tail():
    script = load_script("gridworld_modes")
    edges = torch.arange(-6.0, 6.01, 0.25)
    gen = torch.Generator().manual_seed(0)
    hist = lambda x: torch.histogram(x, edges).hist.numpy()  # noqa: E731
    two = torch.cat([torch.randn(1000, generator=gen) * 0.5 - 2, torch.randn(1000, generator=gen) * 0.5 + 2])
    one = torch.randn(2000, generator=gen)
    tail = torch.cat([torch.randn(1500, generator=gen) * 0.4 + 2, torch.rand(500, generator=gen) * 6.0 - 4.0])  # a plateau into the peak
    assert script.count_peaks(hist(two)) == 2
    assert script.count_peaks(hist(one)) == 1
    assert script.count_peaks(hist(tail)) == 1
    assert script.count_peaks([0] * 10) == 0


def test_gridworld_modes_measures_a_saved_policy_and_draws_it(tmp_path):
    script = load_script("gridworld_modes")
    pc = load_rl_config(PAPER).policy
    torch.manual_seed(0)
    FlowPolicy(pc).save_pretrained(tmp_path / "run" / "policy")
    out = script.main([str(tmp_path / "run"), "--samples", "200", "--per-state", "20", "--png", str(tmp_path / "a.png"),
                       "--boundary"])
    r = out[str(tmp_path / "run")]
    b = r["boundary"]
    assert [q["row"] for q in b["profile"]][::8] == [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0] and b["split_rows"] >= 0.0
    assert 0.0 <= r["down"] <= 1.0 - r["up"] and len(r["per_state"]) == r["states"] == 25
    assert sum(r["a_y_hist"]["counts"]) + r["a_y_hist"]["outside"] == 200
    assert 0 <= r["split_states"] <= 25 and r["two_peaks"] == (r["peaks"] >= 2) and set(r["rows"]) == \
        {"-3", "-2", "-1", "+0", "+1", "+2", "+3"}
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "run" / "gridworld_modes.json").is_file()


class _LogisticPolicy:
    """A stand-in policy whose move goes up with probability sigmoid((row - at) / width) and down
    otherwise, row = the position's offset from the middle in rows (fractional between the rows)."""

    device = torch.device("cpu")

    def __init__(self, at: float, width: float):
        self.at, self.width = at, width

    def sample_noise(self, n, generator):
        return torch.rand(n, 1, 2, generator=generator)

    def predict_action_chunk(self, obs, noise):
        row = obs[STATE][:, 1] * 12  # observation y = (y - 12) / 12 on the 25-row grid
        up = noise[:, 0, 1] < torch.sigmoid((row - self.at) / self.width)
        return torch.stack([torch.zeros_like(row), torch.where(up, 1.0, -1.0)], dim=-1)[:, None]


@pytest.mark.parametrize("at", [-1.3, 0.0, 2.2])
def test_boundary_finds_where_a_policy_turns_from_down_to_up_between_the_rows(at):
    """P(up) is 1/2 at `at` rows from the middle; between 1/4 and 3/4 (split) over 2 ln 3 x width rows."""
    script = load_script("gridworld_modes")
    b = script.boundary(_LogisticPolicy(at, 0.5), per_point=200, seed=1)
    assert abs(b["boundary_row"] - at) < 0.125, b["boundary_row"]  # an eighth of a row: the query spacing
    assert abs(b["split_rows"] - 2 * math.log(3) * 0.5) < 0.3, b["split_rows"]  # 1.10 rows
    assert script.boundary(_LogisticPolicy(9.0, 0.5), per_point=50)["boundary_row"] is None  # never turns up


TINY_TRANSFORMER = ("policy.expert={kind: transformer, width: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0, "
                    "max_state_dim: 2, max_action_dim: 2}")


@pytest.mark.parametrize("seed", [1, 2])
def test_an_untrained_transformer_start_is_tilted_towards_neither_goal(tmp_path, seed):
    """`gridworld_modes.py --start` rebuilds the policy a run began from (its config.yaml, its rl.seed):
    for the transformer that is N(0, I) itself (zero-initialised output layer), so every row sends
    P(a_y > 0.5) = 0.309 of its actions up and as many down. With PyTorch's default init these two
    seeds started at .05-.08 up / .57-.63 down everywhere, and FPO sent the whole grid down (docs/rl.md)."""
    script = load_script("gridworld_modes")
    run = tmp_path / "run"
    run.mkdir()
    config = load_rl_config(PAPER, [TINY_TRANSFORMER, f"rl.seed={seed}"])
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    r = script.main(["--start", str(run), "--samples", "1000", "--per-state", "10", "--seed", "3"])[str(run)]
    for row, (up, down) in r["rows"].items():  # 1,000 samples a row: a standard error of 0.015
        assert abs(up - 0.309) < 0.06 and abs(down - 0.309) < 0.06, (row, up, down)
    with pytest.raises(SystemExit, match="no config.yaml"):
        script.main(["--start", str(tmp_path)])


def test_the_ratio_gap_measure_agrees_with_itself_when_the_fresh_pairs_are_the_stored_ones(tmp_path, monkeypatch):
    """scripts/fpo_ratio_gap.py on a 1-iteration run of the paper config: the update moved the losses
    (a non-zero log ratio), and with the 'fresh' pairs replaced by the stored ones the two estimates
    coincide (correlation 1, gap 0): the measure compares like with like."""
    script = load_script("fpo_ratio_gap")
    load_script("train_fpo").main(["--config", PAPER, "rl.device=cpu", "rl.num_envs=8", "rl.num_macro_steps=8",
                                   "rl.total_env_steps=64", "rl.save_every=1", "rl.progress=false",
                                   f"rl.out_dir={tmp_path / 'run'}"])
    honest = script.measure(tmp_path / "run", step=1, seed=5)
    assert honest["chunks"] == 64 and honest["mean_abs_fresh"] > 1e-4 and -1 <= honest["corr"] <= 1
    from fmpolicy.rl.actors import FlowActor

    stored = {}
    act = FlowActor.act

    def remember(self, obs, generator=None, inputs=None):
        chunk, store = act(self, obs, generator, inputs)
        stored.setdefault("t", []).append(store["t"])
        stored.setdefault("noise", []).append(store["noise"])
        return chunk, store

    pairs = FlowActor.sample_pairs

    def fresh_are_stored(self, b, generator):  # the rollout's calls (8 envs) draw; the measure's (64) reuse
        if b != 64:
            return pairs(self, b, generator)
        return torch.cat(stored["t"]), torch.cat(stored["noise"])

    monkeypatch.setattr(FlowActor, "act", remember)
    monkeypatch.setattr(FlowActor, "sample_pairs", fresh_are_stored)
    same = script.measure(tmp_path / "run", step=1, seed=5)
    assert same["corr"] > 0.999 and same["gap"] < 1e-5
