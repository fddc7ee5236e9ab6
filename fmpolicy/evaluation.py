"""Closed-loop evaluation of a chunk policy in a vectorized environment.

Works with any `gymnasium.vector.VectorEnv` whose observations are dicts of batched arrays under the
policy's keys and which resets in the same step (`AutoresetMode.SAME_STEP`, as our torch vector envs
do): the outcome of an ending episode is read from `info["final_info"][success_key]`. Any other
gymnasium id gets there through `fmpolicy.gym_adapter.make_vector_env` (flat observations mapped to
`observation.state`, float32). Every environment's *first*
episode counts; all environments re-plan together every `n_action_steps` steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from fmpolicy.batch import STATE
from fmpolicy.config import SamplerConfig
from fmpolicy.errors import InputError


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a binomial proportion: sound at 0% and 100% too."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class EvalResult:
    """Outcome of `evaluate_policy`."""

    episodes: int
    successes: int
    success_rate: float
    ci95: tuple[float, float]
    mean_return: float
    mean_length: float
    flags: dict[str, float] = field(default_factory=dict)  # fraction of episodes with a task flag (collision...)
    states: list[np.ndarray] = field(default_factory=list)  # state trajectories (T, s) of the recorded episodes
    frames: list[np.ndarray] = field(default_factory=list)  # (T, e_rec, 3, H, W) uint8 frames, when rendered
    final_states: np.ndarray | None = None  # (episodes, s) the state each episode ended in
    paths: np.ndarray | None = None  # (episodes, T, s) every state of each episode, NaN after its end
    tasks: list[str] = field(default_factory=list)  # the instruction the policy was given, per episode
    return_std: float = 0.0  # standard deviation of the episode returns
    success_reported: bool = True  # False when the env never reported is_success (then successes count 0)
    episode_success: list[bool] = field(default_factory=list)  # per episode, in the order of `tasks`
    # a FlowPolicy's evaluation: per state entry, the largest |normalized state| the policy was given (how
    # many of its imitation data's standard deviations out: fmpolicy.normalize.far_state_warning); else None
    state_z_max: list[float] | None = None

    def success_by_task(self) -> dict[str, dict[str, Any]]:
        """Per instruction (multi-task envs): episodes, successes, rate and Wilson 95% interval."""
        out: dict[str, dict[str, Any]] = {}
        for task, ok in zip(self.tasks, self.episode_success):
            row = out.setdefault(task, {"episodes": 0, "successes": 0})
            row["episodes"] += 1
            row["successes"] += int(ok)
        for row in out.values():
            row["success_rate"] = row["successes"] / row["episodes"]
            row["ci95"] = list(wilson_interval(row["successes"], row["episodes"]))
        return out

    def summary(self) -> dict[str, Any]:
        return {"episodes": self.episodes, "successes": self.successes, "success_rate": self.success_rate,
                "ci95": list(self.ci95), "mean_return": self.mean_return, "mean_length": self.mean_length,
                **{f"{k}_rate": v for k, v in self.flags.items()},
                **({} if self.state_z_max is None else {"state_z_max": self.state_z_max})}


def round_seed(seed: int, rnd: int) -> int:
    """The reset seed of `evaluate_policy`'s round `rnd` (its envs' episodes start from it)."""
    return seed + 1000 * rnd


@torch.no_grad()
def parse_sampler(text: str, policy) -> SamplerConfig:
    """`--sampler METHOD[:STEPS]` (scripts/evaluate.py, trace_metaworld.py) -> the policy's own sampler with
    that method (and step count; default the policy's own)."""
    if policy.config.head != "flow":
        raise InputError(f"--sampler = {text!r}: policy.head = {policy.config.head!r} samples nothing "
                         "(expected a flow policy)")
    method, _, steps = text.partition(":")
    try:
        num_steps = int(steps) if steps else policy.config.sampler.num_steps
    except ValueError:
        raise InputError(f"--sampler = {text!r}: steps {steps!r} are not an int (expected METHOD[:STEPS], "
                         "e.g. euler:30)") from None
    return dataclasses.replace(policy.config.sampler, method=method, num_steps=num_steps)


def evaluate_policy(policy, envs, episodes: int, seed: int = 0, record: int = 0,
                    render_size: int = 0, generator: torch.Generator | None = None,
                    flag_keys: tuple[str, ...] = ("collision",), embodiment: str | None = None,
                    task_map: Callable[[list[str]], list[str]] | None = None,
                    act: Callable[[dict], Tensor] | None = None, n_action_steps: int | None = None,
                    uint8_images: bool = False, max_env_steps: int | None = None,
                    success_key: str = "is_success", zero_noise: bool = False,
                    inference_delay: int = 0, sampler: SamplerConfig | None = None) -> EvalResult:
    """Run `episodes` episodes (in rounds of `envs.num_envs`) and count successes.

    `record` environments of the first round keep their state trajectories (and, with
    `render_size`, frames from `envs.unwrapped.core.render`) for plots. `embodiment` names the robot
    for a policy that serves several. `task_map` rewrites the instructions before the policy reads
    them (e.g. swap "red" and "blue" to test that the policy follows the words).

    The one evaluation loop of the package: imitation (`scripts/evaluate.py`, the pipeline) passes a
    `FlowPolicy`; RL (`fmpolicy.rl.evaluate`) passes `act` (observation -> chunk (e, h, a), e.g. an
    actor's zero-noise chunks) with `n_action_steps`, `uint8_images=True` (its policy sees images as
    in its rollouts) and `max_env_steps` (an error, not a silent stop, when episodes outlast it; by
    default a round ends after the env's `max_episode_steps`, or 1000). `success_key`: the entry of
    `info["final_info"]` that says an episode succeeded. Frames are recorded only from envs with a
    batched renderer (`envs.unwrapped.core.render`); others evaluate without them. `zero_noise`: a
    `FlowPolicy` samples every chunk from initial noise 0 (the flow's deterministic chunk, as RL's
    evaluations do) instead of random noise from `generator`. `n_action_steps` with a `FlowPolicy`:
    execute that many steps of each chunk instead of the policy's own (re-plan more or less often).
    With a `FlowPolicy` (its `state_z`) the result holds `state_z_max`, per state entry the largest
    |normalized state| the policy was given.
    `inference_delay` d in [0, n_action_steps]: execute as an asynchronous deployment whose inference
    takes d control steps ("latest" execution, `fmpolicy.control.run_with_latency`): each chunk after an
    episode's first is sampled from the observation d steps before the previous one runs out and runs
    from its own step d (so chunk_size >= n_action_steps + d); the first runs from step 0.
    `sampler` with a `FlowPolicy`: integrate with this method and step count instead of the policy's own
    (e.g. more Euler steps than it was trained to use).
    """
    if act is None:
        policy.eval()
        n_exec = policy.config.n_action_steps
        if n_action_steps is not None:  # another execution horizon than the policy's own
            h = policy.config.chunk_size
            if isinstance(n_action_steps, bool) or not isinstance(n_action_steps, int) or not 1 <= n_action_steps <= h:
                raise InputError(f"n_action_steps = {n_action_steps!r}: expected an int in [1, chunk_size = {h}] "
                                 "(the chunk steps executed before the next chunk is sampled)")
            n_exec = n_action_steps

        z_max: Tensor | None = None  # per state entry, the largest |normalized state| given so far
        state_z = getattr(policy, "state_z", None)  # a FlowPolicy's; other policy objects may lack it
        kwargs = {} if sampler is None else {"sampler": sampler}  # policy objects without the argument still work

        def act(query):
            nonlocal z_max
            if embodiment is not None:
                query = {**query, "embodiment": embodiment}
            if state_z is not None:
                z = state_z(query)[:query[STATE].shape[-1]].cpu()
                z_max = z if z_max is None else torch.maximum(z_max, z)
            if zero_noise:
                return policy.predict_action_chunk(query, noise=policy.zero_noise(e), **kwargs)
            return policy.predict_action_chunk(query, generator=generator, **kwargs)
    else:
        z_max = None
        if n_action_steps is None:
            raise ValueError("evaluate_policy(act=...) needs n_action_steps")
        if zero_noise:
            raise ValueError("evaluate_policy(act=..., zero_noise=True): `act` chooses its own noise")
        if sampler is not None:
            raise ValueError("evaluate_policy(act=..., sampler=...): `act` samples its own chunks")
        n_exec = n_action_steps
    d = inference_delay
    if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= n_exec:
        raise InputError(f"inference_delay = {d!r}: expected an int in [0, n_action_steps = {n_exec}] "
                         "(the control steps an inference takes)")
    e = envs.num_envs
    horizon = int(max_env_steps or getattr(envs, "max_episode_steps", 1000))
    succ, rets, lens, flag_counts = [], [], [], {}
    states: list[np.ndarray] = []
    frames: list[np.ndarray] = []
    seen_flags: dict[str, bool] = {}
    finals: list[Tensor] = []
    paths: list[np.ndarray] = []
    tasks: list[str] = []
    reported = False
    rnd = 0
    while len(succ) < episodes:
        obs, info = envs.reset(seed=round_seed(seed, rnd))
        obs = observe_env(obs, info, task_map, uint8_images)
        given = list(obs.get("task", []))
        final_state = torch.as_tensor(_state(obs))
        path = [_state(obs)]
        take = min(e, episodes - len(succ))
        done = torch.zeros(e, dtype=torch.bool)
        success = torch.zeros(e, dtype=torch.bool)
        ret, length = torch.zeros(e), torch.zeros(e)
        flagged = {k: torch.zeros(e, dtype=torch.bool) for k in flag_keys}
        trace = [_state(obs)[:record]] if rnd == 0 and record else None
        film = ([_render(envs, render_size, record)] if trace is not None and render_size and _can_render(envs)
                else None)
        chunk, pending, start = None, None, 0
        for step in range(horizon):
            if step == 0 or (step % n_exec == 0 and not d):
                chunk, start = act(obs), step  # synchronous: sampled now, run from its step 0
            elif step % n_exec == 0:
                chunk, start = pending, step - d  # sampled d steps ago: runs from its step d
            if d and step % n_exec == (n_exec - d) % n_exec:
                pending = act(obs)  # the inference that delivers the next chunk d steps from now
            if step - start >= chunk.shape[1]:
                raise InputError(f"inference_delay = {d}: the chunks hold {chunk.shape[1]} steps, fewer than "
                                 f"n_action_steps + inference_delay = {n_exec + d}")
            action = chunk[:, step - start]
            obs, reward, terminated, truncated, info = envs.step(action.to(_device(obs)))
            reached = info.get("final_obs", obs)  # the state this step reached (obs is already reset where it ended)
            obs = observe_env(obs, info, task_map, uint8_images)
            live = ~done
            ret += torch.as_tensor(reward).float().cpu() * live
            length += live.float()
            for k in flag_keys:
                if k in info:
                    seen_flags[k] = True
                    flagged[k] |= torch.as_tensor(info[k]).bool().cpu() & live
            ended = ended_now(info, terminated, truncated)
            new = ended & live
            final_state = torch.where(new[:, None], torch.as_tensor(_state(reached)), final_state)
            path.append(np.where(live[:, None].numpy(), _state(reached), np.nan))
            if new.any():
                final_info = info.get("final_info", {})
                if success_key in final_info:
                    reported = True
                    success |= torch.as_tensor(final_info[success_key]).bool().cpu() & new
                for k in flag_keys:  # a flag raised on the step that ended the episode (a crash)
                    if k in final_info:
                        seen_flags[k] = True
                        flagged[k] |= torch.as_tensor(final_info[k]).bool().cpu() & new
            if trace is not None:
                trace.append(np.where(done[:record, None].numpy(), np.nan, _state(reached)[:record]))
                if film is not None:
                    film.append(_render(envs, render_size, record))
            done |= ended
            if bool(done[:take].all()):
                break
        if max_env_steps is not None and not bool(done[:take].all()):
            raise RuntimeError(f"evaluation: {int((~done[:take]).sum())} of {take} episodes still running after "
                               f"{max_env_steps} env steps (an env without a time limit?)")
        succ += success[:take].tolist()
        finals.append(final_state[:take])
        paths.append(np.stack(path, axis=1)[:take])
        tasks += given[:take]
        rets += ret[:take].tolist()
        lens += length[:take].tolist()
        for k in flag_keys:
            if seen_flags.get(k):
                flag_counts[k] = flag_counts.get(k, 0) + int(flagged[k][:take].sum())
        if trace is not None:
            arr = np.stack(trace, axis=1)  # (record, T, s)
            states = [a[~np.isnan(a).any(-1)] for a in arr]
        if film is not None:
            frames = np.stack(film)
        rnd += 1
    n, k = len(succ), int(sum(succ))
    return EvalResult(episodes=n, successes=k, success_rate=k / n, ci95=wilson_interval(k, n),
                      mean_return=float(np.mean(rets)), mean_length=float(np.mean(lens)),
                      flags={key: c / n for key, c in flag_counts.items()}, states=states, frames=frames,
                      final_states=torch.cat(finals).numpy(), paths=_concat_paths(paths), tasks=tasks,
                      return_std=float(np.std(rets)), success_reported=reported, episode_success=list(succ),
                      state_z_max=None if z_max is None else [float(v) for v in z_max])


def observe_env(obs, info, task_map=None, uint8_images: bool = False) -> dict:
    """An env's observation as the policy reads it. Environments that name their goal in words put the
    instruction in info["task"]; the policy reads obs["task"] (`task_map` rewrites it). `uint8_images`:
    camera images rounded to uint8, as RL's rollouts give them (fmpolicy.rl.observations.from_env)."""
    if uint8_images:
        from fmpolicy.rl.observations import from_env

        obs = from_env(obs, info, _device(obs), uint8_images=True)
    elif isinstance(info, dict) and "task" in info:
        obs = {**obs, "task": list(info["task"])}
    if task_map is not None and "task" in obs:
        obs = {**obs, "task": task_map(list(obs["task"]))}
    return obs


def _concat_paths(paths: list[np.ndarray]) -> np.ndarray:
    """Rounds may differ in length: pad each (e, T, s) with NaN to the longest T, then stack."""
    longest = max(p.shape[1] for p in paths)
    return np.concatenate([np.pad(p, ((0, 0), (0, longest - p.shape[1]), (0, 0)), constant_values=np.nan)
                           for p in paths])


def ended_now(info, terminated, truncated) -> Tensor:
    """(e,) bool: the environments whose episode ended in this step."""
    if isinstance(info, dict) and "_final_info" in info:
        return torch.as_tensor(info["_final_info"]).bool().cpu()
    return (torch.as_tensor(terminated) | torch.as_tensor(truncated)).bool().cpu()


def _state(obs) -> np.ndarray:
    return torch.as_tensor(obs["observation.state"]).float().cpu().numpy()


def _device(obs) -> torch.device:
    s = obs["observation.state"]
    return s.device if isinstance(s, Tensor) else torch.device("cpu")


def _can_render(envs) -> bool:
    return callable(getattr(getattr(getattr(envs, "unwrapped", envs), "core", None), "render", None))


def _render(envs, size: int, record: int) -> np.ndarray:
    img = envs.unwrapped.core.render(size)[:record]  # (record, 3, H, W) float in [0, 1]
    return (img.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
