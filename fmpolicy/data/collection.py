"""Collect demonstrations of an expert in a vector environment into a `DatasetWriter`.

The environment and the expert are passed in (this package never imports `fmpolicy_envs`):

- `env`: a vector environment with same-step autoreset: `reset(seed=)` -> (obs, info) and
  `step(action)` -> (obs, reward, terminated, truncated, info) (the observation after a done is the
  next episode's first), `num_envs`, `obs["observation.state"]` (e, s), optionally cameras
  `obs[image_key]` (e, 3, H, W) float in [0, 1] or uint8, any other float feature the writer declares
  (e.g. `observation.environment_state`, the simulator's privileged state) as `obs[key]` (e, ...), `info["final_info"][success_key]` (e,) and, for
  instruction-conditioned tasks, `info["task"]` (a list of e strings, for the episodes that start).
  Our torch vector envs (fmpolicy_envs, Meta-World's adapter included) are such envs; any other
  gymnasium id becomes one through `fmpolicy.gym_adapter.make_vector_env` (flat observations mapped to
  `observation.state`). Tensors or numpy arrays both work.
- `expert`: with `expert_input="core"` (our scripted experts), a callable on the env's batched simulator
  (`env.core`, or the env itself) returning the actions (e, a); with `expert_input="obs"`, any callable
  observation dict -> actions (e, a) (a scripted controller, a noisy or replayed one, a policy). Its
  optional `mode` attribute (e,) (e.g. above / below the obstacle) is recorded per episode; its optional
  `label` attribute (e, a), when not None after a call, is the action recorded in place of the executed
  one (DART: execute the expert's action plus noise, record the expert's own).

States and actions are written as float32: a float64 observation (Meta-World's, MuJoCo's) is cast here,
explicitly, because the dataset features and the policy are float32.

Episodes are accepted in the order they *start*, not the order they finish: with many environments
the short episodes finish first, and keeping the first N to finish would bias the dataset towards them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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
            task: str = "complete the task", image_key: str | Sequence[str] | None = None,
            only_success: bool = False, max_attempts: int | None = None, progress: bool = False,
            expert_input: str = "core", success_key: str = "is_success", finalize: bool = True,
            desc: str = "episodes") -> dict[str, Any]:
    """Run `expert` in `env` and write accepted episodes until `writer` holds `episodes`; then
    finalize the statistics (also when nothing was missing but the stats are stale). Returns a summary
    (`success_by_task`: the expert's success rate per instruction).

    seed: the environments' reset seed (use `run_seed` when resuming). task: the instruction of tasks
    whose info has no "task". image_key: the camera(s) to record (float images as uint8 round(255 x),
    uint8 as they are), None for none. only_success: drop episodes that end without success; gives up
    (ExpertFailing) after `max_attempts` (default 20 * episodes + num_envs) accepted attempts.
    expert_input: "core" (expert(env.core or env)) or "obs" (expert(observation dict)). success_key: the
    entry of info["final_info"] that says an episode succeeded. finalize: compute the statistics at the
    end (False when more collections into the same writer follow, e.g. one per task).
    """
    if expert_input not in ("core", "obs"):
        raise ValueError(f"expert_input = {expert_input!r} is invalid: expected 'core' or 'obs'")
    image_keys = [image_key] if isinstance(image_key, str) else list(image_key or [])
    # other float features the writer declares (e.g. observation.environment_state): recorded from obs
    float_keys = [k for k in writer.features if k not in (STATE_KEY, "action") and k not in image_keys
                  and writer.features[k]["dtype"] == "float32"]
    existing = writer.num_episodes
    if existing >= episodes:
        if finalize and not writer.stats_are_current:
            writer.finalize()
        return {"episodes": existing, "new_episodes": 0, "frames": writer.num_frames, "new_frames": 0,
                "success_rate": float("nan"), "attempts": 0, "seconds": 0.0, "success_by_task": {}}
    e = int(env.num_envs)
    max_attempts = 20 * episodes + e if max_attempts is None else max_attempts
    core = getattr(env, "core", env)

    # ---- per-environment episode buffers ----
    buffers: list[dict[str, list]] = [{} for _ in range(e)]
    meta: list[dict[str, Any]] = [{} for _ in range(e)]
    in_flight = 0  # accepted episodes still running
    written = existing
    attempts = successes = new_frames = 0
    by_task: dict[str, list[int]] = {}  # instruction -> [successes, attempts]

    def start_episodes(envs: np.ndarray, info: dict[str, Any]) -> None:
        """Open buffers for the episodes that start in `envs`; accept them while slots remain."""
        nonlocal in_flight
        tasks, variation = info.get("task"), info.get("variation")
        for i in envs.tolist():
            accepted = written + in_flight < episodes
            in_flight += accepted
            buffers[i] = {k: [] for k in ("state", "action", "reward", "done", "success", *image_keys, *float_keys)}
            meta[i] = {"accepted": accepted, "task": tasks[i] if tasks else task, "mode": None,
                       "variation": None if variation is None else int(variation[i])}

    obs, info = env.reset(seed=seed)
    start_episodes(np.arange(e), info)
    start_time = time.perf_counter()
    bar = tqdm(total=episodes, initial=existing, unit="ep", desc=desc, disable=not progress)
    while written < episodes:
        # ---- act ----
        action = expert(core) if expert_input == "core" else expert(obs)  # (e, a), executed
        label = getattr(expert, "label", None)  # recorded instead, when the expert gives one
        mode = _numpy(expert.mode) if getattr(expert, "mode", None) is not None else None
        state_np = _numpy(obs[STATE_KEY]).astype(np.float32)  # float64 observations: cast here, explicitly
        images_np = {k: _uint8_image(obs[k]) for k in image_keys}
        missing = [k for k in float_keys if k not in obs]
        if missing:
            raise KeyError(f"the dataset declares {missing}, which the observation does not hold "
                           f"(it has {sorted(obs)})")
        floats_np = {k: _numpy(obs[k]).astype(np.float32) for k in float_keys}
        obs, reward, terminated, truncated, info = env.step(action)

        # ---- record ----
        action_np = _numpy(action if label is None else label).astype(np.float32)
        reward_np = _numpy(reward).astype(np.float32)
        done_np = _numpy(terminated) | _numpy(truncated)
        final_info = info.get("final_info", {})
        if success_key not in final_info:
            if done_np.any():
                raise KeyError(f"info['final_info'] has no {success_key!r} (it has {sorted(final_info)}): "
                               "name the env's success entry with success_key")
            success_np = np.zeros(e, dtype=bool)
        else:
            success_np = _numpy(final_info[success_key]).astype(bool)
        for i in range(e):
            b = buffers[i]
            if meta[i]["mode"] is None and mode is not None:
                meta[i]["mode"] = int(mode[i])
            b["state"].append(state_np[i])
            b["action"].append(action_np[i])
            b["reward"].append(reward_np[i])
            b["done"].append(done_np[i])
            b["success"].append(success_np[i])
            for k in image_keys:
                b[k].append(images_np[k][i])
            for k in float_keys:
                b[k].append(floats_np[k][i])

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
            tally = by_task.setdefault(meta[i]["task"], [0, 0])
            tally[0], tally[1] = tally[0] + success, tally[1] + 1
            if only_success and not success:
                continue
            frames = {STATE_KEY: np.stack(b["state"]), "action": np.stack(b["action"]),
                      "next.reward": np.asarray(b["reward"]), "next.done": np.asarray(b["done"]),
                      "next.success": np.asarray(b["success"])}
            for k in (*image_keys, *float_keys):
                frames[k] = np.stack(b[k])
            extra = {"success": success, "return": float(np.sum(b["reward"])), "seed": seed}
            if meta[i]["mode"] is not None:
                extra["mode"] = meta[i]["mode"]
            if meta[i]["variation"] is not None:  # the goal variation (Meta-World): the demo / held-out split
                extra["variation"] = meta[i]["variation"]
            writer.add_episode(frames, task=meta[i]["task"], extra=extra)
            written += 1
            new_frames += len(b["action"])
            bar.update(1)
        if only_success and written < episodes and attempts > max_attempts:  # short of episodes: give up
            bar.close()
            raise ExpertFailing(f"only {written - existing} successful episodes in {attempts} attempts: "
                               "the expert rarely succeeds")
        start_episodes(ended, info)
    bar.close()
    seconds = time.perf_counter() - start_time
    if finalize:
        writer.finalize()
    return {"episodes": writer.num_episodes, "new_episodes": written - existing, "frames": writer.num_frames,
            "new_frames": new_frames, "success_rate": successes / max(attempts, 1), "attempts": attempts,
            "seconds": seconds, "episodes_per_s": (written - existing) / seconds, "frames_per_s": new_frames / seconds,
            "success_by_task": {t: k / n for t, (k, n) in by_task.items()}}


def _numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like as a numpy array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _uint8_image(x: Any) -> np.ndarray:
    """(e, 3, H, W) camera images as uint8: float in [0, 1] -> round(255 x); uint8 kept as it is."""
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    if t.dtype == torch.uint8:
        return t.cpu().numpy()
    return (t.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
