"""Clips of scripted Meta-World demonstrations: many goal variations for the price of a few rendered frames.

A camera policy learns where a goal marker is only from many distinct goals (docs/benchmarks/metaworld.md,
"Ten goals are too few": a conv tower reads reach's goal to 3-10 mm after 1000 goals, not at all after 50),
but a full demonstration costs a rendered frame (two cameras: 60-80 ms on a CPU) for every one of its
50-150 steps, all of the same goal. A clip keeps `clip_frames` consecutive steps of a demonstration:

1. the scripted expert runs the whole episode of variation v without cameras (MuJoCo alone: ~600 steps/s);
2. a window [lo, hi) of at most `clip_frames` steps is drawn: its start uniform in
   [-(clip_frames - 1), T - 1], clipped to the episode, so that every step of the episode is equally likely
   to be in it (a window that starts before 0 or runs past the end is shorter);
3. the episode is replayed from a fresh reset of v with the same executed actions (MuJoCo is deterministic)
   and the cameras are rendered only inside the window; the replayed states must equal the first pass's.

The clip is a LeRobot episode of hi - lo frames: the states, the recorded actions (the executed ones, or
the expert's clean ones with record="clean"), rewards and success flags of those steps, with
`clip_start` / `episode_length` / the episode's `success` in the episodes table. Action chunks that run
past the clip's last frame are padded and left out of the loss (`action_is_pad`), as at the end of any
episode: a clip teaches nothing false, only less than the whole demonstration.

`clip_episodes` spreads the variations over worker processes (each one MuJoCo process: rendering and
stepping run on several cores) and returns them in variation order, so the dataset does not depend on
the number of workers. Every random draw of a clip (the expert's noise, the window) is seeded by
(seed, variation).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

STATE_KEY = "observation.state"
IMAGE_PREFIX = "observation.images."

_WORKER: dict[str, Any] = {}  # per worker process: its envs (one per task) and settings


def draw_window(length: int, clip_frames: int, rng: np.random.Generator) -> tuple[int, int]:
    """[lo, hi) of at most `clip_frames` steps of an episode of `length` steps, every step equally likely
    to be inside: the start is uniform in [-(clip_frames - 1), length - 1], then clipped to the episode."""
    if length < 1 or clip_frames < 1:
        raise ValueError(f"length = {length} and clip_frames = {clip_frames} must be >= 1")
    start = int(rng.integers(-(clip_frames - 1), length))
    return max(start, 0), min(start + clip_frames, length)


def expert_clip(env, expert, variation: int, clip_frames: int, cameras: Sequence[str], image_size: int,
                seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One clip of the scripted expert's episode of `variation` in `env` (a `MetaWorldEnv` made without
    cameras, one task) -> (frames for `DatasetWriter.add_episode`, extra columns)."""
    expert.rng = np.random.default_rng([seed, variation, 0])  # the noise, whichever worker plays it
    obs, _ = env.reset(seed=variation)
    states, raws, executed, recorded, rewards, dones, successes = [], [], [], [], [], [], []
    floats: dict[str, list[np.ndarray]] = {k: [] for k in obs if k != STATE_KEY and not k.startswith(IMAGE_PREFIX)}
    done = False
    while not done:
        states.append(obs[STATE_KEY])
        for k, values in floats.items():  # observation.environment_state, when the env gives it
            values.append(obs[k])
        raws.append(env.raw_obs.copy())
        action = np.asarray(expert(env), dtype=np.float32)
        label = expert.label
        obs, reward, terminated, truncated, info = env.step(action)
        done = bool(terminated or truncated)
        executed.append(action)
        recorded.append(action if label is None else np.asarray(label, dtype=np.float32))
        rewards.append(reward)
        dones.append(done)
        successes.append(bool(info["is_success"]))
    length = len(executed)
    lo, hi = draw_window(length, clip_frames, np.random.default_rng([seed, variation, 1]))

    # replay with the same actions, rendering only inside the window
    images: dict[str, list[np.ndarray]] = {IMAGE_PREFIX + cam: [] for cam in cameras}
    env.reset(seed=variation)
    for t in range(hi):
        if t >= lo:
            if not np.array_equal(env.raw_obs, raws[t]):
                raise RuntimeError(f"variation {variation}: the replay left the first pass at step {t} "
                                   "(MuJoCo was not deterministic here): the clip would not match its actions")
            for cam in cameras:
                images[IMAGE_PREFIX + cam].append(env.camera_image(cam, image_size))
        if t < hi - 1:
            env.step(executed[t])
    frames = {STATE_KEY: np.stack(states[lo:hi]).astype(np.float32),
              "action": np.stack(recorded[lo:hi]).astype(np.float32),
              "next.reward": np.asarray(rewards[lo:hi], dtype=np.float32),
              "next.done": np.asarray(dones[lo:hi], dtype=bool),
              "next.success": np.asarray(successes[lo:hi], dtype=bool)}
    frames.update({k: np.stack(v[lo:hi]).astype(np.float32) for k, v in floats.items()})
    frames.update({k: np.stack(v) for k, v in images.items()})
    extra = {"success": bool(successes[-1]), "return": float(np.sum(rewards)), "seed": int(seed),
             "variation": int(variation), "clip_start": int(lo), "episode_length": int(length)}
    return frames, extra


def _init_worker(env_kwargs: dict[str, Any], noise_std: float, record: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER.update(env_kwargs=env_kwargs, noise_std=noise_std, record=record, envs={}, expert=None)


def _worker_clip(task: str, variation: int, clip_frames: int, cameras: tuple[str, ...], image_size: int,
                 seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from .metaworld_env import MetaWorldEnv, MetaWorldExpert

    envs = _WORKER["envs"]
    if task not in envs:  # made once a task and worker (0.6 s each)
        envs[task] = MetaWorldEnv(task=task, **_WORKER["env_kwargs"])
        envs[task].check_cameras(cameras)
    if _WORKER["expert"] is None:
        _WORKER["expert"] = MetaWorldExpert(noise_std=_WORKER["noise_std"], record=_WORKER["record"])
    return expert_clip(envs[task], _WORKER["expert"], variation, clip_frames, cameras, image_size, seed)


def clip_episodes(task: str, variations: Iterator[int], clip_frames: int, cameras: Sequence[str],
                  image_size: int, *, seed: int = 0, workers: int = 1, env_kwargs: dict[str, Any] | None = None,
                  noise_std: float = 0.0, record: str = "executed") -> Iterator[tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """Clips of `task`'s scripted expert, one per variation of `variations` (consumed lazily: stop
    iterating when you have enough), in that order, computed by `workers` processes (1: in this one).
    env_kwargs: `MetaWorldEnv` options (state, max_episode_steps, ...; not task or cameras)."""
    if not (isinstance(clip_frames, int) and clip_frames >= 1):
        raise ValueError(f"clip_frames = {clip_frames!r} is invalid: expected an int >= 1")
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers = {workers!r} is invalid: expected an int >= 1")
    env_kwargs = {k: v for k, v in (env_kwargs or {}).items() if k not in ("cameras", "image_size", "processes")}
    for key in ("task", "tasks"):
        env_kwargs.pop(key, None)
    cameras = tuple(cameras)
    args = (clip_frames, cameras, int(image_size), int(seed))
    if workers == 1:
        _init_worker(env_kwargs, noise_std, record)
        try:
            for v in variations:
                yield _worker_clip(task, int(v), *args)
        finally:
            for env in _WORKER.get("envs", {}).values():
                env.close()
            _WORKER.clear()
        return
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(env_kwargs, noise_std, record)) as pool:
        pending: list = []
        variations = iter(variations)
        try:
            while True:  # keep 2 clips a worker in flight; results in submission order
                while len(pending) < 2 * workers:
                    v = next(variations, None)
                    if v is None:
                        break
                    pending.append(pool.submit(_worker_clip, task, int(v), *args))
                if not pending:
                    return
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()
