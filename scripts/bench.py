"""Speed benchmark of the flow-matching action expert: chunk latency, solver overhead, prefix cache, training.

Usage:
    python scripts/bench.py                      # full run, "cpu" preset, readable tables
    python scripts/bench.py --json               # one JSON object per measured row instead
    python scripts/bench.py --quick              # smoke run ("tiny" preset, tiny sizes, 2 repeats)
    python scripts/bench.py --only chunk,cache --preset base --device cuda --threads 2

Setting: a `FlowPolicy` with state_dim 8, action_dim 7, chunk_size h = 10, identity normalization,
prefix tokens of the expert's width (16 tokens unless stated), Euler sampling. Every time is wall clock
in milliseconds per call, after warm-up calls, under `torch.no_grad()` (except `train`); on CUDA the
device is synchronised before and after each timed call. Rows give the median and the 90th
percentile (p90) over the repeats. Where a section compares things (a chunk with its parts, cached
with uncached, fp32 with bf16), the calls are interleaved round by round (the starting one rotates)
so that a ratio is measured side by side, under the same load.

Sections (`--only`):
- `compile` (not in the default run: it compiles for a few minutes): the 10-step chunk with the eager
  expert step against `policy.compile_velocity()` (torch.compile of the step) and against
  `policy.compile_solve()` (torch.compile of the whole fixed-grid solve: row `compiled_solve`), one
  compile per batch size each, timed apart as `compile_s`, interleaved; `speedup` = eager / compiled,
  `max_abs_diff` between their chunks. Then the `cache` section's pair at batch 1 with both sides
  compiled, the step (`cache_cached_compiled` / `cache_uncached_compiled`) and the whole solve
  (`cache_cached_solve` / `cache_uncached_solve`): the prefix cache's speed-up with compile on, target >= 2.
  `cache_cached_solve_step_time`: the cached whole solve with the time conditioning computed at each
  step instead of once for all steps (its `speedup`: what that table saves).
- `rtc` (not in the default run: it compiles for minutes): RTC's cost, the 10-step chunk guided towards
  the previous chunk's leftover (`sample_chunk_rtc`: 3 of its 10 actions executed, inference delay 2)
  against the plain chunk from the same noise, eager (`rtc_eager` / `plain_eager`) and with
  `compile_solve()` (`rtc_compiled_solve` / `plain_compiled_solve`: the guided solve, vector-Jacobian
  products included, compiled as one graph), interleaved, at batch 1 and 64. Figures: `vs_plain` = RTC
  / plain, `speedup` = eager RTC / compiled RTC, `compile_s` (the first call), `max_abs_diff` between
  the eager and the compiled RTC chunk.
- `cuda_graph` (not in the default run; CUDA only): the 10-step chunk with eager sampling against
  `policy.enable_cuda_graphs()` (the whole solve replayed from one CUDA graph; capture timed apart as
  `capture_s`), against compile + graphs, and both again with the expert in bf16
  (`set_compute_dtype(torch.bfloat16)`), interleaved, at batch 1 and 64; then the same at batch 1
  for a pi0-sized action expert (width 1024, 18 blocks, 8 heads, chunk 50, 32-wide padded actions,
  304 prefix tokens of width 2048: one 224-px view's 256 image tokens and 48 text tokens; the
  vision-language backbone that makes those tokens is not run). Figures: `speedup` = eager / graphs,
  `max_abs_diff` between their chunks.
- `chunk`: one `policy.predict_action_chunk(obs)` at batch 1 and 64, with 1, 5 and 10 Euler steps:
  the latency a controller sees, including input checks, the one prefix pass, the ODE solve
  (torchdiffeq) and unnormalization.
- `overhead`: the 10-step chunk against its parts timed in the same run: one prefix pass
  (`policy.encode`) and one expert step (`policy.net.velocity` alone, on a fixed x_t; timed as 10
  back-to-back calls and divided by 10, so that its timed call is as long as the chunk's and as
  exposed to preemption on a shared machine). Figure: `overhead = chunk / (encode + 10 * step) - 1`,
  the cost of everything outside the network (input checks, the solver loop, noise,
  unnormalization). Target: <= 0.15.
- `cache`: a 10-step solve with the prefix keys/values computed once (`policy.net.encode` +
  `sample_ode(policy.velocity_fn(cache), x0)`; the one prefix pass is inside the timed call) against
  one that recomputes them at every step (`policy.net(x_t, t, state, ..., prefix, prefix_mask, ...)`),
  at p = 256 prefix tokens, some of them masked. Figures: `speedup = uncached / cached` (target >= 2;
  it grows with the batch and with p, as the prefix pass becomes the larger cost), and
  `max_abs_diff` between the two chunks from the same noise (they must agree to float rounding,
  < 1e-4). `prefix_effect` is the max change of the chunk when the prefix is replaced: it shows that
  the comparison is not vacuous. (At initialisation the adaLN-Zero gates are 0, every block is the
  identity and the prefix cannot reach the output, and the output layer is 0, so the bench first gives
  those layers small random weights; timings do not depend on the values.)
- `encoder`: `predict_action_chunk` with the encoder in the loop (a 64-pixel camera through a
  SigLIP-style tower of width 128 and 4 layers, and a 32-token instruction through a tiny BERT: 96
  prefix tokens), the encoder alone, and a solve that re-runs the encoder at every step. Figure:
  `speedup = encoder_every_step / chunk`, what running the encoder once per chunk saves.
- `envs`: environment steps per second of the batched torch PointObstacle at 1, 64, 1024 and 4096
  environments (random actions, `--device` decides CPU or CUDA).
- `rl_update`: one FPO update step (m = 8 stored (t, noise) pairs, CFM losses, ratio, clipped
  surrogate, backward, Adam) against one Gaussian PPO update step on the same minibatch of 1024,
  per-step control at HalfCheetah's widths. Figure: `ratio = fpo / gaussian_ppo` (target <= 2.5).
- `rl_vl` (not in the default sections): one FPO iteration (rollout of 8 chunks in 32 envs, 4 epochs of
  4 minibatches) of the image + instruction policy of `configs/point_goals_vl.yaml` with its vision
  tower and text model frozen, against the same expert reading the state only, on two-goal
  PointObstacle. Figure: `ratio = vl_frozen / state_only` (target <= 1.3).
- `train`: CFM training steps (`policy.compute_loss` forward, backward, AdamW step) at batch 64, in
  fp32 and under `torch.autocast(device_type, dtype=torch.bfloat16)`, interleaved. Figures:
  `steps_per_s` and, on the bf16 row, `ratio = bf16 steps/s / fp32 steps/s` (above 1: bf16 is faster).

Each row also carries `machine` (CPU model or GPU name, torch version, CPU threads, the 1-minute load
average at the start: other processes on the CPU inflate the times, multi-threaded ones most). A fixed seed
(`--seed`) makes the inputs and weights the same from run to run; timings on a shared machine still
vary: rerun, and compare figures only between runs on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fmpolicy import FlowPolicy, NormalizationConfig, PolicyConfig, SamplerConfig, make_expert_config
from fmpolicy.config import EXPERT_PRESETS, resolve_device
from fmpolicy.cuda_graphs import solve_expert
from fmpolicy.machine import cpu_model
from fmpolicy.model import ActionExpert
from fmpolicy.model.layers import AdaptiveModulation
from fmpolicy.sampling import fixed_grid, sample_ode, solve_fixed_grid

SECTIONS = ("chunk", "overhead", "cache", "train", "encoder", "envs", "rl_update", "rl_vl", "compile", "rtc",
            "cuda_graph")
DEFAULT_SECTIONS = SECTIONS[:-4]  # `rl_vl` (a minute of rollouts), `compile` and `rtc` (minutes compiling)
#   and `cuda_graph` (CUDA only): run them with --only rl_vl / compile / rtc / cuda_graph
RTC_EXECUTED, RTC_DELAY = 3, 2  # the rtc section: actions of the chunk executed, inference delay
ENV_COUNTS = (1, 64, 1024, 4096)  # environments stepped together in the envs section
FPO_TARGET = 2.5  # an FPO update (m = 8) costs at most this many Gaussian PPO updates
STATE_DIM, ACTION_DIM, CHUNK_SIZE = 8, 7, 10
OVERHEAD_TARGET = 0.15  # chunk / (encode + k * step) - 1 at most this
CACHE_TARGET = 2.0  # uncached / cached at least this
DIFF_LIMIT = 1e-4  # cached and uncached chunks agree to this


@dataclass(frozen=True)
class Sizes:
    """How much a run measures."""

    batches: tuple[int, ...]  # batch sizes of chunk, overhead and cache
    steps: tuple[int, ...]  # Euler steps of the chunk section
    overhead_steps: int  # k of the overhead and cache sections
    prefix_tokens: int  # p of chunk, overhead and train
    cache_prefix_tokens: int  # p of the cache section
    train_batch: int  # batch of the train section
    warmup: int  # untimed calls (per measured thing) before timing
    repeats: int  # timed calls at batch 1 (per measured thing)
    repeats_large: int  # timed calls at larger batches, where one call is much longer


FULL = Sizes(batches=(1, 64), steps=(1, 5, 10), overhead_steps=10, prefix_tokens=16, cache_prefix_tokens=256,
             train_batch=64, warmup=3, repeats=40, repeats_large=10)
QUICK = Sizes(batches=(1, 4), steps=(1, 5, 10), overhead_steps=10, prefix_tokens=16, cache_prefix_tokens=32,
              train_batch=8, warmup=1, repeats=2, repeats_large=2)


# ---- timing ---------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Call every function once per round, rotating which goes first; -> milliseconds per call, by name."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(xs: list[float]) -> float:
    return percentile(xs, 50.0)


# ---- setup ----------------------------------------------------------------------------------------


def make_policy(preset: str, device: torch.device, seed: int, chunk_size: int = CHUNK_SIZE,
                **expert: Any) -> FlowPolicy:
    """The benchmark policy: prefix tokens of the expert's width, identity normalization (`expert`:
    fields of the preset replaced).

    The zero-initialised modulation layers and the transformer's zero-initialised output layer get
    small random weights, so that time, state and prefix reach the output (see the module docstring);
    the cost of a call does not change.
    """
    torch.manual_seed(seed)
    expert = {"prefix_dim": EXPERT_PRESETS[preset].width, **expert}
    config = PolicyConfig(
        state_dim=STATE_DIM, action_dim=ACTION_DIM, chunk_size=chunk_size, n_action_steps=chunk_size // 2,
        expert=make_expert_config(preset, **expert),
        sampler=SamplerConfig(method="euler", num_steps=10),
        normalization=NormalizationConfig(state="identity", action="identity"),
        device=str(device))
    policy = FlowPolicy(config)
    with torch.no_grad():
        for module in policy.modules():
            if isinstance(module, AdaptiveModulation):
                module.proj.weight.normal_(0.0, 0.5 / math.sqrt(module.proj.in_features))
                module.proj.bias.normal_(0.0, 0.1)
            if isinstance(module, ActionExpert):  # its output layer starts at zero too (DiT's)
                module.action_out.weight.normal_(0.0, 1.0 / math.sqrt(module.action_out.in_features))
    return policy.eval()


def make_obs(policy: FlowPolicy, batch: int, p: int, generator: torch.Generator,
             ragged: bool = False) -> dict[str, Tensor]:
    """An observation with p prefix tokens; `ragged` masks out the tail of some samples' prefixes."""
    d = policy.config.expert.prefix_dim
    mask = torch.ones(batch, p, dtype=torch.bool)
    if ragged:
        lengths = torch.randint(p // 2, p + 1, (batch,), generator=generator)
        mask = torch.arange(p)[None, :] < lengths[:, None]
    obs = {
        "observation.state": torch.randn(batch, STATE_DIM, generator=generator),
        "observation.prefix": torch.randn(batch, p, d, generator=generator),
        "observation.prefix_mask": mask,
    }
    return {k: v.to(policy.device) for k, v in obs.items()}


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    # the 1-minute load average at the start: above ~the core count, other processes share the CPU and
    # CPU timings (multi-threaded ones most) are inflated
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_model(), "gpu": gpu, "torch": torch.__version__, "threads": threads, "load_at_start": load}


# ---- rows -----------------------------------------------------------------------------------------


class Bench:
    """Shared state of one run: the policy, the sizes, the seeded generators, the machine description."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, device: torch.device, threads: int):
        self.args, self.sizes, self.device = args, sizes, device
        self.preset = args.preset
        self.machine = machine_info(device, threads)
        self.policy = make_policy(args.preset, device, args.seed)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.device_generator = torch.Generator(device=device).manual_seed(args.seed)

    def time(self, fns: dict[str, Callable[[], Any]], batch: int) -> dict[str, list[float]]:
        """Time `fns` interleaved, with fewer warm-up and timed calls where the batch (one call) is large."""
        s = self.sizes
        warmup, repeats = (s.warmup, s.repeats) if batch == 1 else (max(1, s.warmup - 1), s.repeats_large)
        return time_interleaved(fns, repeats=repeats, warmup=warmup, device=self.device)

    def row(self, section: str, name: str, times: list[float], **fields: Any) -> dict[str, Any]:
        r: dict[str, Any] = {"section": section, "name": name, "preset": self.preset, "device": str(self.device)}
        r.update({k: v for k, v in fields.items() if k in ("batch", "steps", "p")})
        r.update(median_ms=median(times), p90_ms=percentile(times, 90.0), repeats=len(times))
        r.update({k: v for k, v in fields.items() if k not in r})
        r["machine"] = self.machine
        return r


# ---- sections -------------------------------------------------------------------------------------


@torch.no_grad()
def bench_chunk(bench: Bench) -> list[dict]:
    policy, s = bench.policy, bench.sizes
    rows = []
    for batch in s.batches:
        obs = make_obs(policy, batch, s.prefix_tokens, bench.generator)
        fns = {k: (lambda k=k: policy.predict_action_chunk(obs, generator=bench.device_generator,
                                                          sampler=SamplerConfig(method="euler", num_steps=k)))
               for k in s.steps}
        times = bench.time(fns, batch)
        for k in s.steps:
            rows.append(bench.row("chunk", "predict_action_chunk", times[k], batch=batch, steps=k, p=s.prefix_tokens))
    return rows


@torch.no_grad()
def bench_overhead(bench: Bench) -> list[dict]:
    policy, s = bench.policy, bench.sizes
    k = s.overhead_steps
    sampler = SamplerConfig(method="euler", num_steps=k)
    rows = []
    for batch in s.batches:
        obs = make_obs(policy, batch, s.prefix_tokens, bench.generator)
        cache = policy.encode(obs)
        x_t = policy.sample_noise(batch, bench.device_generator)
        t = torch.full((batch,), 0.5, device=policy.device)
        fns = {
            "chunk": lambda: policy.predict_action_chunk(obs, generator=bench.device_generator, sampler=sampler),
            "encode": lambda: policy.encode(obs),
            # k back-to-back steps per timed call, so that the call is as long as a chunk and as exposed
            # to preemption on a shared machine (a short call dodges it and would look cheaper)
            "step": lambda: [policy.net.velocity(x_t, t, cache, policy.action_valid) for _ in range(k)],
        }
        times = bench.time(fns, batch)
        times["step"] = [ms / k for ms in times["step"]]  # per step
        parts = median(times["encode"]) + k * median(times["step"])
        overhead = median(times["chunk"]) / parts - 1.0
        common = dict(batch=batch, p=s.prefix_tokens)
        rows.append(bench.row("overhead", "encode", times["encode"], steps=0, **common))
        rows.append(bench.row("overhead", "step", times["step"], steps=1, **common))
        rows.append(bench.row("overhead", "chunk", times["chunk"], steps=k, **common, parts_ms=parts,
                              overhead=overhead, target=f"<= {OVERHEAD_TARGET}",
                              meets_target=overhead <= OVERHEAD_TARGET))
    return rows


@torch.no_grad()
def bench_cache(bench: Bench) -> list[dict]:
    policy, s = bench.policy, bench.sizes
    p, k = s.cache_prefix_tokens, s.overhead_steps
    rows = []
    for batch in s.batches:
        obs = make_obs(policy, batch, p, bench.generator, ragged=True)
        state = policy.pad_state(obs["observation.state"])
        prefix, mask = obs["observation.prefix"], obs["observation.prefix_mask"]
        x0 = policy.sample_noise(batch, bench.device_generator)

        def cached(prefix: Tensor = prefix) -> Tensor:
            cache = policy.net.encode(state, policy.state_valid, prefix, mask)
            return sample_ode(policy.velocity_fn(cache), x0, method="euler", num_steps=k).x1

        def uncached() -> Tensor:
            def velocity(x_t: Tensor, t: Tensor) -> Tensor:
                return policy.net(x_t, t, state, policy.state_valid, prefix, mask, policy.action_valid)
            return sample_ode(velocity, x0, method="euler", num_steps=k).x1

        times = bench.time({"cached": cached, "uncached": uncached}, batch)
        diff = (cached() - uncached()).abs().max().item()
        other = torch.randn(prefix.shape, generator=bench.generator).to(prefix.device)
        effect = (cached(other) - cached()).abs().max().item()
        speedup = median(times["uncached"]) / median(times["cached"])
        common = dict(batch=batch, steps=k, p=p)
        rows.append(bench.row("cache", "cached", times["cached"], **common))
        rows.append(bench.row("cache", "uncached", times["uncached"], **common, speedup=speedup,
                              max_abs_diff=diff, prefix_effect=effect, target=f">= {CACHE_TARGET}",
                              meets_target=speedup >= CACHE_TARGET and diff < DIFF_LIMIT))
    return rows


@torch.no_grad()
def bench_encoder(bench: Bench) -> list[dict]:
    """`predict_action_chunk` with the encoder in the loop (image + instruction -> chunk): the encoder
    runs once per chunk, its tokens reach every step through the expert's prefix cache. Compared, in
    the same run, with a solve that re-runs the encoder at every step."""
    from fmpolicy.config import EncoderConfig

    s, device = bench.sizes, bench.device
    image = 16 if bench.args.quick else 64
    width = EXPERT_PRESETS[bench.preset].width
    enc = EncoderConfig(kind="vision_text", image_size=image, vision_patch_size=8, vision_hidden_size=128,
                        vision_num_hidden_layers=4, vision_num_attention_heads=4, vision_intermediate_size=512,
                        text_model="tiny", max_text_tokens=32, out_dim=width)
    cfg = PolicyConfig(state_dim=STATE_DIM, action_dim=ACTION_DIM, chunk_size=CHUNK_SIZE,
                       n_action_steps=CHUNK_SIZE // 2, expert=make_expert_config(bench.preset, prefix_dim=width),
                       encoder=enc, normalization=NormalizationConfig(state="identity", action="identity"),
                       device=str(device))
    torch.manual_seed(bench.args.seed)
    policy = FlowPolicy(cfg).eval()
    k = s.overhead_steps
    sampler = SamplerConfig(method="euler", num_steps=k)
    rows = []
    for batch in s.batches:
        cam = torch.rand(batch, 3, image, image, generator=bench.generator).to(device)
        obs = {"observation.state": torch.randn(batch, STATE_DIM, generator=bench.generator).to(device),
               "observation.images.top": cam, "task": ["go to the red goal"] * batch}
        state = policy.pad_state(obs["observation.state"])
        x0 = policy.sample_noise(batch, bench.device_generator)

        def every_step() -> Tensor:
            def velocity(x_t: Tensor, t: Tensor) -> Tensor:
                prefix, mask = policy.encoder(obs)
                return policy.net(x_t, t, state, policy.state_valid, prefix, mask, policy.action_valid)
            return sample_ode(velocity, x0, method="euler", num_steps=k).x1

        times = bench.time({"chunk": lambda: policy.predict_action_chunk(obs, noise=x0, sampler=sampler),
                            "encoder": lambda: policy.encoder(obs), "encoder_every_step": every_step}, batch)
        tokens = policy.encoder.num_tokens
        common = dict(batch=batch, steps=k, p=tokens)
        rows.append(bench.row("encoder", "encoder", times["encoder"], **common, image=image))
        rows.append(bench.row("encoder", "chunk", times["chunk"], **common, image=image))
        rows.append(bench.row("encoder", "encoder_every_step", times["encoder_every_step"], **common, image=image,
                              speedup=median(times["encoder_every_step"]) / median(times["chunk"])))
    return rows


@torch.no_grad()
def bench_envs(bench: Bench) -> list[dict]:
    """Environment steps per second of the batched torch PointObstacle at 1 ... 4096 environments."""
    import fmpolicy_envs

    counts = (1, 64) if bench.args.quick else ENV_COUNTS
    steps = 5 if bench.args.quick else 50
    rows = []
    for n in counts:
        envs = fmpolicy_envs.PointObstacleVectorEnv(num_envs=n, device=bench.device, seed=bench.args.seed)
        envs.reset(seed=bench.args.seed)
        action = torch.rand(n, 2, generator=bench.generator).to(bench.device) * 2 - 1

        def run() -> None:
            for _ in range(steps):
                envs.step(action)

        times = bench.time({"step": run}, 1 if n == 1 else 2)
        per_step = [ms / steps for ms in times["step"]]
        rows.append(bench.row("envs", "PointObstacle", per_step, batch=n, env_steps_per_s=n * 1e3 / median(per_step)))
    # with the 64-pixel camera of configs/point_goals_vl.yaml (two goals): every step renders the images
    n = 8 if bench.args.quick else 32
    envs = fmpolicy_envs.PointObstacleVectorEnv(num_envs=n, device=bench.device, seed=bench.args.seed, n_goals=2,
                                                image_size=64)
    envs.reset(seed=bench.args.seed)
    action = torch.rand(n, 2, generator=bench.generator).to(bench.device) * 2 - 1
    times = bench.time({"step": lambda: [envs.step(action) for _ in range(steps)]}, 2)
    per_step = [ms / steps for ms in times["step"]]
    rows.append(bench.row("envs", "PointObstacle+camera64", per_step, batch=n,
                          env_steps_per_s=n * 1e3 / median(per_step)))
    return rows


def bench_rl_update(bench: Bench) -> list[dict]:
    """One FPO update step (m = 8 pairs) against one Gaussian PPO update step on the same minibatch:
    ratio, clipped surrogate, backward, Adam step. Per-step control, HalfCheetah-sized (s = 17, a = 6)."""
    from fmpolicy.rl.actors import FlowActor, GaussianActor
    from fmpolicy.rl.config import FPOConfig, GaussianConfig
    from fmpolicy.rl.objectives import compute_clipped_surrogate

    device, s_dim, a_dim = bench.device, 17, 6
    b = 64 if bench.args.quick else 1024
    cfg = PolicyConfig(state_dim=s_dim, action_dim=a_dim, chunk_size=1, n_action_steps=1,
                       expert=make_expert_config("mlp", max_state_dim=s_dim, max_action_dim=a_dim),
                       normalization=NormalizationConfig(state="identity", action="identity"), device=str(device))
    torch.manual_seed(bench.args.seed)
    actors = {"fpo": FlowActor(FlowPolicy(cfg), FPOConfig(num_pairs=8)),
              "gaussian_ppo": GaussianActor(s_dim, a_dim, 1, GaussianConfig(), device=device)}
    obs = {"observation.state": torch.randn(b, s_dim, generator=bench.generator).to(device)}
    adv = torch.randn(b, generator=bench.generator).to(device)
    fns = {}
    for name, actor in actors.items():
        chunk, store = actor.act(obs, bench.device_generator)
        optimizer = torch.optim.Adam(actor.parameters(), lr=1e-5)

        def update(actor=actor, chunk=chunk, store=store, optimizer=optimizer) -> None:
            log_ratio, _ = actor.log_ratio(obs, chunk, store)
            loss = compute_clipped_surrogate(log_ratio.exp(), adv, 0.05).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        fns[name] = update
    times = bench.time(fns, b)
    ratio = median(times["fpo"]) / median(times["gaussian_ppo"])
    return [bench.row("rl_update", "gaussian_ppo", times["gaussian_ppo"], batch=b),
            bench.row("rl_update", "fpo", times["fpo"], batch=b, pairs=8, ratio=ratio, target=f"<= {FPO_TARGET}",
                      meets_target=ratio <= FPO_TARGET)]


def bench_rl_vl(bench: Bench) -> list[dict]:
    """One FPO iteration (rollout of n chunks in e envs + the update) of the image + instruction policy of
    configs/point_goals_vl.yaml (64-pixel camera, tiny BERT; vision tower and text model frozen: their
    outputs computed once per observation and stored) against the same expert reading the state only,
    on two-goal PointObstacle (with and without the camera). Figure: `ratio = vl_frozen / state_only`
    (target <= 1.3, issue 15)."""
    import fmpolicy_envs  # noqa: F401  (registers fmpolicy/PointObstacle-v0)
    from fmpolicy.config import config_from_dict
    from fmpolicy.rl.config import RLRunConfig
    from fmpolicy.rl.gae import compute_gae
    from fmpolicy.rl.rollout import RolloutCollector, make_vector_env
    from fmpolicy.rl.trainer import UpdateBatch, make_actor, parameter_groups, update_policy
    from fmpolicy.rl.value import ValueNet

    device = bench.device
    e, n = (8, 2) if bench.args.quick else (32, 8)
    expert = {"kind": "transformer", "width": 128, "depth": 4, "num_heads": 4}
    encoder = {"kind": "vision_text", "cameras": ["observation.images.top"], "image_size": 64, "vision_patch_size": 8,
               "vision_hidden_size": 64, "vision_num_hidden_layers": 2, "text_model": "tiny", "max_text_tokens": 24,
               "out_dim": 64, "freeze_vision": True, "freeze_text": True}
    variants = {"vl_frozen": ({**expert, "prefix_dim": 64}, encoder, {"n_goals": 2, "image_size": 64}, "prefix_pooled"),
                "state_only": (expert, {"kind": "none"}, {"n_goals": 2}, "state")}
    fns = {}
    for name, (exp, enc, env_kwargs, value_input) in variants.items():
        cfg = config_from_dict(RLRunConfig, {
            "policy": {"state_dim": 2, "action_dim": 2, "chunk_size": 8, "n_action_steps": 4, "expert": exp,
                       "encoder": enc, "normalization": {"state": "identity", "action": "identity"}},
            "rl": {"num_envs": e, "num_macro_steps": n, "update_epochs": 4, "num_minibatches": 4, "device": str(device),
                   "value": {"width": 256, "depth": 2, "input": value_input}, "fpo": {"num_pairs": 8}},
            "env": {"id": "fmpolicy/PointObstacle-v0", "kwargs": env_kwargs}})
        torch.manual_seed(bench.args.seed)
        actor, pc = make_actor(cfg, device)
        critic = ValueNet(pc.state_dim, cfg.rl.value, pc.expert.prefix_dim, device)
        params = [p for p in actor.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(parameter_groups(actor, params, list(critic.parameters()), cfg.rl), lr=1e-5)
        collector = RolloutCollector(make_vector_env(cfg.env.id, e, device, 0, cfg.env.kwargs), actor, critic, 4, 0.99,
                                     device)
        collector.reset(0)

        def iteration(actor=actor, critic=critic, optimizer=optimizer, collector=collector, cfg=cfg) -> None:
            r = collector.collect(n, bench.device_generator)
            adv, ret = compute_gae(r.rewards, r.values, r.terminated, r.truncated, r.next_value, r.final_values,
                                   gamma=0.99 ** 4, lam=0.95)
            flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
            batch = UpdateBatch(obs=r.obs, store={k: flat(v) for k, v in r.store.items()}, chunks=flat(r.chunks),
                                executed=flat(r.executed), advantages=flat(adv), returns=flat(ret), values=flat(r.values))
            order = [torch.randperm(e * n, generator=bench.generator).to(device).chunk(4) for _ in range(4)]
            update_policy(actor, critic, optimizer, batch, order, cfg.rl)

        fns[name] = iteration
    times = time_interleaved(fns, repeats=3 if bench.args.quick else 5, warmup=1, device=device)
    ratio = median(times["vl_frozen"]) / median(times["state_only"])
    return [bench.row("rl_vl", "state_only", times["state_only"], batch=e * n),
            bench.row("rl_vl", "vl_frozen", times["vl_frozen"], batch=e * n, ratio=ratio, target="<= 1.3",
                      meets_target=ratio <= 1.3)]


def bench_train(bench: Bench) -> list[dict]:
    policy, s, device = bench.policy, bench.sizes, bench.device
    b, p = s.train_batch, s.prefix_tokens
    batch = make_obs(policy, b, p, bench.generator)
    batch["action"] = torch.randn(b, CHUNK_SIZE, ACTION_DIM, generator=bench.generator).to(device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    losses: list[Tensor] = []

    def step(autocast: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, _ = policy.compute_loss(batch, generator=bench.device_generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    policy.train()
    try:
        times = bench.time({"fp32": lambda: step(False), "bf16": lambda: step(True)}, b)
    finally:
        policy.eval()
    if not all(math.isfinite(x) for x in torch.stack(losses).float().tolist()):
        raise RuntimeError("the training loss became non-finite during the train benchmark")
    fp32, bf16 = (1e3 / median(times[n]) for n in ("fp32", "bf16"))
    return [
        bench.row("train", "fp32", times["fp32"], batch=b, p=p, steps_per_s=fp32),
        bench.row("train", "bf16", times["bf16"], batch=b, p=p, steps_per_s=bf16, ratio=bf16 / fp32),
    ]


@torch.no_grad()
def bench_compile(bench: Bench) -> list[dict]:
    """A 10-step chunk with the eager expert step against `policy.compile_velocity()` and against
    `policy.compile_solve()` (copies of the same weights), timed interleaved after the compiled copies
    have compiled for the batch size."""
    import copy

    policy, s = bench.policy, bench.sizes
    variants = {"compiled": copy.deepcopy(policy).compile_velocity(),
                "compiled_solve": copy.deepcopy(policy).compile_solve()}
    rows = []
    for batch in s.batches:
        obs = make_obs(policy, batch, s.prefix_tokens, bench.generator)
        noise = policy.sample_noise(batch, bench.device_generator)
        eager = policy.predict_action_chunk(obs, noise=noise)
        compile_s, diff = {}, {}
        for name, compiled in variants.items():
            start = time.perf_counter()
            compiled.predict_action_chunk(obs, noise=noise)
            synchronize(policy.device)
            compile_s[name] = time.perf_counter() - start
            diff[name] = float((compiled.predict_action_chunk(obs, noise=noise) - eager).abs().max())
        calls = {"eager": policy}
        calls.update(variants)
        times = bench.time({name: (lambda p=p: p.predict_action_chunk(obs, noise=noise)) for name, p in calls.items()},
                           batch)
        common = dict(batch=batch, steps=policy.config.sampler.num_steps, p=s.prefix_tokens)
        rows.append(bench.row("compile", "eager", times["eager"], **common))
        for name in variants:
            rows.append(bench.row("compile", name, times[name], **common, compile_s=compile_s[name],
                                  speedup=median(times["eager"]) / median(times[name]), max_abs_diff=diff[name]))
    rows += bench_cache_compiled(bench, variants["compiled"])
    return rows


def bench_cache_compiled(bench: Bench, compiled: FlowPolicy) -> list[dict]:
    """The prefix cache's speed-up at batch 1 with compile on (issue 18): a 10-step solve through the
    compiled expert step with the prefix keys / values computed once, against one through a compiled
    whole forward pass that recomputes them at every step (the `cache` section's pair, both compiled);
    then the same pair with each whole solve compiled as one graph (`compile_solve`'s way)."""
    s = bench.sizes
    p, k, batch = s.cache_prefix_tokens, s.overhead_steps, 1
    obs = make_obs(compiled, batch, p, bench.generator, ragged=True)
    state = compiled.pad_state(obs["observation.state"])
    prefix, mask = obs["observation.prefix"], obs["observation.prefix_mask"]
    x0 = compiled.sample_noise(batch, bench.device_generator)
    forward = torch.compile(compiled.net.forward, dynamic=False)

    def cached() -> Tensor:
        cache = compiled.net.encode(state, compiled.state_valid, prefix, mask)
        return sample_ode(compiled.velocity_fn(cache), x0, method="euler", num_steps=k).x1

    def uncached() -> Tensor:
        def velocity(x_t: Tensor, t: Tensor) -> Tensor:
            return forward(x_t, t, state, compiled.state_valid, prefix, mask, compiled.action_valid)
        return sample_ode(velocity, x0, method="euler", num_steps=k).x1

    with torch.no_grad():
        start = time.perf_counter()
        diff = float((cached() - uncached()).abs().max())  # compiles both
        compile_s = time.perf_counter() - start
        times = bench.time({"cached_compiled": cached, "uncached_compiled": uncached}, batch)
    speedup = median(times["uncached_compiled"]) / median(times["cached_compiled"])
    common = dict(batch=batch, steps=k, p=p)
    rows = [bench.row("compile", "cache_cached_compiled", times["cached_compiled"], **common),
            bench.row("compile", "cache_uncached_compiled", times["uncached_compiled"], **common, speedup=speedup,
                      compile_s=compile_s, max_abs_diff=diff, target=f">= {CACHE_TARGET}",
                      meets_target=speedup >= CACHE_TARGET and diff < DIFF_LIMIT)]

    net, state_valid, valid = compiled.net, compiled.state_valid, compiled.action_valid
    grid = fixed_grid(k, x0)
    step = type(net).velocity.__get__(net)

    def cached_solve(x0: Tensor, grid: Tensor) -> Tensor:  # the encode pass and every step in one graph
        cache = net.encode(state, state_valid, prefix, mask)
        return solve_expert(net, x0, valid, cache, "euler", k, step, grid)  # as compile_solve() runs it

    def cached_solve_step_time(x0: Tensor, grid: Tensor) -> Tensor:  # the time conditioning made at each step
        cache = net.encode(state, state_valid, prefix, mask)
        return solve_fixed_grid(lambda x, t: step(x, t, cache, valid), x0, "euler", k, grid)

    def uncached_solve(x0: Tensor, grid: Tensor) -> Tensor:
        return solve_fixed_grid(lambda x, t: type(net).forward(net, x, t, state, state_valid, prefix, mask, valid),
                                x0, "euler", k, grid)

    solves = {"cache_cached_solve": torch.compile(cached_solve, dynamic=False),
              "cache_cached_solve_step_time": torch.compile(cached_solve_step_time, dynamic=False),
              "cache_uncached_solve": torch.compile(uncached_solve, dynamic=False)}
    with torch.no_grad():
        start = time.perf_counter()
        out = {name: f(x0, grid) for name, f in solves.items()}
        compile_s = time.perf_counter() - start
        diff = float((out["cache_cached_solve"] - out["cache_uncached_solve"]).abs().max())
        times = bench.time({name: (lambda f=f: f(x0, grid)) for name, f in solves.items()}, batch)
    speedup = median(times["cache_uncached_solve"]) / median(times["cache_cached_solve"])
    table = median(times["cache_cached_solve_step_time"]) / median(times["cache_cached_solve"])
    rows += [bench.row("compile", "cache_cached_solve", times["cache_cached_solve"], **common),
             bench.row("compile", "cache_cached_solve_step_time", times["cache_cached_solve_step_time"], **common,
                       speedup=table, max_abs_diff=float((out["cache_cached_solve_step_time"]
                                                          - out["cache_cached_solve"]).abs().max())),
             bench.row("compile", "cache_uncached_solve", times["cache_uncached_solve"], **common, speedup=speedup,
                       compile_s=compile_s, max_abs_diff=diff, target=f">= {CACHE_TARGET}",
                       meets_target=speedup >= CACHE_TARGET and diff < DIFF_LIMIT)]
    return rows


def bench_rtc(bench: Bench) -> list[dict]:
    """RTC's cost: the 10-step chunk guided towards the previous chunk's leftover (`sample_chunk_rtc`)
    against the plain chunk from the same noise, both eager and both after `compile_solve()` (a copy of
    the same weights), interleaved, after the compiled copy has compiled both solves for the batch."""
    import copy

    from fmpolicy.rtc import sample_chunk_rtc

    policy, s = bench.policy, bench.sizes
    compiled = copy.deepcopy(policy).compile_solve()
    rows = []
    for batch in s.batches:
        obs = make_obs(policy, batch, s.prefix_tokens, bench.generator)
        noise = policy.sample_noise(batch, bench.device_generator)
        leftover = policy.predict_action_chunk(obs, noise=noise)[:, RTC_EXECUTED:]  # what is left after 3 steps
        calls = {"plain_eager": lambda: policy.predict_action_chunk(obs, noise=noise),
                 "rtc_eager": lambda: sample_chunk_rtc(policy, obs, leftover, RTC_DELAY, noise=noise),
                 "plain_compiled_solve": lambda: compiled.predict_action_chunk(obs, noise=noise),
                 "rtc_compiled_solve": lambda: sample_chunk_rtc(compiled, obs, leftover, RTC_DELAY, noise=noise)}
        compile_s, out = {}, {}
        for name, call in calls.items():
            start = time.perf_counter()
            out[name] = call()  # the compiled copy compiles here
            synchronize(policy.device)
            compile_s[name] = time.perf_counter() - start
        times = bench.time(calls, batch)
        common = dict(batch=batch, steps=policy.config.sampler.num_steps, p=s.prefix_tokens,
                      inference_delay=RTC_DELAY, leftover=leftover.shape[1])
        ms = {name: median(t) for name, t in times.items()}
        rows += [bench.row("rtc", "plain_eager", times["plain_eager"], **common),
                 bench.row("rtc", "rtc_eager", times["rtc_eager"], **common,
                           vs_plain=ms["rtc_eager"] / ms["plain_eager"]),
                 bench.row("rtc", "plain_compiled_solve", times["plain_compiled_solve"], **common,
                           compile_s=compile_s["plain_compiled_solve"]),
                 bench.row("rtc", "rtc_compiled_solve", times["rtc_compiled_solve"], **common,
                           compile_s=compile_s["rtc_compiled_solve"], speedup=ms["rtc_eager"] / ms["rtc_compiled_solve"],
                           vs_plain=ms["rtc_compiled_solve"] / ms["plain_compiled_solve"],
                           max_abs_diff=float((out["rtc_compiled_solve"] - out["rtc_eager"]).abs().max()))]
    return rows


# pi0's action expert (Gemma 300M: width 1024, 18 layers, 8 heads, MLP 4096), chunk 50, 32-wide padded
# actions, and the prefix of one 224-px view (256 SigLIP tokens) + 48 text tokens at the VLM's width 2048
PI0_EXPERT = dict(width=1024, depth=18, num_heads=8, mlp_ratio=4.0, max_state_dim=32, max_action_dim=32,
                  prefix_dim=2048)
PI0_CHUNK, PI0_PREFIX = 50, 304


@torch.no_grad()
def bench_cuda_graph(bench: Bench) -> list[dict]:
    """Eager sampling against `enable_cuda_graphs()` (and compile + graphs), interleaved, on CUDA."""
    import copy

    if bench.device.type != "cuda":
        print("[cuda_graph] skipped: CUDA graphs need --device cuda", file=sys.stderr)
        return []
    s = bench.sizes
    rows = []
    cases = [("bench", bench.policy, s.batches, s.prefix_tokens)]
    if not bench.args.quick:
        pi0 = make_policy("base", bench.device, bench.args.seed, chunk_size=PI0_CHUNK, **PI0_EXPERT)
        cases.append(("pi0_sized", pi0, (1,), PI0_PREFIX))
    for name, policy, batches, p in cases:
        graphed = copy.deepcopy(policy).enable_cuda_graphs()
        both = copy.deepcopy(policy).compile_velocity().enable_cuda_graphs()
        half = copy.deepcopy(policy).set_compute_dtype(torch.bfloat16).enable_cuda_graphs()
        half_both = copy.deepcopy(policy).set_compute_dtype(torch.bfloat16).compile_velocity().enable_cuda_graphs()
        for batch in batches:
            obs = make_obs(policy, batch, p, bench.generator)
            noise = policy.sample_noise(batch, bench.device_generator)
            chunk = {"eager": lambda: policy.predict_action_chunk(obs, noise=noise),
                     "graphs": lambda: graphed.predict_action_chunk(obs, noise=noise),
                     "compile_graphs": lambda: both.predict_action_chunk(obs, noise=noise),
                     "bf16_graphs": lambda: half.predict_action_chunk(obs, noise=noise),
                     "bf16_compile_graphs": lambda: half_both.predict_action_chunk(obs, noise=noise)}
            first, failed = {}, {}
            for key in list(chunk)[1:]:  # capture (and compile) before timing
                synchronize(bench.device)
                start = time.perf_counter()
                try:
                    chunk[key]()
                except Exception as error:  # noqa: BLE001 - a row that says why, and the other rows still measured
                    failed[key] = f"{type(error).__name__}: {error}"[:300]
                    del chunk[key]
                    continue
                synchronize(bench.device)
                first[key] = time.perf_counter() - start
            eager = chunk["eager"]()
            diffs = {key: float((chunk[key]() - eager).abs().max()) for key in first}
            times = bench.time(chunk, batch)
            common = dict(batch=batch, steps=policy.config.sampler.num_steps, p=p, expert=name,
                          chunk_size=policy.config.chunk_size)
            rows.append(bench.row("cuda_graph", "eager", times["eager"], **common))
            for key in first:
                rows.append(bench.row("cuda_graph", key, times[key], **common, capture_s=first[key],
                                      speedup=median(times["eager"]) / median(times[key]), max_abs_diff=diffs[key]))
            for key, error in failed.items():
                rows.append({"section": "cuda_graph", "name": key, **common, "error": error, "machine": bench.machine})
    return rows


RUNNERS = {"cuda_graph": bench_cuda_graph, "compile": bench_compile, "rtc": bench_rtc, "chunk": bench_chunk, "overhead": bench_overhead, "cache": bench_cache, "train": bench_train,
           "encoder": bench_encoder, "envs": bench_envs, "rl_update": bench_rl_update, "rl_vl": bench_rl_vl}


# ---- output ---------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0.0:
            return "0"
        if abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def print_table(section: str, rows: list[dict]) -> None:
    skip = {"section", "preset", "device", "machine"}
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in skip and k not in columns]
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n[{section}]")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


def parse_sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown or text!r}: expected some of {list(SECTIONS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(EXPERT_PRESETS), default=None,
                        help='expert preset (default "cpu"; "tiny" with --quick)')
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = CUDA when present, else CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: all cores available to this process)")
    parser.add_argument("--only", type=parse_sections, default=list(DEFAULT_SECTIONS),
                        help=f"comma-separated sections to run, from {','.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: tiny sizes, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls at batch 1 (larger batches take a quarter of it, at least 3)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of tables")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    args = parser.parse_args(argv)
    if args.preset is None:
        args.preset = "tiny" if args.quick else "cpu"
    if args.preset == "mlp":
        parser.error('--preset mlp has no prefix input and no encode / step split: use a transformer preset')
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads = {args.threads} is invalid: expected a positive int")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats = {args.repeats} is invalid: expected a positive int")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeats is not None:
        sizes = dataclasses.replace(sizes, repeats=args.repeats, repeats_large=max(3, args.repeats // 4))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    bench = Bench(args, sizes, device, threads)
    if not args.json:
        m = bench.machine
        print(f"fmpolicy bench: preset {args.preset}, device {device}"
              f"{' (' + m['gpu'] + ')' if m['gpu'] else ''}, cpu {m['cpu']}, torch {m['torch']}, "
              f"threads {threads}, load average {m['load_at_start']}{', quick' if args.quick else ''}; "
              f"times in ms per call")
    for section in SECTIONS:
        if section not in args.only:
            continue
        rows = RUNNERS[section](bench)
        if args.json:
            for r in rows:
                print(json.dumps(r), flush=True)
        else:
            print_table(section, rows)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        sys.exit(0)
