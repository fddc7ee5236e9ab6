"""Bad inputs a user can give, each a clear error (or, where the docs say so, harmless): unreadable
checkpoints, devices that are not there, NaN in padded action steps, empty batches, malformed
noise / t / arrays, and non-finite or out-of-range config numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fmpolicy import CheckpointError, ConfigError, FlowPolicy, InputError, PolicyConfig
from fmpolicy.config import ImitationConfig, TrainConfig, load_config, resolve_device
from fmpolicy.flow import compute_cfm_loss, make_valid_mask
from fmpolicy.rl.config import RLConfig, RLRunConfig, load_rl_config
from tests.helpers import load_script
from tests.test_policy import A, H, S, make_batch, make_obs, make_policy, make_two_arm_policy

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


# ---- checkpoints ---------------------------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbled":
        path.write_bytes(bytes(range(256)) * 8)
    else:  # a garbled header: the length prefix is intact, the JSON after it is not
        path.write_bytes(data[:8] + b"#" * 40 + data[48:])


@pytest.fixture
def saved(tmp_path) -> Path:
    return make_policy().save_pretrained(tmp_path / "policy")


@pytest.mark.parametrize("how", ["truncated", "empty", "garbled", "garbled_header"])
def test_a_truncated_empty_or_garbled_weights_file_is_a_checkpoint_error_naming_the_path(saved, how):
    weights = saved / "model.safetensors"
    _damage(weights, how)
    with pytest.raises(CheckpointError, match=rf"{weights}.*not a readable safetensors file"):
        FlowPolicy.from_pretrained(saved)


def test_init_from_a_truncated_checkpoint_is_a_checkpoint_error(saved):
    from fmpolicy.rl.trainer import make_actor

    _damage(saved / "model.safetensors", "truncated")
    config = RLRunConfig(policy=make_policy().config, rl=RLConfig(device="cpu"), init_from=str(saved))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        make_actor(config, torch.device("cpu"))


def test_evaluate_script_exits_with_a_message_on_a_truncated_checkpoint(saved, tmp_path):
    evaluate = load_script("evaluate")
    _damage(saved / "model.safetensors", "truncated")
    with pytest.raises(SystemExit, match=r"^error: .*model\.safetensors.*not a readable safetensors file"):
        evaluate.main(["--policy", str(saved), "--env", "fmpolicy/PointObstacle-v0", "--device", "cpu",
                       "--out", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, bad):
    policy = make_policy()
    with torch.no_grad():
        policy.net.action_out.weight[0, 0] = bad
    path = policy.save_pretrained(tmp_path / "p")
    with pytest.raises(CheckpointError, match=r"NaN or inf.*net\.action_out\.weight"):
        FlowPolicy.from_pretrained(path)


@pytest.mark.parametrize("edit, pattern", [
    (lambda meta: meta["config"].pop("state_dim"), r"config\.json.*'state_dim'"),
    (lambda meta: meta.pop("config"), r"config\.json.*'config'"),
    (lambda meta: meta.update(config=[1, 2]), r"config\.json.*'config'.*list"),
])
def test_a_config_json_missing_a_field_is_a_checkpoint_error_naming_it(saved, edit, pattern):
    meta = json.loads((saved / "config.json").read_text())
    edit(meta)
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=pattern):
        FlowPolicy.from_pretrained(saved)


@pytest.mark.parametrize("text", ["[1, 2]", "3", "null"])
def test_a_config_json_that_is_not_an_object_is_a_checkpoint_error(saved, text):
    (saved / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config\.json.*expected a JSON object"):
        FlowPolicy.from_pretrained(saved)


def test_a_failed_save_leaves_the_old_policy_in_place(tmp_path, monkeypatch):
    import fmpolicy.policy as policy_module

    a, b = make_policy(seed=0), make_policy(seed=1)
    a.save_pretrained(tmp_path / "p")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(policy_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        b.save_pretrained(tmp_path / "p")
    obs, noise = make_obs(), a.sample_noise(4, torch.Generator().manual_seed(0))
    loaded = FlowPolicy.from_pretrained(tmp_path / "p")
    assert torch.equal(loaded.predict_action_chunk(obs, noise=noise), a.predict_action_chunk(obs, noise=noise))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_encoder_files_truncated_are_checkpoint_errors_and_a_failed_cache_save_keeps_the_old_file(
        tmp_path, monkeypatch):
    from fmpolicy.encoders import EncoderOutputCache, load_encoder, save_encoder
    from tests.test_encoders import build
    from tests.test_encoders import make_batch as make_image_batch

    encoder = build(seed=0)
    cache = EncoderOutputCache(encoder).fill([(torch.arange(3), make_image_batch(b=3))])
    path = cache.save(tmp_path / "cache" / "encoder_cache.safetensors")
    old = path.read_bytes()
    cache.fill([(torch.tensor([7]), make_image_batch(b=1, seed=4))])

    def crash(src, dst):  # the writer dies after writing the new bytes, before the rename
        raise OSError("killed before the rename")

    with monkeypatch.context() as m:
        m.setattr("os.replace", crash)
        with pytest.raises(OSError, match="killed before the rename"):
            cache.save(path)
    assert path.read_bytes() == old and [p.name for p in path.parent.iterdir()] == [path.name]
    assert len(EncoderOutputCache.load(path, encoder)) == 3
    assert len(EncoderOutputCache.load(cache.save(path), encoder)) == 4
    _damage(path, "truncated")
    with pytest.raises(CheckpointError, match=rf"{path}.*not a readable safetensors file"):
        EncoderOutputCache.load(path, encoder)
    folder = save_encoder(encoder, tmp_path / "enc")
    _damage(folder / "encoder.safetensors", "truncated")
    with pytest.raises(CheckpointError, match=r"encoder\.safetensors.*not a readable safetensors file"):
        load_encoder(folder)


# ---- devices -------------------------------------------------------------------------------------------


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_device_cuda_without_cuda_is_a_config_error_naming_the_field(device):
    with pytest.raises(ConfigError, match=rf"PolicyConfig\.device = '{device}'.*CUDA is not available"):
        FlowPolicy(PolicyConfig(device=device))
    with pytest.raises(ConfigError, match=rf"RLConfig\.device = '{device}'.*CUDA is not available"):
        load_rl_config(None, [f"rl.device={device}"])
    with pytest.raises(ConfigError, match=rf"rl\.device = '{device}'.*CUDA is not available"):
        resolve_device(device, "rl.device")


def test_device_auto_falls_back_to_cpu_and_malformed_devices_are_config_errors():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("cuda:x", "gpu", "cuda:-1", ""):
        with pytest.raises(ConfigError, match=rf"device = '{bad}'.*'auto', 'cpu', 'cuda' or 'cuda:N'"):
            resolve_device(bad, "device")
        with pytest.raises(ConfigError, match=rf"PolicyConfig\.device = '{bad}'"):
            PolicyConfig(device=bad)


@pytest.mark.gpu
def test_a_cuda_index_past_the_last_gpu_is_a_config_error():
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"policy\.device = 'cuda:{n}'.*{n} CUDA device"):
        resolve_device(f"cuda:{n}", "policy.device")


@no_cuda
def test_a_policy_saved_for_cuda_loads_on_a_cpu_machine_when_asked_to(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["config"]["device"] = "cuda"
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"device = 'cuda'.*CUDA is not available"):
        FlowPolicy.from_pretrained(saved)
    assert FlowPolicy.from_pretrained(saved, device="cpu").device.type == "cpu"


@no_cuda
def test_rl_training_with_device_cuda_without_cuda_stops_before_writing(tmp_path):
    train_fpo = load_script("train_fpo")
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"^error: .*device = 'cuda'.*CUDA is not available"):
        train_fpo.main(["rl.device=cuda", f"rl.out_dir={out}", "rl.progress=false"])
    assert not out.exists()


@no_cuda
def test_evaluate_script_with_device_cuda_without_cuda_exits_with_a_message(saved, tmp_path):
    evaluate = load_script("evaluate")
    with pytest.raises(SystemExit, match=r"^error: --device = 'cuda'.*CUDA is not available"):
        evaluate.main(["--policy", str(saved), "--env", "fmpolicy/PointObstacle-v0", "--device", "cuda",
                       "--out", str(tmp_path / "eval")])


# ---- losses with padded steps --------------------------------------------------------------------------


def test_nan_or_inf_in_masked_entries_gives_a_finite_cfm_loss_and_exactly_zero_gradient_there():
    g = torch.Generator().manual_seed(0)
    b, h, a, amax = 3, 4, 2, 5
    is_pad = torch.zeros(b, h, dtype=torch.bool)
    is_pad[1, 2:] = True
    valid = make_valid_mask(is_pad, b, h, a, amax)
    action, noise = torch.randn(b, h, amax, generator=g), torch.randn(b, h, amax, generator=g)
    v = torch.randn(b, h, amax, generator=g, requires_grad=True)
    clean = compute_cfm_loss(v, action, noise, valid)
    (clean_grad,) = torch.autograd.grad(clean.sum(), v)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(b * h * amax)[: b * h * amax]
    bad = bad.reshape(b, h, amax)
    v2 = torch.where(valid, v.detach(), bad).requires_grad_(True)
    loss = compute_cfm_loss(v2, torch.where(valid, action, bad), torch.where(valid, noise, -bad), valid)
    (grad,) = torch.autograd.grad(loss.sum(), v2)
    assert torch.equal(loss, clean.detach())
    assert torch.equal(grad, clean_grad) and torch.all(grad[~valid] == 0)


@pytest.mark.parametrize("head", ["flow", "regression"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_padded_action_steps_gives_a_finite_loss_and_gradient(head, bad):
    policy = make_policy(head=head)
    batch = make_batch()
    is_pad = torch.zeros(4, H, dtype=torch.bool)
    is_pad[0, 3:] = True
    is_pad[2, 1:] = True
    batch["action_is_pad"] = is_pad
    # reference: the padded steps hold the action mean (0 in network units) instead of junk
    ref = dict(batch, action=torch.where(is_pad[..., None], policy.action_normalizer.offset, batch["action"]))
    batch["action"] = torch.where(is_pad[..., None], bad, batch["action"])
    t = torch.rand(4, generator=torch.Generator().manual_seed(0))
    noise = policy.sample_noise(4, torch.Generator().manual_seed(1))

    def loss_and_grads(b):
        policy.zero_grad()
        loss, _ = policy.compute_loss(b, t=t, noise=noise)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in policy.parameters() if p.grad is not None]

    loss, grads = loss_and_grads(batch)
    ref_loss, ref_grads = loss_and_grads(ref)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_nan_in_a_narrower_robots_padded_action_dims_gives_a_finite_loss():
    policy = make_two_arm_policy()
    g = torch.Generator().manual_seed(1)
    a2 = torch.nn.functional.pad(torch.randn(3, H, 2, generator=g), (0, 2), value=float("nan"))
    batch = {"observation.state": torch.randn(5, 8, generator=g), "embodiment": ["arm2"] * 3 + ["arm4"] * 2,
             "action": torch.cat([a2, torch.randn(2, H, 4, generator=g)])}
    loss, _ = policy.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
    # NaN in a robot's own dims is still an error
    batch["action"][3, 0, 3] = float("nan")
    with pytest.raises(InputError, match="'action' contains NaN"):
        policy.compute_loss(batch)


# ---- batches, noise, t, arrays -------------------------------------------------------------------------


def test_an_empty_batch_is_an_input_error():
    policy = make_policy()
    empty = {k: v[:0] for k, v in make_batch().items()}
    for call in (lambda: policy.compute_loss(empty), lambda: policy.predict_action_chunk(empty),
                 lambda: policy.select_action(empty)):
        with pytest.raises(InputError, match=r"'observation.state' has batch size 0"):
            call()


def test_select_action_with_another_batch_size_than_the_queued_chunk_is_an_input_error_until_reset():
    policy = make_policy()
    policy.reset()
    assert policy.select_action(make_obs(4)).shape == (4, A)
    with pytest.raises(InputError, match=r"batch of 2.*queued actions for 4.*reset\(\)"):
        policy.select_action(make_obs(2))
    assert policy.select_action(make_obs(4)).shape == (4, A)  # the queue was left as it was
    policy.reset()
    assert policy.select_action(make_obs(2)).shape == (2, A)


def test_noise_of_the_wrong_dtype_shape_or_with_nan_is_an_input_error_naming_noise():
    policy = make_policy()
    obs, batch = make_obs(), make_batch()
    good = policy.sample_noise(4)
    nan = good.clone()
    nan[0, 0, 0] = float("nan")
    for noise, pattern in ((good.double(), r"dtype torch.float64.*torch.float32"),
                           (good[..., :3], r"shape \(4, 6, 3\).*\(4, 6, 32\)"),
                           (nan, "NaN"), (good.numpy(), "torch.Tensor")):
        with pytest.raises(InputError, match="noise.*" + pattern):
            policy.predict_action_chunk(obs, noise=noise)
        with pytest.raises(InputError, match="noise.*" + pattern):
            policy.compute_loss(batch, noise=noise)
    t = torch.full((4, 3), 0.5)
    pairs = torch.randn(4, 3, H, 32)
    for noise, pattern in ((pairs.double(), "torch.float64"),
                           (pairs[..., :3], r"shape \(4, 3, 6, 3\).*\(4, 3, 6, 32\)")):
        with pytest.raises(InputError, match="noise.*" + pattern):
            policy.compute_cfm_losses(obs, batch["action"], t, noise)


@pytest.mark.parametrize("value, pattern", [
    (2.0, r"outside \[0, 1\]"), (-0.1, r"outside \[0, 1\]"), (float("nan"), r"NaN"),
])
def test_t_outside_the_unit_interval_or_nan_is_an_input_error_naming_t(value, pattern):
    policy = make_policy()
    obs, batch = make_obs(), make_batch()
    t = torch.full((4,), 0.5)
    t[1] = value
    with pytest.raises(InputError, match=r"^'t' .*" + pattern):
        policy.compute_loss(batch, t=t)
    with pytest.raises(InputError, match=r"^'t' .*" + pattern):
        policy.compute_cfm_losses(obs, batch["action"], t[:, None].repeat(1, 3), torch.randn(4, 3, H, 32))


def test_t_of_the_wrong_shape_or_dtype_is_an_input_error_naming_t():
    policy = make_policy()
    obs, batch = make_obs(), make_batch()
    with pytest.raises(InputError, match=r"^'t' has shape \(4, 1\): expected \(4\)"):
        policy.compute_loss(batch, t=torch.full((4, 1), 0.5))
    with pytest.raises(InputError, match=r"^'t' has dtype torch.float64"):
        policy.compute_loss(batch, t=torch.full((4,), 0.5, dtype=torch.float64))
    with pytest.raises(InputError, match=r"^'t' has shape \(4,\): expected \(b, m\)"):
        policy.compute_cfm_losses(obs, batch["action"], torch.full((4,), 0.5), torch.randn(4, 3, H, 32))
    with pytest.raises(InputError, match=r"'action' has shape \(4, 5, 2\): expected \(4, 6, a\)"):
        policy.compute_cfm_losses(obs, batch["action"][:, :5], torch.full((4, 3), 0.5), torch.randn(4, 3, H, 32))


@pytest.mark.parametrize("value", [
    np.array([[1.0, 2.0, 3.0]] * 4, dtype=object),
    np.array([[1, "a", None]] * 4, dtype=object),
    np.array([["1", "2", "3"]] * 4),
    [[1.0, 2.0, 3.0], [1.0, 2.0]],
])
def test_object_string_or_ragged_arrays_are_input_errors_naming_the_key(value):
    policy = make_policy()
    with pytest.raises(InputError, match=r"^'observation.state' .*expected a numeric array"):
        policy.predict_action_chunk({"observation.state": value})


def test_fit_normalization_on_zero_rows_is_an_input_error():
    policy = make_policy()
    with pytest.raises(InputError, match=r"fit_normalization: 'states' has 0 rows"):
        policy.fit_normalization(torch.zeros(0, S), torch.zeros(10, H, A))
    with pytest.raises(InputError, match=r"fit_normalization: 'actions' has 0 rows"):
        policy.fit_normalization(torch.zeros(10, S), torch.zeros(0, H, A))
    with pytest.raises(InputError, match=r"'states' .*expected a numeric array"):
        policy.fit_normalization(np.array([[1, "a", None]], dtype=object), torch.zeros(10, H, A))


# ---- config numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, pattern", [
    ("train.lr=inf", r"TrainConfig\.lr = inf"),
    ("train.lr=.nan", r"TrainConfig\.lr = nan"),
    ("train.lr=0", r"TrainConfig\.lr = 0.0"),
    ("train.betas=[2,-1]", r"TrainConfig\.betas = \(2\.0, -1\.0\).*two numbers in \[0, 1\)"),
    ("train.betas=[0.9,.nan]", r"TrainConfig\.betas = \(0\.9, nan\)"),
    ("train.betas=[0.9]", r"train\.betas = \[0\.9\] has 1 items"),
    ("train.weight_decay=inf", r"TrainConfig\.weight_decay = inf"),
    ("train.weight_decay=-1", r"TrainConfig\.weight_decay = -1\.0"),
    ("train.grad_clip=inf", r"TrainConfig\.grad_clip = inf"),
    ("policy.flow.beta_alpha=inf", r"FlowConfig\.beta_alpha = inf"),
    ("policy.flow.logit_mean=nan", r"FlowConfig\.logit_mean = nan"),
    ("policy.sampler.atol=inf", r"SamplerConfig\.atol = inf"),
    ("policy.normalization.min_scale=inf", r"NormalizationConfig\.min_scale = inf"),
    ("policy.expert.mlp_ratio=inf", r"ExpertConfig\.mlp_ratio = inf"),
])
def test_non_finite_or_out_of_range_training_numbers_are_config_errors_naming_field_and_value(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ImitationConfig, None, [override])


def test_betas_given_directly_must_be_two_numbers_in_the_unit_interval():
    with pytest.raises(ConfigError, match=r"TrainConfig\.betas = \(0\.9, 1\.0\)"):
        TrainConfig(betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match=r"TrainConfig\.betas = \(0\.9,\)"):
        TrainConfig(betas=(0.9,))
    assert TrainConfig(betas=(0.0, 0.999)).betas == (0.0, 0.999)


@pytest.mark.parametrize("override, pattern", [
    ("rl.lr=inf", r"RLConfig\.lr = inf"),
    ("rl.gamma=nan", r"RLConfig\.gamma = nan"),
    ("rl.clip=inf", r"RLConfig\.clip = inf"),
    ("rl.vf_coef=inf", r"RLConfig\.vf_coef = inf"),
    ("rl.ent_coef=nan", r"RLConfig\.ent_coef = nan"),
    ("rl.max_grad_norm=inf", r"RLConfig\.max_grad_norm = inf"),
    ("rl.reward_scale=inf", r"RLConfig\.reward_scale = inf"),
    ("rl.value_clip=inf", r"RLConfig\.value_clip = inf"),
    ("rl.fpo.clamp_old=inf", r"FPOConfig\.clamp_old = inf"),
    ("rl.fpo.clamp_log_ratio=nan", r"FPOConfig\.clamp_log_ratio = nan"),
    ("rl.fpo.ref_coef=inf", r"FPOConfig\.ref_coef = inf"),
    ("rl.fpo.action_noise_std=inf", r"FPOConfig\.action_noise_std = inf"),
    ("rl.gaussian.init_log_std=nan", r"GaussianConfig\.init_log_std = nan"),
])
def test_non_finite_or_out_of_range_rl_numbers_are_config_errors_naming_field_and_value(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_rl_config(None, [override])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "point"
    load_script("collect_demos").main(["--env", "fmpolicy/PointObstacle-v0", "--episodes", "2", "--num-envs", "2",
                                       "--out", str(out), "--seed", "0", "--no-progress"])
    return out


@pytest.mark.parametrize("override, pattern", [
    ("train.lr=inf", r"TrainConfig\.lr = inf"),
    ("train.betas=[2,-1]", r"TrainConfig\.betas = \(2\.0, -1\.0\)"),
])
def test_train_script_rejects_bad_optimiser_numbers_before_creating_the_run_folder(dataset, tmp_path, override,
                                                                                   pattern):
    train = load_script("train")
    out = tmp_path / "run"
    argv = ["--config", str(ROOT / "configs" / "point_obstacle.yaml"), f"data.root={dataset}", f"train.out_dir={out}",
            "policy.expert.width=32", "policy.expert.depth=1", "policy.expert.num_heads=2",
            "policy.expert.time_embed_dim=32", "policy.device=cpu", "train.progress=false", "train.steps=1", override]
    with pytest.raises(SystemExit, match=r"^error: .*" + pattern):
        train.main(argv)
    assert not out.exists()


def test_policy_widths_can_be_taken_from_the_dataset(tmp_path):
    root = Path(__file__).parent / "fixtures" / "lerobot_v3" / "png"  # observation.state (3,), action (2,)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(f"data: {{root: {root}}}\npolicy:\n  state_dim: auto\n  action_dim: auto\n"
                         "  expert: {preset: cpu, max_state_dim: auto, max_action_dim: auto}\n")
    cfg = load_config(ImitationConfig, str(yaml_path))
    assert (cfg.policy.state_dim, cfg.policy.action_dim) == (3, 2)
    assert (cfg.policy.expert.max_state_dim, cfg.policy.expert.max_action_dim) == (3, 2)
    assert cfg.policy.expert.width == 128  # the rest of the preset is kept
    # the padded widths alone, with the robot's widths given
    cfg = load_config(ImitationConfig, None, [f"data.root={root}", "policy.state_dim=3", "policy.action_dim=2",
                                              "policy.expert.max_state_dim=auto"])
    assert cfg.policy.expert.max_state_dim == 3 and cfg.policy.expert.max_action_dim == 32
    with pytest.raises(ConfigError, match=r"'auto' take the widths from one dataset: expected data.root"):
        load_config(ImitationConfig, None, ["policy.state_dim=auto"])
    with pytest.raises(ConfigError, match="has no feature 'observation.joints'"):
        load_config(ImitationConfig, None, [f"data.root={root}", "policy.state_dim=auto",
                                            "data.rename_map={observation.joints: observation.state}"])
    with pytest.raises(ConfigError, match="meta/info.json"):
        load_config(ImitationConfig, None, [f"data.root={tmp_path}", "policy.action_dim=auto"])
