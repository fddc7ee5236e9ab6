"""`EncoderConfig`: what turns camera images + an instruction into prefix tokens for the expert.

Frozen and validated on construction like the configs of `fmpolicy.config` (a bad value raises
`ConfigError` naming the field, the value and what was expected); `config_from_dict(EncoderConfig, d)`
and `config_to_dict` map it to and from YAML / JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

from fmpolicy.config import _check, _choice, _positive_ints
from fmpolicy.errors import ConfigError

ENCODER_KINDS = ("none", "vision_text", "vlm")
IMAGES_PREFIX = "observation.images."
TEXT_MODELS = ("tiny", "minilm")  # or a local folder for `from_pretrained`


@dataclass(frozen=True)
class EncoderConfig:
    """The prefix encoder: a SigLIP vision tower + a text encoder, or a whole (PaliGemma) VLM."""

    kind: str = "none"  # "none" (no encoder), "vision_text" (vision tower + text model) or "vlm" (PaliGemma)
    cameras: tuple[str, ...] = ("observation.images.top",)  # batch keys of the cameras, in token order
    image_size: int = 64  # images are resized (bilinear, antialiased) to image_size x image_size
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalization (SigLIP: 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # pixel = (x - mean) / std, x in [0, 1]
    vision_path: str = ""  # local folder of a pretrained SiglipVisionModel; "" = build from the fields below
    vision_hidden_size: int = 64  # SiglipVisionConfig.hidden_size of a vision tower built from config
    vision_num_hidden_layers: int = 2  # SiglipVisionConfig.num_hidden_layers
    vision_num_attention_heads: int = 2  # SiglipVisionConfig.num_attention_heads
    vision_intermediate_size: int = 128  # SiglipVisionConfig.intermediate_size
    vision_patch_size: int = 16  # SiglipVisionConfig.patch_size; (image_size / patch_size)^2 tokens per camera
    text_model: str = "tiny"  # "tiny" (BertConfig + byte tokenizer), "minilm" (pretrained all-MiniLM-L6-v2) or a local folder
    text_hidden_size: int = 64  # hidden size of the tiny text model (and of the tiny VLM's Gemma)
    text_num_hidden_layers: int = 2  # layers of the tiny text model (and of the tiny VLM's Gemma)
    text_num_attention_heads: int = 2  # attention heads of the tiny text model (and of the tiny VLM's Gemma)
    text_intermediate_size: int = 128  # feed-forward size of the tiny text model (and of the tiny VLM's Gemma)
    max_text_tokens: int = 32  # instructions are padded / truncated to this many tokens (fixed prefix length)
    vlm_path: str = ""  # kind="vlm": local folder of a pretrained PaliGemma (+ tokenizer); "" = tiny from config
    out_dim: int = 128  # width of the prefix tokens = the expert's ExpertConfig.prefix_dim
    freeze_vision: bool = True  # vision_text: vision tower frozen (no gradient, eval mode)
    freeze_text: bool = True  # vision_text: text model frozen (its LoRA adapters still train when lora_rank > 0)
    freeze_vlm: bool = True  # vlm: the whole VLM frozen (its LoRA adapters still train when lora_rank > 0)
    lora_rank: int = 0  # LoRA rank on the text model / the VLM's language model (0 = off); needs `peft`
    lora_alpha: float = 16.0  # LoRA scale numerator: adapters add (lora_alpha / lora_rank) * B A x
    require_task: bool = True  # a missing or empty instruction (`task`) is an InputError; else "" is used

    def __post_init__(self) -> None:
        name = type(self).__name__
        _choice(self, "kind", ENCODER_KINDS)
        _positive_ints(self, "image_size", "vision_hidden_size", "vision_num_hidden_layers",
                       "vision_num_attention_heads", "vision_intermediate_size", "vision_patch_size",
                       "text_hidden_size", "text_num_hidden_layers", "text_num_attention_heads",
                       "text_intermediate_size", "max_text_tokens", "out_dim")
        cams = self.cameras
        _check(isinstance(cams, tuple) and all(isinstance(c, str) and c.startswith(IMAGES_PREFIX)
                                                and len(c) > len(IMAGES_PREFIX) for c in cams),
               name, "cameras", cams, f"a tuple of batch keys starting with {IMAGES_PREFIX!r}")
        _check(len(set(cams)) == len(cams), name, "cameras", cams, "distinct camera keys")
        _check(not any(c.endswith("_is_pad") for c in cams), name, "cameras", cams,
               "camera keys not ending in '_is_pad' (that suffix marks per-sample padding flags)")
        if self.kind != "none":
            _check(len(cams) > 0, name, "cameras", cams, f"at least one camera for kind={self.kind!r}")
        _check(self.image_size % self.vision_patch_size == 0, name, "image_size", self.image_size,
               f"a multiple of vision_patch_size={self.vision_patch_size}")
        _check(self.vision_hidden_size % self.vision_num_attention_heads == 0, name, "vision_num_attention_heads",
               self.vision_num_attention_heads, f"a divisor of vision_hidden_size={self.vision_hidden_size}")
        _check(self.text_hidden_size % self.text_num_attention_heads == 0, name, "text_num_attention_heads",
               self.text_num_attention_heads, f"a divisor of text_hidden_size={self.text_hidden_size}")
        for f in ("image_mean", "image_std"):
            v = getattr(self, f)
            _check(isinstance(v, tuple) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v),
                   name, f, v, "a tuple of 3 numbers (one per RGB channel)")
        _check(all(s > 0 for s in self.image_std), name, "image_std", self.image_std, "3 positive numbers")
        _check(isinstance(self.text_model, str) and bool(self.text_model), name, "text_model", self.text_model,
               f"one of {list(TEXT_MODELS)} or a local folder")
        for f in ("vision_path", "vlm_path"):
            _check(isinstance(getattr(self, f), str), name, f, getattr(self, f), "a str (a local folder, or '')")
        _check(isinstance(self.lora_rank, int) and self.lora_rank >= 0, name, "lora_rank", self.lora_rank, "an int >= 0")
        _check(self.lora_alpha > 0, name, "lora_alpha", self.lora_alpha, "a positive number")
        for f in ("freeze_vision", "freeze_text", "freeze_vlm", "require_task"):
            _check(isinstance(getattr(self, f), bool), name, f, getattr(self, f), "a bool")
        if self.kind == "vision_text" and self.text_model == "minilm" and self.max_text_tokens > 512:
            raise ConfigError(f"{name}.max_text_tokens = {self.max_text_tokens} is invalid: "
                              "expected at most 512 (MiniLM's position embeddings)")

    @property
    def num_patches(self) -> int:
        """Image tokens per camera of a tower built from this config."""
        return (self.image_size // self.vision_patch_size) ** 2
