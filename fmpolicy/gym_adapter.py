"""Any gymnasium environment behind the contract our tools read (`collect`, `evaluate_policy`,
scripts/collect_demos.py, scripts/evaluate.py): a vector env with same-step autoreset whose
observations are dicts of torch tensors under LeRobot's keys and whose info carries `is_success`.

Our own ids (fmpolicy_envs: PointObstacle, ..., MetaWorld) already speak it through their
`vector_entry_point`; `make_vector_env` builds those directly and wraps every other id (a gymnasium
`SyncVectorEnv` / `AsyncVectorEnv` with `AutoresetMode.SAME_STEP`) in `DictObsVectorEnv`, which maps

- a flat Box observation to `observation.state`, or dict entries by a declared `obs_map`
  ({env key: our key}, e.g. {"pixels": "observation.images.top", "agent_pos": "observation.state"});
- float64 (or any other float) states to **float32**, explicitly: the policy and LeRobot datasets are
  float32, and a silent cast would hide that values beyond ~1e7 lose integer precision;
- images given as uint8 (H, W, 3) to (3, H, W) float32 in [0, 1] (our camera convention);
- `info[success_key]` (e.g. Meta-World's "success", many tasks' "is_success") to `info["is_success"]`
  and `info["final_info"]["is_success"]` (bool).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

STATE_KEY = "observation.state"
IMAGE_PREFIX = "observation.images."


def _to_state(x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.reshape(t.shape[0], -1).to(torch.float32)  # (e, ...) float64 -> (e, s) float32: explicit


def _to_image(x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
        t = t[..., :3].permute(0, 3, 1, 2)  # (e, H, W, C) -> (e, 3, H, W)
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()


class DictObsVectorEnv:
    """Wraps a gymnasium vector env (same-step autoreset) so that its observations, rewards and flags
    are torch tensors under our keys and its success flag is `is_success`. Everything else
    (`num_envs`, `single_action_space`, `metadata`, `close`, ...) passes through to the wrapped env."""

    def __init__(self, envs: Any, success_key: str = "is_success", obs_map: Mapping[str, str] | None = None):
        mode = getattr(envs, "metadata", {}).get("autoreset_mode")
        if mode is not None and str(getattr(mode, "value", mode)) != "SameStep":
            raise ValueError(f"autoreset_mode = {mode!r} is invalid: expected AutoresetMode.SAME_STEP "
                             "(make the vector env with vector_kwargs={'autoreset_mode': AutoresetMode.SAME_STEP})")
        self.envs, self.success_key, self.obs_map = envs, success_key, dict(obs_map or {})
        self.num_envs = envs.num_envs
        self.max_episode_steps = getattr(envs, "max_episode_steps", None) or _spec_steps(envs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.envs, name)

    @property
    def single_observation_space(self) -> Any:
        """The observation space under our keys: `observation.state` a flat float32 Box, cameras
        (3, H, W) float32 Boxes in [0, 1] (what `observe` returns)."""
        from gymnasium import spaces

        raw = self.envs.single_observation_space

        def mapped(space: Any, key: str) -> Any:
            if key == STATE_KEY:
                return spaces.Box(-np.inf, np.inf, (int(np.prod(space.shape)),), np.float32)
            shape = space.shape
            if len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4):
                shape = (3, shape[0], shape[1])
            return spaces.Box(0.0, 1.0, (3, *shape[1:]), np.float32)

        if not isinstance(raw, spaces.Dict):
            return spaces.Dict({STATE_KEY: mapped(raw, STATE_KEY)})
        if not self.obs_map:
            return raw
        return spaces.Dict({dst: mapped(raw[src], dst) for src, dst in self.obs_map.items()})

    @property
    def unwrapped(self) -> Any:
        return self

    def observe(self, obs: Any) -> dict[str, torch.Tensor]:
        if not isinstance(obs, Mapping):
            return {STATE_KEY: _to_state(obs)}
        if not self.obs_map:
            if STATE_KEY not in obs:
                raise KeyError(f"observation keys {sorted(obs)} lack {STATE_KEY!r}: declare obs_map "
                               f"({{env key: our key}}, e.g. {{'agent_pos': {STATE_KEY!r}}})")
            return {k: _to_state(v) if k == STATE_KEY else _to_image(v) if k.startswith(IMAGE_PREFIX) else v
                    for k, v in obs.items()}
        out = {}
        for src, dst in self.obs_map.items():
            if src not in obs:
                raise KeyError(f"obs_map names {src!r}, but the observation has {sorted(obs)}")
            out[dst] = _to_state(obs[src]) if dst == STATE_KEY else _to_image(obs[src])
        return out

    def _success(self, info: Mapping[str, Any]) -> torch.Tensor:
        if self.success_key in info:
            return torch.as_tensor(np.asarray(info[self.success_key])).bool().reshape(self.num_envs)
        return torch.zeros(self.num_envs, dtype=torch.bool)

    def _info(self, info: Mapping[str, Any]) -> dict[str, Any]:
        info = dict(info)
        info["is_success"] = self._success(info)
        return info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.envs.reset(seed=seed, options=options)
        return self.observe(obs), self._info(info)

    def step(self, actions: Any):
        if isinstance(actions, torch.Tensor):
            actions = actions.detach().cpu().numpy()
        obs, reward, terminated, truncated, raw = self.envs.step(actions)
        info = self._info(raw)
        done = np.asarray(terminated) | np.asarray(truncated)
        final_info = dict(raw.get("final_info", {}))
        if self.success_key not in final_info and done.any() and self.success_key in raw:
            raise KeyError(f"info['final_info'] lacks {self.success_key!r}: is the vector env's autoreset "
                           "mode SAME_STEP?")
        final_info["is_success"] = self._success(final_info) & torch.as_tensor(done)
        info["final_info"] = final_info
        info["_final_info"] = torch.as_tensor(done)
        if "final_obs" in info:
            final_obs = info["final_obs"]
            if isinstance(final_obs, np.ndarray) and final_obs.dtype == object:  # per env, None where not done
                final_obs = [o if o is not None else c for o, c in zip(final_obs, _split(obs, self.num_envs))]
                final_obs = _merge(final_obs)
            info["final_obs"] = self.observe(final_obs)
        return (self.observe(obs), torch.as_tensor(np.asarray(reward)).float(), torch.as_tensor(np.asarray(terminated)),
                torch.as_tensor(np.asarray(truncated)), info)


def _split(obs: Any, n: int) -> list[Any]:
    if isinstance(obs, Mapping):
        return [{k: v[i] for k, v in obs.items()} for i in range(n)]
    return [obs[i] for i in range(n)]


def _merge(items: list[Any]) -> Any:
    if isinstance(items[0], Mapping):
        return {k: np.stack([np.asarray(o[k]) for o in items]) for k in items[0]}
    return np.stack([np.asarray(o) for o in items])


def _spec_steps(envs: Any) -> int | None:
    spec = getattr(envs, "spec", None)
    return getattr(spec, "max_episode_steps", None) if spec is not None else None


def make_vector_env(env_id: str, num_envs: int, *, seed: int | None = None, device: str = "cpu",
                    kwargs: Mapping[str, Any] | None = None, success_key: str = "is_success",
                    obs_map: Mapping[str, str] | None = None, vectorization: str = "sync") -> Any:
    """A vector env of any registered id in our contract: the id's own `vector_entry_point` when it has
    one (our environments: torch tensors, same-step autoreset), else gymnasium's sync (in-process) or
    async (one process per env) vector env wrapped by `DictObsVectorEnv`."""
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode

    # fmpolicy never imports fmpolicy_envs (tests/test_envs.py): the scripts import it to register our ids
    if env_id not in gym.registry:
        raise ValueError(f"env id {env_id!r} is not registered with gymnasium (import its package first, "
                         "e.g. fmpolicy_envs for ours)")
    kwargs = dict(kwargs or {})
    spec = gym.registry[env_id]
    if spec.vector_entry_point is not None:
        envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", device=device,
                            seed=seed, **kwargs)
        if success_key != "is_success" or obs_map:
            return DictObsVectorEnv(envs, success_key, obs_map)
        return envs
    if vectorization not in ("sync", "async"):
        raise ValueError(f"vectorization = {vectorization!r} is invalid: expected 'sync' or 'async'")
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=vectorization,
                        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, **kwargs)
    return DictObsVectorEnv(envs, success_key, obs_map)


def env_fps(envs: Any, fps: float | None = None, flag: str = "--fps") -> float:
    """The recording frequency: `fps` when given, else the env's `metadata["render_fps"]`; an env that
    states neither is an error naming the flag (a dataset's timestamps are frame_index / fps)."""
    if fps is not None:
        return float(fps)
    meta = getattr(envs, "metadata", None) or {}
    value = meta.get("render_fps")
    if value is None:  # gymnasium vector envs keep the single env's metadata apart
        single = getattr(envs, "single_metadata", None) or getattr(getattr(envs, "envs", None), "metadata", None) or {}
        value = single.get("render_fps") if isinstance(single, Mapping) else None
    if value is None or not np.isfinite(value) or value <= 0:
        raise ValueError(f"the environment states no frame rate (metadata['render_fps'] = {value!r}): pass {flag} "
                         "with the control frequency in Hz")
    return float(value)
