"""`FlowPolicy`: the user-facing policy around a velocity network.

It owns the normalizers (fitted from data, saved with the weights), the zero-padding to
`max_state_dim` / `max_action_dim`, the CFM training loss, chunk sampling by ODE integration and
the action queue of `select_action`. With `head="regression"` the same backbone is trained by MSE to
predict the chunk in one pass: the baseline that averages modes.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fmpolicy import batch as keys
from fmpolicy.config import (PolicyConfig, SamplerConfig, config_from_dict, config_to_dict, resolve_device,
                             saved_policy_dict)
from fmpolicy.embodiment import Embodiments
from fmpolicy.errors import CheckpointError, ConfigError, InputError
from fmpolicy.flow import compute_cfm_loss, compute_masked_mse, interpolate, make_valid_mask, sample_time
from fmpolicy.io import atomic_directory
from fmpolicy.model import ExpertCache, make_velocity_net
from fmpolicy.normalize import Normalizer
from fmpolicy.rtc import PrefixGuidance
from fmpolicy.sampling import NFE_PER_STEP, SampleResult, sample_noise, sample_ode

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# config.json fields without which the saved weights cannot be rebuilt as they were trained (every
# PolicyConfig field of format version 1 that shapes the network or says what its outputs mean)
LOW_PRECISION = (torch.bfloat16, torch.float16)  # expert compute types with float32 inputs and integration
REQUIRED_CONFIG_FIELDS = ("state_dim", "action_dim", "chunk_size", "n_action_steps", "head", "expert", "normalization")


class FlowPolicy(nn.Module):
    """A flow-matching action-chunk policy. See the module docstring and README for the API."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        self.net = make_velocity_net(config.expert, config.chunk_size)
        # images + instruction -> prefix tokens, run once per chunk (None: prefix from the batch, if any)
        self.encoder = None
        if config.encoder.kind != "none":
            from fmpolicy.encoders import make_encoder  # transformers is imported only when needed

            self.encoder = make_encoder(config.encoder)
        # training only: a head that predicts privileged entries (config.aux) from the pooled prefix
        self.aux_head = None
        if config.aux.key:
            n, width = len(config.aux.dims), config.aux.hidden
            self.aux_head = nn.Sequential(nn.Linear(config.expert.prefix_dim, width), nn.GELU(), nn.Linear(width, n))
            self.register_buffer("aux_mean", torch.zeros(n))  # the target's normalization (fit_aux_normalization)
            self.register_buffer("aux_std", torch.ones(n))
        # per-robot normalizers and padding masks (one "default" embodiment unless configured)
        self.embodiments = Embodiments(config)
        self._queue: deque[Tensor] = deque()
        self._graphs = None  # a fmpolicy.cuda_graphs.GraphedSolver once enable_cuda_graphs() is called
        self._compiled_solve = None  # a fmpolicy.compiled.CompiledSolver once compile_solve() is called
        self.to(resolve_device(config.device, "PolicyConfig.device"))

    @property
    def device(self) -> torch.device:
        return self.embodiments.state_dims.device

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of noise, t and the integration: the network's weights' (float32 unless the
        policy was converted, e.g. to float64), but float32 when the expert computes in a 16-bit type
        (`set_compute_dtype`). Noise and t given to the policy must have it."""
        d = self.compute_dtype
        return torch.float32 if d in LOW_PRECISION else d

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float dtype the action expert computes in (its weights')."""
        return next(self.net.parameters()).dtype

    @property
    def state_normalizer(self) -> Normalizer:
        """The state normalizer of the first (with one robot: the only) embodiment."""
        return self.embodiments.state[0]

    @property
    def action_normalizer(self) -> Normalizer:
        """The action normalizer of the first (with one robot: the only) embodiment."""
        return self.embodiments.action[0]

    @property
    def state_valid(self) -> Tensor:
        """(S,) bool: the first embodiment's own state entries of a padded state."""
        return self.embodiments.state_valid(torch.zeros(1, dtype=torch.long, device=self.device))[0]

    @property
    def action_valid(self) -> Tensor:
        """(A,) bool: the first embodiment's own action entries of a padded action."""
        return self.embodiments.action_valid(torch.zeros(1, dtype=torch.long, device=self.device))[0]

    # ---- normalization -----------------------------------------------------------------------------

    def fit_normalization(self, states: Tensor, actions: Tensor, embodiment: str | None = None) -> "FlowPolicy":
        """Fit one embodiment's normalizers from data: states (n, s), actions (n, [h,] a), n >= 1."""
        i = self.embodiments.get(embodiment)
        for name, data, normalizer in (("states", states, self.embodiments.state[i]),
                                       ("actions", actions, self.embodiments.action[i])):
            data = keys.as_tensor(data, name, self.device)
            if data.dim() == 0 or data.shape[0] == 0:
                raise InputError(f"fit_normalization: {name!r} has {data.shape[0] if data.dim() else 0} rows "
                                 f"(shape {tuple(data.shape)}): expected at least one sample")
            normalizer.fit(data, f"fit_normalization: {name!r}")
        return self

    def fit_aux_normalization(self, values: Tensor) -> "FlowPolicy":
        """Mean and spread of the auxiliary target (config.aux) from `values` (N, width of aux.key), e.g. a
        dataset's column: the head predicts the target in those units."""
        aux = self.config.aux
        values = torch.as_tensor(values)
        if self.aux_head is None:
            raise ConfigError("fit_aux_normalization: the policy has no auxiliary target (policy.aux.key is empty)")
        if values.dim() != 2 or values.shape[0] < 2 or values.shape[1] <= max(aux.dims):
            raise InputError(f"fit_aux_normalization: {aux.key!r} has shape {tuple(values.shape)}: expected (N >= 2, "
                             f"> {max(aux.dims)}) for policy.aux.dims = {list(aux.dims)}")
        target = values[:, list(aux.dims)].double()
        self.aux_mean.copy_(target.mean(0).to(self.aux_mean))
        self.aux_std.copy_(target.std(0).clamp(min=self.config.normalization.min_scale).to(self.aux_std))
        return self

    def _aux_loss(self, batch: Mapping[str, Any], cache: ExpertCache) -> Tensor | None:
        """(b,) MSE of the auxiliary head on the normalized target; None when off or the batch lacks the key
        (an RL batch, control time)."""
        aux = self.config.aux
        if self.aux_head is None or aux.key not in batch or cache.prefix_pooled is None:
            return None
        value = torch.as_tensor(batch[aux.key]).to(self.device)
        if value.dim() != 2 or value.shape[1] <= max(aux.dims):
            raise InputError(f"batch[{aux.key!r}] has shape {tuple(value.shape)}: expected (b, > {max(aux.dims)}) "
                             f"for policy.aux.dims = {list(aux.dims)}")
        target = (value[:, list(aux.dims)].float() - self.aux_mean) / self.aux_std
        pred = self.aux_head(cache.prefix_pooled.float())
        return ((pred - target) ** 2).mean(-1)

    def set_normalization_stats(self, state_stats: Mapping[str, Tensor], action_stats: Mapping[str, Tensor],
                                embodiment: str | None = None) -> "FlowPolicy":
        """Set one embodiment's normalizers from precomputed statistics (e.g. a dataset's stats.json)."""
        i = self.embodiments.get(embodiment)
        self.embodiments.state[i].fit_stats(dict(state_stats))
        self.embodiments.action[i].fit_stats(dict(action_stats))
        return self

    # ---- inputs ------------------------------------------------------------------------------------

    def pad_state(self, state: Tensor, embodiment: Tensor | None = None) -> Tensor:
        """Normalize and zero-pad states (b, s) to (b, S); `embodiment` (b,) indices, default the first."""
        idx = embodiment if embodiment is not None else torch.zeros(state.shape[0], dtype=torch.long, device=self.device)
        return self.embodiments.normalize_state(state, idx)

    def pad_action(self, action: Tensor, embodiment: Tensor | None = None) -> Tensor:
        """Normalize and zero-pad action chunks (b, h, a) to (b, h, A)."""
        idx = embodiment if embodiment is not None else torch.zeros(action.shape[0], dtype=torch.long, device=self.device)
        return self.embodiments.normalize_action(action, idx)

    @torch.no_grad()
    def state_z(self, obs: Mapping[str, Any]) -> Tensor:
        """max |normalized state| over the batch, per padded state entry (max_state_dim,): how many of the
        imitation data's standard deviations (the state normalizer) the states of `obs` lie out."""
        state = keys.read_state(obs, self.config.expert.max_state_dim, self.device)
        idx = self.embodiments.index(obs, state.shape[0])
        return self.pad_state(state.to(self.dtype), idx).abs().amax(0)

    def encode(self, obs: Mapping[str, Any]) -> ExpertCache:
        """Validate an observation and compute the per-chunk cache (state token, prefix keys/values)."""
        self.embodiments.check_fitted()
        cfg = self.config
        state = keys.read_state(obs, cfg.expert.max_state_dim, self.device)
        if self.encoder is not None and keys.PREFIX not in obs:
            if keys.ENCODER_FEATURES in obs:  # cached backbone outputs: only the trainable head runs
                prefix, mask = self.encoder.head(obs[keys.ENCODER_FEATURES])
                obs = {**obs, keys.PREFIX: prefix, keys.PREFIX_MASK: mask}
            else:
                obs = self.encoder.encode_batch(self._to_device(obs))  # adds observation.prefix / prefix_mask
        idx = self.embodiments.index(obs, state.shape[0])
        keys.check_width(state, keys.STATE, (self.embodiments.width(idx, "state"), cfg.state_dim), "state_dim")
        prefix, prefix_mask = keys.read_prefix(obs, state.shape[0], cfg.expert.prefix_dim, self.device)
        d = self.compute_dtype  # a no-op unless the expert computes in another type than its inputs
        cache = self.net.encode(self.pad_state(state, idx).to(d), self.embodiments.state_valid(idx),
                                None if prefix is None else prefix.to(d), prefix_mask)
        cache.embodiment, cache.action_valid = idx, self.embodiments.action_valid(idx)
        if prefix is not None:
            cache.prefix_pooled = pool_prefix(prefix, prefix_mask)
        return cache

    def frozen_features(self, obs: Mapping[str, Any]) -> dict[str, Any] | None:
        """`obs` with its images and instruction replaced by the frozen encoder backbone's outputs
        (`encoder_features`), which `encode` then reads, running only the trainable head; None when the
        policy has no encoder, its backbone trains, or `obs` already holds a prefix or features.

        For callers that read the same observation many times with weights changing in between (the
        RL update): the backbone's outputs do not change, so they are computed once and stored.
        """
        if (self.encoder is None or not self.encoder.backbone_frozen or keys.PREFIX in obs
                or keys.ENCODER_FEATURES in obs):
            return None
        with torch.no_grad():
            features = self.encoder.backbone(self._to_device(obs))
        kept = {k: v for k, v in obs.items() if k != keys.TASK and not k.startswith(keys.IMAGES_PREFIX)}
        return {**kept, keys.ENCODER_FEATURES: dict(features)}

    def _to_device(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in obs.items()}

    def compile_velocity(self, **compile_kwargs: Any) -> "FlowPolicy":
        """Run the expert step through `torch.compile` (CPU and CUDA) from now on; returns the policy.

        Every sampler, and RTC, calls the compiled step; the weights and `save_pretrained` are not
        affected. The first call at each new batch size compiles (seconds to a minute; `dynamic=False`
        by default, so that each fixed shape gets its fastest code), later calls are faster: measured
        by `scripts/bench.py --only compile`. Outputs agree with the eager step to float rounding
        (fused kernels sum in another order). `compile_kwargs` go to `torch.compile` (e.g. `mode=`).
        """
        compile_kwargs.setdefault("dynamic", False)
        self.net.velocity = torch.compile(type(self.net).velocity.__get__(self.net), **compile_kwargs)
        return self

    def compile_solve(self, **compile_kwargs: Any) -> "FlowPolicy":
        """Run fixed-grid sampling (euler, midpoint, rk4) as one `torch.compile`d solve from now on (CPU
        and CUDA); returns the policy.

        Where `compile_velocity()` compiles the expert step and leaves the loop over the steps in Python,
        this compiles the whole solve, every step from the noise to the chunk, given the observation's
        prefix cache (`fmpolicy.compiled`): one call per chunk. The first call at each batch size (and
        prefix length, method, step count) compiles (up to a minute); at batch 1 on a CPU later chunks
        are faster than with the compiled step (`scripts/bench.py --only compile`). RTC's guided solve
        (`fmpolicy.rtc.sample_chunk_rtc`) is compiled too, as a graph of its own, vector-Jacobian products
        included (`scripts/bench.py --only rtc`). Used in eval mode only (in train mode, and for dopri5 or
        trajectories, sampling runs as before); with CUDA graphs enabled, the graphs take precedence for
        unguided solves. Weights updated in place are seen. Chunks agree with eager
        sampling to float rounding. `compile_kwargs` go to `torch.compile` (`dynamic=False` by default).
        """
        from fmpolicy.compiled import CompiledSolver

        self._compiled_solve = CompiledSolver(self.net, **compile_kwargs)
        return self

    def prepare_inference(self, compile: str | None = None, cuda_graphs: bool = False, bf16: bool = False,
                          max_graphs: int = 8) -> "FlowPolicy":
        """The control-time speed settings in one call, in the order they must come (what
        `serve_policy.py --bf16 --compile ... --cuda-graphs` does); returns the policy. `compile`: None,
        "step" (`compile_velocity`) or "solve" (`compile_solve`); `bf16`: `set_compute_dtype(bfloat16)`;
        `cuda_graphs`: `enable_cuda_graphs(max_graphs)`."""
        if compile not in (None, "step", "solve"):
            raise ConfigError(f"compile = {compile!r} is invalid: expected None, 'step' or 'solve'")
        if bf16:
            self.set_compute_dtype(torch.bfloat16)
        if compile == "step":
            self.compile_velocity()
        elif compile == "solve":
            self.compile_solve()
        if cuda_graphs:
            self.enable_cuda_graphs(max_graphs)
        return self

    def enable_cuda_graphs(self, max_graphs: int = 8) -> "FlowPolicy":
        """Replay fixed-grid sampling (euler, midpoint, rk4) from CUDA graphs from now on; returns the policy.

        The whole solve, every step from the noise to the chunk, is captured once per batch size (and
        prefix length) and then replayed as one launch (`fmpolicy.cuda_graphs`): at batch 1 the kernel
        launches, not the arithmetic, set a GPU's latency. The first call at each new size warms up and
        captures (a few solves' time); at most `max_graphs` graphs are kept. Used in eval mode only (in
        train mode, and for dopri5, trajectories or RTC, sampling runs eagerly as before). Chunks agree
        with eager sampling to float rounding. Combine with `compile_velocity()` to capture the compiled
        step. Weights updated in place are seen; `.to()` drops the graphs. CUDA only.
        """
        from fmpolicy.cuda_graphs import GraphedSolver

        if self.device.type != "cuda":
            raise ConfigError(f"enable_cuda_graphs: the policy is on device {str(self.device)!r}: CUDA graphs "
                              "need a CUDA device (PolicyConfig.device 'cuda' or 'auto' on a machine with one)")
        self._graphs = GraphedSolver(self.net, max_graphs)
        return self

    def disable_cuda_graphs(self) -> "FlowPolicy":
        """Sample eagerly again and free the captured graphs; returns the policy."""
        self._graphs = None
        return self

    def _apply(self, *args: Any, **kwargs: Any) -> "FlowPolicy":
        # .to() / .cuda() / .half() may move the weights: a captured graph would read their old memory
        if getattr(self, "_graphs", None) is not None:
            self._graphs.clear()
        return super()._apply(*args, **kwargs)

    def set_compute_dtype(self, dtype: torch.dtype) -> "FlowPolicy":
        """Run the action expert in `dtype` from now on; returns the policy.

        `torch.bfloat16` (or float16) is for inference on GPUs: matrix products on the tensor cores, half
        the weight traffic. Only the expert's weights are converted; the normalizers, the noise, t (and
        the time features, which need float32 to resolve pi0's 0.004 period), the integration and the
        returned chunks stay float32, and an encoder stays as it is (its prefix tokens are converted).
        Chunks differ from float32 ones by bf16 rounding (~1e-2 relative). `torch.float32` converts the
        weights back (their bf16 rounding stays: reload the checkpoint for the exact float32 policy).
        Not for training (use `torch.autocast` there) nor for saving.
        """
        if dtype not in (torch.float32, *LOW_PRECISION):
            raise ConfigError(f"set_compute_dtype: dtype = {dtype} is not supported: expected torch.float32, "
                              "torch.bfloat16 or torch.float16")
        self.net.to(dtype)
        if self._graphs is not None:  # captured with the old weights' memory
            self._graphs.clear()
        return self

    def _velocity(self, x_t: Tensor, t: Tensor, cache: ExpertCache, valid: Tensor | None) -> Tensor:
        """The expert's velocity in its compute type, returned in x_t's (a no-op when they agree)."""
        d = self.compute_dtype
        if x_t.dtype == d:
            return self.net.velocity(x_t, t, cache, valid)
        return self.net.velocity(x_t.to(d), t, cache, valid).to(x_t.dtype)

    def velocity_fn(self, cache: ExpertCache):
        """A callable `v(x_t, t)` over padded, normalized chunks for `sample_ode`, reusing `cache`."""
        valid = cache.action_valid if cache.action_valid is not None else self.action_valid
        return lambda x_t, t: self._velocity(x_t, t, cache, valid)

    def _chunk_shape(self, batch_size: int) -> tuple[int, int, int]:
        return batch_size, self.config.chunk_size, self.config.expert.max_action_dim

    def _valid_mask(self, action_is_pad: Tensor | None, cache: ExpertCache) -> Tensor:
        return make_valid_mask(action_is_pad, cache.batch_size, self.config.chunk_size,
                               self.embodiments.action_dims[cache.embodiment], self.config.expert.max_action_dim)

    def _read_action(self, batch: Mapping[str, Any], cache: ExpertCache,
                     finite: bool = True) -> tuple[Tensor, Tensor | None]:
        widths = (self.embodiments.width(cache.embodiment, "action"), self.config.action_dim)
        return keys.read_action(batch, cache.batch_size, self.config.chunk_size, widths,
                                self.config.expert.max_action_dim, self.device,
                                own_dims=self.embodiments.action_dims[cache.embodiment], finite=finite)

    # ---- training ----------------------------------------------------------------------------------

    def compute_loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                     t: Tensor | None = None, noise: Tensor | None = None) -> tuple[Tensor, dict]:
        """Training loss on a batch with `observation.state`, `action` [, `action_is_pad`, prefix].

        Returns the mean loss and an info dict with the per-sample losses `per_sample` (b,).
        Flow head: CFM loss at t ~ flow.time_sampling (or the given `t` (b,) in [0, 1] and `noise`
        (b, h, A), both of the policy's dtype); regression head: MSE of a one-pass prediction. Padded
        chunk steps (`action_is_pad`) may hold anything, NaN included: they count neither in the loss
        nor in its gradient (non-finite ones enter the network as 0).
        """
        cache = self.encode(batch)
        b = cache.batch_size
        action, is_pad = self._read_action(batch, cache)
        valid = self._valid_mask(is_pad, cache)
        target = _zero_non_finite_padding(self.pad_action(action, cache.embodiment), valid)
        if self.config.head == "regression":
            per_sample = compute_masked_mse(self._regress(cache), target, valid)
        else:
            if t is None:
                t = self.sample_time(b, generator)
            else:
                t = keys.read_time(t, (b,), "b", self.device, self.dtype)
            if noise is None:
                noise = sample_noise(target.shape, generator=generator, device=self.device)
            else:
                noise = keys.read_noise(noise, tuple(target.shape), "b h max_action_dim", self.device, self.dtype)
            v = self._velocity(interpolate(target, noise, t), t, cache, cache.action_valid)
            per_sample = compute_cfm_loss(v, target, noise, valid)
        info: dict[str, Any] = {}
        weight = self.config.flow.mean_loss_weight
        if self.config.head == "flow" and weight > 0:  # the CFM loss at noise 0, t = 0: the chunk's MSE there
            mean = compute_masked_mse(self._regress(cache), target, valid)
            info["mean_loss"] = mean.mean().detach()
            per_sample = per_sample + weight * mean.to(per_sample.dtype)
        aux = self._aux_loss(batch, cache)
        if aux is not None:  # training only: the policy's own loss plus the weighted auxiliary one
            info["aux_loss"] = aux.mean().detach()
            per_sample = per_sample + self.config.aux.weight * aux.to(per_sample.dtype)
        info["per_sample"] = per_sample.detach()
        return per_sample.mean(), info

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                t: Tensor | None = None, noise: Tensor | None = None) -> tuple[Tensor, dict]:
        """Same as `compute_loss`, so that DistributedDataParallel can wrap the policy."""
        return self.compute_loss(batch, generator, t, noise)

    def sample_time(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Training times (b,) drawn as `config.flow` says."""
        f = self.config.flow
        return sample_time(batch_size, f.time_sampling, generator=generator, device=self.device,
                           beta_alpha=f.beta_alpha, beta_beta=f.beta_beta, t_min=f.t_min,
                           logit_mean=f.logit_mean, logit_std=f.logit_std)

    def compute_cfm_losses(self, obs: Mapping[str, Any], action: Tensor, t: Tensor, noise: Tensor,
                           action_is_pad: Tensor | None = None, cache: ExpertCache | None = None,
                           per_step: bool = False, huber_delta: float | None = None) -> Tensor:
        """CFM loss for each of m explicit (t, noise) pairs per sample, as FPO needs. -> (b, m)
        (`per_step`: (b, m, h), the loss of each chunk step apart, 0 at padded steps: FPO masks the
        steps a rollout did not execute after the fact)

        action (b, h, a) in environment units; t (b, m) in [0, 1]; noise (b, m, h, A) in padded network
        units, or (b, m, h, a) at the batch's own action width (zero-padded here: padded entries count in
        no loss), both of the policy's dtype (float32 unless converted). `action_is_pad` (b, h) bool:
        steps that count in no loss (FPO: the chunk steps never executed). The observation is encoded
        once and shared by the m pairs (`cache`: that encoding, when the caller has it). The action is
        not checked for NaN (a diverging RL run reports its non-finite losses itself); padded steps may
        hold anything. `huber_delta`: the Huber error instead of the squared error (`flow.squared_error`).
        """
        keys.check_tensor(t, "t", (None, None), "b m", self.dtype)
        cache = self.encode(obs) if cache is None else cache
        b, m = cache.batch_size, t.shape[1]
        t = keys.read_time(t, (b, m), "b m", self.device, self.dtype).reshape(b * m)
        h, amax = self.config.chunk_size, self.config.expert.max_action_dim
        if isinstance(noise, Tensor) and noise.dim() == 4 and noise.shape[-1] == self.config.action_dim < amax:
            noise = nn.functional.pad(noise, (0, amax - noise.shape[-1]))  # the robot's width -> padded
        noise = keys.read_noise(noise, (b, m, h, amax), "b m h max_action_dim", self.device, self.dtype)
        noise = noise.reshape(b * m, h, amax)
        given = {keys.ACTION: action} if action_is_pad is None else {keys.ACTION: action,
                                                                     keys.ACTION_IS_PAD: action_is_pad}
        action, is_pad = self._read_action(given, cache, finite=False)
        valid = self._valid_mask(is_pad, cache)
        target = _zero_non_finite_padding(self.pad_action(action, cache.embodiment), valid)
        target, valid = target.repeat_interleave(m, 0), valid.repeat_interleave(m, 0)  # (b*m, h, A)
        cache = cache.repeat_interleave(m, share_prefix=True)
        v = self._velocity(interpolate(target, noise, t), t, cache, cache.action_valid)
        if per_step:  # every step's own masked mean over its action entries
            return compute_cfm_loss(v.flatten(0, 1)[:, None], target.flatten(0, 1)[:, None], noise.flatten(0, 1)[:, None],
                                    valid.flatten(0, 1)[:, None], huber_delta).reshape(b, m, h)
        return compute_cfm_loss(v, target, noise, valid, huber_delta).reshape(b, m)

    def _regress(self, cache: ExpertCache) -> Tensor:
        """Regression head: one pass at x = 0, t = 0 gives the normalized chunk directly."""
        b = cache.batch_size
        zeros = torch.zeros(self._chunk_shape(b), device=self.device, dtype=self.dtype)
        return self._velocity(zeros, torch.zeros(b, device=self.device, dtype=self.dtype), cache, cache.action_valid)

    # ---- sampling ----------------------------------------------------------------------------------

    def sample_noise(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Initial noise x0 (b, h, A) for `predict_action_chunk(noise=...)`."""
        return sample_noise(self._chunk_shape(batch_size), generator=generator, device=self.device)

    def zero_noise(self, batch_size: int) -> Tensor:
        """Initial noise 0 (b, h, A): `predict_action_chunk(noise=...)` then gives the flow's deterministic chunk."""
        return torch.zeros(self._chunk_shape(batch_size), device=self.device)

    @torch.no_grad()
    def sample_chunk(self, obs: Mapping[str, Any], noise: Tensor | None = None,
                     generator: torch.Generator | None = None, sampler: SamplerConfig | None = None,
                     return_trajectory: bool = False, cache: ExpertCache | None = None,
                     guidance: PrefixGuidance | None = None) -> SampleResult:
        """Integrate the flow for a batch of observations; `x1` is padded and in network units.
        `cache`: `encode(obs)` computed by the caller (reused, e.g. for FPO's old losses of the chunk).
        `guidance`: RTC's guidance towards a committed prefix (`fmpolicy.rtc.sample_chunk_rtc` makes it);
        after `compile_solve()` the guided fixed-grid solve is compiled too (CUDA graphs replay unguided
        solves only: a guided one runs compiled if `compile_solve()` is on, eagerly otherwise)."""
        cache = self.encode(obs) if cache is None else cache
        b = cache.batch_size
        if self.config.head == "regression":
            return SampleResult(x1=self._regress(cache), nfe=1, embodiment=cache.embodiment)
        if noise is None:
            noise = self.sample_noise(b, generator)
        else:
            noise = keys.read_noise(noise, self._chunk_shape(b), "b h max_action_dim", self.device, self.dtype)
        s = sampler or self.config.sampler
        solver = self._graphs if self._graphs is not None and guidance is None else self._compiled_solve
        if solver is not None and s.method in NFE_PER_STEP and not return_trajectory and not self.training:
            valid = cache.action_valid if cache.action_valid is not None else self.action_valid
            x1 = (solver.solve(cache, valid, noise, s.method, s.num_steps) if guidance is None
                  else solver.solve_guided(cache, valid, noise, s.method, s.num_steps, guidance))
            return SampleResult(x1=x1, nfe=NFE_PER_STEP[s.method] * s.num_steps, embodiment=cache.embodiment)
        velocity = self.velocity_fn(cache)
        if guidance is not None:
            velocity = guidance.wrap(velocity)
        result = sample_ode(velocity, noise, method=s.method, num_steps=s.num_steps,
                            atol=s.atol, rtol=s.rtol, return_trajectory=return_trajectory)
        result.embodiment = cache.embodiment
        return result

    @torch.no_grad()
    def predict_action_chunk(self, obs: Mapping[str, Any], noise: Tensor | None = None,
                             generator: torch.Generator | None = None,
                             sampler: SamplerConfig | None = None, cache: ExpertCache | None = None) -> Tensor:
        """Sample an action chunk (b, h, a) in environment units (a: the robot's action_dim; with a
        batch that mixes robots, the widest one's, and entries past each robot's own width are 0).

        `noise` (b, h, max_action_dim), finite and of the policy's dtype, fixes the initial point
        (reproducible chunks; FPO; tests; noise on another device is moved to the policy's); otherwise
        it is drawn from `generator` (or torch's global generator). `cache`: `encode(obs)`, when the
        caller already has it.
        """
        result = self.sample_chunk(obs, noise, generator, sampler, cache=cache)
        idx = result.embodiment
        return self.embodiments.unnormalize_action(result.x1, idx, self.embodiments.width(idx, "action"))

    @torch.no_grad()
    def select_action(self, obs: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """One action (b, action_dim) per call; a new chunk is sampled every `n_action_steps` calls.

        While actions are queued, `obs` must have the batch size they were planned for: another batch
        size is an `InputError` (it does not re-plan), and the queue is left as it was. Call `reset()`
        when an episode starts or the number of environments changes.
        """
        if self._queue:
            b = keys.read_state(obs, self.config.expert.max_state_dim, self.device).shape[0]
            queued = self._queue[0].shape[0]
            if b != queued:
                raise InputError(f"select_action got a batch of {b} observations but holds queued actions for "
                                 f"{queued}: call policy.reset() when the batch size changes (e.g. a new episode)")
        else:
            chunk = self.predict_action_chunk(obs, generator=generator)
            self._queue.extend(chunk[:, : self.config.n_action_steps].unbind(1))
        return self._queue.popleft()

    def reset(self) -> None:
        """Forget queued actions (call at the start of every episode)."""
        self._queue.clear()

    # ---- save / load -------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` and `model.safetensors` (weights + normalizer stats) atomically
        (`fmpolicy.io.atomic_directory`: an existing `directory` is replaced whole)."""
        directory = Path(directory)
        meta = {"format_version": FORMAT_VERSION, "type": "FlowPolicy", "config": config_to_dict(self.config)}
        if self.encoder is not None:  # image size, normalization, tokenizer: checked again on load
            meta["encoder_preprocessing"] = self.encoder.preprocessing_config()
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        # assembled aside and moved into place: a crash leaves the old directory or the new one
        with atomic_directory(directory) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | None = None,
                        encoder_overrides: Mapping[str, Any] | None = None) -> "FlowPolicy":
        """Rebuild a saved policy; `device` overrides the saved config's device.

        `encoder_overrides`: EncoderConfig fields to change on the way (`freeze_vision`, `freeze_text`,
        `freeze_vlm`, `lora_rank`: what an RL run trains, `fmpolicy.rl.config.FinetuneConfig`). New LoRA
        adapters start at zero (B = 0: the loaded policy acts exactly as the saved one); removing or
        resizing saved adapters is refused (the weights would change).

        A missing, unreadable or inconsistent file, or weights holding NaN or inf, raise `CheckpointError`
        naming the file; a saved device this machine lacks (e.g. "cuda") raises `ConfigError`: pass `device`.
        """
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise CheckpointError(f"{path} is missing: expected a directory written by save_pretrained")
        try:
            meta = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
        if not isinstance(meta, dict):
            raise CheckpointError(f"{config_path} holds a JSON {type(meta).__name__}: expected a JSON object with "
                                  "'format_version' and 'config', as save_pretrained writes")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{config_path} has format_version {version!r}: this fmpolicy reads {FORMAT_VERSION}")
        data = meta.get("config")
        if not isinstance(data, dict):
            found = "is missing" if data is None else f"is a {type(data).__name__}"
            raise CheckpointError(f"{config_path}: the field 'config' {found}: expected the policy config object "
                                  "save_pretrained writes")
        missing = [f for f in REQUIRED_CONFIG_FIELDS if f not in data]
        if missing:
            raise CheckpointError(f"{config_path}: the config lacks the field(s) {missing}: the weights cannot "
                                  "be rebuilt without them; expected the full config save_pretrained writes")
        data = saved_policy_dict(data)  # defaults that have changed since an older fmpolicy saved it
        if device is not None:
            data = {**data, "device": device}
        saved_lora = int((data.get("encoder") or {}).get("lora_rank", 0) or 0)
        if encoder_overrides:
            encoder = data.get("encoder") or {}
            if encoder.get("kind", "none") == "none":
                raise ConfigError(f"encoder settings {dict(encoder_overrides)} were given, but the policy in {directory} "
                                  "has no encoder (encoder.kind = 'none')")
            lora = encoder_overrides.get("lora_rank", saved_lora)
            if saved_lora and lora != saved_lora:
                raise ConfigError(f"lora_rank = {lora} is invalid for {directory}: its policy was saved with LoRA adapters "
                                  f"of rank {saved_lora}; expected {saved_lora} (adapters cannot be removed or resized "
                                  "without changing the policy)")
            data = {**data, "encoder": {**encoder, **encoder_overrides}}
        config = config_from_dict(PolicyConfig, data, where=f"{config_path}:config")
        added_lora = not saved_lora and config.encoder.lora_rank > 0
        policy = cls(config)
        try:
            state = load_file(str(weights_path), device=str(policy.device))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights_path} is not a readable safetensors file (truncated, empty or "
                                  f"corrupt?): {e}") from e
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise CheckpointError(f"{weights_path} holds NaN or inf in {len(bad)} tensor(s): {bad[:10]}"
                                  f"{' ...' if len(bad) > 10 else ''}; refusing to load weights that cannot act")
        own = policy.state_dict()
        if added_lora:  # the new adapters are not in the file: they keep their zero-effect initialisation,
            # and the layers they wrap hold the saved weights under `base_layer` (peft's naming)
            for k in own:
                src = k.replace(".base_layer.", ".")
                if ".base_layer." in k and src in state:
                    state[k] = state.pop(src)
            state = {**{k: v for k, v in own.items() if "lora_" in k}, **state}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [k for k, v in own.items() if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            raise CheckpointError(f"{weights_path} does not match its config: missing {missing}, "
                                  f"unexpected {unexpected}, wrong shape {shapes}")
        policy.load_state_dict(state)
        if policy.encoder is not None:
            saved = meta.get("encoder_preprocessing")
            now = json.loads(json.dumps(policy.encoder.preprocessing_config()))
            if saved != now:
                raise CheckpointError(f"{config_path}: the encoder's preprocessing settings {saved} differ from the "
                                      f"rebuilt encoder's {now} (a tokenizer or model folder changed?)")
        return policy


def pool_prefix(prefix: Tensor, mask: Tensor | None) -> Tensor:
    """Masked mean of prefix tokens (b, p, d) over the valid ones -> (b, d) (zeros where none is valid)."""
    if mask is None:
        return prefix.mean(1)
    w = mask.to(prefix.dtype)[..., None]
    return (torch.where(mask[..., None], prefix, torch.zeros((), dtype=prefix.dtype, device=prefix.device)) * w).sum(1) \
        / w.sum(1).clamp_min(1.0)


def _zero_non_finite_padding(target: Tensor, valid: Tensor) -> Tensor:
    """Padded entries (`~valid`) holding NaN or inf -> 0, before they enter the network through x_t: a
    NaN there would spread to every token through attention. Finite padding is left as it is."""
    return torch.where(~valid & ~torch.isfinite(target), torch.zeros((), dtype=target.dtype, device=target.device),
                       target)
