"""Where the time of one chunk goes: torch.profiler over repeated `predict_action_chunk` calls.

Usage:
    python scripts/profile_sampling.py --device cuda --expert pi0_sized      # eager, graphs, compile+graphs
    python scripts/profile_sampling.py --device cpu --expert bench --quick   # tiny run on CPU
    python scripts/profile_sampling.py --device cuda --tf32 --json

For each variant (`eager`; `graphs`: `enable_cuda_graphs()`, CUDA only; `compile_graphs`:
`compile_velocity()` + graphs, CUDA only; `compile`: `compile_velocity()`; `compile_solve`:
`compile_solve()`, the whole solve as one graph; by default eager, graphs and compile_graphs on CUDA,
eager, compile and compile_solve on CPU) it times `--chunks` chunks after warm-up
(wall clock, device synchronised), then profiles the same calls and reports per chunk: `wall_ms`,
`device_ms` (the sum of the GPU kernels' own times: where it is far below `wall_ms`, the GPU waits on
the host, i.e. launches and Python set the latency, not arithmetic), `launches` (kernels per chunk), and
the top operators by device time (CPU time without CUDA). Experts: `bench` (scripts/bench.py's policy,
"cpu" preset, chunk 10, 16 prefix tokens) and `pi0_sized` (bench.py's PI0_EXPERT: width 1024, 18
blocks, chunk 50, 304 prefix tokens of width 2048). `--tf32` allows TF32 tensor cores for float32
matrix products (`torch.set_float32_matmul_precision("high")`; results then differ from fp32 by ~1e-3).
Output: a table per variant, or one JSON object per variant with `--json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fmpolicy.scripting import load_script

bench = load_script("bench", Path(__file__).resolve().parent)


def make_case(expert: str, device: torch.device, batch: int, seed: int):
    """The policy and one observation of the named expert size."""
    if expert == "pi0_sized":
        policy = bench.make_policy("base", device, seed, chunk_size=bench.PI0_CHUNK, **bench.PI0_EXPERT)
        p = bench.PI0_PREFIX
    else:
        policy, p = bench.make_policy("cpu", device, seed), 16
    obs = bench.make_obs(policy, batch, p, torch.Generator().manual_seed(seed))
    return policy, obs


def profile_variant(policy, obs: dict, chunks: int, warmup: int, top: int) -> dict[str, Any]:
    device = policy.device
    noise = policy.sample_noise(obs["observation.state"].shape[0], torch.Generator(device=device).manual_seed(0))

    def call():
        return policy.predict_action_chunk(obs, noise=noise)

    with torch.no_grad():
        start = time.perf_counter()
        call()  # captures / compiles
        bench.synchronize(device)
        first_s = time.perf_counter() - start
        for _ in range(warmup):
            call()
        bench.synchronize(device)
        start = time.perf_counter()
        for _ in range(chunks):
            call()
        bench.synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / chunks
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(chunks):
                call()
            bench.synchronize(device)
    events = prof.key_averages()
    on_device = device.type == "cuda"

    def self_time(e) -> float:  # microseconds
        return float(getattr(e, "self_device_time_total", 0.0) or 0.0) if on_device else float(e.self_cpu_time_total)

    kernels = [e for e in events if on_device and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    device_ms = sum(self_time(e) for e in kernels) / 1e3 / chunks if on_device else None
    launches = sum(e.count for e in kernels) / chunks if on_device else None
    ranked = sorted((e for e in (kernels if on_device else events) if self_time(e) > 0), key=self_time, reverse=True)
    return {"first_call_s": first_s, "wall_ms": wall_ms, "device_ms": device_ms, "launches": launches,
            "top": [{"name": e.key[:90], "ms_per_chunk": self_time(e) / 1e3 / chunks, "calls_per_chunk": e.count / chunks}
                    for e in ranked[:top]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--expert", choices=("bench", "pi0_sized"), default="pi0_sized")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunks", type=int, default=20, help="chunks timed, then profiled")
    parser.add_argument("--variants", default=None,
                        help="comma-separated from eager,graphs,compile_graphs,compile,compile_solve "
                             "(default: see above)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 tensor cores for float32 matmuls")
    parser.add_argument("--top", type=int, default=12, help="operators listed per variant")
    parser.add_argument("--quick", action="store_true", help="3 chunks, 1 warm-up")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    cuda = device.type == "cuda"
    variants = (args.variants.split(",") if args.variants
                else ["eager", "graphs", "compile_graphs"] if cuda else ["eager", "compile", "compile_solve"])
    known = ("eager", "graphs", "compile_graphs", "compile", "compile_solve")
    bad = [v for v in variants if v not in known or (not cuda and v in ("graphs", "compile_graphs"))]
    if bad:
        allowed = known if cuda else [v for v in known if "graphs" not in v]
        parser.error(f"--variants {bad} invalid on {device.type}: expected some of {','.join(allowed)}")
    chunks, warmup = (3, 1) if args.quick else (args.chunks, 3)
    base, obs = make_case(args.expert, device, args.batch, args.seed)
    machine = bench.machine_info(device, torch.get_num_threads())
    for name in variants:
        policy = copy.deepcopy(base)
        if name in ("compile", "compile_graphs"):
            policy.compile_velocity()
        if name == "compile_solve":
            policy.compile_solve()
        if name in ("graphs", "compile_graphs"):
            policy.enable_cuda_graphs()
        result = {"variant": name, "expert": args.expert, "batch": args.batch, "tf32": args.tf32,
                  "chunk_size": policy.config.chunk_size, "steps": policy.config.sampler.num_steps,
                  **profile_variant(policy, obs, chunks, warmup, args.top), "machine": machine}
        if args.json:
            print(json.dumps(result), flush=True)
            continue
        dev = "" if result["device_ms"] is None else (f", device {result['device_ms']:.2f} ms in "
                                                      f"{result['launches']:.0f} kernels")
        print(f"\n[{name}] {args.expert}, batch {args.batch}{', tf32' if args.tf32 else ''}: wall "
              f"{result['wall_ms']:.2f} ms per chunk{dev}; first call {result['first_call_s']:.2f} s")
        for row in result["top"]:
            print(f"  {row['ms_per_chunk']:9.3f} ms  {row['calls_per_chunk']:6.1f}x  {row['name']}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
