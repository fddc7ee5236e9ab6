#!/usr/bin/env python
"""Chunk execution under inference latency: success and action jerk for synchronous execution, naive
async (switch to the new chunk), ACT's temporal ensembling and real-time chunking (RTC).

    python scripts/latency_experiment.py --policy runs/point_obstacle_flow/policy \\
        [--env fmpolicy/PointObstacle-v0] [--delays 1,2,3,4] [--envs 200] [--seed 10000] [--out runs/latency]

Each (mode, delay) plays one episode in each of `--envs` batched environments from the same start
states (seed), with an inference that takes `delay` control steps (fmpolicy/control.py,
`run_with_latency`). Jerk: |a_t - a_{t-1}| (environment units) at the steps where a new chunk takes
over (boundary) and over every step. Also times plain sampling against RTC sampling (same steps,
batch 1 and 64, median of 20 calls, side by side). Prints a table; writes <out>/latency.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fmpolicy import FlowPolicy
from fmpolicy.control import MODES, run_with_latency, summarize
from fmpolicy.errors import FmPolicyError
from fmpolicy.evaluation import observe_env
from fmpolicy.io import atomic_write_json
from fmpolicy.machine import cpu_model


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="a directory written by save_pretrained")
    p.add_argument("--env", default="fmpolicy/PointObstacle-v0")
    p.add_argument("--env-kwargs", default="{}", help="JSON task options")
    p.add_argument("--delays", default="1,2,3,4", help="inference latencies in control steps")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--envs", type=int, default=200, help="episodes (one per batched environment)")
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--out", default="runs/latency")
    p.add_argument("--timing-repeats", type=int, default=20, help="calls per timing of plain vs RTC sampling")
    args = p.parse_args(argv)
    try:
        import gymnasium as gym

        import fmpolicy_envs  # noqa: F401  (registers the fmpolicy/ tasks)

        policy = FlowPolicy.from_pretrained(args.policy, device="cpu").eval()
        envs = gym.make_vec(args.env, num_envs=args.envs, vectorization_mode="vector_entry_point",
                            **json.loads(args.env_kwargs))
        results, rows = [], []
        for mode in args.modes.split(","):
            for delay in ([0] if mode == "sync" else [int(d) for d in args.delays.split(",")]):
                start = time.perf_counter()
                r = run_with_latency(policy, envs, mode, delay, seed=args.seed,
                                     generator=torch.Generator().manual_seed(args.seed))
                results.append(r)
                rows.append({**r.as_dict(), "seconds": time.perf_counter() - start})
                print(summarize([r]).splitlines()[1], flush=True)
    except FmPolicyError as e:
        sys.exit(f"error: {e}")
    print()
    print(summarize(results))
    cost = time_rtc(policy, envs, args.timing_repeats)
    for c in cost:
        print(f"batch {c['batch']}: plain {c['plain_ms']:.1f} ms, RTC {c['rtc_ms']:.1f} ms, {c['ratio']:.2f}x")
    out = Path(args.out)
    atomic_write_json(out / "latency.json", {"policy": args.policy, "env": args.env, "envs": args.envs,
                                             "seed": args.seed, "cpu": cpu_model(), "threads": torch.get_num_threads(),
                                             "rows": rows, "rtc_cost": cost})
    return rows


def time_rtc(policy, envs, repeats: int = 20) -> list[dict]:
    """Median ms of plain and RTC sampling of one chunk, alternated call by call."""
    from fmpolicy.rtc import sample_chunk_rtc

    obs, info = envs.reset(seed=0)
    obs = observe_env(obs, info)
    out = []
    for b in sorted({1, min(64, envs.num_envs)}):
        sub = {k: v[:b] for k, v in obs.items()}
        leftover = policy.predict_action_chunk(sub)[:, policy.config.n_action_steps - 1:]
        plain, rtc = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            policy.predict_action_chunk(sub)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            sample_chunk_rtc(policy, sub, leftover, inference_delay=1)
            rtc.append(time.perf_counter() - start)
        p, r = 1000 * float(np.median(plain)), 1000 * float(np.median(rtc))
        out.append({"batch": b, "plain_ms": p, "rtc_ms": r, "ratio": r / p})
    return out


if __name__ == "__main__":
    main()
