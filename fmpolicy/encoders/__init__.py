"""Prefix encoders: camera images + an instruction -> prefix tokens (b, p, d) and a mask (b, p) for the expert.

    encoder = make_encoder(EncoderConfig(kind="vision_text", out_dim=policy_config.expert.prefix_dim))
    prefix, mask = encoder(batch)  # batch: observation.images.<cam> (b, 3, H, W) in [0, 1], task (b strings)
    batch = encoder.encode_batch(batch)  # adds observation.prefix / observation.prefix_mask for FlowPolicy

Kinds: "vision_text" (SigLIP vision tower + a text encoder, `VisionTextEncoder`), "vlm" (a whole
PaliGemma, `VLMEncoder`) and "task" (a learned embedding of an instruction from a fixed list,
`TaskEncoder`: multi-task policies without images). See docs/encoders.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from fmpolicy.config import config_from_dict, config_to_dict
from fmpolicy.encoders.base import PrefixEncoder
from fmpolicy.encoders.cache import EncoderOutputCache, benchmark_cache
from fmpolicy.encoders.config import ENCODER_KINDS, EncoderConfig
from fmpolicy.errors import CheckpointError
from fmpolicy.io import atomic_directory

CONFIG_FILE = "encoder_config.json"
WEIGHTS_FILE = "encoder.safetensors"


def make_encoder(config: EncoderConfig) -> PrefixEncoder | None:
    """The encoder `config.kind` names; None for kind="none" (the policy then reads observation.prefix, if any)."""
    if config.kind == "none":
        return None
    if config.kind == "vision_text":
        from fmpolicy.encoders.vision_text import VisionTextEncoder

        return VisionTextEncoder(config)
    if config.kind == "task":
        from fmpolicy.encoders.task import TaskEncoder

        return TaskEncoder(config)
    from fmpolicy.encoders.vlm import VLMEncoder

    return VLMEncoder(config)


def save_encoder(encoder: PrefixEncoder, directory: str | Path) -> Path:
    """Write encoder_config.json (config + preprocessing settings) and encoder.safetensors (all weights, LoRA
    included) as the directory `directory`, which is replaced whole."""
    directory = Path(directory)
    meta = {"config": config_to_dict(encoder.config), "preprocessing": encoder.preprocessing_config()}
    with atomic_directory(directory) as tmp:  # a crash leaves the old encoder or the new one
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        save_model(encoder, str(tmp / WEIGHTS_FILE))
    return directory


def load_encoder(directory: str | Path) -> PrefixEncoder:
    """Rebuild an encoder saved by `save_encoder`; its preprocessing settings must match the saved ones."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory / CONFIG_FILE} does not exist: not an encoder saved by save_encoder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or "preprocessing" not in meta:
        raise CheckpointError(f"{directory / CONFIG_FILE}: expected a JSON object with the fields 'config' (an object) "
                              "and 'preprocessing', as save_encoder writes")
    encoder = make_encoder(config_from_dict(EncoderConfig, meta["config"], where=f"{directory / CONFIG_FILE}:config"))
    try:
        missing, unexpected = load_model(encoder, str(directory / WEIGHTS_FILE), strict=False)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} is not a readable safetensors file (truncated, empty or "
                              f"corrupt?): {e}") from e
    if missing or unexpected:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} does not match the encoder: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    saved = json.loads(json.dumps(meta["preprocessing"]))
    now = json.loads(json.dumps(encoder.preprocessing_config()))
    if saved != now:
        raise CheckpointError(f"{directory}: the saved preprocessing settings {saved} differ from the rebuilt "
                              f"encoder's {now} (a tokenizer or model folder changed?)")
    return encoder.eval()


__all__ = ["ENCODER_KINDS", "EncoderConfig", "EncoderOutputCache", "PrefixEncoder", "benchmark_cache",
           "load_encoder", "make_encoder", "save_encoder"]
