"""The one rollout collector shared by FPO and Gaussian PPO, and the vector envs it drives.

A chunk is executed as one **macro-step** of k = n_action_steps env steps. Its reward is the
discounted in-chunk sum sum_j gamma^j r_j; GAE then runs over macro-steps with gamma^k. An env whose
episode ends inside the macro-step stops accumulating (same-step autoreset has already started its
next episode, which plays the rest of the old chunk; those rewards count towards the new episode's
logged return but belong to no macro-step). If it was *truncated* after j <= k steps, the value of
the observation it reached is bootstrapped with the exact discount gamma^j: the collector stores
`final_values = gamma^(j - k) V(final_obs)`, which `compute_gae` multiplies by gamma^k.
k = 1 is the plain per-step setting.

With a delay d (`rl.rollout_delay`) the rollouts execute chunks as an asynchronous deployment with d
control steps of inference latency does ("latest" execution, `fmpolicy.control`): the chunk of
macro-step m is sampled from the observation seen d steps before the macro-step starts (while the
previous chunk's last d steps played on) and runs from its own step d; a new episode's first chunk
is sampled from its first observation and runs from step 0. The critic values the observation each
chunk was sampled from. With a range of delays (`rl.rollout_delay_max`) each env draws the delay of
each next chunk uniformly from it (an inference whose latency varies).

Environments: ours (`fmpolicy_envs`: the tasks' `TorchVectorEnv`s, `TwoOptimaBandit`, `TwoGoalGridWorld`:
torch tensors on the device, dict obs, same-step autoreset; registered when a script imports
`fmpolicy_envs`) are built by their vector entry points and used as they are; any other gymnasium
`VectorEnv` (numpy) is wrapped in `GymVectorAdapter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch import Tensor

from fmpolicy.batch import STATE
from fmpolicy.errors import ConfigError
from fmpolicy.rl import observations


def _obs_to_torch(obs: Any, device: torch.device) -> dict[str, Tensor]:
    if isinstance(obs, dict):
        return {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=device) for k, v in obs.items()}
    return {STATE: torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device)}


class GymVectorAdapter:
    """A gymnasium `VectorEnv` (numpy) seen through our torch contract (docs/envs.md).

    Observations become {"observation.state": (e, s) float32 on `device`} (dict observations keep
    their keys); actions (e, a) in [-1, 1] are clipped and rescaled to the Box bounds; rewards and
    flags become tensors; info carries "final_obs" (a full obs dict: the reached observation where an
    episode ended, the returned one elsewhere), "_final_obs", and "final_info" {"is_success"} when the
    env reports it. The env must use same-step autoreset (`gym.make_vec(...,
    vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP})`).
    """

    def __init__(self, env: gym.vector.VectorEnv, device: torch.device | str = "cpu"):
        mode = env.metadata.get("autoreset_mode")
        if mode != AutoresetMode.SAME_STEP:
            raise ConfigError(f"the vector env uses autoreset_mode {mode!r}: expected AutoresetMode.SAME_STEP "
                              "(gym.make_vec(..., vector_kwargs={'autoreset_mode': AutoresetMode.SAME_STEP}))")
        space = env.single_action_space
        if not isinstance(space, gym.spaces.Box) or not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
            raise ConfigError(f"the env's action space {space} is not a bounded Box: expected finite bounds to rescale to")
        self.env, self.device, self.num_envs = env, torch.device(device), env.num_envs
        self.single_action_space, self.single_observation_space = space, env.single_observation_space
        self.metadata = env.metadata
        self.low = torch.as_tensor(space.low, dtype=torch.float32, device=self.device)
        self.high = torch.as_tensor(space.high, dtype=torch.float32, device=self.device)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return _obs_to_torch(obs, self.device), info

    def step(self, actions: Tensor):
        a = self.low + (actions.to(self.device).clamp(-1.0, 1.0) + 1.0) * 0.5 * (self.high - self.low)
        obs, reward, terminated, truncated, info = self.env.step(a.cpu().numpy())
        done = np.asarray(info.get("_final_obs", np.zeros(self.num_envs, bool)), dtype=bool)
        final_obs = obs if not isinstance(obs, dict) else {k: v.copy() for k, v in obs.items()}
        if done.any():
            final_obs = np.array(final_obs, copy=True) if not isinstance(obs, dict) else final_obs
            for i in np.flatnonzero(done):
                reached = info["final_obs"][i]
                if isinstance(final_obs, dict):
                    for k in final_obs:
                        final_obs[k][i] = reached[k]
                else:
                    final_obs[i] = reached
        out: dict[str, Any] = {"final_obs": _obs_to_torch(final_obs, self.device),
                               "_final_obs": torch.as_tensor(done, device=self.device),
                               "_final_info": torch.as_tensor(done, device=self.device)}
        final_info = info.get("final_info", {})
        if "is_success" in final_info:
            ok = np.asarray(final_info["is_success"], dtype=bool) & np.asarray(final_info.get("_is_success", True))
            out["final_info"] = {"is_success": torch.as_tensor(ok, device=self.device)}
        t = lambda x, dt: torch.as_tensor(np.asarray(x), dtype=dt, device=self.device)  # noqa: E731
        return (_obs_to_torch(obs, self.device), t(reward, torch.float32), t(terminated, torch.bool),
                t(truncated, torch.bool), out)

    def close(self) -> None:
        self.env.close()


def make_vector_env(env_id: str, num_envs: int, device: torch.device, seed: int, kwargs: dict | None = None):
    """`num_envs` copies of `env_id` with same-step autoreset, speaking torch on `device`.

    An id with a `vector_entry_point` (our fmpolicy/... envs, once `fmpolicy_envs` is imported) is
    built by it on `device`; any other id is a gymnasium sync vector env wrapped in `GymVectorAdapter`.
    """
    kwargs = dict(kwargs or {})
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as e:
        hint = " (import fmpolicy_envs first to register the fmpolicy/ tasks)" if env_id.startswith("fmpolicy/") else ""
        raise ConfigError(f"env.id = {env_id!r} is not a registered gymnasium id{hint}: {e}") from None
    if spec.vector_entry_point is not None:
        env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", device=device,
                           seed=seed, **kwargs)
        if env.metadata.get("autoreset_mode") != AutoresetMode.SAME_STEP:
            raise ConfigError(f"{env_id}: its vector env does not use same-step autoreset")
        return env
    env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                       vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, **kwargs)
    return GymVectorAdapter(env, device)


def env_state_dict(env) -> dict | None:
    """What an exact resume needs from an env, or None when it cannot be captured.

    An env with `state_dict()` provides it; our torch envs (an `unwrapped.core` with a torch
    generator) are captured generically: every tensor attribute of the env and of its core, and the
    core generator's state. gymnasium's numpy envs are not captured (resume re-seeds them).
    """
    if hasattr(env, "state_dict"):
        return {"kind": "own", "state": env.state_dict()}
    u = getattr(env, "unwrapped", env)
    core = getattr(u, "core", None)
    if core is None or not isinstance(getattr(core, "generator", None), torch.Generator):
        return None
    tensors = lambda obj: {k: v.clone() for k, v in vars(obj).items() if isinstance(v, Tensor)}  # noqa: E731
    return {"kind": "torch_core", "env": tensors(u), "core": tensors(core), "generator": core.generator.get_state()}


def load_env_state_dict(env, state: dict) -> None:
    if state["kind"] == "own":
        env.load_state_dict(state["state"])
        return
    u = env.unwrapped
    for k, v in state["env"].items():
        setattr(u, k, v.to(u.core.device))
    for k, v in state["core"].items():
        setattr(u.core, k, v.to(u.core.device))
    u.core.generator.set_state(state["generator"])


@dataclass
class Rollout:
    """n macro-steps of e environments (tensors on the device; step-major rows i * e + j where flat)."""

    obs: dict[str, Any]  # the observations as the actor stores them (`actor.storable`), flat: (n * e) rows
    chunks: Tensor  # (n, e, h, a) as the actor returned them (k steps executed: from step 0, or rollout_delay)
    store: dict[str, Tensor]  # (n, e, ...) the actor's per-chunk data (pairs + old losses, or pre-squash + old log-prob)
    executed: Tensor  # (n, e, h) bool: the chunk steps executed in the chunk's own episode (k from its offset, not past its end)
    values: Tensor  # (n, e) V(obs) at rollout time
    rewards: Tensor  # (n, e) discounted in-chunk reward sums
    terminated: Tensor  # (n, e) bool: the episode ended inside the macro-step without a future
    truncated: Tensor  # (n, e) bool: cut by a time limit inside the macro-step (bootstrapped)
    final_values: Tensor  # (n, e) gamma^(j - k) V(reached obs) where truncated after j steps, else 0
    next_value: Tensor  # (e,) V of the observation after the last macro-step
    episode_returns: list[float] = field(default_factory=list)  # undiscounted returns of episodes that ended
    episode_successes: list[float] = field(default_factory=list)  # their successes (when the env reports them)
    action_rate: float | None = None  # mean |a_t - a_(t-1)|^2 of the executed steps (with rl.action_rate_penalty)


class RolloutCollector:
    """Steps `envs` with `actor` chunks for n macro-steps; keeps the current observation between calls.

    Observations come through `fmpolicy.rl.observations.from_env`: the instruction of `info["task"]`
    travels with them, camera images are rounded to uint8. Per macro-step the actor's per-observation
    work (`actor.prepare`: the policy's encoder and prefix cache) runs once and serves the chunk, its old
    CFM losses and the critic.

    An env whose episode ends inside a macro-step (same-step autoreset) plays the macro-step's remaining
    steps from a fresh chunk the actor samples at its new episode's first observation
    (`fresh_chunk_after_reset`, default), as a deployed policy starts every episode; those steps are not
    stored for learning (their rewards still count in the episode statistics). With False it plays the
    old chunk's remaining actions, which start the new episode with actions planned for another one
    (Meta-World pick-place: success 34% -> 11% with the same policy; docs/rl.md, "Episodes that end inside a chunk").

    `delay` d in [0, n_action_steps], or a range (lo, hi) to draw each chunk's d from (with the
    `collect` generator): the inference latency the rollouts simulate (module docstring); the actor's
    chunks must then hold at least n_action_steps + d (+ hi) steps. An episode that ends after its
    env's next observation was taken (in the macro-step's last d steps) makes that observation stale:
    the env's next chunk is then sampled from the macro-step's last observation and runs from step 0.
    """

    def __init__(self, envs, actor, critic, n_action_steps: int, gamma: float, device: torch.device,
                 fresh_chunk_after_reset: bool = True, action_rate_penalty: float = 0.0,
                 delay: int | tuple[int, int] = 0):
        lo, hi = delay if isinstance(delay, tuple) else (delay, delay)
        for name, v, least in (("rollout_delay", lo, 0), ("rollout_delay_max", hi, lo)):
            if isinstance(v, bool) or not isinstance(v, int) or not least <= v <= n_action_steps:
                raise ConfigError(f"rl.{name} = {v!r}: expected an int in [{least}, n_action_steps = {n_action_steps}]")
        self.envs, self.actor, self.critic = envs, actor, critic
        self.delay_range = (lo, hi)
        self.k, self.gamma, self.device = n_action_steps, gamma, torch.device(device)
        self.fresh_chunk_after_reset = fresh_chunk_after_reset
        self.action_rate_penalty = float(action_rate_penalty)
        self.num_envs = envs.num_envs
        self.obs: dict[str, Any] | None = None  # the observation each env's next chunk is sampled from
        self.current: dict[str, Any] | None = None  # the env's latest observation (self.obs when delay = 0)
        self.offset: Tensor | None = None  # (e,) long: the step each env's next chunk starts executing at (0 or d)
        self.running_return = torch.zeros(self.num_envs, device=self.device)
        self.last_action: Tensor | None = None  # (e, a) the previous executed action (clipped), NaN at an episode's start

    def reset(self, seed: int | None) -> None:
        obs, info = self.envs.reset(seed=seed)
        self.obs = observations.from_env(obs, info, self.device, uint8_images=True)
        self.current = self.obs
        self.offset = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self.running_return.zero_()
        self.last_action = None

    def state_dict(self) -> dict[str, Any]:
        return {"obs": self.obs, "current": self.current, "offset": self.offset,
                "running_return": self.running_return, "last_action": self.last_action,
                "env": env_state_dict(self.envs)}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore the collector (and the env when it was captured). Returns False when the env could
        not be restored, so that the caller re-seeds and resets it."""
        if state.get("env") is None:
            return False
        load_env_state_dict(self.envs, state["env"])
        self.obs = observations.to_device(state["obs"], self.device)
        current, offset = state.get("current"), state.get("offset")  # absent in checkpoints before rollout_delay
        self.current = self.obs if current is None else observations.to_device(current, self.device)
        self.offset = (torch.zeros(self.num_envs, dtype=torch.long, device=self.device) if offset is None
                       else offset.to(self.device))
        self.running_return = state["running_return"].to(self.device)
        last = state.get("last_action")
        self.last_action = None if last is None else last.to(self.device)
        return True

    def _action_rate(self, action: Tensor, done: Tensor) -> Tensor:
        """(e,) |a - a_prev|^2 of this step's executed (clipped) actions against the previous step's of
        the same episode (0 at an episode's first step); remembers `action`, or NaN where the episode
        ended (`done`): the env's next step begins a new one."""
        a = action.detach().to(self.device).float().clamp(-1.0, 1.0)
        prev = self.last_action
        rate = torch.zeros(a.shape[0], device=self.device) if prev is None else torch.nan_to_num(
            (a - prev).square().sum(-1), nan=0.0)
        self.last_action = torch.where(done[:, None], float("nan"), a)
        return rate

    def value(self, obs: dict[str, Any]) -> tuple[dict[str, Any], Any, Tensor]:
        """(obs as stored, the actor's inputs for it, V(obs) (e,))."""
        stored = self.actor.storable(obs)
        inputs = self.actor.prepare(stored)
        return stored, inputs, self.critic(stored, self.actor.critic_features(inputs))

    def _replan(self, plan: Tensor, obs: dict[str, Any], done: Tensor, j: int, generator) -> Tensor:
        """`plan` with steps j.. of the `done` envs replaced by a fresh chunk sampled at `obs` (their new
        episodes' first observations)."""
        idx = torch.nonzero(done).squeeze(1)
        fresh, _ = self.actor.act(self.actor.storable(observations.take(obs, idx)), generator)
        plan = plan.clone()
        plan[idx, j:] = fresh[:, :plan.shape[1] - j].to(plan.dtype)
        return plan

    @torch.no_grad()
    def collect(self, num_macro_steps: int, generator: torch.Generator | None) -> Rollout:
        """Run n = `num_macro_steps` macro-steps in every env; returns the stacked `Rollout`."""
        if self.obs is None:
            raise RuntimeError("RolloutCollector.collect before reset(seed)")
        e, k, gamma = self.num_envs, self.k, self.gamma
        lo, d = self.delay_range  # d: the longest delay, what the chunks must hold beyond k
        steps_k = torch.arange(k, device=self.device)
        names = ("chunks", "store", "executed", "values", "rewards", "terminated", "truncated", "final_values")
        buf: dict[str, list] = {name: [] for name in names}
        stored_obs: list[dict[str, Any]] = []
        ep_returns: list[float] = []
        ep_successes: list[float] = []
        action_rates: list[Tensor] = []
        for _ in range(num_macro_steps):
            obs, inputs, value = self.value(self.obs)
            chunk, store = self.actor.act(obs, generator, inputs)  # (e, h, a)
            if chunk.shape[0] != e or chunk.shape[1] < k + d:
                raise RuntimeError(f"the actor returned chunks of shape {tuple(chunk.shape)}: expected ({e}, >= {k + d}, a) "
                                   f"(n_action_steps {k} + rollout_delay {d})")
            offset = self.offset  # where each env's chunk starts (always 0 without a delay)
            if d:  # each env's delay for its next chunk: where in this macro-step its observation is taken
                delay = (torch.full((e,), lo, dtype=torch.long, device=self.device) if lo == d else
                         torch.randint(lo, d + 1, (e,), generator=generator,
                                       device=generator.device if generator is not None else self.device).to(self.device))
                take_at = k - delay  # the observation before this step of the macro-step
            reward = torch.zeros(e, device=self.device)
            active = torch.ones(e, dtype=torch.bool, device=self.device)  # still in the episode the chunk began in
            terminated, truncated = torch.zeros_like(active), torch.zeros_like(active)
            steps_done = torch.full((e,), k, dtype=torch.long, device=self.device)  # j: steps until the episode ended
            final_obs = self.current
            next_obs = self.current
            # the actions each env plays in this macro-step: the chunk's steps offset .. offset + k - 1
            plan = chunk[:, :k] if not d else chunk.gather(1, (offset[:, None] + steps_k)[:, :, None].expand(
                -1, -1, chunk.shape[2]))
            decision = self.current  # with a delay: the observation the next chunk is sampled from ...
            stale = torch.zeros_like(active)  # ... unless an episode ended after it was taken
            for j in range(k):
                env_obs, r, term, trunc, info = self.envs.step(plan[:, j])
                next_obs = observations.from_env(env_obs, info, self.device, uint8_images=True)
                r, term, trunc = r.to(self.device).float(), term.to(self.device), trunc.to(self.device)
                done = term | trunc
                if d:
                    stale |= done & (j >= take_at)
                learn_r = r
                if self.action_rate_penalty:
                    rate = self._action_rate(plan[:, j], done)
                    learn_r = r - self.action_rate_penalty * rate
                    action_rates.append(rate)
                reward += active * (gamma**j) * learn_r
                ended = done & active
                terminated |= term & active
                truncated |= trunc & ~term & active
                steps_done = torch.where(ended, j + 1, steps_done)
                if bool(ended.any()):
                    final_obs = observations.final_from_env(info["final_obs"], info, final_obs, ended,
                                                            self.device, uint8_images=True)
                # episode statistics: every env (one may finish a second, short episode inside the chunk)
                self.running_return += r
                if bool(done.any()):
                    ep_returns += self.running_return[done].tolist()
                    success = info.get("final_info", {}).get("is_success")
                    if success is not None:
                        ep_successes += torch.as_tensor(success, device=self.device)[done].float().tolist()
                self.running_return = torch.where(done, 0.0, self.running_return)
                active &= ~done
                if self.fresh_chunk_after_reset and j < k - 1 and bool(done.any()):
                    plan = self._replan(plan, next_obs, done, j + 1, generator)
                if d and bool((take_at == j + 1).any()):  # seen `delay` steps before the macro-step ends
                    decision = observations.where(take_at == j + 1, next_obs, decision)
            self.current = next_obs
            if d:
                self.obs = observations.where(stale, next_obs, decision)
                self.offset = torch.where(stale, 0, delay)
            else:
                self.obs = next_obs
            steps = torch.arange(chunk.shape[1], device=self.device)[None, :]
            executed = (steps >= offset[:, None]) & (steps < (offset + steps_done)[:, None])  # (e, h)
            # V(reached obs) with the exact discount of a truncation after j steps (see the module doc);
            # the policy's encoder runs on the reached observations only when an episode was truncated
            final_value = torch.zeros(e, device=self.device)
            if bool(truncated.any()):
                reached_value = self.value(final_obs)[2]
                final_value = torch.where(truncated, reached_value * gamma ** (steps_done - k).float(), 0.0)
            stored_obs.append(obs)
            for name, v in zip(names, (chunk, store, executed, value, reward, terminated, truncated, final_value)):
                buf[name].append(v)

        stack = lambda items: {key: torch.stack([d[key] for d in items]) for key in items[0]}  # noqa: E731
        return Rollout(obs=observations.stack(stored_obs), chunks=torch.stack(buf["chunks"]),
                       store=stack(buf["store"]), executed=torch.stack(buf["executed"]),
                       values=torch.stack(buf["values"]), rewards=torch.stack(buf["rewards"]),
                       terminated=torch.stack(buf["terminated"]), truncated=torch.stack(buf["truncated"]),
                       final_values=torch.stack(buf["final_values"]), next_value=self.value(self.obs)[2],
                       episode_returns=ep_returns, episode_successes=ep_successes,
                       action_rate=float(torch.cat(action_rates).mean()) if action_rates else None)
