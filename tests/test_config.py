"""Configs: strict dict mapping, validation messages, presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fmpolicy.config import (
    EXPERT_PRESETS,
    ExpertConfig,
    PolicyConfig,
    SamplerConfig,
    config_from_dict,
    config_to_dict,
    make_expert_config,
)
from fmpolicy.errors import ConfigError


def test_dict_round_trip_is_exact():
    cfg = PolicyConfig(state_dim=7, action_dim=3, chunk_size=12, n_action_steps=6,
                       expert=make_expert_config("cpu", prefix_dim=64), sampler=SamplerConfig(method="rk4", num_steps=4))
    assert config_from_dict(PolicyConfig, config_to_dict(cfg)) == cfg


def test_unknown_keys_are_errors_at_every_level():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['chunk'\] in PolicyConfig"):
        config_from_dict(PolicyConfig, {"chunk": 4})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['steps'\] in PolicyConfig\.sampler"):
        config_from_dict(PolicyConfig, {"sampler": {"steps": 4}})


@pytest.mark.parametrize("data, pattern", [
    ({"sampler": {"method": "heun"}}, r"SamplerConfig\.method = 'heun'.*one of"),
    ({"sampler": {"num_steps": 0}}, r"SamplerConfig\.num_steps = 0.*positive int"),
    ({"expert": {"width": 100, "num_heads": 3}}, r"num_heads = 3.*divisor of width=100"),
    ({"flow": {"time_sampling": "cosine"}}, r"FlowConfig\.time_sampling = 'cosine'"),
    ({"normalization": {"action": "zscore"}}, r"NormalizationConfig\.action = 'zscore'"),
    ({"chunk_size": "ten"}, r"PolicyConfig\.chunk_size = 'ten' has the wrong type"),
    ({"device": "tpu"}, r"PolicyConfig\.device = 'tpu'"),
    ({"expert": 5}, r"PolicyConfig\.expert must be a mapping"),
])
def test_invalid_values_name_the_field_and_the_value(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(PolicyConfig, data)


def test_ints_are_accepted_for_floats_and_presets_are_valid():
    assert config_from_dict(SamplerConfig, {"atol": 1}).atol == 1.0
    for name, preset in EXPERT_PRESETS.items():
        assert isinstance(preset, ExpertConfig), name
    assert make_expert_config("cpu", depth=2).depth == 2
    with pytest.raises(ConfigError, match="preset 'huge'"):
        make_expert_config("huge")
    with pytest.raises(dataclasses.FrozenInstanceError):
        PolicyConfig().chunk_size = 3  # type: ignore[misc]


def test_dotted_overrides_parse_yaml_values_and_exponent_floats():
    from fmpolicy.config import apply_overrides

    out = apply_overrides({"train": {"lr": 0.1}}, ["train.lr=1e-3", "train.steps=5", "data.image_keys=[a, b]", "x=abc"])
    assert out == {"train": {"lr": 0.001, "steps": 5}, "data": {"image_keys": ["a", "b"]}, "x": "abc"}
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["train.lr"])


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """The configs in configs/ stay true to the dataclasses: an unknown or mistyped key is an error."""
    from fmpolicy.config import ImitationConfig, load_config
    from fmpolicy.rl.config import load_rl_config

    if path.name.startswith("fpo_"):
        assert load_rl_config(str(path)).rl.total_env_steps > 0
    else:
        assert load_config(ImitationConfig, str(path)).policy.action_dim > 0
