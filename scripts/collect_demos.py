#!/usr/bin/env python
"""Collect scripted-expert demonstrations of a fmpolicy_envs task into a dataset (docs/datasets.md).

Runs the task's batched scripted expert in the torch vector env (same-step autoreset), keeps one
episode buffer per environment, and writes every finished episode through `DatasetWriter`
(crash-safe: a killed run leaves the finished episodes readable). Re-running with the same --out
resumes: it appends until --episodes episodes exist, with a different seed for the new episodes.
At the end it computes the statistics (meta/stats.json) and prints a summary. The writer locks the
dataset root for the whole run: a second collection on the same --out exits at once, naming the PID
of the first. Bad options (--image-size, --fps, --device cuda without CUDA) fail before anything is written.

    python scripts/collect_demos.py --env fmpolicy/PointObstacle-v0 --episodes 200 --num-envs 64 \\
        --out data/point_obstacle --seed 0 [--env-kwargs '{"n_goals": 2}'] [--image-size 32]

Episodes are accepted in the order they *start*, not the order they finish: with many environments
the short episodes finish first, and keeping the first N to finish would bias the dataset towards them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fmpolicy.config import resolve_device
from fmpolicy.data import DatasetWriter
from fmpolicy.errors import FmPolicyError

STATE_KEY = "observation.state"
IMAGE_KEY = "observation.images.top"
MAX_IMAGE_SIZE = 1024  # a (3, 1024, 1024) frame is 3 MB raw; beyond that is a typo, not a dataset

# Instruction of single-goal tasks (multi-goal tasks name their goal in info["task"]).
DEFAULT_TASKS = {
    "fmpolicy/PointObstacle-v0": "go to the goal around the obstacle",
    "fmpolicy/ArmReach-v0": "reach the target with the end effector",
    "fmpolicy/Push-v0": "push the disk to the goal",
}
ROBOT_TYPES = {
    "fmpolicy/PointObstacle-v0": "point_mass_2d",
    "fmpolicy/ArmReach-v0": "planar_arm",
    "fmpolicy/Push-v0": "disk_pusher_2d",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="fmpolicy/PointObstacle-v0", help="registered fmpolicy_envs task id")
    p.add_argument("--episodes", type=int, default=200, help="number of episodes the dataset should hold")
    p.add_argument("--num-envs", type=int, default=64, help="environments stepped together")
    p.add_argument("--out", default="data/point_obstacle", help="dataset root (appended to when it exists)")
    p.add_argument("--seed", type=int, default=0, help="seed of the environments and of the expert's modes")
    p.add_argument("--env-kwargs", default="{}", help='JSON task options, e.g. \'{"n_links": 3}\'')
    p.add_argument("--image-size", type=int, default=None, help="also record (3, N, N) images of this side")
    p.add_argument("--only-success", action="store_true", help="discard episodes that end without success")
    p.add_argument("--device", default="cpu", help="torch device of the environments (cpu, cuda, cuda:N, auto)")
    p.add_argument("--fps", type=float, default=None, help="recorded control frequency (default 1 / dt of the task)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.num_envs < 1:
        p.error(f"--num-envs must be >= 1, got {args.num_envs}")
    if args.image_size is not None and not 1 <= args.image_size <= MAX_IMAGE_SIZE:
        p.error(f"--image-size must be in 1..{MAX_IMAGE_SIZE} pixels, got {args.image_size}")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        p.error(f"--fps must be a finite number > 0, got {args.fps}")
    try:
        args.env_kwargs = json.loads(args.env_kwargs)
    except json.JSONDecodeError as e:
        p.error(f"--env-kwargs is not valid JSON: {e}")
    if not isinstance(args.env_kwargs, dict):
        p.error(f"--env-kwargs must be a JSON object, got {args.env_kwargs!r}")
    return args


def run_seed(seed: int, existing: int) -> int:
    """The seed of a run that starts with `existing` episodes on disk: --seed itself for a fresh
    dataset, a different one when resuming (reusing it would record the same episodes again)."""
    if existing == 0:
        return seed
    return int(np.random.SeedSequence([seed, existing]).generate_state(1)[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = str(resolve_device(args.device, field="--device"))  # ConfigError: unknown, or CUDA without CUDA
    import fmpolicy_envs  # noqa: F401  (registers the ids; fmpolicy itself never imports it)

    if args.env not in fmpolicy_envs.TASKS:
        raise SystemExit(f"unknown --env {args.env!r}; expected one of {sorted(fmpolicy_envs.TASKS)}")
    vec_cls = fmpolicy_envs.TASKS[args.env][1]

    # ---- environment, features, writer ----
    env = vec_cls(num_envs=args.num_envs, device=device, seed=args.seed, image_size=args.image_size,
                  **args.env_kwargs)
    s = env.single_observation_space[STATE_KEY].shape[0]
    a = env.single_action_space.shape[0]
    features: dict[str, dict[str, Any]] = {STATE_KEY: {"dtype": "float32", "shape": [s]},
                                           "action": {"dtype": "float32", "shape": [a]}}
    if args.image_size:
        features[IMAGE_KEY] = {"dtype": "uint8", "shape": [3, args.image_size, args.image_size]}
    fps = args.fps or 1.0 / float(args.env_kwargs.get("dt", 0.1))
    env_info = {"id": args.env, "kwargs": args.env_kwargs, "image_size": args.image_size,
                "max_episode_steps": env.max_episode_steps, "expert": fmpolicy_envs.TASKS[args.env][3].__name__}
    # the writer holds the root's lock until the end (or an error): a second collection fails at once
    with DatasetWriter(args.out, fps=fps, features=features, robot_type=ROBOT_TYPES.get(args.env),
                       env_info=env_info) as writer:
        return collect(args, env, writer)


def collect(args: argparse.Namespace, env: Any, writer: DatasetWriter) -> dict[str, Any]:
    """Run the expert in `env` and write accepted episodes until `writer` holds --episodes; finalize."""
    import fmpolicy_envs

    existing = writer.num_episodes
    target = args.episodes
    if existing >= target:
        if int(writer.info.get("stats_episodes", 0)) != existing:
            writer.finalize()
        print(f"{args.out} already holds {existing} episodes (>= {target}): nothing to collect")
        return {"episodes": existing, "new_episodes": 0, "frames": writer.num_frames, "seconds": 0.0}

    seed = run_seed(args.seed, existing)
    expert = fmpolicy_envs.make_expert(args.env, seed=seed + 1)
    default_task = DEFAULT_TASKS.get(args.env, "complete the task")

    # ---- per-environment episode buffers ----
    e = args.num_envs
    buffers: list[dict[str, list]] = [{} for _ in range(e)]
    meta: list[dict[str, Any]] = [{} for _ in range(e)]
    in_flight = 0  # accepted episodes still running
    written = existing
    finished = attempts = successes = new_frames = 0
    max_attempts = 20 * target + e  # only with --only-success can this be reached

    def start_episodes(envs: np.ndarray, tasks: list[str] | None) -> None:
        """Open buffers for the episodes that start in `envs`; accept them while slots remain."""
        nonlocal in_flight
        for i in envs.tolist():
            accepted = written + in_flight < target
            in_flight += accepted
            buffers[i] = {k: [] for k in ("state", "image", "action", "reward", "done", "success")}
            meta[i] = {"accepted": accepted, "task": tasks[i] if tasks else default_task, "mode": None}

    obs, info = env.reset(seed=seed)
    start_episodes(np.arange(e), info.get("task"))
    start_time = time.perf_counter()
    bar = tqdm(total=target, initial=existing, unit="ep", desc="episodes", disable=args.no_progress)
    while written < target:
        # ---- act ----
        action = expert(env.core)  # (e, a)
        mode = expert.mode.cpu().numpy() if getattr(expert, "mode", None) is not None else None
        state_np = obs[STATE_KEY].cpu().numpy()
        image_np = None
        if args.image_size:
            image_np = (obs[IMAGE_KEY].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        obs, reward, terminated, truncated, info = env.step(action)

        # ---- record ----
        action_np = action.cpu().numpy()
        reward_np = reward.cpu().numpy()
        done_np = (terminated | truncated).cpu().numpy()
        success_np = info["final_info"]["is_success"].cpu().numpy()
        for i in range(e):
            b = buffers[i]
            if meta[i]["mode"] is None and mode is not None:
                meta[i]["mode"] = int(mode[i])
            b["state"].append(state_np[i])
            b["action"].append(action_np[i])
            b["reward"].append(reward_np[i])
            b["done"].append(done_np[i])
            b["success"].append(success_np[i])
            if image_np is not None:
                b["image"].append(image_np[i])

        # ---- write the accepted episodes that ended ----
        ended = np.flatnonzero(done_np)
        for i in ended.tolist():
            finished += 1
            if not meta[i]["accepted"]:
                continue
            in_flight -= 1
            attempts += 1
            b = buffers[i]
            success = bool(b["success"][-1])
            successes += success
            if args.only_success and not success:
                continue
            frames = {STATE_KEY: np.stack(b["state"]), "action": np.stack(b["action"]),
                      "next.reward": np.asarray(b["reward"]), "next.done": np.asarray(b["done"]),
                      "next.success": np.asarray(b["success"])}
            if image_np is not None:
                frames[IMAGE_KEY] = np.stack(b["image"])
            extra = {"success": success, "return": float(np.sum(b["reward"])), "seed": seed}
            if meta[i]["mode"] is not None:
                extra["mode"] = meta[i]["mode"]
            writer.add_episode(frames, task=meta[i]["task"], extra=extra)
            written += 1
            new_frames += len(b["action"])
            bar.update(1)
        if args.only_success and attempts > max_attempts:
            bar.close()
            raise SystemExit(f"only {written - existing} successful episodes in {attempts} attempts: "
                             f"the expert rarely succeeds on {args.env} {args.env_kwargs}")
        start_episodes(ended, info.get("task"))
    bar.close()
    seconds = time.perf_counter() - start_time

    # ---- statistics and summary ----
    writer.finalize()
    summary = {
        "episodes": writer.num_episodes, "new_episodes": written - existing, "frames": writer.num_frames,
        "new_frames": new_frames, "success_rate": successes / max(attempts, 1), "seconds": seconds,
        "episodes_per_s": (written - existing) / seconds, "frames_per_s": new_frames / seconds,
    }
    print(f"{args.out}: {summary['episodes']} episodes, {summary['frames']} frames "
          f"(+{summary['new_episodes']} episodes, +{new_frames} frames this run); "
          f"expert success {100 * summary['success_rate']:.1f}% of {attempts}; {seconds:.2f} s "
          f"({summary['episodes_per_s']:.1f} episodes/s, {summary['frames_per_s']:.0f} frames/s)")
    return summary


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except FmPolicyError as e:  # LockError, ConfigError, DatasetError: the message, not a traceback
        raise SystemExit(f"collect_demos.py: error: {e}") from None
