"""Replay the episodes of a dataset in a simulator and record them again, with other observations.

A demonstration is its start and its actions: a simulator reset to the same start and given the same
actions (MuJoCo is deterministic) plays the same episode. Recording that replay with other settings gives
the same demonstrations seen differently: a state-only dataset with cameras added, at another image size,
with the arm's own state instead of the full one, with the simulator's privileged state for an auxiliary
target. No expert runs, so the new dataset holds exactly the source's demonstrations.

- `read_source(root, start_key)`: each episode's task, start, actions, states and success from any LeRobot
  v3.0 dataset whose episodes table says where each episode started (`start_key`: the reset seed of that
  episode, e.g. Meta-World's goal `variation`, which our collection records).
- `ReplayExpert`: an `expert_input="obs"` expert that plays one episode's actions and checks, before each,
  that the replayed state equals the recorded one (leading `check_dims` entries, within `atol`).
- `replay(make_env, episodes, writer)`: every episode replayed from its start in a one-env vector env (our
  contract, `fmpolicy.data.collection`) and written; the episode must end exactly where the source's ended,
  with the same success. A resumed run goes on after the episodes on disk (which must be the first ones).
  With `workers` > 1 the episodes play in that many processes (rendering is the cost) and are written in
  source order, so the dataset does not depend on the number of workers; `make_env` must then pickle
  (`EnvMaker`).

The actions written are the source's. They must be the executed ones: a dataset that recorded other labels
(DART's clean actions, `--noise-record clean`) does not replay, and the state check says so at the first
step where it leaves the recording.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fmpolicy.data.collection import STATE_KEY, _numpy, _uint8_image
from fmpolicy.data.dataset import ChunkDataset, DatasetError
from fmpolicy.data.writer import DatasetWriter
from fmpolicy.pool import in_order


class ReplayError(RuntimeError):
    """A replay left its recording: another state, an earlier or later end, another outcome."""


@dataclass
class SourceEpisode:
    """One recorded episode: what a replay needs and what it is checked against."""

    index: int  # episode_index in the source dataset
    task: str  # the instruction
    start: int  # the reset seed that reproduces the episode's start
    actions: np.ndarray  # (T, a) float32, executed
    states: np.ndarray  # (T, s) float32, observation.state before each action
    success: bool | None  # the episode's recorded success (None when the table has no `success` column)


def read_source(root: str | Path, start_key: str = "variation") -> list[SourceEpisode]:
    """The episodes of the LeRobot v3.0 dataset at `root`, in episode order, for `replay`.

    Raises DatasetError when the episodes table has no `start_key` column (or a null in it: the start of
    that episode is unknown) or when an episode is a clip of a longer demonstration (`clip_start` > 0:
    its first frame is not a start the simulator can be reset to)."""
    ds = ChunkDataset(root, 1, image_keys=[])
    eps = ds.episodes
    where = f"the episodes table of {root}"
    if start_key not in eps:
        raise DatasetError(f"{where} has no column {start_key!r} (it has {sorted(eps)}): a replay needs each "
                           f"episode's start (its reset seed); Meta-World datasets of ours record it as 'variation'")
    starts = eps[start_key]
    if "clip_start" in eps:
        clipped = np.flatnonzero(np.asarray(eps["clip_start"]) != 0)
        if clipped.size:
            k = int(clipped[0])
            raise DatasetError(f"{where}: episode {int(eps['episode_index'][k])} is a clip that starts at step "
                               f"{int(eps['clip_start'][k])} of its demonstration: a clip's first frame is not a "
                               "start the simulator can be reset to (replay the full demonstrations instead)")
    ends = np.cumsum(eps["length"].astype(np.int64))
    out = []
    for k, end in enumerate(ends.tolist()):
        start = starts[k]
        if start is None or (isinstance(start, float) and not np.isfinite(start)):
            raise DatasetError(f"{where}: episode {int(eps['episode_index'][k])} has no {start_key!r}: its start "
                               "is unknown")
        lo = end - int(eps["length"][k])
        success = eps["success"][k] if "success" in eps else None
        out.append(SourceEpisode(index=int(eps["episode_index"][k]), task=ds.tasks[int(ds.task_index[lo])],
                                 start=int(start), actions=ds.action[lo:end].numpy(), states=ds.state[lo:end].numpy(),
                                 success=None if success is None else bool(success)))
    return out


class ReplayExpert:
    """Plays `episode.actions` one step a call (expert_input="obs", one env), checking the state first.

    check_dims: how many leading entries of `observation.state` to compare with the recording (None: all
    of it, which then must have the recorded width; 0: no check). atol: the largest allowed |difference|.
    `steps` counts the actions given, `max_deviation` the largest difference seen."""

    def __init__(self, episode: SourceEpisode, check_dims: int | None = None, atol: float = 1e-3):
        if not (np.isfinite(atol) and atol >= 0):
            raise ValueError(f"atol = {atol!r} is invalid: expected a finite number >= 0")
        width = episode.states.shape[1]
        if check_dims is None:
            check_dims = width
        if isinstance(check_dims, bool) or not isinstance(check_dims, int) or not 0 <= check_dims <= width:
            raise ValueError(f"check_dims = {check_dims!r} is invalid: expected an int in 0..{width} (the recorded "
                             "state's width)")
        self.episode, self.check_dims, self.atol = episode, check_dims, float(atol)
        self.steps, self.max_deviation = 0, 0.0

    def __call__(self, obs: dict[str, Any]) -> np.ndarray:
        ep, t = self.episode, self.steps
        if t >= len(ep.actions):
            raise ReplayError(f"episode {ep.index} (start {ep.start}): asked for action {t + 1} of "
                              f"{len(ep.actions)} recorded")
        if self.check_dims:
            state = _numpy(obs[STATE_KEY]).reshape(-1)
            if state.shape[0] < self.check_dims:
                raise ReplayError(f"the replayed {STATE_KEY} has {state.shape[0]} entries, fewer than the "
                                  f"{self.check_dims} to check")
            diff = np.abs(state[:self.check_dims].astype(np.float64) - ep.states[t, :self.check_dims])
            worst = int(np.argmax(diff))
            self.max_deviation = max(self.max_deviation, float(diff[worst]))
            if not diff[worst] <= self.atol:
                raise ReplayError(f"episode {ep.index} (start {ep.start}), step {t}: the replayed {STATE_KEY}[{worst}] "
                                  f"is {state[worst]:.6g}, the recorded {ep.states[t, worst]:.6g} (|difference| "
                                  f"{diff[worst]:.3g} > atol {self.atol:g}): the replay left the recording (another "
                                  "start, other environment settings, or recorded actions that were not the executed "
                                  "ones, e.g. DART's clean labels)")
        self.steps += 1
        return ep.actions[t][None]


@dataclass(frozen=True)
class EnvMaker:
    """make_env for `replay` that pickles (for worker processes): task -> a one-env vector env of `env_id`
    with `kwargs`, updated by `task_kwargs[task]` (e.g. Meta-World's task name for each instruction).
    `imports`: modules that register the id (e.g. "fmpolicy_envs"), imported first."""

    env_id: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    task_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    success_key: str = "is_success"
    obs_map: dict[str, str] | None = None
    device: str = "cpu"
    imports: tuple[str, ...] = ()

    def __call__(self, task: str) -> Any:
        from fmpolicy.gym_adapter import make_vector_env

        for module in self.imports:
            importlib.import_module(module)
        return make_vector_env(self.env_id, 1, device=self.device, kwargs={**self.kwargs, **self.task_kwargs.get(task, {})},
                               success_key=self.success_key, obs_map=self.obs_map)


def replay(make_env: Callable[[str], Any], episodes: Sequence[SourceEpisode], writer: DatasetWriter, *,
           image_key: str | Sequence[str] | None = None, check_dims: int | None = None, atol: float = 1e-3,
           success_key: str = "is_success", start_key: str = "variation", workers: int = 1,
           progress: bool = False, finalize: bool = True) -> dict[str, Any]:
    """Replay `episodes` and write each into `writer`, after those it already holds (a resumed run: the
    episodes on disk must be replays of the first ones, in order).

    make_env(task) -> a one-env vector env in our contract (made at the first episode of a task, closed at the
    next task's);
    `reset(seed=episode.start)` must reproduce the episode's start. image_key: the camera(s) to record.
    check_dims / atol: the state check of `ReplayExpert`. start_key: the episodes-table column the start is
    written to (the source's, so the new dataset replays too). Returns a summary (episodes, frames, seconds,
    the largest state deviation)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers = {workers!r} is invalid: expected an int >= 1")
    image_keys = [image_key] if isinstance(image_key, str) else list(image_key or [])
    float_keys = [k for k in writer.features if k not in (STATE_KEY, "action") and k not in image_keys
                  and writer.features[k]["dtype"] == "float32"]
    done_before = writer.num_episodes
    if done_before > len(episodes):
        raise ReplayError(f"the dataset holds {done_before} episodes, more than the {len(episodes)} to replay")
    for k, row in enumerate(writer.episodes):
        if row.get("replay_of") != episodes[k].index or row.get(start_key) != episodes[k].start:
            raise ReplayError(f"episode {k} on disk is not the replay of source episode {episodes[k].index} (start "
                              f"{episodes[k].start}): it says replay_of {row.get('replay_of')!r}; write to another "
                              "dataset")
    todo = list(episodes[done_before:])
    settings = (make_env, check_dims, atol, image_keys, float_keys, success_key)
    t0, frames, worst = time.perf_counter(), 0, 0.0
    bar = tqdm(total=len(todo), unit="ep", desc="replay", disable=not progress)
    try:
        for ep, (played, deviation) in zip(todo, _played(todo, settings, workers)):
            writer.add_episode(played, task=ep.task, extra=_extra(ep, played, start_key))
            frames += len(ep.actions)
            worst = max(worst, deviation)
            bar.update(1)
    finally:
        bar.close()
    if finalize and not writer.stats_are_current:
        writer.finalize()
    seconds = time.perf_counter() - t0
    return {"episodes": writer.num_episodes, "new_episodes": writer.num_episodes - done_before, "new_frames": frames,
            "seconds": seconds, "max_state_deviation": worst}


_WORKER: dict[str, Any] = {}  # per process: the settings and one env a task


def _init_worker(settings: tuple) -> None:
    torch.set_num_threads(1)  # a worker renders and steps one env: no intra-op threads to share the cores
    _WORKER.clear()
    _WORKER.update(settings=settings, envs={})


def _play_one(ep: SourceEpisode, state: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], float]:
    """Replay `ep` in the env of its task (`state`: the settings and envs; a worker's own by default)
    -> (its frames, the largest state difference)."""
    state = _WORKER if state is None else state
    make_env, check_dims, atol, image_keys, float_keys, success_key = state["settings"]
    envs = state["envs"]
    if ep.task not in envs:  # one env at a time (each holds a simulator and renderers): sources go task by task
        for env in envs.values():
            env.close()
        envs.clear()
        envs[ep.task] = make_env(ep.task)
    expert = ReplayExpert(ep, check_dims, atol)
    return _play(envs[ep.task], expert, image_keys, float_keys, success_key), expert.max_deviation


def _played(todo: list[SourceEpisode], settings: tuple, workers: int) -> Iterator[tuple[dict[str, np.ndarray], float]]:
    """The replays of `todo`, in order: in this process, or in `workers` processes with two episodes each
    in flight."""
    if workers == 1:
        state: dict[str, Any] = {"settings": settings, "envs": {}}
        try:
            for ep in todo:
                yield _play_one(ep, state)
        finally:
            for env in state["envs"].values():
                env.close()
        return
    yield from in_order(_play_one, todo, workers, initializer=_init_worker, initargs=(settings,))


def _extra(ep: SourceEpisode, played: dict[str, np.ndarray], start_key: str) -> dict[str, Any]:
    """The episodes-table columns of a replay: its outcome, start and source episode."""
    return {"success": bool(played["next.success"][-1]), "return": float(np.sum(played["next.reward"])),
            start_key: ep.start, "replay_of": ep.index}


def _play(env: Any, expert: ReplayExpert, image_keys: list[str], float_keys: list[str],
          success_key: str) -> dict[str, np.ndarray]:
    """One episode of `expert` from its start in the one-env vector `env` -> the frames to write, checked:
    it ends with the last recorded action, with the recorded success."""
    ep = expert.episode
    if int(env.num_envs) != 1:
        raise ValueError(f"replay needs a one-env vector env, got num_envs = {env.num_envs}")
    obs, _ = env.reset(seed=ep.start)
    rec: dict[str, list] = {k: [] for k in (STATE_KEY, "action", "next.reward", "next.done", "next.success",
                                            *image_keys, *float_keys)}
    for t in range(len(ep.actions)):
        missing = [k for k in (*image_keys, *float_keys) if k not in obs]
        if missing:
            raise KeyError(f"the dataset declares {missing}, which the observation does not hold (it has {sorted(obs)})")
        rec[STATE_KEY].append(_numpy(obs[STATE_KEY])[0].astype(np.float32))
        for k in image_keys:
            rec[k].append(_uint8_image(obs[k])[0])
        for k in float_keys:
            rec[k].append(_numpy(obs[k])[0].astype(np.float32))
        action = expert(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        done = bool(_numpy(terminated)[0] | _numpy(truncated)[0])
        final_info = info.get("final_info", {})
        if done and success_key not in final_info:
            raise KeyError(f"info['final_info'] has no {success_key!r} (it has {sorted(final_info)}): name the "
                           "env's success entry with success_key")
        success = bool(_numpy(final_info[success_key])[0]) if success_key in final_info else False  # as collect
        rec["action"].append(np.asarray(action[0], dtype=np.float32))
        rec["next.reward"].append(np.float32(_numpy(reward)[0]))
        rec["next.done"].append(done)
        rec["next.success"].append(success)
        if done and t < len(ep.actions) - 1:
            raise ReplayError(f"episode {ep.index} (start {ep.start}): the replay ended at step {t + 1}, before the "
                              f"{len(ep.actions)} recorded actions (success {success}): the environment's settings "
                              "end episodes earlier than the source's, or the replay left the recording")
    if not rec["next.done"][-1]:
        raise ReplayError(f"episode {ep.index} (start {ep.start}): the replay goes on after the {len(ep.actions)} "
                          "recorded actions: the environment's settings end episodes later than the source's "
                          "(max_episode_steps, terminate_on_success, steps_after_success)")
    if ep.success is not None and rec["next.success"][-1] != ep.success:
        raise ReplayError(f"episode {ep.index} (start {ep.start}): the replay ended with success "
                          f"{rec['next.success'][-1]}, the recording with {ep.success}")
    return {k: np.stack(v) if k in (STATE_KEY, "action", *image_keys, *float_keys) else np.asarray(v)
            for k, v in rec.items()}
