"""Executing action chunks while the next one is computed: queues that combine overlapping chunks, a
threaded runner for a real robot loop, and a latency simulation that measures what each choice costs.

Timeline with chunk size h, `n_action_steps` s and an inference that takes d control steps (d <= s):
the next inference starts when d of the current chunk's s actions are left, from the observation of
that moment; its chunk arrives d steps later. Position j of the new chunk is planned for the control
step its observation was taken at + j, so its first d positions are already in the past when it
arrives. What the robot executes then (`ChunkQueue.aggregation`, `run_with_latency` modes):

- "sync" (mode only): the robot waits for every chunk (d = 0 as far as the actions go; the waiting
  costs wall time, which a simulation does not show). The reference.
- "latest": switch to the new chunk at once, skipping its stale first d positions ("naive async").
- "average" / "ensemble": every control step executes a weighted mean over all chunks that planned an
  action for it; "ensemble" is ACT's temporal ensembling, weights exp(-m i) with i = 0 the oldest chunk.
- "rtc" (mode only): "latest", with the new chunk sampled by real-time chunking (`fmpolicy.rtc`): its
  first d positions inpainted to the actions being executed meanwhile, so the switch is smooth.
  On a robot: `AsyncChunkRunner(client.infer_chunk, ..., inference_delay=d)` against a policy server.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium.spaces import Box
from torch import Tensor

from fmpolicy.errors import InputError
from fmpolicy.evaluation import observe_env

AGGREGATIONS = ("latest", "average", "ensemble")
MODES = ("sync", "latest", "ensemble", "rtc")


class ChunkQueue:
    """Planned actions from overlapping chunks, keyed by control step.

    `add(chunk, start)`: chunk (b, h, a) whose position j is planned for control step start + j.
    `action(step)`: the (b, a) action to execute at `step` under `aggregation`.
    """

    def __init__(self, aggregation: str = "latest", ensemble_m: float = 0.01):
        if aggregation not in AGGREGATIONS:
            raise InputError(f"aggregation = {aggregation!r}: expected one of {AGGREGATIONS}")
        self.aggregation, self.m = aggregation, float(ensemble_m)
        self.chunks: list[tuple[int, Tensor]] = []  # (start step, chunk), oldest first

    def add(self, chunk: Tensor, start: int) -> None:
        self.chunks.append((int(start), chunk))

    def covering(self, step: int) -> list[Tensor]:
        """The (b, a) actions that the stored chunks plan for `step`, oldest chunk first."""
        return [c[:, step - s] for s, c in self.chunks if s <= step < s + c.shape[1]]

    def action(self, step: int) -> Tensor:
        self.chunks = [(s, c) for s, c in self.chunks if step < s + c.shape[1]]  # drop the exhausted
        planned = self.covering(step)
        if not planned:
            raise InputError(f"no chunk plans an action for control step {step}: request chunks earlier")
        if self.aggregation == "latest":
            return planned[-1]
        if self.aggregation == "average":
            return torch.stack(planned).mean(0)
        w = torch.exp(-self.m * torch.arange(len(planned), dtype=planned[0].dtype, device=planned[0].device))
        return (torch.stack(planned) * (w / w.sum())[:, None, None]).sum(0)

    def leftover(self, step: int) -> Tensor:
        """The newest chunk's actions from `step` on (b, n, a): what real-time chunking continues."""
        start, chunk = self.chunks[-1]
        return chunk[:, step - start:]

    def reset(self) -> None:
        self.chunks.clear()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to `n` for this thread's OpenMP setting (and torch's default for threads
    started meanwhile), restored on exit; None leaves them as they are."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class AsyncChunkRunner:
    """One action per control step from a chunk `predict` function (`policy.predict_action_chunk`, or a
    remote client's `PolicyClient.infer_chunk`), asking for the next chunk on a worker thread while the
    current one runs.

    `act(obs)` returns the action for this step. When at most `threshold` of the current chunk's
    `n_action_steps` are left, it starts `predict(obs)` in the background; the chunk is merged when it
    arrives (positions already in the past are skipped; overlapping ones combined by `aggregation`).
    If the queue runs dry first, `act` waits for the chunk (a late inference stalls the robot, it never
    makes it act on nothing).

    Chunks may be (b, h, a) or (h, a), torch or numpy: `act` returns the action in the same form, (b, a)
    or (a,). `delays` holds, for the latest chunks, the control steps from each request to its merge.

    Real-time chunking (`inference_delay` = d, an int; needs `aggregation="latest"`): every request
    after the first is `predict(obs, leftover, d)`, with `leftover` the current chunk's actions from the
    request's step on ((n, a) or (b, n, a), the form `predict` returns), of which about d are executed
    while the request runs (d <= n); the first request is `predict(obs)`. `PolicyClient.infer_chunk`
    takes exactly these arguments and sends them as the server's RTC fields, so the new chunk continues
    what the robot is doing (in process: `sample_chunk_rtc(policy, obs, leftover, d)`). Set d to the
    control steps an inference takes (`delays` shows them), and `threshold` >= d so that the chunk
    arrives before the current one's `n_action_steps` are used up.

    `threads` (an int, or None to leave torch as it is): torch's CPU threads for `predict` on the
    worker thread. With a policy on the CPU, `threads=1` is usually fastest: torch's OpenMP runtime
    slows every parallel region once two host threads (the control loop's, which loaded the policy,
    and the worker) each hold a pool of OpenMP threads that together outnumber the cores, and one
    thread keeps the worker from making a pool (docs/serving.md: on a 2-core machine 43-47 -> 32-37 ms
    a chunk). The control loop's thread keeps its own setting; threads torch starts later take
    `threads` as their default while a chunk is computed (torch's setting is restored after it).
    """

    def __init__(self, predict: Callable[..., Any], n_action_steps: int, threshold: int = 1,
                 aggregation: str = "latest", ensemble_m: float = 0.01, inference_delay: int | None = None,
                 threads: int | None = None):
        if not 0 <= threshold < n_action_steps:
            raise InputError(f"threshold = {threshold}: expected 0 <= threshold < n_action_steps = {n_action_steps}")
        if inference_delay is not None:
            if isinstance(inference_delay, bool) or not isinstance(inference_delay, int) or inference_delay < 0:
                raise InputError(f"inference_delay = {inference_delay!r}: expected None (no real-time chunking) or "
                                 "an int >= 0 (control steps an inference takes)")
            if aggregation != "latest":
                raise InputError(f"aggregation = {aggregation!r} with inference_delay = {inference_delay}: real-time "
                                 "chunking continues the executed chunk, expected aggregation='latest'")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads = {threads!r}: expected None (torch's own setting) or an int >= 1 (torch's CPU "
                             "threads for predict on the worker thread)")
        self.threads = threads
        self.predict, self.s, self.threshold = predict, int(n_action_steps), int(threshold)
        self.inference_delay = inference_delay
        self.queue = ChunkQueue(aggregation, ensemble_m)
        self.step, self.last_start = 0, 0
        self.delays: deque[int] = deque(maxlen=100)
        self.requested_at: int | None = None  # the control step of the request in flight, None when none is
        self._numpy, self._unbatched = False, False  # the form of predict's chunks (act answers in it)
        self._worker: threading.Thread | None = None
        self._result: tuple[int, Any] | None = None
        self._error: BaseException | None = None

    def _request(self, obs: Any) -> None:
        start = self.requested_at = self.step
        args: tuple = (obs,)
        if self.inference_delay is not None and self.queue.chunks:
            leftover = self.queue.leftover(start)  # (b, n, a)
            if leftover.shape[1] > 0:
                args = (obs, self._as_returned(leftover), min(self.inference_delay, leftover.shape[1]))

        def run() -> None:
            try:
                with torch_threads(self.threads):
                    self._result = (start, self.predict(*args))
            except BaseException as e:  # noqa: BLE001 (re-raised in act)
                self._error = e

        self._worker = threading.Thread(target=run, name="fmpolicy-chunk", daemon=True)
        self._worker.start()

    def _collect(self, wait: bool) -> None:
        if self._worker is None or (self._worker.is_alive() and not wait):
            return
        self._worker.join()
        self._worker, self.requested_at = None, None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        start, chunk = self._result
        self.queue.add(self._as_tensor(chunk), start)
        self.last_start = start
        self.delays.append(self.step - start)

    def _as_tensor(self, chunk: Any) -> Tensor:
        """predict's chunk -> (b, h, a) tensor, remembering its form."""
        self._numpy = isinstance(chunk, np.ndarray)
        x = torch.as_tensor(chunk)
        if x.dim() not in (2, 3):
            raise InputError(f"predict returned a chunk of shape {tuple(x.shape)}: expected (b, h, a) or (h, a)")
        self._unbatched = x.dim() == 2
        return x[None] if self._unbatched else x

    def _as_returned(self, x: Tensor) -> Any:
        """(b, ...) tensor -> the form of predict's chunks (numpy or torch, with or without the batch axis)."""
        x = x[0] if self._unbatched else x
        return x.numpy() if self._numpy else x

    def act(self, obs: Any) -> Any:
        if not self.queue.chunks and self._worker is None:  # the first chunk: nothing to run meanwhile
            self._request(obs)
            self._collect(wait=True)
        self._collect(wait=False)
        left = self.last_start + self.s - self.step
        if self._worker is None and left <= self.threshold:
            self._request(obs)
        if not self.queue.covering(self.step):
            self._collect(wait=True)
        action = self.queue.action(self.step)
        self.step += 1
        return self._as_returned(action)

    def wait(self) -> None:
        """Block until the chunk in flight (if any) has arrived, and merge it now."""
        self._collect(wait=True)

    def reset(self) -> None:
        if self._worker is not None:
            self._worker.join()
        self._worker, self._result, self._error, self.requested_at = None, None, None, None
        self.queue.reset()
        self.delays.clear()
        self.step, self.last_start = 0, 0


@dataclass
class LatencyResult:
    mode: str
    delay: int
    success_rate: float
    episodes: int
    boundary_jerk_mean: float  # mean |a_t - a_{t-1}| of the executed (box-clipped) actions where a new chunk takes over
    boundary_jerk_max: float
    step_jerk_mean: float  # the same over every step

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@torch.no_grad()
def run_with_latency(policy, envs, mode: str, delay: int, seed: int = 0, ensemble_m: float = 0.01,
                     generator: torch.Generator | None = None, rtc_max_guidance: float = 5.0,
                     max_steps: int | None = None) -> LatencyResult:
    """One episode per environment of `envs` (a batched vector env) with an inference that takes
    `delay` control steps, executed as `mode` says (see the module docstring); at most `max_steps`
    control steps (default: the env's episode limit)."""
    if mode not in MODES:
        raise InputError(f"mode = {mode!r}: expected one of {MODES}")
    s = policy.config.n_action_steps
    d = 0 if mode == "sync" else int(delay)
    if not 0 <= d <= s:
        raise InputError(f"delay = {delay}: expected 0 <= delay <= n_action_steps = {s}")
    horizon = int(max_steps or getattr(envs, "max_episode_steps", 1000))
    queue = ChunkQueue("ensemble" if mode == "ensemble" else "latest", ensemble_m)
    executed = _box_clip(envs)
    obs, info = envs.reset(seed=seed)
    obs = observe_env(obs, info)  # the instruction, where the env gives one in info["task"]
    e = envs.num_envs
    done = torch.zeros(e, dtype=torch.bool)
    success = torch.zeros(e, dtype=torch.bool)
    queue.add(policy.predict_action_chunk(obs, generator=generator), 0)
    pending: tuple[int, int, Tensor] | None = None  # (ready step, start step, chunk)
    prev, boundary, every = None, [], []
    for step in range(horizon):
        if pending is not None and pending[0] == step:  # the inference launched d steps ago is done
            queue.add(pending[2], pending[1])
            pending = None
        if step % s == s - d and step + d < horizon and d > 0:  # launch the next inference now
            if mode == "rtc":
                chunk = _rtc_chunk(policy, obs, queue.leftover(step), d, generator, rtc_max_guidance)
            else:
                chunk = policy.predict_action_chunk(obs, generator=generator)
            pending = (step + d, step, chunk)
        if d == 0 and step > 0 and step % s == 0:
            queue.add(policy.predict_action_chunk(obs, generator=generator), step)
        action = queue.action(step)
        live = ~done
        action_done = executed(action)  # what the robot does: the env clips to its box
        if prev is not None:
            jump = (action_done - prev).norm(dim=-1)
            every.append(jump[live])
            if step % s == 0:
                boundary.append(jump[live])
        prev = action_done
        obs, _, terminated, truncated, info = envs.step(action)
        obs = observe_env(obs, info)
        ended = torch.as_tensor(terminated | truncated).bool().cpu()
        new = ended & live
        if new.any():
            success |= torch.as_tensor(info["final_info"]["is_success"]).bool().cpu() & new
        done |= ended
        if bool(done.all()):
            break
    b = torch.cat(boundary) if boundary else torch.zeros(1)
    a = torch.cat(every) if every else torch.zeros(1)
    return LatencyResult(mode, d if mode != "sync" else int(delay), float(success.float().mean()), e,
                         float(b.mean()), float(b.max()), float(a.mean()))


def _box_clip(envs):
    """action (e, a) -> the action as the env executes it (on the CPU): clipped to a Box action space's
    bounds, so that jerk counts the motion, not how far outside the box the policy asked to go."""
    space = getattr(envs, "single_action_space", None)
    if not isinstance(space, Box):
        return lambda action: torch.as_tensor(action).cpu().float()
    low, high = torch.as_tensor(space.low, dtype=torch.float32), torch.as_tensor(space.high, dtype=torch.float32)
    return lambda action: torch.maximum(torch.minimum(torch.as_tensor(action).cpu().float(), high), low)


def _rtc_chunk(policy, obs, leftover: Tensor, delay: int, generator, max_guidance: float) -> Tensor:
    from fmpolicy.rtc import sample_chunk_rtc

    return sample_chunk_rtc(policy, obs, leftover, inference_delay=delay, max_guidance_weight=max_guidance,
                            generator=generator)


def summarize(results: list[LatencyResult]) -> str:
    """A table of latency results (one row each)."""
    lines = [f"{'mode':<9} {'delay':>5} {'success':>8} {'boundary jerk mean':>19} {'max':>7} {'step jerk mean':>15}"]
    for r in results:
        lines.append(f"{r.mode:<9} {r.delay:>5} {100 * r.success_rate:>7.1f}% {r.boundary_jerk_mean:>19.4f} "
                     f"{r.boundary_jerk_max:>7.3f} {r.step_jerk_mean:>15.4f}")
    return "\n".join(lines)


__all__ = ["AGGREGATIONS", "MODES", "AsyncChunkRunner", "ChunkQueue", "LatencyResult", "run_with_latency",
           "summarize"]
