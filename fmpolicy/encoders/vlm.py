"""`VLMEncoder`: a whole PaliGemma VLM; its last hidden states over [image tokens, prompt] are the prefix.

Sequence (p = k * n_patches + max_text_tokens), as PaliGemma's processor lays it out:
    [camera 1 image tokens, ..., camera k image tokens, <bos> prompt ... <pad>]
Attention over the prefix is bidirectional (PaliGemma's prefix-LM: token_type_ids = 0), and
padding tokens and the image tokens of absent cameras are masked out of attention and of the
output mask. The tiny path builds `PaliGemmaModel` from a `PaliGemmaConfig` (tiny SigLIP + tiny
Gemma) with a byte tokenizer; `vlm_path` loads a pretrained PaliGemma and its tokenizer from a
local folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from fmpolicy.encoders.base import PrefixEncoder, add_lora
from fmpolicy.encoders.config import EncoderConfig
from fmpolicy.encoders.inputs import preprocess_images, read_tasks
from fmpolicy.encoders.tokenizer import ByteTokenizer, HFTokenizer
from fmpolicy.encoders.vision_text import _local_folder
from fmpolicy.errors import ConfigError

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_vlm(config: EncoderConfig) -> tuple[nn.Module, ByteTokenizer | HFTokenizer]:
    """A PaliGemmaModel (no LM head) and its tokenizer: tiny from config, or from `vlm_path`."""
    from transformers import AutoModel, GemmaConfig, PaliGemmaConfig, PaliGemmaModel, SiglipVisionConfig

    if config.vlm_path:
        folder = _local_folder(config.vlm_path, "vlm_path")
        model = AutoModel.from_pretrained(folder)
        if getattr(model.config, "model_type", "") != "paligemma":
            raise ConfigError(f"EncoderConfig.vlm_path = {config.vlm_path!r} is invalid: expected a PaliGemma "
                              f"checkpoint, found model_type {getattr(model.config, 'model_type', None)!r}")
        size = model.config.vision_config.image_size
        if size != config.image_size:
            raise ConfigError(f"EncoderConfig.image_size = {config.image_size} is invalid: the VLM at "
                              f"{config.vlm_path} takes {size} x {size} images")
        return model, HFTokenizer(folder, suffix="\n")
    tok = ByteTokenizer()
    head_dim = config.text_hidden_size // config.text_num_attention_heads
    vision = SiglipVisionConfig(hidden_size=config.vision_hidden_size,
                                num_hidden_layers=config.vision_num_hidden_layers,
                                num_attention_heads=config.vision_num_attention_heads,
                                intermediate_size=config.vision_intermediate_size,
                                patch_size=config.vision_patch_size, image_size=config.image_size)
    text = GemmaConfig(vocab_size=tok.vocab_size + 1, hidden_size=config.text_hidden_size,
                       num_hidden_layers=config.text_num_hidden_layers,
                       num_attention_heads=config.text_num_attention_heads, num_key_value_heads=1,
                       head_dim=head_dim, intermediate_size=config.text_intermediate_size,
                       pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    pg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tok.vocab_size,
                         projection_dim=config.text_hidden_size)
    return PaliGemmaModel(pg), tok


class VLMEncoder(PrefixEncoder):
    """PaliGemma hidden states over [image tokens, instruction] -> prefix (b, p, out_dim)."""

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.vlm, self.tokenizer = build_vlm(config)
        vc = self.vlm.config.vision_config
        self.num_patches = (vc.image_size // vc.patch_size) ** 2
        self.image_token_id = self.vlm.config.image_token_id
        self.proj = nn.Linear(self.vlm.config.text_config.hidden_size, config.out_dim)
        if config.lora_rank > 0:
            # adapters on the language model's linear layers; the rest of the VLM as freeze_vlm says
            self.vlm.language_model = add_lora(self.vlm.language_model, config.lora_rank, config.lora_alpha,
                                               LORA_TARGETS)
            if config.freeze_vlm:
                for name, p in self.vlm.named_parameters():
                    if not name.startswith("language_model."):
                        p.requires_grad_(False)
                self._frozen += [self.vlm.vision_tower, self.vlm.multi_modal_projector]
                self.vlm.vision_tower.eval(), self.vlm.multi_modal_projector.eval()
        elif config.freeze_vlm:
            self._freeze(self.vlm)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.proj.parameters())

    def backbone(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """-> hidden (b, p, d_vlm) last hidden states, mask (b, p) bool."""
        c = self.config
        pixels, present, b = preprocess_images(batch, c.cameras, c.image_size, c.image_mean, c.image_std, self.device,
                                               c.resize_images)
        tasks = read_tasks(batch, b, c.require_task)
        ids, text_mask = self.tokenizer.tokenize(tasks, c.max_text_tokens)
        k, n = len(c.cameras), self.num_patches
        image_ids = torch.full((b, k * n), self.image_token_id, dtype=torch.long)
        input_ids = torch.cat([image_ids, ids], dim=1).to(self.device)  # (b, p)
        image_mask = repeat(present, "b k -> b (k n)", n=n)
        mask = torch.cat([image_mask, text_mask.to(self.device)], dim=1)  # (b, p)
        frozen = c.freeze_vlm and c.lora_rank == 0
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = self.vlm(input_ids=input_ids, pixel_values=rearrange(pixels, "b k c h w -> (b k) c h w"),
                           attention_mask=mask.long(), token_type_ids=torch.zeros_like(input_ids))
        return {"hidden": out.last_hidden_state, "mask": mask}

    def head(self, features: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """features -> prefix (b, p, out_dim), mask (b, p) bool."""
        return self.proj(features["hidden"]), features["mask"]
