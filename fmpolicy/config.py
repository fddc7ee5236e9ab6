"""Typed, frozen configs: one dataclass per concern, each field documented next to its default.

Every config validates itself on construction (a bad value raises `ConfigError` naming the field and
the value) and maps one-to-one onto a dict / YAML mapping through `config_from_dict` and
`config_to_dict`; an unknown key is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from fmpolicy.errors import ConfigError

C = TypeVar("C")

TIME_SAMPLINGS = ("uniform", "beta", "logit_normal")
SAMPLER_METHODS = ("euler", "midpoint", "rk4", "dopri5")
NORM_MODES = ("identity", "mean_std", "min_max", "quantile")
EXPERT_KINDS = ("transformer", "mlp")
PREFIX_POOLS = ("mean", "attention")
HEADS = ("flow", "regression")
EXPERT_TIME_INPUTS = ("sinusoidal", "raw")
DEFAULT_EMBODIMENT = "default"  # the one robot of a policy that configures no embodiments
EXPERT_ACTIVATIONS = ("silu", "relu")


def _check(ok: bool, cls: str, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{cls}.{name} = {value!r} is invalid: expected {expected}")


def _positive_ints(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, type(obj).__name__, name, value,
               "a positive int")


def _is_number(value: Any) -> bool:
    """A finite real number (int or float, not bool): NaN and inf pass every `>` / `<=` test the wrong way."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(obj: Any, name: str, expected: str, ok: Callable[[float], bool] = lambda v: True) -> None:
    """Field `name` must be a finite number for which `ok` holds; `expected` says which, in words."""
    value = getattr(obj, name)
    _check(_is_number(value) and ok(value), type(obj).__name__, name, value, expected)


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        _number(obj, name, "a finite number > 0", lambda v: v > 0)


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        _number(obj, name, "a finite number >= 0", lambda v: v >= 0)


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    _check(value in choices, type(obj).__name__, name, value, f"one of {list(choices)}")


@dataclass(frozen=True)
class ExpertConfig:
    """The velocity network: a transformer action expert or a small MLP."""

    kind: str = "transformer"  # "transformer" (state token + action tokens) or "mlp" (low-dim control)
    width: int = 128  # hidden size d of every token / MLP layer
    depth: int = 4  # number of transformer blocks (or hidden layers of the MLP)
    num_heads: int = 4  # attention heads; width must divide by it
    mlp_ratio: float = 4.0  # feed-forward hidden size = mlp_ratio * width
    max_state_dim: int = 32  # states are zero-padded to this width
    max_action_dim: int = 32  # actions are zero-padded to this width
    prefix_dim: int = 0  # width of prefix tokens (observation.prefix); 0 = no prefix input
    # MLP only: how the prefix becomes one vector: "mean" (the masked mean of its tokens) or "attention"
    # (`prefix_queries` learned queries, each a masked softmax over the tokens: prefix_queries * prefix_dim
    # inputs; a camera's token is then read apart from the instruction's instead of averaged into it)
    prefix_pool: str = "mean"
    prefix_queries: int = 4  # prefix_pool "attention": learned queries
    time_embed_dim: int = 128  # width of the sinusoidal time features before the time MLP
    dropout: float = 0.0  # dropout inside attention and feed-forward layers (training only)
    # how t enters: "sinusoidal" (time_embed_dim features) or "raw" (t itself, one input: into the MLP's first
    # layer, or the transformer's time MLP). Default (None): "raw" for the MLP, which keeps FPO's modes
    # (docs/rl.md, "Which time input keeps the modes"), "sinusoidal" for the transformer
    time_input: str | None = None
    activation: str = "silu"  # MLP only: hidden activation, "silu" or "relu" (the FPO paper's GridWorld net)
    time_min_period: float = 4e-3  # shortest period of the sinusoidal time features (pi0's 0.004)
    time_max_period: float = 4.0  # longest period (pi0's 4)

    def __post_init__(self) -> None:
        _choice(self, "kind", EXPERT_KINDS)
        if self.time_input is None:  # resolved here, so that a saved config names what the weights were built for
            object.__setattr__(self, "time_input", "raw" if self.kind == "mlp" else "sinusoidal")
        _choice(self, "time_input", EXPERT_TIME_INPUTS)
        _choice(self, "activation", EXPERT_ACTIVATIONS)
        _choice(self, "prefix_pool", PREFIX_POOLS)
        _positive_ints(self, "width", "depth", "num_heads", "max_state_dim", "max_action_dim", "time_embed_dim",
                       "prefix_queries")
        name = type(self).__name__
        _check(self.width % self.num_heads == 0, name, "num_heads", self.num_heads, f"a divisor of width={self.width}")
        _check(self.time_embed_dim % 2 == 0, name, "time_embed_dim", self.time_embed_dim, "an even int")
        _positive(self, "mlp_ratio", "time_min_period", "time_max_period")
        _check(self.time_min_period <= self.time_max_period, name, "time_min_period", self.time_min_period,
               f"at most time_max_period={self.time_max_period}")
        _check(isinstance(self.prefix_dim, int) and self.prefix_dim >= 0, name, "prefix_dim", self.prefix_dim, "an int >= 0")
        _number(self, "dropout", "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
        if self.kind != "mlp":  # the transformer has its own SwiGLU layers: refuse, not ignore
            _check(self.activation == "silu", name, "activation", self.activation, "'silu' with kind='transformer'")
            _check(self.prefix_pool == "mean", name, "prefix_pool", self.prefix_pool,
                   "'mean' with kind='transformer' (its action tokens attend to every prefix token)")


@dataclass(frozen=True)
class FlowConfig:
    """How training draws the flow time t (t = 0 is noise, t = 1 is the action)."""

    time_sampling: str = "beta"  # "uniform", "beta" (pi0: mass on the noisy end) or "logit_normal"
    beta_alpha: float = 1.5  # Beta(alpha, beta) of pi0; t = 1 - s * (1 - t_min) puts the mass near t = 0
    beta_beta: float = 1.0
    t_min: float = 0.001  # smallest distance from t = 1 kept by the beta sampler (pi0's 0.001)
    logit_mean: float = 0.0  # logit-normal location
    logit_std: float = 1.0  # logit-normal scale
    # also the CFM loss at the single point noise = 0, t = 0, times this weight (0: off). There the velocity's
    # target is the chunk itself and its minimiser the mean chunk given the observation: the regression head's
    # MSE target, a signal for the encoder without the noise's variance (a flow head that located objects worse
    # than the MSE head on the same backbone: docs/benchmarks/metaworld.md, Prove-it 2). Training only.
    mean_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        _non_negative(self, "mean_loss_weight")
        _choice(self, "time_sampling", TIME_SAMPLINGS)
        _positive(self, "beta_alpha", "beta_beta", "logit_std")
        _number(self, "logit_mean", "a finite number")
        _number(self, "t_min", "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)


@dataclass(frozen=True)
class SamplerConfig:
    """How a chunk is drawn: integrate the learned velocity from t = 0 (noise) to t = 1 (action)."""

    method: str = "euler"  # "euler", "midpoint", "rk4" (fixed grid) or "dopri5" (adaptive)
    num_steps: int = 10  # integration steps of the fixed-grid methods
    atol: float = 1e-5  # dopri5 absolute tolerance
    rtol: float = 1e-5  # dopri5 relative tolerance

    def __post_init__(self) -> None:
        _choice(self, "method", SAMPLER_METHODS)
        _positive_ints(self, "num_steps")
        _positive(self, "atol", "rtol")


@dataclass(frozen=True)
class NormalizationConfig:
    """How state and action are mapped to network units (fitted from data, saved with the policy)."""

    state: str = "mean_std"  # "identity", "mean_std", "min_max" (to [-1, 1]) or "quantile" (q01/q99 to [-1, 1])
    action: str = "mean_std"
    min_scale: float = 1e-4  # a dimension whose spread is below this is only centred, never divided by ~0
    # a state dimension whose spread is below this fraction of its centre's magnitude (a gripper held at
    # 1.0 +- 0.001) is divided by that fraction of it instead: its jitter is not blown up (0: off; states only)
    relative_min_scale: float = 0.05

    def __post_init__(self) -> None:
        _choice(self, "state", NORM_MODES)
        _choice(self, "action", NORM_MODES)
        _positive(self, "min_scale")
        _non_negative(self, "relative_min_scale")


@dataclass(frozen=True)
class AuxConfig:
    """An auxiliary target for training only: entries `dims` of the batch's `key` (privileged data the policy
    never reads at control time, e.g. the simulator's `observation.environment_state`) are predicted from the
    pooled prefix by a small MLP head, and the MSE of the normalized target, times `weight`, is added to the
    policy's loss. It asks the encoder to hold that information (Meta-World's goal marker:
    docs/benchmarks/metaworld.md, Prove-it 2). Off when `key` is empty; needs an encoder (it reads the prefix)."""

    key: str = ""  # e.g. "observation.environment_state"
    dims: tuple[int, ...] = ()  # entries of `key` to predict, e.g. [36, 37, 38]: Meta-World's goal xyz
    weight: float = 1.0
    hidden: int = 256  # width of the head's hidden layer

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check(isinstance(self.dims, (list, tuple)), name, "dims", self.dims, "a list of entry indices")
        object.__setattr__(self, "dims", tuple(self.dims))  # a list from Python code, as YAML's becomes
        if self.key:
            _check(len(self.dims) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in self.dims),
                   name, "dims", self.dims, "a non-empty list of entry indices >= 0 of `key`")
            _check(len(set(self.dims)) == len(self.dims), name, "dims", self.dims, "distinct entries")
        _non_negative(self, "weight")
        _positive_ints(self, "hidden")


ENCODER_KINDS = ("none", "vision_text", "vlm", "task")
VISION_TOWERS = ("siglip", "conv")
IMAGES_PREFIX = "observation.images."
TEXT_MODELS = ("tiny", "minilm")  # or a local folder for `from_pretrained`


@dataclass(frozen=True)
class EncoderConfig:
    """The prefix encoder: a SigLIP vision tower + a text encoder, or a whole (PaliGemma) VLM."""

    # "none" (no encoder), "vision_text" (vision tower + text model), "vlm" (PaliGemma) or "task" (a learned
    # embedding of the instruction, one of `tasks`: a multi-task policy without images or a text model)
    kind: str = "none"
    cameras: tuple[str, ...] = ("observation.images.top",)  # batch keys of the cameras, in token order (kind="task": none)
    tasks: tuple[str, ...] = ()  # kind="task": the instructions it knows, in embedding order ("auto" in a YAML
    #   training config: the dataset's meta/tasks.parquet)
    image_size: int = 64  # the encoder's input size: images must be image_size x image_size (see resize_images)
    resize_images: bool = False  # True: images of another size are resized (bilinear, antialiased); False: an error
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalization (SigLIP: 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # pixel = (x - mean) / std, x in [0, 1]
    vision_path: str = ""  # local folder of a pretrained SiglipVisionModel; "" = build from the fields below
    # vision_text: "siglip" (a SigLIP ViT: patch tokens) or "conv" (a small conv net + spatial softmax: one token
    #   a camera holding `vision_keypoints` (x, y) points; fmpolicy/encoders/conv.py). With "conv",
    #   vision_hidden_size is the channel width and vision_num_hidden_layers the 3x3 layers after its 4x4
    #   stride-4 stem (keypoints on an image_size / 4 grid); the SigLIP-only fields (heads, intermediate
    #   size, patch size) are not read
    vision_tower: str = "siglip"
    vision_keypoints: int = 32  # vision_tower "conv": keypoints (spatial-softmax maps) a camera
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
        _choice(self, "vision_tower", VISION_TOWERS)
        _positive_ints(self, "image_size", "vision_keypoints", "vision_hidden_size", "vision_num_hidden_layers",
                       "vision_num_attention_heads", "vision_intermediate_size", "vision_patch_size",
                       "text_hidden_size", "text_num_hidden_layers", "text_num_attention_heads",
                       "text_intermediate_size", "max_text_tokens", "out_dim")
        if self.kind == "task":  # reads no camera: the instruction alone
            object.__setattr__(self, "cameras", ())
            tasks = self.tasks
            _check(isinstance(tasks, tuple) and len(tasks) > 0 and all(isinstance(t, str) and t.strip() for t in tasks),
                   name, "tasks", tasks, "a non-empty tuple of non-empty instructions with kind='task'")
            _check(len(set(tasks)) == len(tasks), name, "tasks", tasks, "distinct instructions")
        else:
            _check(self.tasks == (), name, "tasks", self.tasks, "() unless kind='task'")
        cams = self.cameras
        _check(isinstance(cams, tuple) and all(isinstance(c, str) and c.startswith(IMAGES_PREFIX)
                                                and len(c) > len(IMAGES_PREFIX) for c in cams),
               name, "cameras", cams, f"a tuple of batch keys starting with {IMAGES_PREFIX!r}")
        _check(len(set(cams)) == len(cams), name, "cameras", cams, "distinct camera keys")
        _check(not any(c.endswith("_is_pad") for c in cams), name, "cameras", cams,
               "camera keys not ending in '_is_pad' (that suffix marks per-sample padding flags)")
        if self.kind == "vlm":  # vision_text may read the instruction alone (cameras: [])
            _check(len(cams) > 0, name, "cameras", cams, f"at least one camera for kind={self.kind!r}")
        _check(isinstance(self.resize_images, bool), name, "resize_images", self.resize_images, "true or false")
        if self.vision_tower == "siglip":
            _check(self.image_size % self.vision_patch_size == 0, name, "image_size", self.image_size,
                   f"a multiple of vision_patch_size={self.vision_patch_size}")
        else:
            _check(self.kind == "vision_text", name, "vision_tower", self.vision_tower,
                   f"'siglip' with kind={self.kind!r} (the conv tower is a vision_text option)")
            _check(self.vision_path == "", name, "vision_path", self.vision_path,
                   "'' with vision_tower='conv' (a pretrained tower is a SigLIP one)")
            _check(self.image_size % 4 == 0, name, "image_size", self.image_size,
                   "a multiple of 4 with vision_tower='conv' (its stem reads 4x4 cells)")
        _check(self.vision_hidden_size % self.vision_num_attention_heads == 0, name, "vision_num_attention_heads",
               self.vision_num_attention_heads, f"a divisor of vision_hidden_size={self.vision_hidden_size}")
        _check(self.text_hidden_size % self.text_num_attention_heads == 0, name, "text_num_attention_heads",
               self.text_num_attention_heads, f"a divisor of text_hidden_size={self.text_hidden_size}")
        for f in ("image_mean", "image_std"):
            v = getattr(self, f)
            _check(isinstance(v, tuple) and len(v) == 3 and all(_is_number(x) for x in v),
                   name, f, v, "a tuple of 3 finite numbers (one per RGB channel)")
        _check(all(s > 0 for s in self.image_std), name, "image_std", self.image_std, "3 positive numbers")
        _check(isinstance(self.text_model, str) and bool(self.text_model), name, "text_model", self.text_model,
               f"one of {list(TEXT_MODELS)} or a local folder")
        for f in ("vision_path", "vlm_path"):
            _check(isinstance(getattr(self, f), str), name, f, getattr(self, f), "a str (a local folder, or '')")
        _check(isinstance(self.lora_rank, int) and self.lora_rank >= 0, name, "lora_rank", self.lora_rank, "an int >= 0")
        _positive(self, "lora_alpha")
        for f in ("freeze_vision", "freeze_text", "freeze_vlm", "require_task"):
            _check(isinstance(getattr(self, f), bool), name, f, getattr(self, f), "a bool")
        if self.kind == "vision_text" and self.text_model == "minilm" and self.max_text_tokens > 512:
            raise ConfigError(f"{name}.max_text_tokens = {self.max_text_tokens} is invalid: "
                              "expected at most 512 (MiniLM's position embeddings)")

    @property
    def num_patches(self) -> int:
        """Image tokens per camera of a tower built from this config."""
        if self.vision_tower == "conv":
            return 1
        return (self.image_size // self.vision_patch_size) ** 2


@dataclass(frozen=True)
class EmbodimentConfig:
    """One robot shape served by a policy: its name and its own state and action widths."""

    name: str = DEFAULT_EMBODIMENT  # what batches put under the key "embodiment"
    state_dim: int = 2  # width of this robot's observation.state
    action_dim: int = 2  # width of this robot's action

    def __post_init__(self) -> None:
        _positive_ints(self, "state_dim", "action_dim")
        _check(isinstance(self.name, str) and bool(self.name), type(self).__name__, "name", self.name, "a non-empty str")


@dataclass(frozen=True)
class PolicyConfig:
    """Everything needed to rebuild a `FlowPolicy`: robot widths, chunking, network, flow, sampler."""

    state_dim: int = 2  # width of observation.state (the widest robot's when there are several embodiments)
    action_dim: int = 2  # width of one action (the widest robot's when there are several embodiments)
    chunk_size: int = 10  # h: actions predicted per chunk
    n_action_steps: int = 5  # actions executed from each chunk before re-planning (<= chunk_size)
    head: str = "flow"  # "flow" (CFM, sampled by ODE) or "regression" (MSE baseline, same backbone)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N"
    # several robot shapes in one model, each normalized on its own and zero-padded to the expert's
    # max widths; empty = one embodiment "default" of state_dim / action_dim
    embodiments: tuple[EmbodimentConfig, ...] = ()
    # images + instruction -> prefix tokens inside the policy (kind "none": the batch may carry
    # precomputed observation.prefix instead)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    # an auxiliary training-only target predicted from the prefix (off by default)
    aux: AuxConfig = field(default_factory=AuxConfig)

    def __post_init__(self) -> None:
        _positive_ints(self, "state_dim", "action_dim", "chunk_size", "n_action_steps")
        if self.embodiments:
            names = [e.name for e in self.embodiments]
            _check(len(set(names)) == len(names), type(self).__name__, "embodiments", names, "distinct names")
            for f in ("state_dim", "action_dim"):
                widest = max(getattr(e, f) for e in self.embodiments)
                _check(getattr(self, f) == widest, type(self).__name__, f, getattr(self, f),
                       f"the widest embodiment's {f} = {widest}")
        _choice(self, "head", HEADS)
        name = type(self).__name__
        _check(self.state_dim <= self.expert.max_state_dim, name, "state_dim", self.state_dim,
               f"at most expert.max_state_dim={self.expert.max_state_dim}")
        _check(self.action_dim <= self.expert.max_action_dim, name, "action_dim", self.action_dim,
               f"at most expert.max_action_dim={self.expert.max_action_dim}")
        _check(self.n_action_steps <= self.chunk_size, name, "n_action_steps", self.n_action_steps,
               f"at most chunk_size={self.chunk_size}")
        check_device(self.device, f"{name}.device")
        if self.encoder.kind != "none":
            _check(self.expert.prefix_dim == self.encoder.out_dim, name, "expert.prefix_dim", self.expert.prefix_dim,
                   f"encoder.out_dim = {self.encoder.out_dim} (the encoder's tokens are the expert's prefix)")
        _check(not self.aux.key or self.encoder.kind != "none", name, "aux.key", self.aux.key,
               "an encoder (encoder.kind other than 'none'): the auxiliary head reads the encoder's prefix")

    def embodiment_list(self) -> tuple[EmbodimentConfig, ...]:
        """The embodiments this policy serves (one "default" when none are configured)."""
        return self.embodiments or (EmbodimentConfig(DEFAULT_EMBODIMENT, self.state_dim, self.action_dim),)


# Named presets for the expert. "cpu" answers a 10-step chunk at batch 1 in a few ms on 2 CPU cores;
# "pi0" is sized like the anchors' action experts (pi0's Gemma-300M expert: width 1024, depth 18).
EXPERT_PRESETS: dict[str, ExpertConfig] = {
    "tiny": ExpertConfig(width=64, depth=2, num_heads=4, time_embed_dim=64),
    "cpu": ExpertConfig(width=128, depth=4, num_heads=4),
    "base": ExpertConfig(width=512, depth=6, num_heads=8, time_embed_dim=256),
    "pi0": ExpertConfig(width=1024, depth=18, num_heads=8, time_embed_dim=256),
    "mlp": ExpertConfig(kind="mlp", width=256, depth=3, time_embed_dim=64),
}


def make_expert_config(preset: str, **overrides: Any) -> ExpertConfig:
    """A named expert preset with some fields replaced."""
    if preset not in EXPERT_PRESETS:
        raise ConfigError(f"expert preset {preset!r} is unknown: expected one of {sorted(EXPERT_PRESETS)}")
    return dataclasses.replace(EXPERT_PRESETS[preset], **overrides)


def _expand_expert_preset(data: dict[str, Any], where: str) -> dict[str, Any]:
    """`{preset: cpu, max_state_dim: 48}` (YAML) -> the preset's fields, overridden by the given ones: a
    preset is named, not copied by hand, and a changed preset changes every config that names it."""
    preset = data["preset"]
    if not isinstance(preset, str) or preset not in EXPERT_PRESETS:
        raise ConfigError(f"{where}.preset = {preset!r} is invalid: expected one of {sorted(EXPERT_PRESETS)}")
    rest = {k: v for k, v in data.items() if k != "preset"}
    return {**config_to_dict(EXPERT_PRESETS[preset]), **rest}


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(device: str, field: str = "device") -> None:
    """A config's `device` must be "auto", "cpu", "cuda" or "cuda:N", and CUDA must be there when named
    (with N below its GPU count): else a `ConfigError` naming `field` (e.g. "rl.device", "--device").
    Configs check this on construction, before a run writes anything; "auto" never touches CUDA here."""
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(f"{field} = {device!r} is invalid: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{field} = {device!r} is invalid: CUDA is not available on this machine "
                              "(torch.cuda.is_available() is False); use 'cpu', or 'auto' to take CUDA when present")
        n = torch.cuda.device_count()
        index = int(device.partition(":")[2] or 0)
        if index >= n:
            raise ConfigError(f"{field} = {device!r} is invalid: this machine has {n} CUDA device(s), "
                              f"so the index must be below {n}")


def resolve_device(device: str, field: str = "device") -> "torch.device":  # noqa: F821 (torch imported lazily)
    """The torch device a `device` string names: "auto" (CUDA when present, else CPU), "cpu", "cuda" or
    "cuda:N"; anything else, or a CUDA device this machine lacks, is a `ConfigError` naming `field`."""
    import torch

    check_device(device, field)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---- dict <-> dataclass ---------------------------------------------------------------------------


def _is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def config_from_dict(cls: type[C], data: dict[str, Any] | None, where: str = "") -> C:
    """Build `cls` from a (nested) mapping; unknown keys and wrong types raise `ConfigError`."""
    where = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}: {data!r}")
    if cls is ExpertConfig and "preset" in data:
        data = _expand_expert_preset(data, where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}: expected some of {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if _is_config_type(tp):
            kwargs[name] = value if isinstance(value, tp) else config_from_dict(tp, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, tp, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a scalar against its annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} = {value!r} has the wrong type: expected {tp}")
    if tp is Any:
        return value
    if _is_config_type(tp):
        return value if isinstance(value, tp) else config_from_dict(tp, value, where)
    if tp is type(None):
        if value is None:
            return None
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp in (str, bool) and isinstance(value, tp):
        return value
    elif (tp is dict or origin is dict) and isinstance(value, dict):
        return dict(value)
    elif origin in (tuple, list) and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if origin is tuple and args and len(args) != len(value):
            raise ConfigError(f"{where} = {value!r} has {len(value)} items: expected {len(args)}")
        items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))] if args else list(value)
        return tuple(items) if origin is tuple else items
    raise ConfigError(f"{where} = {value!r} has the wrong type: expected {getattr(tp, '__name__', tp)}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (JSON / YAML ready) that `config_from_dict` maps back to `config`."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return config_to_dict(value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


# ---- experiments: data + training, read from YAML --------------------------------------------------

AMP_MODES = ("auto", "bf16", "none")
LOGGERS = ("jsonl", "tensorboard")


BALANCE_MODES = ("windows", "episodes", "tasks")  # DataConfig.balance


@dataclass(frozen=True)
class DataConfig:
    """Which demonstrations to train on."""

    root: str = ""  # LeRobot v3.0 dataset directory (scripts/collect_demos.py --out, or any LeRobot dataset)
    roots: dict = field(default_factory=dict)  # several robots: {embodiment name: dataset directory}
    num_episodes: int = 0  # train on the first N episodes only (0 = all): "too few demonstrations" runs
    episodes: tuple[int, ...] = ()  # train on these episode indices only (() = all; not with num_episodes)
    rename_map: dict = field(default_factory=dict)  # {dataset key: our key}, e.g. {"observation.images.top": ...}
    image_keys: tuple[str, ...] = ()  # camera keys to load (after rename_map), e.g. ("observation.images.top",)
    video: bool = False  # scripts/pipeline.py: record cameras as mp4 video instead of PNG images
    cache_encoder: bool = True  # with a frozen encoder backbone: compute its outputs once per frame, not every step
    # how windows are drawn: "windows" (every window equally often: a fresh permutation each epoch), or with
    # replacement so that every "episodes" (each episode) or "tasks" (each task string) is drawn equally often
    # whatever its length: short tasks in a multi-task dataset get their share (docs/datasets.md, "Balancing")
    balance: str = "windows"
    # with balance "tasks": {task string: weight}, each task drawn in proportion to its weight (1 for a task not
    # named), e.g. {"reach the red goal with the gripper": 3} draws reach's windows 3x as often as another task's
    task_weights: dict = field(default_factory=dict)
    # "auto": stream batches from disk through DataLoader workers when a dataset has video cameras or
    # every window in memory would take more than in_memory_max_gb; true / false force it. Either way
    # the batches are the same (same sampler), so the result is too (docs/datasets.md, "Large datasets").
    stream: bool | str = "auto"
    num_workers: int = 2  # DataLoader worker processes when streaming (0: load in the training process)
    in_memory_max_gb: float = 2.0  # "auto" streams above this estimated in-memory size (images decoded)

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check(self.stream == "auto" or isinstance(self.stream, bool), name, "stream", self.stream,
               "'auto', true or false")
        _check(self.balance in BALANCE_MODES, name, "balance", self.balance, f"one of {BALANCE_MODES}")
        _check(all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v) and v > 0 for k, v in self.task_weights.items()), name, "task_weights",
               self.task_weights, "a mapping of task string -> weight (a finite number > 0)")
        _check(not self.task_weights or self.balance == "tasks", name, "task_weights", self.task_weights,
               f"empty unless balance is 'tasks' (it is {self.balance!r})")
        _check(isinstance(self.num_workers, int) and not isinstance(self.num_workers, bool) and self.num_workers >= 0,
               name, "num_workers", self.num_workers, "an int >= 0")
        _number(self, "in_memory_max_gb", "a finite number > 0 (GB)", lambda v: v > 0)
        _check(isinstance(self.num_episodes, int) and self.num_episodes >= 0, name,
               "num_episodes", self.num_episodes, "an int >= 0")
        _check(all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in self.episodes)
               and len(set(self.episodes)) == len(self.episodes), name, "episodes", self.episodes,
               "distinct ints >= 0")
        _check(not (self.episodes and self.num_episodes), name, "episodes", self.episodes,
               "empty when num_episodes is set (choose one)")
        _check(all(isinstance(k, str) and isinstance(v, str) for k, v in self.rename_map.items()), name,
               "rename_map", self.rename_map, "a mapping of dataset key -> our key (strings)")


@dataclass(frozen=True)
class TrainConfig:
    """The imitation training loop (CleanRL-style: every knob here, documented)."""

    steps: int = 2000  # optimiser steps
    batch_size: int = 128  # global batch (split across processes under torchrun)
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup_steps: int = 100  # linear warm-up, then cosine decay
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    ema_decay: float = 0.999  # EMA of the weights, used for evaluation and saving (0 = off)
    amp: str = "auto"  # "auto" (bf16 autocast on CUDA only), "bf16" or "none"
    seed: int = 0  # seeds data order, flow times/noise and initialisation
    log_every: int = 50  # steps between log lines
    save_every: int = 500  # steps between checkpoints (the last step is always saved)
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    logger: str = "jsonl"  # "jsonl" (out/log.jsonl) or "tensorboard" (also writes out/tb/ if installed)
    out_dir: str = "runs/default"  # where checkpoints, logs and the final policy go
    progress: bool = True  # show a progress bar
    # random shifts of every camera image by up to this many pixels each way (DrQ: replicate pad + random
    # crop; 0 = off; ~4 for 64-84 px images). Images then go through the encoder every step, so a frozen
    # backbone's outputs are not cached (data.cache_encoder). docs/datasets.md, "Image augmentation"
    image_shift: int = 0

    def __post_init__(self) -> None:
        _positive_ints(self, "steps", "batch_size", "log_every", "save_every", "keep_checkpoints")
        _check(isinstance(self.image_shift, int) and not isinstance(self.image_shift, bool) and self.image_shift >= 0,
               type(self).__name__, "image_shift", self.image_shift, "an int >= 0 (pixels; 0 = off)")
        _choice(self, "amp", AMP_MODES)
        _choice(self, "logger", LOGGERS)
        name = type(self).__name__
        _positive(self, "lr")
        _non_negative(self, "weight_decay", "grad_clip")
        b = self.betas
        _check(isinstance(b, (tuple, list)) and len(b) == 2 and all(_is_number(x) and 0.0 <= x < 1.0 for x in b),
               name, "betas", b, "two numbers in [0, 1) (AdamW's beta1, beta2)")
        _number(self, "ema_decay", "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
        _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, name, "warmup_steps",
               self.warmup_steps, "an int >= 0")
        _number(self, "min_lr_ratio", "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)


@dataclass(frozen=True)
class ImitationConfig:
    """A whole imitation run: `configs/<name>.yaml` maps onto this one-to-one."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    env: dict = field(default_factory=dict)  # evaluation env: {"id": ..., "kwargs": {...}, "episodes": N}


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply dotted `key.sub=value` overrides (values parsed as YAML) to a nested dict, in a copy."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
        node[parts[-1]] = _parse_value(raw)
    return out


def _parse_value(raw: str) -> Any:
    """A YAML scalar, except that `1e-3` (which YAML 1.1 reads as a string) and an unquoted `inf`, `-inf`
    or `nan` (YAML's are `.inf`, `.nan`) are the floats they look like, so that validation can judge them."""
    import yaml

    value = yaml.safe_load(raw)
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?(inf|infinity|nan)", raw.strip(), re.IGNORECASE):
        return float(raw)
    return value


def saved_policy_dict(policy: Any) -> Any:
    """A policy config as an older fmpolicy saved it, with the defaults it was built with where those
    have changed since: an MLP expert saved without `time_input` read sinusoidal time features (raw t is
    the default since issue 14). For `FlowPolicy.from_pretrained` and for resuming a run."""
    expert = policy.get("expert") if isinstance(policy, dict) else None
    if isinstance(expert, dict) and expert.get("kind") == "mlp" and "time_input" not in expert:
        return {**policy, "expert": {**expert, "time_input": "sinusoidal"}}
    return policy


def saved_run_dict(run: Any) -> Any:
    """A run's saved config.yaml (`policy` section and the rest) with `saved_policy_dict` applied."""
    if isinstance(run, dict) and "policy" in run:
        return {**run, "policy": saved_policy_dict(run["policy"])}
    return run


def read_config_dict(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML config file (or nothing) with the dotted overrides applied, as a plain dict: nothing taken
    from datasets or checked yet (`load_config` does both)."""
    import yaml

    data: dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    return apply_overrides(data, overrides)


def load_config(cls: type[C], path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Read a YAML file (or nothing) into `cls`, with dotted overrides applied first."""
    data = read_config_dict(path, overrides)
    if cls is ImitationConfig:
        data = _auto_from_dataset(data, path or cls.__name__)
    return config_from_dict(cls, data, where=f"{path or cls.__name__}")


def dataset_auto_fields(data: dict[str, Any]) -> list[str]:
    """The fields of a config dict that are "auto" and taken from the dataset (widths, the task list)."""
    policy = data.get("policy")
    if not isinstance(policy, dict):
        return []
    expert = policy.get("expert") if isinstance(policy.get("expert"), dict) else {}
    encoder = policy.get("encoder") if isinstance(policy.get("encoder"), dict) else {}
    auto = [f"policy.{k}" for k in ("state_dim", "action_dim") if policy.get(k) == "auto"]
    auto += [f"policy.expert.{k}" for k in ("max_state_dim", "max_action_dim") if expert.get(k) == "auto"]
    return auto + (["policy.encoder.tasks"] if encoder.get("tasks") == "auto" else [])


def _auto_from_dataset(data: dict[str, Any], where: str) -> dict[str, Any]:
    """`policy.state_dim` / `action_dim` and `policy.expert.max_state_dim` / `max_action_dim` given as
    "auto": the widths of the dataset in `data.root` (its meta/info.json; the padded widths then equal
    the robot's own, the smallest that fit); `policy.encoder.tasks: auto`: its tasks (meta/tasks.parquet,
    in task_index order). Other values are left as they are."""
    auto = dataset_auto_fields(data)
    if not auto:
        return data
    policy = data["policy"]
    expert = policy.get("expert") if isinstance(policy.get("expert"), dict) else None
    encoder = policy.get("encoder") if isinstance(policy.get("encoder"), dict) else None
    source = data.get("data") if isinstance(data.get("data"), dict) else {}
    root = source.get("root")
    if not root or source.get("roots"):
        raise ConfigError(f"{where}: {auto} = 'auto' take the widths from one dataset: expected data.root to be set "
                          f"(got root={root!r}{', and data.roots' if source.get('roots') else ''}); with several "
                          "robots give the widths")
    from fmpolicy.data.dataset import read_v3_info, read_v3_tasks  # the data package imports this module

    try:
        features = read_v3_info(root)["features"]
        if "policy.encoder.tasks" in auto:
            policy = {**policy, "encoder": {**encoder, "tasks": list(read_v3_tasks(root))}}
    except Exception as e:  # noqa: BLE001 - a DatasetError or an OSError, reported as the config's problem
        raise ConfigError(f"{where}: {auto} = 'auto' need the dataset's meta/info.json and meta/tasks.parquet: "
                          f"{e}") from e
    rename = source.get("rename_map") or {}
    if auto == ["policy.encoder.tasks"]:
        return {**data, "policy": policy}
    widths = {}
    for ours, field_name in (("observation.state", "state_dim"), ("action", "action_dim")):
        key = next((k for k, v in rename.items() if v == ours), ours)
        if key not in features:
            raise ConfigError(f"{where}: {auto} = 'auto', but the dataset {root} has no feature {key!r} "
                              f"(it has {sorted(features)}); expected one named by data.rename_map")
        widths[field_name] = int(features[key]["shape"][0])
    policy = {**policy, **{k: widths[k] for k in ("state_dim", "action_dim") if policy.get(k) == "auto"}}
    if expert is not None:
        own = {"max_state_dim": policy.get("state_dim", widths["state_dim"]),
               "max_action_dim": policy.get("action_dim", widths["action_dim"])}
        policy["expert"] = {**expert, **{k: own[k] for k in own if expert.get(k) == "auto"}}
    return {**data, "policy": policy}
