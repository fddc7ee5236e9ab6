"""Collect demonstrations of a batched environment's scripted expert into a `DatasetWriter`.

The environment and the expert are passed in (this package never imports `fmpolicy_envs`):

- `env`: a batched (vector) environment in torch: `reset(seed=)` -> (obs, info) and `step(action)` ->
  (obs, reward, terminated, truncated, info) with same-step autoreset (the observation after a done is
  the next episode's first), `num_envs`, `obs["observation.state"]` (e, s), optionally a camera
  `obs[image_key]` (e, 3, H, W) float in [0, 1], `info["final_info"]["is_success"]` (e,) and, for
  instruction-conditioned tasks, `info["task"]` (a list of e strings, for the episodes that start).
- `expert`: a callable on the env's batched simulator (`env.core`, or the env itself) returning the
  actions (e, a); its optional `mode` attribute (e,) (e.g. above / below the obstacle) is recorded per
  episode.

Episodes are accepted in the order they *start*, not the order they finish: with many environments
the short episodes finish first, and keeping the first N to finish would bias the dataset towards them.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fmpolicy.data.writer import DatasetWriter

STATE_KEY = "observation.state"


class ExpertFailing(RuntimeError):
    """With only_success, the expert succeeded too rarely to fill the dataset."""


def run_seed(seed: int, existing: int) -> int:
    """The seed of a run that starts with `existing` episodes on disk: `seed` itself for a fresh
    dataset, a different one when resuming (reusing it would record the same episodes again)."""
    if existing == 0:
        return seed
    return int(np.random.SeedSequence([seed, existing]).generate_state(1)[0])


def collect(env: Any, expert: Any, writer: DatasetWriter, episodes: int, *, seed: int = 0,
            task: str = "complete the task", image_key: str | None = None, only_success: bool = False,
            max_attempts: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Run `expert` in `env` and write accepted episodes until `writer` holds `episodes`; then
    finalize the statistics (also when nothing was missing but the stats are stale). Returns a summary.

    seed: the environments' reset seed (use `run_seed` when resuming). task: the instruction of tasks
    whose info has no "task". image_key: the camera to record (uint8 round(255 x)), None for none.
    only_success: drop episodes that end without success; gives up (ExpertFailing) after
    `max_attempts` (default 20 * episodes + num_envs) accepted attempts.
    """
    existing = writer.num_episodes
    if existing >= episodes:
        if not writer.stats_are_current:
            writer.finalize()
        return {"episodes": existing, "new_episodes": 0, "frames": writer.num_frames, "new_frames": 0,
                "success_rate": float("nan"), "attempts": 0, "seconds": 0.0}
    e = int(env.num_envs)
    max_attempts = 20 * episodes + e if max_attempts is None else max_attempts
    core = getattr(env, "core", env)

    # ---- per-environment episode buffers ----
    buffers: list[dict[str, list]] = [{} for _ in range(e)]
    meta: list[dict[str, Any]] = [{} for _ in range(e)]
    in_flight = 0  # accepted episodes still running
    written = existing
    attempts = successes = new_frames = 0

    def start_episodes(envs: np.ndarray, tasks: list[str] | None) -> None:
        """Open buffers for the episodes that start in `envs`; accept them while slots remain."""
        nonlocal in_flight
        for i in envs.tolist():
            accepted = written + in_flight < episodes
            in_flight += accepted
            buffers[i] = {k: [] for k in ("state", "image", "action", "reward", "done", "success")}
            meta[i] = {"accepted": accepted, "task": tasks[i] if tasks else task, "mode": None}

    obs, info = env.reset(seed=seed)
    start_episodes(np.arange(e), info.get("task"))
    start_time = time.perf_counter()
    bar = tqdm(total=episodes, initial=existing, unit="ep", desc="episodes", disable=not progress)
    while written < episodes:
        # ---- act ----
        action = expert(core)  # (e, a)
        mode = expert.mode.cpu().numpy() if getattr(expert, "mode", None) is not None else None
        state_np = obs[STATE_KEY].cpu().numpy()
        image_np = None
        if image_key:
            image_np = (obs[image_key].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        obs, reward, terminated, truncated, info = env.step(action)

        # ---- record ----
        action_np, reward_np = action.cpu().numpy(), reward.cpu().numpy()
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
            if not meta[i]["accepted"]:
                continue
            in_flight -= 1
            attempts += 1
            b = buffers[i]
            success = bool(b["success"][-1])
            successes += success
            if only_success and not success:
                continue
            frames = {STATE_KEY: np.stack(b["state"]), "action": np.stack(b["action"]),
                      "next.reward": np.asarray(b["reward"]), "next.done": np.asarray(b["done"]),
                      "next.success": np.asarray(b["success"])}
            if image_np is not None:
                frames[image_key] = np.stack(b["image"])
            extra = {"success": success, "return": float(np.sum(b["reward"])), "seed": seed}
            if meta[i]["mode"] is not None:
                extra["mode"] = meta[i]["mode"]
            writer.add_episode(frames, task=meta[i]["task"], extra=extra)
            written += 1
            new_frames += len(b["action"])
            bar.update(1)
        if only_success and attempts > max_attempts:
            bar.close()
            raise ExpertFailing(f"only {written - existing} successful episodes in {attempts} attempts: "
                               "the expert rarely succeeds")
        start_episodes(ended, info.get("task"))
    bar.close()
    seconds = time.perf_counter() - start_time
    writer.finalize()
    return {"episodes": writer.num_episodes, "new_episodes": written - existing, "frames": writer.num_frames,
            "new_frames": new_frames, "success_rate": successes / max(attempts, 1), "attempts": attempts,
            "seconds": seconds, "episodes_per_s": (written - existing) / seconds, "frames_per_s": new_frames / seconds}
