"""A FlowPolicy with its encoder inside: images + instruction in, chunks out, saved and loaded whole."""

from __future__ import annotations

import json

import pytest
import torch

from fmpolicy import CheckpointError, ConfigError, FlowPolicy, NormalizationConfig, PolicyConfig, make_expert_config
from fmpolicy.config import EncoderConfig
from tests.helpers import randomized

CAM = "observation.images.top"


def make_policy(**encoder_overrides) -> FlowPolicy:
    enc = EncoderConfig(kind="vision_text", image_size=32, vision_patch_size=8, out_dim=32, max_text_tokens=12,
                        **encoder_overrides)
    cfg = PolicyConfig(state_dim=2, action_dim=2, chunk_size=4, n_action_steps=2, device="cpu",
                       expert=make_expert_config("tiny", prefix_dim=32), encoder=enc,
                       normalization=NormalizationConfig(state="identity", action="identity"))
    policy = FlowPolicy(cfg)
    randomized(policy.net, 0)
    return policy


def make_obs(b: int = 3, tasks=None) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"observation.state": torch.randn(b, 2, generator=g), CAM: torch.rand(b, 3, 32, 32, generator=g),
            "task": tasks or ["go to the red goal"] * b}


def test_the_encoder_runs_once_per_chunk_and_the_instruction_matters():
    policy = make_policy(freeze_text=False)
    calls = []
    policy.encoder.register_forward_hook(lambda *_: calls.append(1))
    noise = policy.sample_noise(3, torch.Generator().manual_seed(1))
    red = policy.predict_action_chunk(make_obs(), noise=noise)
    assert red.shape == (3, 4, 2) and len(calls) == 1  # 10 Euler steps, one encoder pass
    blue = policy.predict_action_chunk(make_obs(tasks=["go to the blue goal"] * 3), noise=noise)
    assert (red - blue).abs().max() > 1e-4


def test_training_reaches_the_unfrozen_parts_only():
    policy = make_policy()  # vision tower and text model frozen; projections and expert train
    batch = {**make_obs(), "action": torch.randn(3, 4, 2)}
    loss, _ = policy.compute_loss(batch)
    loss.backward()
    enc = policy.encoder
    frozen = [p for n, p in enc.named_parameters() if not p.requires_grad]
    trained = [p for n, p in enc.named_parameters() if p.requires_grad]
    assert frozen and trained
    assert all(p.grad is None for p in frozen)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_save_load_round_trip_includes_the_encoder(tmp_path):
    policy = make_policy(freeze_vision=False)
    with torch.no_grad():
        for p in policy.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights that differ from a fresh build
    obs, noise = make_obs(), policy.sample_noise(3, torch.Generator().manual_seed(2))
    path = policy.save_pretrained(tmp_path / "p")
    loaded = FlowPolicy.from_pretrained(path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in policy.state_dict().items())
    # the weights are equal bit for bit; the outputs agree to float32 rounding, not always
    # exactly: with one thread the loaded tensors' other memory alignment can pick other vector kernels
    torch.testing.assert_close(loaded.predict_action_chunk(obs, noise=noise),
                               policy.predict_action_chunk(obs, noise=noise), rtol=1e-5, atol=0)
    meta = json.loads((path / "config.json").read_text())
    assert meta["encoder_preprocessing"]["image_size"] == 32
    meta["encoder_preprocessing"]["image_size"] = 64  # a processor that no longer matches
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="preprocessing settings"):
        FlowPolicy.from_pretrained(path)


def test_encoder_width_must_match_the_expert_prefix():
    with pytest.raises(ConfigError, match=r"expert\.prefix_dim = 16.*encoder\.out_dim = 32"):
        PolicyConfig(expert=make_expert_config("tiny", prefix_dim=16), encoder=EncoderConfig(kind="vision_text", out_dim=32))


def test_lora_adapters_train_and_travel_with_the_policy(tmp_path):
    pytest.importorskip("peft")
    policy = make_policy(lora_rank=4)  # text model frozen, LoRA adapters on it train
    lora = [n for n, p in policy.encoder.named_parameters() if "lora" in n.lower()]
    assert lora and all(dict(policy.encoder.named_parameters())[n].requires_grad for n in lora)
    loss, _ = policy.compute_loss({**make_obs(), "action": torch.randn(3, 4, 2)})
    loss.backward()
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    state = policy.state_dict()
    assert all(f"encoder.{n}" in state for n in lora)
    loaded = FlowPolicy.from_pretrained(policy.save_pretrained(tmp_path / "p"))
    for n in lora:
        assert torch.equal(loaded.state_dict()[f"encoder.{n}"], state[f"encoder.{n}"]), n
    obs, noise = make_obs(), policy.sample_noise(3, torch.Generator().manual_seed(3))
    # the weights are equal bit for bit (checked above); the outputs agree to float32 rounding, not always
    # exactly: with one thread the loaded tensors' other memory alignment can pick other vector kernels
    torch.testing.assert_close(loaded.predict_action_chunk(obs, noise=noise),
                               policy.predict_action_chunk(obs, noise=noise), rtol=1e-5, atol=0)
