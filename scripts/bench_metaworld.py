#!/usr/bin/env python
"""Cheap Meta-World figures for docs/benchmarks/metaworld.md: env steps/s without rendering, render
ms/frame at 64x64 per camera, and the scripted expert's success per task (MT10 by default) over
--episodes goal variations each, starting at --seed (10000: the held-out range). Prints a markdown
table with the machine and its load; --json writes the numbers.

    python scripts/bench_metaworld.py [--tasks mt10] [--episodes 10] [--seed 10000] [--json out.json]
        [--evaluate-starts NUM_ENVS] [--expert-only]

With --evaluate-starts N the expert plays exactly the episodes `evaluate.py --env fmpolicy/MetaWorld-v0
--env-kwargs '{"tasks": <tasks>}' --num-envs N --episodes <episodes x tasks> --seed <seed>` plays (round r
resets env i with variation seed + 1000 r + i, whose task is variation % number of tasks), so a policy's
success and the expert's come from the same starts. --expert-only skips the speed figures.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import torch  # noqa: E402

from fmpolicy.evaluation import round_seed  # noqa: E402
from fmpolicy_envs.metaworld_env import MetaWorldEnv, MetaWorldExpert, MetaWorldVectorEnv, task_names  # noqa: E402


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min), torch threads "
            f"{os.environ.get('OMP_NUM_THREADS', 'default')}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="mt10")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--json")
    p.add_argument("--evaluate-starts", type=int, default=0, metavar="NUM_ENVS",
                   help="the starts of evaluate.py with --num-envs NUM_ENVS on the multi-task env (0: variations "
                        "seed .. seed + episodes - 1 of each task)")
    p.add_argument("--expert-only", action="store_true", help="only the expert's success per task")
    args = p.parse_args(argv)
    out: dict = {"machine": machine(), "before": os.getloadavg()}
    if not args.expert_only:
        speed_figures(out)
    names = task_names(tasks=args.tasks)
    variations = ({name: range(args.seed, args.seed + args.episodes) for name in names} if not args.evaluate_starts
                  else evaluate_starts(names, args.episodes * len(names), args.evaluate_starts, args.seed))
    expert_figures(out, variations)
    out["after"] = os.getloadavg()

    print(f"\nmachine: {out['machine']}")
    if not args.expert_only:
        print(f"make an env: {out['make_s']:.2f} s; steps/s without rendering: {out['steps_per_s']:.0f} (zero actions), "
              f"{out['steps_per_s_with_expert']:.0f} (with the scripted expert)")
        print("vector env steps/s: " + ", ".join(f"{k} {v:.0f}" for k, v in out["vector_steps_per_s"].items()))
        print("render ms/frame at 64x64: " + ", ".join(f"{k} {v:.1f}" for k, v in out["render_ms"].items()))
    rates = [r["success"] for r in out["expert"].values()]
    total = sum(r["successes"] for r in out["expert"].values()) / sum(r["episodes"] for r in out["expert"].values())
    print(f"expert: mean {100 * np.mean(rates):.1f}% over {len(rates)} tasks ({100 * total:.1f}% of all episodes), "
          f"{out['expert_seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def evaluate_starts(names: list[str], episodes: int, num_envs: int, seed: int) -> dict[str, list[int]]:
    """The variations `evaluate_policy` plays on the multi-task env, per task (see the module docstring)."""
    out: dict[str, list[int]] = {name: [] for name in names}
    for k in range(episodes):  # the k-th counted episode: env k % num_envs of round k // num_envs
        v = round_seed(seed, k // num_envs) + k % num_envs
        out[names[v % len(names)]].append(v)
    return out


def speed_figures(out: dict) -> None:
    """Env steps/s (one env, vector envs) and render ms/frame, into `out`."""
    # ---- steps/s without rendering (zero actions: the simulator, not the expert) ----
    start = time.perf_counter()
    env = MetaWorldEnv(task="pick-place")
    out["make_s"] = time.perf_counter() - start
    env.reset(seed=0)
    n, start = 0, time.perf_counter()
    while n < 2000:
        _, _, term, trunc, _ = env.step(np.zeros(4, np.float32))
        n += 1
        if term or trunc:
            env.reset()
    out["steps_per_s"] = n / (time.perf_counter() - start)
    expert = MetaWorldExpert()
    env.reset(seed=0)
    n, start = 0, time.perf_counter()
    while n < 2000:
        _, _, term, trunc, _ = env.step(expert(env))
        n += 1
        if term or trunc:
            env.reset()
    out["steps_per_s_with_expert"] = n / (time.perf_counter() - start)
    env.close()

    # ---- vector env steps/s (zero actions): in this process, one process per env, and 4 or 8 envs on 2 workers ----
    out["vector_steps_per_s"] = {}
    for processes, n_envs in ((False, 4), (True, 1), (True, 2), (True, 4), (2, 4), (2, 8)):
        envs = MetaWorldVectorEnv(num_envs=n_envs, task="pick-place", processes=processes)
        envs.reset(seed=0)
        zeros = torch.zeros(n_envs, 4)
        for _ in range(20):
            envs.step(zeros)
        start = time.perf_counter()
        for _ in range(300):
            envs.step(zeros)
        key = ("in-process" if processes is False else "processes" if processes is True
               else f"{processes} workers") + f" x{n_envs}"
        out["vector_steps_per_s"][key] = 300 * n_envs / (time.perf_counter() - start)
        envs.close()

    # ---- render ms/frame at 64x64 ----
    out["render_ms"] = {}
    for cam in ("corner", "corner2", "topview", "gripperPOV"):
        env = MetaWorldEnv(task="pick-place", cameras=(cam,), image_size=64)
        env.reset(seed=0)
        env._render(cam, 64)  # the GL context and scene are made on the first frame
        start = time.perf_counter()
        for _ in range(100):
            env._render(cam, 64)
        out["render_ms"][cam] = 1000 * (time.perf_counter() - start) / 100
        env.close()



def expert_figures(out: dict, variations: dict[str, list[int] | range]) -> None:
    """The scripted expert's success per task over the given goal variations."""
    out["expert"] = {}
    start_all = time.perf_counter()
    for name, vs in variations.items():
        if not vs:
            continue
        env = MetaWorldEnv(task=name)
        expert = MetaWorldExpert()
        ok, lengths, start = 0, [], time.perf_counter()
        for v in vs:
            env.reset(seed=v)
            for t in range(env.max_episode_steps):
                _, _, term, trunc, info = env.step(expert(env))
                if term or trunc:
                    break
            ok += info["is_success"]
            lengths.append(t + 1)
        n = len(vs)
        out["expert"][name] = {"success": ok / n, "successes": int(ok), "episodes": n,
                               "mean_length": float(np.mean(lengths)), "seconds": time.perf_counter() - start}
        env.close()
        print(f"{name:<26} {100 * ok / n:5.1f}% of {n:4d}  mean length {np.mean(lengths):5.0f}", flush=True)
    out["expert_seconds"] = time.perf_counter() - start_all


if __name__ == "__main__":
    main()
