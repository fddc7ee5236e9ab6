"""What every prefix encoder shares: the backbone / head split, freezing, LoRA and the common API.

An encoder is `head(backbone(batch))`:
- `backbone(batch) -> features`: validation, preprocessing and the (possibly frozen) `transformers`
  models. Its output is a dict of tensors with the batch on axis 0, which `EncoderOutputCache`
  stores per dataset frame when the backbone is frozen.
- `head(features) -> (prefix (b, p, d), mask (b, p) bool)`: the trainable projections to the
  expert's width. It always runs, so a cached backbone still trains the projections.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fmpolicy.encoders.config import EncoderConfig
from fmpolicy.errors import ConfigError


def freeze(module: nn.Module) -> nn.Module:
    """No gradient and eval mode (dropout off); `PrefixEncoder.train` keeps it in eval mode."""
    module.requires_grad_(False)
    return module.eval()


def add_lora(module: nn.Module, rank: int, alpha: float, target_modules: list[str] | str) -> nn.Module:
    """Inject LoRA adapters (peft) into `module` in place: only the adapters stay trainable.

    The adapters are ordinary submodules (`lora_A` / `lora_B`), so they appear in the encoder's
    `state_dict` and a save / load round-trips them.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("EncoderConfig.lora_rank > 0 needs the `peft` package: pip install peft") from None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules)
    module = inject_adapter_in_model(config, module)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return module


class PrefixEncoder(nn.Module):
    """Common API: `encoder(batch) -> (prefix (b, p, out_dim), mask (b, p) bool)`."""

    config: EncoderConfig

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self._frozen: list[nn.Module] = []  # fully frozen submodules, kept in eval mode

    # subclasses define these two
    def backbone(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def head(self, features: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """batch with `observation.images.<cam>` (b, 3, H, W) and `task` -> prefix (b, p, d), mask (b, p)."""
        return self.head(self.backbone(batch))

    def encode_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of `batch` with `observation.prefix` and `observation.prefix_mask` added (what FlowPolicy reads)."""
        prefix, mask = self(batch)
        return {**batch, "observation.prefix": prefix, "observation.prefix_mask": mask}

    def _freeze(self, module: nn.Module) -> nn.Module:
        self._frozen.append(module)
        return freeze(module)

    def train(self, mode: bool = True) -> "PrefixEncoder":
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def backbone_frozen(self) -> bool:
        """True when no backbone parameter trains: its outputs can then be cached per frame."""
        head = {id(p) for p in self.head_parameters()}
        return not any(p.requires_grad for p in self.parameters() if id(p) not in head)

    def head_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def preprocessing_config(self) -> dict[str, Any]:
        """The processor settings to save with a policy: a policy served with other settings sees other inputs."""
        c = self.config
        return {
            "kind": c.kind,
            "cameras": list(c.cameras),
            "image_size": c.image_size,
            "image_mean": list(c.image_mean),
            "image_std": list(c.image_std),
            "resize": ("bilinear, antialias=True, align_corners=False (torch.nn.functional.interpolate)"
                       if c.resize_images else "none: other sizes are an error"),
            "image_input": "float in [0, 1] (uint8 is divided by 255)",
            "max_text_tokens": c.max_text_tokens,
            "tokenizer": self.tokenizer.identity(),
            "prefix_tokens": self.num_tokens,
            "out_dim": c.out_dim,
        }

    @property
    def num_tokens(self) -> int:
        """Prefix length p: `num_patches` image tokens per camera (set by the subclass), then the text."""
        return len(self.config.cameras) * self.num_patches + self.config.max_text_tokens
