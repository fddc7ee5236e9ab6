"""policy.aux: an auxiliary target for training only (privileged entries of the batch, e.g. the simulator's
goal) predicted from the pooled prefix. The head learns it, its loss is added with its weight and only
when the batch holds the key, it saves and loads, and bad settings name the field."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fmpolicy import FlowPolicy, PolicyConfig, make_expert_config
from fmpolicy.config import AuxConfig, EncoderConfig, ImitationConfig
from fmpolicy.errors import ConfigError

TOP = "observation.images.top"
KEY = "observation.environment_state"


def make_policy(aux: dict | None = None, encoder: bool = True) -> FlowPolicy:
    enc = EncoderConfig(kind="vision_text", cameras=(TOP,), image_size=16, vision_tower="conv", vision_hidden_size=8,
                        vision_num_hidden_layers=1, vision_keypoints=8, text_hidden_size=16, text_intermediate_size=32,
                        text_num_hidden_layers=1, text_num_attention_heads=2, max_text_tokens=8, out_dim=16)
    cfg = PolicyConfig(state_dim=2, action_dim=2, chunk_size=4, n_action_steps=2, device="cpu",
                       expert=make_expert_config("mlp", max_state_dim=2, max_action_dim=2, prefix_dim=16),
                       encoder=enc if encoder else EncoderConfig(), aux=AuxConfig(**(aux or {})))
    torch.manual_seed(0)
    return FlowPolicy(cfg)


def marker_batch(n: int, g: torch.Generator, size: int = 16) -> dict:
    """Dark images with one bright pixel; the environment state holds noise and, at entries 2 and 3, the
    pixel's column and row: what the auxiliary head should find."""
    xy = torch.randint(1, size - 1, (n, 2), generator=g)
    images = torch.full((n, 3, size, size), 0.1)
    images[torch.arange(n), :, xy[:, 1], xy[:, 0]] = 1.0
    env_state = torch.randn(n, 5, generator=g)
    env_state[:, 2:4] = xy.float()
    return {"observation.state": torch.zeros(n, 2), "action": torch.randn(n, 4, 2, generator=g), TOP: images,
            "task": ["find the marker"] * n, KEY: env_state}


def test_the_head_learns_where_the_marker_is_and_its_loss_is_added_with_its_weight():
    g = torch.Generator().manual_seed(0)
    policy = make_policy({"key": KEY, "dims": [2, 3], "weight": 0.5})
    policy.fit_normalization(torch.zeros(10, 2), torch.randn(10, 4, 2, generator=g))
    data = marker_batch(512, g)
    policy.fit_aux_normalization(data[KEY])
    torch.testing.assert_close(policy.aux_mean, data[KEY][:, 2:4].mean(0))
    torch.testing.assert_close(policy.aux_std, data[KEY][:, 2:4].std(0))

    # the total is the policy's own loss plus weight x the auxiliary one; without the key, the policy's own
    t, noise = torch.full((8,), 0.3), torch.randn(8, 4, 2, generator=g)
    batch = {k: v[:8] for k, v in data.items()}
    with_aux, info = policy.compute_loss(batch, t=t, noise=noise)
    plain, plain_info = policy.compute_loss({k: v for k, v in batch.items() if k != KEY}, t=t, noise=noise)
    assert "aux_loss" in info and "aux_loss" not in plain_info
    torch.testing.assert_close(with_aux, plain + 0.5 * info["aux_loss"], rtol=1e-5, atol=1e-6)

    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    history = []
    for _ in range(300):
        idx = torch.randint(0, 512, (32,), generator=g)
        loss, info = policy.compute_loss({k: v[idx] if torch.is_tensor(v) else v[:32] for k, v in data.items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(info["aux_loss"]))
    start, end = sum(history[:20]) / 20, sum(history[-20:]) / 20
    assert start > 0.6 and end < 0.25, (start, end)  # normalized units: the mean alone scores ~1


def test_aux_saves_and_loads(tmp_path):
    policy = make_policy({"key": KEY, "dims": [2, 3]})
    policy.fit_normalization(torch.randn(10, 2), torch.randn(10, 4, 2))
    policy.fit_aux_normalization(torch.randn(20, 5) * 3 + 1)
    policy.save_pretrained(tmp_path / "p")
    loaded = FlowPolicy.from_pretrained(tmp_path / "p", device="cpu")
    assert loaded.config.aux == policy.config.aux
    for name, value in policy.state_dict().items():
        if name.startswith("aux"):
            torch.testing.assert_close(loaded.state_dict()[name], value)


@pytest.mark.parametrize("aux, field", [({"key": KEY}, "dims"), ({"key": KEY, "dims": [1, 1]}, "dims"),
                                        ({"key": KEY, "dims": [-1]}, "dims"), ({"weight": -1.0}, "weight"),
                                        ({"key": KEY, "dims": [0], "hidden": 0}, "hidden")])
def test_bad_aux_settings_name_the_field(aux, field):
    with pytest.raises(ConfigError, match=field):
        AuxConfig(**aux)


def test_aux_needs_an_encoder_and_the_dataset_must_hold_the_key():
    with pytest.raises(ConfigError, match="aux.key"):
        make_policy({"key": KEY, "dims": [0]}, encoder=False)
    from fmpolicy.training.imitation import make_policy as trainer_policy

    policy_cfg = make_policy({"key": KEY, "dims": [2]}).config
    stats = {"mean": torch.zeros(2), "std": torch.ones(2), "min": -torch.ones(2), "max": torch.ones(2)}
    dataset = SimpleNamespace(state_dim=2, action_dim=2, stats={"observation.state": stats, "action": stats},
                              extras={}, root="data/without_it")
    with pytest.raises(ConfigError, match="not a feature of the dataset data/without_it"):
        trainer_policy(ImitationConfig(policy=policy_cfg), {"default": dataset}, torch.device("cpu"))
    dataset.extras = {KEY: torch.randn(30, 5)}
    policy = trainer_policy(ImitationConfig(policy=policy_cfg), {"default": dataset}, torch.device("cpu"))
    torch.testing.assert_close(policy.aux_mean, dataset.extras[KEY][:, 2:3].mean(0))
