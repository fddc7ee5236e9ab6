#!/usr/bin/env python
"""Collect expert demonstrations into a LeRobot v3.0 dataset (docs/datasets.md): a thin wrapper that
builds the vector env and the expert and calls `fmpolicy.data.collect`.

--env: a fmpolicy_envs task (its batched scripted expert), `fmpolicy/MetaWorld-v0` (Meta-World's
scripted experts; --tasks mt10 collects --episodes per task, one task after the
other, into one dataset with each episode's instruction, and prints the expert's success per task;
docs/benchmarks/metaworld.md), or any other registered gymnasium id with --expert module:callable
(observation dict -> actions (e, a); a flat observation is `observation.state`, float32) and success
read from info[--success-key]. The frame rate is --fps, else the env's metadata["render_fps"]; an env
without one is an error naming --fps. --noise-std S adds Gaussian noise to any expert's actions (clipped to
the action space); --noise-record clean records the expert's own actions instead of the executed ones (DART).

The writer is crash-safe (a killed run leaves the finished episodes readable) and locks the dataset
root for the whole run: a second collection on the same --out exits at once, naming the PID of the
first. Re-running with the same --out resumes: it appends until --episodes episodes exist (a dataset
that already holds more is an error: a run would otherwise train on more than it says), with a
different seed for the new episodes (Meta-World: the goal variations go on after the largest of the task's
episodes on disk, so a resumed run stays inside the demonstration variations). At the end it computes the
statistics (meta/stats.json) and prints a summary.

Meta-World only: --task-episodes '{"reach": 1000}' sets the episodes of some tasks (the others take
--episodes); --clip-frames W records of each demonstration a random window of at most W consecutive
frames (every step equally likely to be in it), rendering the cameras only there: the expert plays the
episode blind, then it is replayed and rendered inside the window (fmpolicy_envs.metaworld_clips). Many
goal variations for few rendered frames: what a camera policy needs to learn where a goal marker is
(docs/benchmarks/metaworld.md, Prove-it 2). --num-envs is then the number of worker processes.
--spread POOL puts each task's demonstrations at the goal variations among POOL from --seed on that cover
its starts (the k-medoids of object and goal positions); with --only-success a demonstration that fails is
replaced by the next variation of its medoid's cluster, nearest first, so the demonstrations stay spread:
with a step limit (--env-kwargs '{"max_episode_steps": 120}') this keeps only demonstrations that succeed
within it (Prove-it 1: peg-insert-side's scripted expert sometimes puts the peg down and re-grasps it).

--replay SRC records the episodes of the dataset SRC again by replaying their actions from their starts
(`fmpolicy.data.replay`): the same demonstrations with other observations (cameras, another image size,
another state mode, the simulator's state). The env id and options are SRC's (info.json `env`), updated by
--env-kwargs / --cameras / --image-size; each episode's start is its reset seed in SRC's episodes table
(--replay-start-key, Meta-World's `variation`); the replayed state must equal the recorded one (within
--replay-atol, on the entries both have) and each episode must end where SRC's ended with the same success,
else the run stops naming the episode and the step. --episodes: the first N of SRC (default all);
--num-envs: worker processes (rendering is the cost), the dataset the same for any number.

Bad options (--image-size, --fps, --device cuda without CUDA) fail before anything
is written.

    python scripts/collect_demos.py --env fmpolicy/PointObstacle-v0 --episodes 200 --num-envs 64 \\
        --out data/point_obstacle --seed 0 [--env-kwargs '{"n_goals": 2}'] [--image-size 32 [--video]]
    python scripts/collect_demos.py --env fmpolicy/MetaWorld-v0 --tasks mt10 --episodes 10 --num-envs 4 \
        --out data/mw_mt10 --seed 0 [--cameras corner2 --image-size 64] [--noise-std 0.1] [--env-kwargs '{"state": "full"}']
    python scripts/collect_demos.py --env fmpolicy/MetaWorld-v0 --tasks mt10 --episodes 200 --task-episodes \
        '{"reach": 1000, "push": 1000}' --clip-frames 8 --num-envs 2 --out data/mt10_clips --cameras corner,topview
    python scripts/collect_demos.py --replay data/mt10_d10_spread120 --out data/mt10_d10_cameras \
        --cameras corner,topview --image-size 64 --env-kwargs '{"state": "proprio", "environment_state": true}'
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import sys
from typing import Any, Callable

from fmpolicy.config import resolve_device
from fmpolicy.data import DatasetWriter, collect, run_seed
from fmpolicy.data.collection import ExpertFailing
from fmpolicy.data.noisy import NoisyExpert
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
    "fmpolicy/MetaWorld-v0": "sawyer",
}
METAWORLD = "fmpolicy/MetaWorld-v0"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default=None,
                   help="registered gymnasium id (ours or any other; default fmpolicy/PointObstacle-v0, with --replay "
                        "the source's)")
    p.add_argument("--tasks", help="Meta-World: 'mt10' or comma-separated tasks; --episodes per task, one dataset")
    p.add_argument("--cameras", help="Meta-World: comma-separated cameras (e.g. corner2) recorded at --image-size")
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="Gaussian noise on the expert's actions (clipped to the action space)")
    p.add_argument("--noise-record", choices=("executed", "clean"), default="executed",
                   help="with --noise-std: record the noisy executed actions (a weaker expert) or the "
                        "expert's clean ones (DART: noisy states, corrective labels)")
    p.add_argument("--expert", help="module:callable, observation dict -> actions (e, a), for ids without our expert")
    p.add_argument("--success-key", default="is_success", help="ids without our vector env: info entry of success")
    p.add_argument("--obs-map", default="{}", help='JSON {env key: our key} for dict observations, e.g. '
                                                   '\'{"agent_pos": "observation.state"}\'')
    p.add_argument("--episodes", type=int, default=None,
                   help="number of episodes the dataset should hold (default 200; with --replay all of the source's)")
    p.add_argument("--task-episodes", default="{}",
                   help='Meta-World: JSON {task: episodes} overriding --episodes for those tasks, e.g. \'{"reach": 1000}\'')
    p.add_argument("--clip-frames", type=int, default=None,
                   help="Meta-World: record a clip of at most this many consecutive frames of each demonstration "
                        "(a random window; the cameras are rendered only there): many goals for few rendered frames")
    p.add_argument("--spread", type=int, default=None, metavar="POOL",
                   help="Meta-World: each task's demonstrations at the goal variations among the POOL ones from "
                        "--seed on that cover its starts (k-medoids of object and goal positions), not the next "
                        "--episodes ones; with --only-success a failed one is replaced by the nearest variation of "
                        "its cluster")
    p.add_argument("--num-envs", type=int, default=None,
                   help="environments stepped together (default 64); with --clip-frames / --replay: worker "
                        "processes (default 2 / 1)")
    p.add_argument("--out", default="data/point_obstacle", help="dataset root (appended to when it exists)")
    p.add_argument("--seed", type=int, default=0, help="seed of the environments and of the expert's modes")
    p.add_argument("--env-kwargs", default="{}", help='JSON task options, e.g. \'{"n_links": 3}\'')
    p.add_argument("--image-size", type=int, default=None, help="also record (3, N, N) images of this side")
    p.add_argument("--video", action="store_true", help="store the camera as mp4 video (H.264), not PNG")
    p.add_argument("--only-success", action="store_true", help="discard episodes that end without success")
    p.add_argument("--device", default="cpu", help="torch device of the environments (cpu, cuda, cuda:N, auto)")
    p.add_argument("--fps", type=float, default=None, help="recorded control frequency (default 1 / dt of the task)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--replay", metavar="SRC", help="record the episodes of the dataset SRC again by replaying their "
                                                   "actions (other cameras, state, image size; no expert)")
    p.add_argument("--replay-start-key", default="variation",
                   help="--replay: the episodes-table column holding each episode's reset seed")
    p.add_argument("--replay-atol", type=float, default=1e-3,
                   help="--replay: the largest |replayed - recorded| state entry allowed")
    args = p.parse_args(argv)
    if args.episodes is not None and args.episodes < 1:
        p.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.num_envs is not None and args.num_envs < 1:
        p.error(f"--num-envs must be >= 1, got {args.num_envs}")
    if args.image_size is not None and not 1 <= args.image_size <= MAX_IMAGE_SIZE:
        p.error(f"--image-size must be in 1..{MAX_IMAGE_SIZE} pixels, got {args.image_size}")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        p.error(f"--fps must be a finite number > 0, got {args.fps}")
    if args.spread is not None and args.spread < 1:
        p.error(f"--spread must be >= 1 (a pool of goal variations), got {args.spread}")
    if args.spread is not None and args.only_success and args.clip_frames:
        p.error("--spread, --only-success and --clip-frames do not go together: a failed clip's goal would be "
                "replaced by one outside the spread")
    if args.clip_frames is not None and args.clip_frames < 1:
        p.error(f"--clip-frames must be >= 1, got {args.clip_frames}")
    for flag in ("env_kwargs", "obs_map", "task_episodes"):  # JSON objects given on the command line
        name = "--" + flag.replace("_", "-")
        try:
            value = json.loads(getattr(args, flag))
        except json.JSONDecodeError as e:
            p.error(f"{name} is not valid JSON: {e}")
        if not isinstance(value, dict):
            p.error(f"{name} must be a JSON object, got {value!r}")
        setattr(args, flag, value)
    if args.replay:
        given = [f for f, v in (("--tasks", args.tasks), ("--expert", args.expert), ("--spread", args.spread),
                                ("--clip-frames", args.clip_frames), ("--only-success", args.only_success),
                                ("--noise-std", args.noise_std), ("--task-episodes", args.task_episodes))
                 if v]
        if given:
            p.error(f"--replay plays the source's recorded actions: {', '.join(given)} cannot be used with it")
        if not (math.isfinite(args.replay_atol) and args.replay_atol >= 0):
            p.error(f"--replay-atol must be a finite number >= 0, got {args.replay_atol}")
    else:
        args.env = args.env or "fmpolicy/PointObstacle-v0"
        args.episodes = 200 if args.episodes is None else args.episodes
    if args.num_envs is None:
        args.num_envs = 1 if args.replay else 2 if args.clip_frames else 64
    bad = {k: v for k, v in args.task_episodes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        p.error(f"--task-episodes must map tasks to ints >= 1, got {bad}")
    if not (math.isfinite(args.noise_std) and args.noise_std >= 0):
        p.error(f"--noise-std must be a finite number >= 0, got {args.noise_std}")
    if args.expert is not None and ":" not in args.expert:
        p.error(f"--expert must be module:callable, got {args.expert!r}")
    return args


def load_callable(spec: str) -> Callable:
    """`module:attr` -> the object (e.g. an expert function); a clear error when it is not there."""
    module, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--expert {spec!r} cannot be loaded: {e}") from None
    if not callable(obj):
        raise SystemExit(f"--expert {spec!r} is not callable")
    return obj


def with_noise(args: argparse.Namespace, expert: Any, env: Any, seed: int) -> Any:
    """`expert` with --noise-std / --noise-record (`NoisyExpert`, clipped to the env's action space), or as it is."""
    if not args.noise_std and args.noise_record == "executed":
        return expert
    space = env.single_action_space
    return NoisyExpert(expert, args.noise_std, seed=seed, record=args.noise_record, low=space.low, high=space.high)


def features_of(space: Any) -> dict[str, dict[str, Any]]:
    """Dataset features from a vector env's single observation and action spaces: the state and
    action as float32, cameras (3, H, W) as uint8."""
    obs_space, action_space = space
    if hasattr(obs_space, "spaces"):
        keys = obs_space.spaces
        if STATE_KEY not in keys:
            raise SystemExit(f"the observation has no {STATE_KEY!r} (it has {sorted(keys)})")
        features = {STATE_KEY: {"dtype": "float32", "shape": [int(math.prod(keys[STATE_KEY].shape))]}}
        for k, sp in keys.items():
            if k.startswith("observation.images."):
                shape = list(sp.shape) if sp.shape[0] == 3 else [3, *sp.shape[:2]]
                features[k] = {"dtype": "uint8", "shape": shape}
            elif k.startswith("observation.") and k != STATE_KEY:  # e.g. observation.environment_state
                features[k] = {"dtype": "float32", "shape": [int(math.prod(sp.shape))]}
    else:  # a flat Box observation is the state
        features = {STATE_KEY: {"dtype": "float32", "shape": [int(math.prod(obs_space.shape))]}}
    features["action"] = {"dtype": "float32", "shape": [int(math.prod(action_space.shape))]}
    return features


def collect_generic(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Meta-World and any other gymnasium id: one vector env per task, one dataset for all of them."""
    import fmpolicy_envs

    from fmpolicy.gym_adapter import env_fps, make_vector_env

    kwargs = dict(args.env_kwargs)
    is_mw = args.env == METAWORLD
    if is_mw:
        from fmpolicy_envs.metaworld_env import EVAL_VARIATION_START, task_names

        if args.spread and args.seed + args.spread > EVAL_VARIATION_START:
            raise SystemExit(f"--spread {args.spread} from --seed {args.seed} reaches goal variation "
                             f"{args.seed + args.spread - 1}: the held-out ones start at {EVAL_VARIATION_START}; "
                             "expected --seed + --spread <= that")
        if args.cameras:
            kwargs["cameras"] = [c for c in args.cameras.split(",") if c]
        if kwargs.get("cameras"):  # --env-kwargs '{"cameras": [...]}' (scripts/pipeline.py) works too
            kwargs["image_size"] = args.image_size or kwargs.get("image_size", 64)
        task_set = args.tasks or kwargs.pop("tasks", None)
        try:  # one task after the other, each into the same dataset
            tasks: list[Any] = list(task_names(tasks=task_set) if task_set else
                                    task_names(task=kwargs.get("task", "reach-v3")))
        except ValueError as e:
            raise SystemExit(f"--tasks: {e}") from None
        kwargs.pop("task", None)
        kwargs.pop("tasks", None)
        try:
            task_counts = {task_names(task=k)[0]: v for k, v in args.task_episodes.items()}
        except ValueError as e:
            raise SystemExit(f"--task-episodes: {e}") from None
        unknown = sorted(set(task_counts) - set(tasks))
        if unknown:
            raise SystemExit(f"--task-episodes names {unknown}, which --tasks does not collect ({tasks})")
    else:
        if args.tasks or args.cameras or args.clip_frames or args.task_episodes or args.spread:
            raise SystemExit("--tasks, --cameras, --clip-frames, --task-episodes and --spread are Meta-World options "
                             "(--env fmpolicy/MetaWorld-v0)")
        if not args.expert:
            raise SystemExit(f"--env {args.env!r} has no scripted expert of ours: pass --expert module:callable")
        tasks, task_counts = [None], {}
    counts = [task_counts.get(t, args.episodes) for t in tasks]  # episodes of each task, in order
    firsts = [sum(counts[:k]) for k in range(len(tasks))]  # tasks fill the dataset one after the other

    def make(task: Any):
        return make_vector_env(args.env, args.num_envs, seed=args.seed, device=device,
                               kwargs={**kwargs, **({"task": task} if task else {})}, success_key=args.success_key,
                               obs_map=args.obs_map)

    env = make(tasks[0])
    try:
        fps = env_fps(env, args.fps, flag="--fps")
    except ValueError as e:
        env.close()
        raise SystemExit(f"collect_demos.py: error: {e}") from None
    features = features_of((env.single_observation_space, env.single_action_space))
    image_keys = [k for k in features if k.startswith("observation.images.")]
    env_info = {"id": args.env, "kwargs": kwargs, "tasks": [t for t in tasks if t], "image_size": args.image_size,
                "max_episode_steps": getattr(env, "max_episode_steps", None),
                "expert": "MetaWorldExpert" if is_mw else args.expert, "noise_std": args.noise_std,
                "noise_record": args.noise_record}
    if task_counts:  # only when used: datasets made before these options stay appendable
        env_info["task_episodes"] = task_counts
    if args.spread:
        env_info["spread_pool"] = args.spread
    if args.clip_frames:
        env_info["clip_frames"] = args.clip_frames
        env.close()  # clips are played by their own workers (fmpolicy_envs.metaworld_clips)
    per_task: dict[str, float] = {}
    totals = {"new_episodes": 0, "new_frames": 0, "attempts": 0, "seconds": 0.0, "successes": 0.0}
    with DatasetWriter(args.out, fps=fps, features=features, robot_type=ROBOT_TYPES.get(args.env),
                       env_info=env_info, video=args.video) as writer:
        how = (f"{args.episodes} per task x {len(tasks)} tasks" if len(tasks) > 1 else None) if not task_counts else \
            f"{dict(zip(tasks, counts))}"
        _refuse_more_than_asked(args.out, writer.num_episodes, sum(counts), how)
        for k, task in enumerate(tasks):
            target = firsts[k] + counts[k]  # tasks fill the dataset one after the other: resumable
            try:
                if args.clip_frames:
                    summary = collect_clips(args, writer, task, target, firsts[k], kwargs, image_keys,
                                            finalize=k == len(tasks) - 1)
                elif args.spread:
                    summary = collect_spread(args, writer, task, target, firsts[k], image_keys, device, kwargs,
                                             finalize=k == len(tasks) - 1)
                else:
                    if k:
                        env.close()
                        env = make(task)
                    if is_mw:  # goal variations go on after the task's on disk: the split holds on a resume
                        seed = next_variation(writer, firsts[k], target, args.seed)
                        expert = fmpolicy_envs.make_expert(args.env, seed=seed + 1, noise_std=args.noise_std,
                                                           record=args.noise_record)
                        expert_input = "core"
                    else:
                        seed = run_seed(args.seed, max(0, min(writer.num_episodes - firsts[k], counts[k])))
                        expert, expert_input = with_noise(args, load_callable(args.expert), env, seed + 1), "obs"
                    summary = collect(env, expert, writer, target, seed=seed,
                                      task=DEFAULT_TASKS.get(args.env, "complete the task"), image_key=image_keys,
                                      only_success=args.only_success, progress=not args.no_progress,
                                      expert_input=expert_input, success_key=args.success_key,
                                      finalize=k == len(tasks) - 1, desc=task or "episodes")
            except ExpertFailing as e:
                raise SystemExit(f"{e} on {args.env} {task or ''}") from None
            for name in ("new_episodes", "new_frames", "attempts", "seconds"):
                totals[name] += summary[name]
            totals["successes"] += summary["success_rate"] * summary["attempts"] if summary["attempts"] else 0
            per_task.update(summary["success_by_task"])
            if summary["attempts"]:
                print(f"  {task or args.env}: expert success {100 * summary['success_rate']:.1f}% of "
                      f"{summary['attempts']} episodes, {summary['seconds']:.1f} s")
        episodes, frames = writer.num_episodes, writer.num_frames
    env.close()
    rate = totals["successes"] / max(totals["attempts"], 1)
    print(f"{args.out}: {episodes} episodes, {frames} frames (+{totals['new_episodes']} episodes, "
          f"+{totals['new_frames']} frames this run); expert success {100 * rate:.1f}% of {totals['attempts']}; "
          f"{totals['seconds']:.1f} s")
    return {"episodes": episodes, "frames": frames, "success_rate": rate, "success_by_task": per_task, **totals}


def next_variation(writer: Any, first: int, end: int, seed: int) -> int:
    """Meta-World: the first goal variation of a run that adds to the episodes [first, end) of one task:
    `seed` when it has none on disk, else one past the largest variation among them (a resumed run then
    plays new goals and stays below the held-out variations, where a re-drawn seed would land anywhere)."""
    done = [int(e["variation"]) for e in writer.episodes[first:end] if e.get("variation") is not None]
    return max(done) + 1 if done else seed


def spread_list(args: argparse.Namespace, writer: Any, task: str, target: int, first: int) -> list[list[int]]:
    """Meta-World --spread: for each demonstration of `task` still to collect (those after the ones on disk),
    the goal variations to try in turn: its cluster (the medoid first, then the others nearest first) with
    --only-success, else the medoid alone. The episodes on disk must be of the same choice."""
    from fmpolicy_envs.metaworld_env import spread_clusters

    clusters = spread_clusters(task, target - first, start=args.seed, pool=args.spread)
    done = [int(e["variation"]) for e in writer.episodes[first:target] if e.get("variation") is not None]
    if len(done) > len(clusters) or any(v not in cluster for v, cluster in zip(done, clusters)):
        raise SystemExit(f"{args.out}: the {task} episodes on disk played goal variations {done}, not the first of "
                         f"--spread {args.spread}'s {[c[0] for c in clusters]} (or, with --only-success, of their "
                         "clusters): resume with the options that wrote them")
    return [c if args.only_success else c[:1] for c in clusters[len(done):]]


def collect_spread(args: argparse.Namespace, writer: Any, task: str, target: int, first: int, image_keys: list[str],
                   device: str, kwargs: dict[str, Any], finalize: bool) -> dict[str, Any]:
    """Meta-World --spread: `task`'s demonstrations at its covering goal variations (`spread_list`), one
    episode at a time on one env, until `writer` holds `target` episodes. With --only-success a failed
    demonstration is not written and the next variation of its cluster is played instead."""
    import time

    from tqdm import tqdm

    import fmpolicy_envs
    from fmpolicy.data.collection import ExpertFailing
    from fmpolicy.gym_adapter import make_vector_env
    from fmpolicy_envs.metaworld_env import instruction

    todo = spread_list(args, writer, task, target, first)
    summary: dict[str, Any] = {"new_episodes": 0, "new_frames": 0, "attempts": 0, "seconds": 0.0,
                               "success_rate": float("nan"), "success_by_task": {}, "replaced": []}
    if todo:
        t0, successes = time.perf_counter(), 0.0
        env = make_vector_env(args.env, 1, seed=todo[0][0], device=device, kwargs={**kwargs, "task": task})
        try:
            for candidates in tqdm(todo, unit="ep", desc=task, disable=args.no_progress):
                for v in candidates:
                    expert = fmpolicy_envs.make_expert(args.env, seed=v + 1, noise_std=args.noise_std,
                                                       record=args.noise_record)
                    try:  # with --only-success one attempt: a failure raises, and the next candidate plays
                        one = collect(env, expert, writer, writer.num_episodes + 1, seed=v, image_key=image_keys,
                                      expert_input="core", finalize=False, only_success=args.only_success,
                                      max_attempts=0)
                    except ExpertFailing:
                        summary["attempts"] += 1
                        continue
                    for name in ("new_episodes", "new_frames", "attempts"):
                        summary[name] += one[name]
                    successes += one["success_rate"] * one["attempts"]
                    if v != candidates[0]:
                        summary["replaced"].append((candidates[0], v))
                    break
                else:
                    raise ExpertFailing(f"--spread --only-success: no demonstration of {task} succeeded at any of the "
                                        f"{len(candidates)} goal variations of the cluster of {candidates[0]}")
        finally:
            env.close()
        summary["seconds"] = time.perf_counter() - t0
        summary["success_rate"] = successes / max(summary["attempts"], 1)
        summary["success_by_task"] = {instruction(task): summary["success_rate"]}
        if summary["replaced"]:
            print(f"  {task}: failed demonstrations replaced (medoid -> played): "
                  + ", ".join(f"{a} -> {b}" for a, b in summary["replaced"]))
    if finalize and not writer.stats_are_current:
        writer.finalize()
    return summary


def collect_clips(args: argparse.Namespace, writer: Any, task: str, target: int, first: int, kwargs: dict[str, Any],
                  image_keys: list[str], finalize: bool) -> dict[str, Any]:
    """Meta-World --clip-frames: clips of `task`'s demonstrations (fmpolicy_envs.metaworld_clips) until
    `writer` holds `target` episodes. Goal variations go on from args.seed; a resumed run goes on after
    the largest variation of the task's episodes on disk (those from `first` on), so the demonstration /
    held-out split holds and no goal is played twice."""
    import time

    from tqdm import tqdm

    from fmpolicy_envs.metaworld_clips import clip_episodes
    from fmpolicy_envs.metaworld_env import instruction

    start = next_variation(writer, first, target, args.seed)
    need = max(0, target - writer.num_episodes)
    summary = {"new_episodes": 0, "new_frames": 0, "attempts": 0, "seconds": 0.0, "success_rate": float("nan"),
               "success_by_task": {}}
    if need:
        successes, t0 = 0, time.perf_counter()
        bar = tqdm(total=target - first, initial=writer.num_episodes - first, unit="clip", desc=task,
                   disable=args.no_progress)
        cameras = [k[len("observation.images."):] for k in image_keys]
        variations = ([c[0] for c in spread_list(args, writer, task, target, first)] if args.spread
                      else itertools.count(start))
        clips = clip_episodes(task, variations, args.clip_frames, cameras, kwargs.get("image_size", 64),
                              seed=args.seed, workers=args.num_envs, env_kwargs=kwargs, noise_std=args.noise_std,
                              record=args.noise_record)
        for frames, extra in clips:
            summary["attempts"] += 1
            successes += extra["success"]
            if extra["success"] or not args.only_success:
                writer.add_episode(frames, task=instruction(task), extra=extra)
                summary["new_episodes"] += 1
                summary["new_frames"] += len(frames["action"])
                bar.update(1)
            if writer.num_episodes >= target:
                break
            if args.only_success and summary["attempts"] > 20 * need + args.num_envs:
                raise ExpertFailing(f"only {summary['new_episodes']} successful episodes in {summary['attempts']} "
                                    "attempts: the expert rarely succeeds")
        clips.close()
        bar.close()
        summary["seconds"] = time.perf_counter() - t0
        summary["success_rate"] = successes / summary["attempts"]
        summary["success_by_task"] = {instruction(task): summary["success_rate"]}
    if finalize and not writer.stats_are_current:
        writer.finalize()
    return summary


def _refuse_more_than_asked(out: str, existing: int, wanted: int, how: str | None = None) -> None:
    """A dataset holding more episodes than asked for would be trained on whole, so that a run that says
    "N demonstrations" would use more: an error, before anything is touched."""
    if existing > wanted:
        raise SystemExit(f"{out} already holds {existing} episodes, more than the {wanted} asked for "
                         f"({how or f'--episodes {wanted}'}): training on it would use all {existing}. Write to "
                         "another --out, or remove that dataset first")


def collect_replay(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """--replay SRC: SRC's episodes replayed from their starts and recorded with this run's observations
    (`fmpolicy.data.replay`), into --out."""
    import fmpolicy_envs  # noqa: F401  (registers the ids)
    from fmpolicy.data.dataset import read_v3_info
    from fmpolicy.data.replay import EnvMaker, ReplayError, read_source, replay
    from fmpolicy.gym_adapter import env_fps

    source_info = read_v3_info(args.replay)
    source_env = source_info.get("env") or {}
    if source_env.get("noise_std") and source_env.get("noise_record") == "clean":
        raise SystemExit(f"{args.replay} recorded the expert's clean actions, not the noisy executed ones "
                         "(--noise-record clean): a replay of them would not play its episodes")
    env_id = args.env or source_env.get("id")
    if not env_id:
        raise SystemExit(f"{args.replay}/meta/info.json does not say which env made it: pass --env")
    episodes = read_source(args.replay, args.replay_start_key)
    if args.episodes is not None:
        if args.episodes > len(episodes):
            raise SystemExit(f"--episodes {args.episodes}: {args.replay} holds {len(episodes)} episodes")
        episodes = episodes[:args.episodes]
    kwargs = {**(source_env.get("kwargs") or {}), **args.env_kwargs}
    is_mw = env_id == METAWORLD
    if is_mw:
        from fmpolicy_envs.metaworld_env import task_of_instruction

        if args.cameras is not None:
            kwargs["cameras"] = [c for c in args.cameras.split(",") if c]
        if kwargs.get("cameras"):
            kwargs["image_size"] = args.image_size or kwargs.get("image_size", 64)
        for key in ("task", "tasks", "processes"):  # each episode's task is its instruction's; --num-envs: workers
            kwargs.pop(key, None)
        try:
            names = {text: task_of_instruction(text) for text in {ep.task for ep in episodes}}
        except ValueError as e:
            raise SystemExit(f"--replay {args.replay}: {e}") from None
    elif args.cameras:
        raise SystemExit("--cameras is a Meta-World option (--env fmpolicy/MetaWorld-v0)")

    make = EnvMaker(env_id, kwargs, {text: {"task": name} for text, name in names.items()} if is_mw else {},
                    success_key=args.success_key, obs_map=args.obs_map, device=device, imports=("fmpolicy_envs",))

    env = make(episodes[0].task)
    try:
        fps = env_fps(env, args.fps or source_info["fps"], flag="--fps")
        features = features_of((env.single_observation_space, env.single_action_space))
    finally:
        env.close()
    width, recorded = features[STATE_KEY]["shape"][0], episodes[0].states.shape[1]
    # Meta-World's state modes all begin with its raw observation: compare the entries both have
    check_dims = min(width, recorded) if is_mw else (recorded if width == recorded else 0)
    if not check_dims:
        print(f"note: the replayed {STATE_KEY} has {width} entries, {args.replay}'s {recorded}: not compared")
    image_keys = [k for k in features if k.startswith("observation.images.")]
    env_info = {"id": env_id, "kwargs": kwargs, "image_size": kwargs.get("image_size") if image_keys else None,
                "replay_of": str(args.replay), "source_env": source_env}
    with DatasetWriter(args.out, fps=fps, features=features, robot_type=source_info.get("robot_type")
                       or ROBOT_TYPES.get(env_id), env_info=env_info, video=args.video) as writer:
        try:
            summary = replay(make, episodes, writer, image_key=image_keys, check_dims=check_dims,
                             atol=args.replay_atol, success_key=args.success_key, start_key=args.replay_start_key,
                             workers=args.num_envs, progress=not args.no_progress)
        except ReplayError as e:
            raise SystemExit(f"--replay {args.replay}: {e}") from None
        frames = writer.num_frames
    print(f"{args.out}: {summary['episodes']} episodes, {frames} frames (+{summary['new_episodes']} replayed, "
          f"+{summary['new_frames']} frames this run) from {args.replay}; largest state difference "
          f"{summary['max_state_deviation']:.2g} over {check_dims} entries; {summary['seconds']:.1f} s")
    return {**summary, "frames": frames}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = str(resolve_device(args.device, field="--device"))  # ConfigError: unknown, or CUDA without CUDA
    import gymnasium as gym

    import fmpolicy_envs  # noqa: F401  (registers the ids; fmpolicy itself never imports it)

    if args.replay:
        return collect_replay(args, device)

    if args.env not in fmpolicy_envs.TASKS:
        if args.env not in gym.registry:
            raise SystemExit(f"unknown --env {args.env!r}: expected one of {sorted(fmpolicy_envs.TASKS)}, "
                             f"{METAWORLD!r} or another registered gymnasium id")
        return collect_generic(args, device)
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
    if args.noise_std:  # only when used: datasets made before this option stay appendable
        env_info.update(noise_std=args.noise_std, noise_record=args.noise_record)
    # the writer holds the root's lock until the end (or an error): a second collection fails at once
    with DatasetWriter(args.out, fps=fps, features=features, robot_type=ROBOT_TYPES.get(args.env),
                       env_info=env_info, video=args.video) as writer:
        existing = writer.num_episodes
        _refuse_more_than_asked(args.out, existing, args.episodes)
        seed = run_seed(args.seed, existing)
        expert = with_noise(args, fmpolicy_envs.make_expert(args.env, seed=seed + 1), env, seed + 2)
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
