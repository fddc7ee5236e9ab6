#!/usr/bin/env python
"""Collect scripted-expert demonstrations of a fmpolicy_envs task into a LeRobot v3.0 dataset
(docs/datasets.md): a thin wrapper that builds the task's vector env and expert and calls
`fmpolicy.data.collect`.

The writer is crash-safe (a killed run leaves the finished episodes readable) and locks the dataset
root for the whole run: a second collection on the same --out exits at once, naming the PID of the
first. Re-running with the same --out resumes: it appends until --episodes episodes exist, with a
different seed for the new episodes. At the end it computes the statistics (meta/stats.json) and
prints a summary. Bad options (--image-size, --fps, --device cuda without CUDA) fail before anything
is written.

    python scripts/collect_demos.py --env fmpolicy/PointObstacle-v0 --episodes 200 --num-envs 64 \\
        --out data/point_obstacle --seed 0 [--env-kwargs '{"n_goals": 2}'] [--image-size 32 [--video]]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from fmpolicy.config import resolve_device
from fmpolicy.data import DatasetWriter, collect, run_seed
from fmpolicy.data.collection import ExpertFailing
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
    p.add_argument("--video", action="store_true", help="store the camera as mp4 video (H.264), not PNG")
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
                       env_info=env_info, video=args.video) as writer:
        existing = writer.num_episodes
        seed = run_seed(args.seed, existing)
        expert = fmpolicy_envs.make_expert(args.env, seed=seed + 1)
        try:
            summary = collect(env, expert, writer, args.episodes, seed=seed,
                              task=DEFAULT_TASKS.get(args.env, "complete the task"),
                              image_key=IMAGE_KEY if args.image_size else None, only_success=args.only_success,
                              progress=not args.no_progress)
        except ExpertFailing as e:  # --only-success and an expert that rarely succeeds
            raise SystemExit(f"{e} on {args.env} {args.env_kwargs}") from None
    if summary["new_episodes"] == 0:
        print(f"{args.out} already holds {existing} episodes (>= {args.episodes}): nothing to collect")
        return summary
    print(f"{args.out}: {summary['episodes']} episodes, {summary['frames']} frames "
          f"(+{summary['new_episodes']} episodes, +{summary['new_frames']} frames this run); "
          f"expert success {100 * summary['success_rate']:.1f}% of {summary['attempts']}; {summary['seconds']:.2f} s "
          f"({summary['episodes_per_s']:.1f} episodes/s, {summary['frames_per_s']:.0f} frames/s)")
    return summary




if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except FmPolicyError as e:  # LockError, ConfigError, DatasetError: the message, not a traceback
        raise SystemExit(f"collect_demos.py: error: {e}") from None
