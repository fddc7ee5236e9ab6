"""RL fine-tuning configs: FPO (flow policy) and Gaussian PPO (the baseline) in one loop.

One dataclass per concern, every field documented next to its default, validated on construction
(a bad value raises `ConfigError` naming the field and the value); `configs/fpo_*.yaml` map onto
`RLRunConfig` one-to-one, and an unknown key is an error. Defaults follow the FPO paper's MuJoCo
Playground settings: m = 8 pairs, clip 0.05, lr 3e-4, GAE lambda 0.95 (10 Euler steps: the policy's
sampler default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fmpolicy.config import (  # noqa: F401
    EncoderConfig,
    PolicyConfig,
    _check,
    _choice,
    _is_number,
    _non_negative,
    _number,
    _positive,
    _positive_ints,
    check_device,
    config_from_dict,
    load_config,
)

POLICY_TYPES = ("flow", "gaussian")
RATIO_MODES = ("mean", "per_pair")
LOSS_REDUCTIONS = ("mean", "sum_steps")  # FPOConfig.loss_reduction
FPO_TIME_SAMPLINGS = ("uniform", "policy")
SQUASHES = ("tanh", "clip")
SURROGATES = ("clip", "aspo")
REF_POLICIES = ("start", "best")  # FPOConfig.ref_policy
VALUE_INPUTS = ("state", "prefix_pooled")
VALUE_ACTIVATIONS = ("tanh", "relu")
ADVANTAGE_NORM_SCOPES = ("minibatch", "batch")


def _positive_or_none(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value is None or (_is_number(value) and value > 0), type(obj).__name__, name, value,
               "a finite number > 0, or null (off)")


@dataclass(frozen=True)
class FPOConfig:
    """What FPO adds to PPO: the CFM-difference ratio and its Monte Carlo pairs."""

    num_pairs: int = 8  # m: (t, noise) pairs drawn per action at rollout time, reused by every update
    ratio_mode: str = "mean"  # "mean": one ratio exp(mean_i(l_old_i - l_new_i)) per action; "per_pair"
    # one pair's CFM loss l_i from the chunk's squared errors: "mean" over all its entries (the imitation
    # loss), or "sum_steps": each step's mean over its action entries, summed over the chunk's steps (the
    # executed ones with mask_unexecuted), as FPO++'s code (fpo-control, chunk-level PPO). The sum makes
    # the log ratio h times larger for a chunk of h steps, so the same clip is h times tighter (FPO++'s
    # manipulation clips 0.01-0.03 on chunks of 16: about 0.001-0.002 on the mean; docs/rl.md)
    loss_reduction: str = "mean"
    # the Huber error with this delta instead of the squared error in the pairs' CFM losses (equal below
    # delta, linear beyond: a far-off chunk entry moves the ratio less), as FPO++'s manipulation runs
    # (delta 0.1-1 in normalized action units); null = the squared error, as imitation trains
    huber_delta: float | None = None
    clamp_old: float | None = None  # cap on the per-pair CFM losses (old and new; no gradient above it), null = off
    clamp_log_ratio: float | None = None  # bound on |log_ratio| before exp (straight-through), null = off
    clamp_pair_log_ratio: float | None = None  # bound on each pair's l_old_i - l_new_i before the mean, null = off
    hard_clamps: bool = False  # the two log-ratio clamps zero the gradient outside their bounds (torch.clamp, as
    #   the FPO paper's GridWorld code) instead of passing it straight through
    action_noise_std: float = 0.0  # std of a Gaussian added to sampled chunks (extra exploration), 0 = off
    time_sampling: str = "uniform"  # t_i of the pairs: "uniform" U(0, 1), or "policy" (policy.flow's schedule)
    clip_actions: bool = False  # store (and execute) sampled chunks clipped to [-1, 1]: see FlowActor.act
    mask_unexecuted: bool = False  # true: the CFM losses of the ratio count only the chunk steps the rollout
    #   executed (the first n_action_steps, none past an episode's end), as imitation masks action_is_pad.
    #   Off by default: measured, it breaks fine-tuning (PointObstacle from 10 demos: 38.5% against 91-99%
    #   with every step counted): nothing then holds the unexecuted steps' velocity, which drifts, and the
    #   network reads those steps' x_t when it predicts the executed ones (docs/rl.md)
    # fresh chunks per observation, sampled at rollout time with their own (t, noise) pairs, whose CFM-loss
    # change estimates how the policy's update moves the CFM losses of its typical actions at that
    # observation; subtracted from every log ratio (0 = off). -L is a log density only up to a normaliser
    # that the update moves, so without it E over the policy's own actions of the ratio is not 1: a
    # constant advantage sharpens the flow (A > 0) or spreads it without bound (A < 0) where a true
    # likelihood ratio does nothing, and critic errors act that way state by state (docs/rl.md,
    # "Advantages without information"). Costs k more chunk samples per rollout step and k x m more CFM
    # losses per update row.
    normalizer_samples: int = 0
    ref_coef: float = 0.0  # weight of the reference regulariser (FlowActor.regularizer): the CFM loss of
    #   chunks sampled from a frozen copy of the starting policy (random init or the imitation
    #   checkpoint) at the rollout's observations; keeps mass wherever the start had it. 0 = off
    ref_policy: str = "start"  # what the reference is: "start" (the starting policy, fixed) or "best" (the
    #   policy of the best zero-noise evaluation so far, as rl.keep_best ranks them: replaced whenever an
    #   evaluation beats it, so the pull holds what the run has reached instead of where it began; needs
    #   ref_coef > 0 and rl.eval_every > 0)
    positive_imitation: float = 0.0  # weight of self-imitation: the CFM loss of each stored chunk at its
    #   stored pairs, weighted by the positive part of its standardised advantage and not clipped
    #   (advantage-weighted regression on the better-than-expected chunks): pulls the flow towards them,
    #   so it narrows the sampled spread where the advantages tell chunks apart. 0 = off

    def __post_init__(self) -> None:
        _positive_ints(self, "num_pairs")
        _check(isinstance(self.clip_actions, bool), type(self).__name__, "clip_actions", self.clip_actions, "true or false")
        _check(isinstance(self.hard_clamps, bool), type(self).__name__, "hard_clamps", self.hard_clamps, "true or false")
        _check(isinstance(self.mask_unexecuted, bool), type(self).__name__, "mask_unexecuted", self.mask_unexecuted,
               "true or false")
        _choice(self, "ratio_mode", RATIO_MODES)
        _choice(self, "loss_reduction", LOSS_REDUCTIONS)
        _choice(self, "time_sampling", FPO_TIME_SAMPLINGS)
        _choice(self, "ref_policy", REF_POLICIES)
        _positive_or_none(self, "clamp_old", "clamp_log_ratio", "clamp_pair_log_ratio", "huber_delta")
        _non_negative(self, "ref_coef", "action_noise_std", "positive_imitation")
        _check(isinstance(self.normalizer_samples, int) and not isinstance(self.normalizer_samples, bool)
               and self.normalizer_samples >= 0, type(self).__name__, "normalizer_samples", self.normalizer_samples,
               "an integer >= 0 (0 = off)")


@dataclass(frozen=True)
class GaussianConfig:
    """The Gaussian PPO baseline: an MLP mean of the executed chunk, a state-independent log-std."""

    squash: str = "tanh"  # "tanh" (exact log-prob with the log-det correction) or "clip" (to [-1, 1])
    init_log_std: float = -0.5  # initial log standard deviation of every action entry
    width: int = 256  # hidden width of the mean MLP
    depth: int = 2  # hidden layers of the mean MLP

    def __post_init__(self) -> None:
        _choice(self, "squash", SQUASHES)
        _positive_ints(self, "width", "depth")
        _number(self, "init_log_std", "a number in [-10, 2]", lambda v: -10.0 <= v <= 2.0)


@dataclass(frozen=True)
class ValueConfig:
    """The critic V(obs), a separate MLP (no weights shared with the actor)."""

    width: int = 256  # hidden width
    depth: int = 2  # hidden layers
    input: str = "state"  # "state", or "prefix_pooled" (state + masked mean of observation.prefix)
    activation: str = "tanh"  # hidden activation: "tanh" (CleanRL) or "relu" (the FPO paper's GridWorld critic)

    def __post_init__(self) -> None:
        _positive_ints(self, "width", "depth")
        _choice(self, "input", VALUE_INPUTS)
        _choice(self, "activation", VALUE_ACTIVATIONS)


@dataclass(frozen=True)
class FinetuneConfig:
    """Which parts of the flow policy RL trains, and how fast; null = as the policy was saved (init_from) or
    configured (from scratch) / as rl.lr. Applied when the run builds its policy, and saved with it: the
    final policy's config.json says how it was trained (its LoRA adapters included)."""

    freeze_vision: bool | None = None  # vision_text: the vision tower frozen (no gradient, eval mode)
    freeze_text: bool | None = None  # vision_text: the text model frozen (its LoRA adapters still train)
    freeze_vlm: bool | None = None  # vlm: the whole VLM frozen (its LoRA adapters still train)
    lora_rank: int | None = None  # LoRA adapters on the text model / the VLM's language model (0 = none);
    #   adds adapters to a policy saved without them (they start at zero: the policy is unchanged)
    lr_expert: float | None = None  # Adam lr of the velocity network (the action expert)
    lr_encoder: float | None = None  # of every trainable encoder parameter (towers, adapters, projections)
    lr_critic: float | None = None  # of the critic

    ENCODER_FIELDS = ("freeze_vision", "freeze_text", "freeze_vlm", "lora_rank")

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in ("freeze_vision", "freeze_text", "freeze_vlm"):
            v = getattr(self, f)
            _check(v is None or isinstance(v, bool), name, f, v, "true, false or null")
        v = self.lora_rank
        _check(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0), name, "lora_rank", v,
               "an int >= 0 or null")
        _positive_or_none(self, "lr_expert", "lr_encoder", "lr_critic")

    def encoder_overrides(self) -> dict:
        """The encoder settings this config sets (EncoderConfig fields), the null ones left out."""
        return {f: getattr(self, f) for f in self.ENCODER_FIELDS if getattr(self, f) is not None}


@dataclass(frozen=True)
class RLConfig:
    """The PPO-style loop shared by FPO and Gaussian PPO (CleanRL's knobs, documented)."""

    policy_type: str = "flow"  # "flow" (FPO on a FlowPolicy) or "gaussian" (PPO baseline)
    num_envs: int = 64  # e: environments stepped together
    num_macro_steps: int = 16  # n: chunks executed per environment per rollout
    n_action_steps: int = 0  # env steps per chunk (one macro-step); 0 = the policy config's n_action_steps
    gamma: float = 0.99  # per env step discount (a macro-step of k steps is discounted by gamma ** k)
    gae_lambda: float = 0.95  # GAE lambda (per macro-step)
    update_epochs: int = 4  # passes over the rollout per iteration
    num_minibatches: int = 4  # minibatches per pass (the rollout of n * e chunks is split evenly)
    lr: float = 3e-4  # Adam learning rate (actor and critic)
    adam_eps: float = 1e-5  # Adam's epsilon (CleanRL's 1e-5; PyTorch's default, which the FPO paper code keeps, 1e-8).
    #   One Adam over actor and critic equals two separate ones exactly (its state is per parameter, and
    #   the gradients are clipped per network): tests/test_gridworld_paper.py
    anneal_lr: bool = False  # decay the learning rate linearly from lr to 0 over the run (CleanRL's default)
    # adaptive step size (rsl_rl's "adaptive" schedule, legged_gym's default): after each minibatch whose
    # approximate KL to the rollout policy exceeds 2x desired_kl the policy's lrs (expert and encoder, not
    # the critic's) are divided by 1.5, below desired_kl / 2 multiplied by 1.5, kept within [lr_min, lr_max].
    # One setting for networks whose KL per step differs 100x at the same lr (the MLP vs the transformer
    # expert under FPO, docs/rl.md); null = off (the lr is rl.lr, or annealed)
    desired_kl: float | None = None
    lr_min: float = 1e-6  # bounds of the adaptive lr (desired_kl)
    lr_max: float = 1e-2
    target_kl: float | None = None  # stop the update's epochs early once the last minibatch's approximate KL
    #   exceeds this (CleanRL's target_kl); null = every epoch runs
    clip: float = 0.05  # PPO clip range c: ratios outside [1 - c, 1 + c] get no further push
    surrogate: str = "clip"  # policy loss: "clip" (PPO) or "aspo" (PPO clip for A >= 0, SPO penalty for A < 0)
    normalize_advantages: bool = True  # standardise advantages (over normalize_advantages_over)
    normalize_advantages_over: str = "minibatch"  # "minibatch" (CleanRL: each minibatch), or "batch" (the whole
    #   rollout, once before the epochs: the FPO paper code)
    vf_coef: float = 0.5  # weight of the value loss
    ent_coef: float = 0.0  # weight of an entropy bonus (CleanRL's ent_coef), 0 = off: the Gaussian's exact
    #   entropy, or the flow's estimated along its sampling path (FlowActor.entropy: costs a
    #   re-integration with divergences per minibatch)
    value_clip: float | None = None  # clip the value update around the old values (CleanRL), null = off
    max_grad_norm: float = 0.5  # gradient-norm clip, applied to the actor and the critic separately (0 = off)
    reward_scale: float = 1.0  # rewards are multiplied by this for learning (logged returns stay raw)
    # subtracted from every step's reward for learning: action_rate_penalty x |a_t - a_(t-1)|^2, the executed
    # actions in [-1, 1] units (clipped to the box, as the env executes them), chunk boundaries included,
    # none at an episode's first step; 0 = off. Logged returns stay the env's. (Robot RL's action-rate
    # term: without it FPO's image policy learnt chunks that zig-zag, docs/rl.md)
    action_rate_penalty: float = 0.0
    critic_warmup_iterations: int = 0  # first iterations train only the critic (for a BC-initialised actor)
    # an env whose episode ends inside a macro-step plays the rest of it from a fresh chunk of its new
    # episode (as deployed), not the old chunk's remaining actions (false: the behaviour before
    # 2026-11-30, which cut Meta-World pick-place's rollout success from 34% to 11%; docs/rl.md)
    fresh_chunk_after_reset: bool = True
    # rollouts executed as an asynchronous deployment with this many control steps of inference latency
    # ("latest" execution, docs/serving.md): the chunk a macro-step executes was sampled from the observation
    # `rollout_delay` steps before it starts, while the previous chunk played on, and runs from its own step
    # `rollout_delay` (an episode's first chunk: from step 0 of its first observation). 0 = synchronous.
    # Evaluations during the run execute the same way. FPO shapes the chunk steps that get executed: tuned
    # synchronously, the image policy lost its success under 1-4 steps of latency (docs/rl.md)
    rollout_delay: int = 0
    # with it, each env draws the delay of each next chunk uniformly from rollout_delay .. rollout_delay_max
    # (an inference whose latency varies; a policy for several deployments): FPO tuned at one delay works at
    # that delay only (docs/rl.md). The run's evaluations then execute with rollout_delay_max. null = off
    rollout_delay_max: int | None = None
    total_env_steps: int = 100_000  # stop after this many env steps (iterations = steps / (e * n * k))
    seed: int = 0  # seeds weights, env resets, flow noise/pairs, minibatch order
    # the robot these envs are, by its embodiment name, when the flow policy serves several (a mixed-arm
    # policy fine-tuned on one arm); "" = the policy's only one
    embodiment: str = ""
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda" or "cuda:N": envs, nets and buffers
    out_dir: str = "runs/fpo"  # checkpoints, log.jsonl, learning_curve.png, final policy
    save_every: int = 10  # iterations between checkpoints (the last is always saved)
    keep_checkpoints: int = 2  # recent checkpoints kept
    log_every: int = 1  # iterations between log lines (every update is logged with 1)
    progress: bool = True  # show a progress bar
    eval_every: int = 0  # iterations between evaluations (and one before the first update); 0 = off
    eval_episodes: int = 64  # one episode in each of this many fresh envs, same start states every time
    # with evaluations on: save the policy of the best zero-noise evaluation so far (by its success rate, then
    # its return; the start's included) to <out_dir>/best_policy, and its iteration and figures to
    # <out_dir>/best_policy.json. FPO can lose a policy's gains later in a run
    # (Meta-World reach collapsed after every rollout succeeded, docs/benchmarks/metaworld.md); FPO++ keeps
    # its best checkpoint by the zero-noise evaluation too
    keep_best: bool = True
    fpo: FPOConfig = field(default_factory=FPOConfig)
    gaussian: GaussianConfig = field(default_factory=GaussianConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # what of the flow policy trains, lrs per part

    def __post_init__(self) -> None:
        name = type(self).__name__
        _choice(self, "policy_type", POLICY_TYPES)
        _choice(self, "surrogate", SURROGATES)
        _choice(self, "normalize_advantages_over", ADVANTAGE_NORM_SCOPES)
        _positive_ints(self, "num_envs", "num_macro_steps", "update_epochs", "num_minibatches", "total_env_steps",
                       "save_every", "keep_checkpoints", "log_every", "eval_episodes")
        for f in ("n_action_steps", "critic_warmup_iterations", "seed", "eval_every", "rollout_delay"):
            v = getattr(self, f)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, f, v, "an int >= 0")
        _number(self, "gamma", "a number in (0, 1]", lambda v: 0.0 < v <= 1.0)
        _number(self, "gae_lambda", "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        _positive(self, "lr", "reward_scale", "adam_eps")
        _check(isinstance(self.embodiment, str), name, "embodiment", self.embodiment, "a str (an embodiment name, or '')")
        _check(isinstance(self.anneal_lr, bool), name, "anneal_lr", self.anneal_lr, "true or false")
        _check(isinstance(self.fresh_chunk_after_reset, bool), name, "fresh_chunk_after_reset",
               self.fresh_chunk_after_reset, "true or false")
        _check(isinstance(self.keep_best, bool), name, "keep_best", self.keep_best, "true or false")
        _positive_or_none(self, "desired_kl", "target_kl")
        if self.rollout_delay_max is not None:
            v = self.rollout_delay_max
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= self.rollout_delay, name,
                   "rollout_delay_max", v, f"null or an int >= rollout_delay = {self.rollout_delay}")
        _positive(self, "lr_min", "lr_max")
        _check(self.lr_min <= self.lr_max, name, "lr_min", self.lr_min, f"at most lr_max = {self.lr_max}")
        _check(not (self.anneal_lr and self.desired_kl is not None), name, "desired_kl", self.desired_kl,
               "null with anneal_lr: true (the lr is either annealed or adapted to the KL, not both)")
        _number(self, "clip", "a number in (0, 1)", lambda v: 0.0 < v < 1.0)
        _non_negative(self, "vf_coef", "ent_coef", "max_grad_norm", "action_rate_penalty")
        _positive_or_none(self, "value_clip")
        _check(not (self.policy_type == "gaussian" and self.fpo.positive_imitation > 0), "FPOConfig",
               "positive_imitation", self.fpo.positive_imitation,
               "0 with rl.policy_type='gaussian' (it fits the flow's CFM loss; PPO has none)")
        if self.fpo.ref_policy == "best":
            _check(self.fpo.ref_coef > 0, "FPOConfig", "ref_policy", self.fpo.ref_policy,
                   "'start' with ref_coef = 0 (there is no reference to replace)")
            _check(self.eval_every > 0, "FPOConfig", "ref_policy", self.fpo.ref_policy,
                   "'start' with rl.eval_every = 0 ('best' is ranked by the evaluations)")
            _check(self.policy_type == "flow", "FPOConfig", "ref_policy", self.fpo.ref_policy,
                   "'start' with rl.policy_type='gaussian' (the reference is the flow's)")
        _check(self.num_macro_steps * self.num_envs >= self.num_minibatches, name, "num_minibatches",
               self.num_minibatches, f"at most num_envs * num_macro_steps = {self.num_envs * self.num_macro_steps}")
        check_device(self.device, f"{name}.device")  # a ConfigError here, not an AssertionError deep in torch


@dataclass(frozen=True)
class EnvConfig:
    """Which vectorised environment to train in (the number of copies is rl.num_envs)."""

    id: str = "fmpolicy/TwoOptimaBandit-v0"  # a gymnasium id, ours (fmpolicy/...) or external (Pendulum-v1)
    kwargs: dict = field(default_factory=dict)  # passed to the env constructor (e.g. {"n_links": 3})
    # merged over `kwargs` for the evaluation envs only: train on one distribution of tasks (a weighted
    # list, say) and evaluate on another (each task equally often), or evaluate without a training shaping
    eval_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(isinstance(self.id, str) and bool(self.id), type(self).__name__, "id", self.id, "a non-empty str")
        for name in ("kwargs", "eval_kwargs"):
            _check(isinstance(getattr(self, name), dict), type(self).__name__, name, getattr(self, name),
                   "a mapping of constructor arguments")

    @property
    def evaluation_kwargs(self) -> dict:
        """The evaluation envs' constructor arguments: `kwargs` with `eval_kwargs` over them."""
        return {**self.kwargs, **self.eval_kwargs}


@dataclass(frozen=True)
class RLRunConfig:
    """A whole RL run: `configs/fpo_<name>.yaml` maps onto this one-to-one.

    `policy` gives the shapes for both policy types (state_dim, action_dim, chunk_size, n_action_steps)
    and the flow network for FPO; with `init_from` the saved policy's own config replaces it.
    """

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    init_from: str = ""  # imitation checkpoint dir (written by save_pretrained) to fine-tune, "" = from scratch

    def __post_init__(self) -> None:
        _check(self.rl.n_action_steps <= self.policy.chunk_size, "RLConfig", "n_action_steps", self.rl.n_action_steps,
               f"at most policy.chunk_size = {self.policy.chunk_size}")
        _check(not (self.init_from and self.rl.policy_type == "gaussian"), type(self).__name__, "init_from",
               self.init_from, "'' with rl.policy_type='gaussian' (only a flow policy can be initialised from imitation)")
        # with init_from the saved policy's encoder is used as saved: settings here would be ignored silently
        _check(not (self.init_from and self.policy.encoder != EncoderConfig()), "RLRunConfig", "policy.encoder",
               self.policy.encoder, "unset with init_from (the saved policy's encoder is used; set what of it trains "
               "in rl.finetune: freeze_vision, freeze_text, freeze_vlm, lora_rank)")

    def n_action_steps(self) -> int:
        """Env steps per macro-step: rl.n_action_steps, or the policy's when that is 0."""
        return self.rl.n_action_steps or self.policy.n_action_steps


def load_rl_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> RLRunConfig:
    """Read `configs/fpo_<name>.yaml` (or nothing) with dotted overrides into an `RLRunConfig`."""
    return load_config(RLRunConfig, path, overrides)
