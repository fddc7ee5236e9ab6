"""Meta-World (PyPI `metaworld` 3.1.x, MuJoCo) behind our environment contract: dict observations with
LeRobot's keys, the instruction in `info["task"]`, success as `info["is_success"]`, goal variations
fixed by an integer seed, and a same-step-autoreset vector env that `fmpolicy.evaluation.evaluate_policy`
and `fmpolicy.data.collect` drive unchanged. See docs/benchmarks/metaworld.md.

Registered ids (importing `fmpolicy_envs` registers them; this module and `metaworld` are imported
only when one is made): `fmpolicy/MetaWorld-v0` (`gymnasium.make(..., task="reach")` or
`tasks=[...]` / `tasks="mt10"`; `gymnasium.make_vec(..., vectorization_mode="vector_entry_point")` gives
`MetaWorldVectorEnv`).

## Goal variations: one integer per episode, a split by range
Meta-World draws the object and goal positions of an episode (its `rand_vec`) from a random stream,
and `reset()` on the same env with the same seed draws a *different* goal: only a fresh env reproduces
one. Here every episode has a **variation** v, an int: the positions are drawn from
`numpy.random.default_rng(v)` (rejection loops of the task included), so the same v gives the same goal
on any env instance, in any order, and the task of a multi-task env is `tasks[v % len(tasks)]`.
`reset(seed=v)` plays variation v; `reset()` plays the previous variation + `variation_stride`
(1 for one env; the vector env uses `num_envs`, so env i of `reset(seed=s)` plays s + i, s + i + e, ...:
every episode of a run has a distinct variation in [s, s + episodes run)).
**Split**: variations in [0, 10_000) are for demonstrations and training (`DEMO_VARIATIONS`), those
>= 10_000 are held out for evaluation (`EVAL_VARIATION_START`, the default `--seed` of
scripts/evaluate.py). A demonstration run with `--seed 0` and fewer than 10_000 episodes stays inside
its range.

## Observation (a `spaces.Dict`)
- `"observation.state"`: float32. `state="proprio"` (default): hand xyz + gripper opening (4), what a
  real robot measures; `state="full"`: Meta-World's 39-d vector (hand, gripper, objects' poses, the
  previous frame of those, the goal position); `state="full_relative"`: those 39, then goal - hand,
  object - hand and goal - object (48: the offsets a policy must drive to zero, given as inputs, so
  that an unseen goal is a familiar offset; docs/benchmarks/metaworld.md, Prove-it 1). Meta-World returns
  float64; the cast to float32 is ours and explicit (positions are within +-2 m: float32 keeps them to ~1e-7 m).
- `"observation.environment_state"` with `environment_state=True`: the full 39-d vector as float32 whatever
  `state` is (LeRobot's key for privileged simulator state): for training-time targets and analysis.
- `"observation.images.<camera>"` for each of `cameras`: (3, N, N) float32 in [0, 1], N = `image_size`,
  rendered by `mujoco.Renderer` with shadows and reflections off (the default 4096 shadow map costs
  most of a frame); cameras whose up axis points down in the world (Meta-World's `corner` cameras)
  are turned 180 degrees so that the image is the right way up.
Actions: Box(-1, 1, (4,)) float32 (hand xyz velocity, gripper effort), clipped.

## Info
`"task"`: the instruction (INSTRUCTIONS, one short sentence per task; Meta-World has no language),
`"task_name"`: Meta-World's name, `"variation"`: the episode's variation, `"is_success"`: bool from
Meta-World's `info["success"]` (kept too, with its other entries). `terminate_on_success=True` (default)
ends the episode at the first success (`terminated`), or `steps_after_success` steps after it (a
demonstration that goes on to hold the goal: `"is_success"` then stays True from the first success on);
otherwise only the time limit ends it (`truncated` after `max_episode_steps`, 500 as Meta-World).
"""

from __future__ import annotations

import atexit
import os
import weakref

# mujoco reads MUJOCO_GL when it is first imported: headless machines need EGL (or OSMesa) to render.
os.environ.setdefault("MUJOCO_GL", "egl")

from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gymnasium import spaces  # noqa: E402
from gymnasium.vector import AutoresetMode  # noqa: E402
from gymnasium.vector.utils import batch_space  # noqa: E402

STATE_KEY = "observation.state"
ENV_STATE_KEY = "observation.environment_state"  # LeRobot's key for privileged simulator state
IMAGE_PREFIX = "observation.images."

MT10 = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3")
# one short instruction per task (Meta-World has none); tasks outside MT10 get "<name with spaces>"
INSTRUCTIONS = {
    "reach-v3": "reach the red goal with the gripper",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
TASK_SETS = {"mt10": MT10}
REWARDS = ("dense", "success")  # MetaWorldEnv(reward=...)
DEMO_VARIATIONS = range(0, 10_000)  # goal variations for demonstrations / training
EVAL_VARIATION_START = 10_000  # variations >= this are held out for evaluation
STATE_MODES = {"proprio": 4, "full": 39, "full_relative": 48}
HAND, OBJECT, GOAL = slice(0, 3), slice(4, 7), slice(36, 39)  # positions in Meta-World's 39-d observation
# state="full_relative": the 39-d vector, then three differences of its positions (9 more entries):
# goal - hand, object - hand, goal - object
RELATIVE_PAIRS = ((GOAL, HAND), (OBJECT, HAND), (GOAL, OBJECT))
MAX_EPISODE_STEPS = 500
MAX_SPREAD_POOL = 5000  # spread_variations: a 5000 x 5000 distance matrix is 200 MB, the resets ~1 min a task
CONTROL_FPS = 80  # Meta-World: frame_skip 5 x timestep 0.0025 s = 12.5 ms per step


_LIVE_ENVS: "weakref.WeakSet[MetaWorldEnv]" = weakref.WeakSet()
_EXIT_HOOK: list[bool] = []


def relative_state(raw_obs: np.ndarray) -> np.ndarray:
    """Meta-World's 39-d observation (..., 39) with the differences of RELATIVE_PAIRS appended: (..., 48),
    in the input's dtype (the differences taken before any cast)."""
    raw_obs = np.asarray(raw_obs)
    return np.concatenate([raw_obs, *(raw_obs[..., a] - raw_obs[..., b] for a, b in RELATIVE_PAIRS)], axis=-1)


def _close_renderers() -> None:
    """Free GL contexts before mujoco's EGL display goes away at exit (else each prints an EGLError).
    Registered when the first renderer is made, i.e. after mujoco's own exit hook: so it runs first."""
    for env in list(_LIVE_ENVS):
        for r in env._renderers.values():
            try:
                r.close()
            except Exception:  # at exit a failed free changes nothing
                pass
        env._renderers.clear()


def _require_metaworld():
    try:
        import metaworld  # noqa: F401
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
    except ImportError as e:  # an optional dependency: say how to get it
        raise ImportError("Meta-World is not installed: pip install -e '.[metaworld]' (metaworld 3.1.x, "
                          f"mujoco 3.3.0): {e}") from e
    return ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE


def task_names(task: str | None = None, tasks: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """The Meta-World names of `task` or `tasks` ("reach" and "reach-v3" both work; "mt10" is MT10)."""
    if (task is None) == (tasks is None):
        raise ValueError(f"give exactly one of task= and tasks=, got task={task!r}, tasks={tasks!r}")
    if tasks is None:
        items: Sequence[str] = [task]  # type: ignore[list-item]
    elif isinstance(tasks, str):
        items = TASK_SETS[tasks.lower()] if tasks.lower() in TASK_SETS else tasks.split(",")
    else:
        items = list(tasks)
    known = _require_metaworld()
    names = []
    for t in items:
        if not isinstance(t, str):
            raise ValueError(f"task = {t!r} is invalid: expected a Meta-World task name such as 'reach-v3'")
        name = t.strip() if t.strip().endswith("-v3") else f"{t.strip()}-v3"
        if f"{name}-goal-observable" not in known:
            raise ValueError(f"task = {t!r} is unknown: expected a Meta-World v3 task, e.g. {list(MT10[:3])}, "
                             f"or tasks='mt10'")
        names.append(name)
    if not names:
        raise ValueError(f"tasks = {tasks!r} is empty: expected at least one task")
    return tuple(names)


def instruction(name: str) -> str:
    return INSTRUCTIONS.get(name, name.removesuffix("-v3").replace("-", " "))


def task_of_instruction(text: str) -> str:
    """The Meta-World task whose instruction is `text` (a dataset's task string -> "reach-v3")."""
    names = [k.removesuffix("-goal-observable") for k in _require_metaworld()]
    for name in names:
        if instruction(name) == text:
            return name
    raise ValueError(f"no Meta-World task has the instruction {text!r} (MT10's: "
                     f"{[instruction(t) for t in MT10]})")


def start_positions(task: str, variations: Sequence[int]) -> np.ndarray:
    """(len(variations), 6): the object's start (xyz) and the goal (xyz) of `task` at each goal variation,
    as `reset(seed=v)` draws them (one env, reset once a variation: ~10 ms each)."""
    env = MetaWorldEnv(task=task, state="full")
    try:
        rows = []
        for v in variations:
            env.reset(seed=int(v))
            rows.append(np.concatenate([env.raw_obs[OBJECT], env.goal]))
        return np.array(rows, dtype=np.float64).reshape(-1, 6)
    finally:
        env.close()


def spread_clusters(task: str, n: int, start: int = 0, pool: int = 500) -> list[list[int]]:
    """`n` clusters of the `pool` goal variations of `task` from `start` on, each a list of variations: its
    medoid first, then its other members nearest first (what `collect_demos.py --spread --only-success`
    tries in turn when a demonstration fails). In order of their medoids; `spread_variations` are the medoids.

    The medoids are `n` goal variations chosen to cover the task's starts: the
    k-medoids of the candidates' object start and goal positions, each coordinate scaled by its spread over
    the candidates (coordinates that never vary dropped). The medoids minimise the mean distance from a
    candidate start to its nearest chosen one, so held-out starts (drawn from the same distribution) lie
    as near a demonstrated start as n demonstrations allow, where the next n variations are a random draw
    that can leave part of the range bare (10 draws can put one goal in the upper 40% of reach's heights:
    docs/benchmarks/metaworld.md, Prove-it 1). Deterministic: greedy BUILD, then alternating assignment
    and per-cluster medoid updates until nothing changes."""
    for name, value, low in (("n", n, 1), ("pool", pool, 1), ("start", start, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"spread: {name} = {value!r} is invalid: expected an int >= {low}")
    if n > pool:
        raise ValueError(f"spread: n = {n} is more than pool = {pool}: expected n <= pool")
    if pool > MAX_SPREAD_POOL:
        raise ValueError(f"spread: pool = {pool} is too large: expected at most {MAX_SPREAD_POOL} "
                         "(the pairwise distances are pool x pool floats, each candidate a reset)")
    candidates = np.arange(start, start + pool)
    x = start_positions(task, candidates)
    spread = x.std(axis=0)
    x = x[:, spread > 1e-9] / spread[spread > 1e-9]
    d = np.zeros((pool, pool))  # pairwise distances, one coordinate at a time: no (pool, pool, dims) array
    for column in x.T:
        d += (column[:, None] - column[None, :]) ** 2
    d = np.sqrt(d)
    medoids = [int(d.sum(axis=0).argmin())]  # BUILD: the most central candidate, then the largest gains
    nearest = d[:, medoids[0]].copy()
    while len(medoids) < n:
        cost = np.minimum(nearest[:, None], d).sum(axis=0)
        cost[medoids] = np.inf
        medoids.append(int(cost.argmin()))
        nearest = np.minimum(nearest, d[:, medoids[-1]])
    for _ in range(100):  # alternate: assign each candidate to its nearest medoid, re-centre each cluster
        label = d[:, medoids].argmin(axis=1)
        new = []
        for k in range(n):
            members = np.flatnonzero(label == k)
            new.append(int(members[d[np.ix_(members, members)].sum(axis=0).argmin()]))
        if new == medoids:
            break
        medoids = new
    label = d[:, medoids].argmin(axis=1)
    clusters = []
    for k in sorted(range(n), key=lambda k: medoids[k]):
        members = np.flatnonzero(label == k)
        members = members[np.argsort(d[members, medoids[k]], kind="stable")]  # the medoid (distance 0) first
        members = np.concatenate([[medoids[k]], members[members != medoids[k]]])
        clusters.append([int(candidates[m]) for m in members])
    return clusters


def spread_variations(task: str, n: int, start: int = 0, pool: int = 500) -> list[int]:
    """`n` goal variations of `task` among the `pool` ones from `start` on that cover its starts: the medoids
    of `spread_clusters` (the k-medoids of the object's start and the goal), sorted ascending."""
    return sorted(cluster[0] for cluster in spread_clusters(task, n, start, pool))


class MetaWorldEnv(gym.Env):
    """One Meta-World environment (one or several tasks) with our observation dict and goal variations.

    Args:
        task / tasks: one task ("reach" or "reach-v3"), or several (a list, comma-separated, or "mt10");
            the episode's task is tasks[variation % len(tasks)].
        state: "proprio" (hand xyz + gripper, 4), "full" (Meta-World's 39-d observation) or "full_relative"
            (the 39, then goal - hand, object - hand, goal - object: 48).
        environment_state: also give `observation.environment_state` (LeRobot's key for the simulator's
            privileged state): Meta-World's full 39-d observation (objects' poses, the goal at 36:39) as
            float32, whatever `state` is. For training-time targets and analysis: a policy reads only
            `observation.state`, images and the instruction.
        cameras: camera names to render into `observation.images.<name>` (e.g. ("corner2",)); () for none.
        image_size: side N of the (3, N, N) camera images.
        terminate_on_success: end the episode at the first success.
        steps_after_success: with terminate_on_success, end it this many steps after the first success
            instead (the time limit still applies); `info["is_success"]` stays True from that success on.
            Demonstrations that go on past the success show the policy the states around the goal, which
            episodes cut at the success never reach (docs/benchmarks/metaworld.md, Prove-it 1).
        max_episode_steps: time limit (truncation).
        reward: "dense" (Meta-World's shaped reward, up to 10 a step) or "success" (1 in every step that
            ends with the task solved, else 0). For RL the dense reward can be nearly blind to success: on
            reach an episode hovering 2-6 cm off the goal (a failure) earns about what a success does
            (docs/benchmarks/metaworld.md), so FPO on it raised neither return nor success.
        variation_stride: the step from one variation to the next on `reset()` without a seed.
        render_mode: None or "rgb_array" (`render()` -> uint8 (H, W, 3) of `render_camera`).
        render_size, render_camera: size and camera of `render()`.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_FPS}

    def __init__(self, task: str | None = None, tasks: str | Sequence[str] | None = None, state: str = "proprio",
                 cameras: Sequence[str] = (), image_size: int = 64, terminate_on_success: bool = True,
                 max_episode_steps: int = MAX_EPISODE_STEPS, variation_stride: int = 1,
                 render_mode: str | None = None, render_size: int = 128, render_camera: str = "corner2",
                 reward: str = "dense", environment_state: bool = False, steps_after_success: int = 0):
        if task is None and tasks is None:
            task = "reach-v3"
        self.tasks = task_names(task, tasks)
        if state not in STATE_MODES:
            raise ValueError(f"state = {state!r} is invalid: expected one of {list(STATE_MODES)}")
        if isinstance(cameras, str):
            cameras = (cameras,)
        if not (isinstance(image_size, int) and 1 <= image_size <= 1024):
            raise ValueError(f"image_size = {image_size!r} is invalid: expected an int in 1..1024")
        if not (isinstance(max_episode_steps, int) and max_episode_steps > 0):
            raise ValueError(f"max_episode_steps = {max_episode_steps!r} is invalid: expected an int > 0")
        if isinstance(steps_after_success, bool) or not isinstance(steps_after_success, int) or steps_after_success < 0:
            raise ValueError(f"steps_after_success = {steps_after_success!r} is invalid: expected an int >= 0")
        if reward not in REWARDS:
            raise ValueError(f"reward = {reward!r} is invalid: expected one of {list(REWARDS)}")
        self.reward_mode = reward
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode = {render_mode!r} is invalid: expected None or 'rgb_array'")
        self.state_mode, self.cameras, self.image_size = state, tuple(cameras), image_size
        self.terminate_on_success, self.max_episode_steps = bool(terminate_on_success), max_episode_steps
        self.steps_after_success = steps_after_success
        self.success_step: int | None = None  # the step of the episode's first success
        self.variation_stride = int(variation_stride)
        self.render_mode, self.render_size, self.render_camera = render_mode, render_size, render_camera
        obs_spaces: dict[str, spaces.Space] = {
            STATE_KEY: spaces.Box(-np.inf, np.inf, (STATE_MODES[state],), np.float32)}
        if not isinstance(environment_state, bool):
            raise ValueError(f"environment_state = {environment_state!r} is invalid: expected true or false")
        self.environment_state = environment_state
        if environment_state:
            obs_spaces[ENV_STATE_KEY] = spaces.Box(-np.inf, np.inf, (STATE_MODES["full"],), np.float32)
        for cam in self.cameras:
            obs_spaces[IMAGE_PREFIX + cam] = spaces.Box(0.0, 1.0, (3, image_size, image_size), np.float32)
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
        self._inner: dict[str, Any] = {}  # task name -> Meta-World env (0.6 s to make: made once, reused)
        self._renderers: dict[tuple[str, int], Any] = {}
        self._flip: dict[tuple[str, str], bool] = {}
        self.variation: int | None = None
        self.task_name = self.tasks[0]
        self.raw_obs = np.zeros(39)  # Meta-World's float64 observation (the scripted experts read it)
        self.elapsed_steps = 0
        _LIVE_ENVS.add(self)
        if self.cameras:  # fail at construction, not in the first step, when the camera is unknown
            self.check_cameras(self.cameras + ((self.render_camera,) if self.render_mode else ()))

    # ---- Meta-World envs, renderers ----
    def _env(self, name: str):
        if name not in self._inner:
            env = _require_metaworld()[f"{name}-goal-observable"]()
            env._freeze_rand_vec = False  # positions drawn from env.np_random, which reset() seeds per variation
            env.seeded_rand_vec = True
            env.max_path_length = max(self.max_episode_steps, MAX_EPISODE_STEPS)  # our limit, not its own
            self._inner[name] = env
        return self._inner[name]


    def _render(self, camera: str, size: int) -> np.ndarray:
        """uint8 (size, size, 3), right way up."""
        import mujoco

        env = self._inner[self.task_name]
        key = (self.task_name, size)
        if key not in self._renderers:
            try:
                renderer = mujoco.Renderer(env.model, size, size)
            except Exception as e:  # no GL context: name the switch
                raise RuntimeError(f"cannot render Meta-World cameras ({e}); set MUJOCO_GL=egl (or osmesa) "
                                   "before mujoco is first imported") from e
            if not _EXIT_HOOK:
                atexit.register(_close_renderers)
                _EXIT_HOOK.append(True)
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0  # the shadow map costs most of a frame
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            self._renderers[key] = renderer
        renderer = self._renderers[key]
        renderer.update_scene(env.data, camera=camera)
        image = renderer.render()
        flip = self._flip.get((self.task_name, camera))
        if flip is None:  # a fixed camera whose up axis (its y) points down in the world is upside down
            cam = env.model.camera(camera)
            flip = int(cam.mode[0]) == 0 and float(env.data.cam(camera).xmat.reshape(3, 3)[2, 1]) < 0
            self._flip[(self.task_name, camera)] = flip
        return np.ascontiguousarray(image[::-1, ::-1]) if flip else image

    def check_cameras(self, cameras: Sequence[str]) -> None:
        """A clear error when a camera of `cameras` is not in the current task's model."""
        import mujoco

        env = self._env(self.task_name)
        for cam in cameras:
            if mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, cam) < 0:
                names = [env.model.camera(i).name for i in range(env.model.ncam)]
                raise ValueError(f"camera = {cam!r} is unknown: expected one of {names}")

    def camera_image(self, camera: str, size: int | None = None) -> np.ndarray:
        """uint8 (3, N, N) of `camera` now (N = `size`, default `image_size`), rendered as the observation's
        cameras are, whether or not the env was made with cameras (clip collection renders on demand)."""
        if self.variation is None:
            raise RuntimeError("call reset() before camera_image()")
        return self._render(camera, self.image_size if size is None else int(size)).transpose(2, 0, 1)

    def _obs(self) -> dict[str, np.ndarray]:
        raw = self.raw_obs
        state = relative_state(raw) if self.state_mode == "full_relative" else raw[:STATE_MODES[self.state_mode]]
        state = state.astype(np.float32)  # float64 -> float32, explicit
        obs = {STATE_KEY: state}
        if self.environment_state:
            obs[ENV_STATE_KEY] = self.raw_obs.astype(np.float32)
        for cam in self.cameras:
            obs[IMAGE_PREFIX + cam] = self._render(cam, self.image_size).transpose(2, 0, 1).astype(np.float32) / 255.0
        return obs

    @property
    def goal(self) -> np.ndarray:
        """The episode's goal position (xyz, m)."""
        return np.array(self._inner[self.task_name]._target_pos, dtype=np.float64)

    # ---- gymnasium API ----
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        variation = (options or {}).get("variation", seed)
        if variation is None:
            variation = (int(self.np_random.integers(2**31)) if self.variation is None
                         else self.variation + self.variation_stride)
        if isinstance(variation, bool) or not isinstance(variation, (int, np.integer)) or variation < 0:
            raise ValueError(f"variation (reset seed) = {variation!r} is invalid: expected an int >= 0")
        self.variation = int(variation)
        self.task_name = self.tasks[self.variation % len(self.tasks)]
        env = self._env(self.task_name)
        env.np_random = np.random.default_rng(self.variation)  # the variation fixes every random draw of reset
        raw, _ = env.reset()
        self.raw_obs = np.asarray(raw, dtype=np.float64)
        self.elapsed_steps = 0
        self.success_step = None
        return self._obs(), {"task": instruction(self.task_name), "task_name": self.task_name,
                             "variation": self.variation, "is_success": False}

    def step(self, action):
        if self.variation is None:
            raise RuntimeError("call reset() before step()")
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(4), -1.0, 1.0)
        raw, reward, _, _, mw_info = self._inner[self.task_name].step(action)
        self.raw_obs = np.asarray(raw, dtype=np.float64)
        self.elapsed_steps += 1
        success = bool(mw_info.get("success", 0.0))
        if self.reward_mode == "success":
            reward = float(success)
        if success and self.success_step is None:
            self.success_step = self.elapsed_steps
        if self.steps_after_success and self.success_step is not None:  # latched: the episode succeeded
            success = True
        terminated = (self.terminate_on_success and self.success_step is not None
                      and self.elapsed_steps - self.success_step >= self.steps_after_success)
        truncated = self.elapsed_steps >= self.max_episode_steps and not terminated
        info = {**mw_info, "task": instruction(self.task_name), "task_name": self.task_name,
                "variation": self.variation, "is_success": success}
        return self._obs(), float(reward), terminated, truncated, info

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return self._render(self.render_camera, self.render_size)

    def close(self):
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()
        for env in self._inner.values():
            env.close()
        self._inner.clear()


def _reset_group(envs: Sequence[MetaWorldEnv], first: int, seed: int | None) -> list[tuple[dict, dict]]:
    """Reset a block of a vector env's envs (global indices first, first + 1, ...): env i plays seed + i."""
    return [env.reset(seed=None if seed is None else seed + first + j) for j, env in enumerate(envs)]


def _step_group(envs: Sequence[MetaWorldEnv], actions: np.ndarray) -> list[tuple]:
    """Step a block of envs with same-step autoreset: per env (obs, final_obs, reward, terminated, truncated,
    the ended step's is_success / task / variation, the info of what the env now plays)."""
    rows = []
    for env, action in zip(envs, actions):
        obs, reward, terminated, truncated, info = env.step(action)
        final_obs, final = obs, {k: info[k] for k in ("is_success", "task", "variation")}
        if terminated or truncated:
            obs, info = env.reset()
        rows.append((obs, final_obs, float(reward), bool(terminated), bool(truncated), final, info))
    return rows


def _group_worker(conn, kwargs: dict[str, Any], first: int, count: int) -> None:
    """A worker process of `MetaWorldVectorEnv(processes=...)`: `count` envs stepped one after the other,
    commands and replies over `conn` (("ok", result) or ("error", traceback))."""
    import traceback

    try:
        envs = [MetaWorldEnv(**kwargs) for _ in range(count)]
    except BaseException:  # noqa: BLE001 - sent to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while True:
        try:
            command, arg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        try:
            if command == "close":
                break
            if command == "reset":
                result = _reset_group(envs, first, arg)
            elif command == "step":
                result = _step_group(envs, arg)
            elif command == "get_attr":
                result = [getattr(env, arg) for env in envs]
            elif command == "render":
                result = [env.render() for env in envs]
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send(("ok", result))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
    for env in envs:
        env.close()
    conn.close()


class _Workers:
    """`processes` worker processes (spawned) stepping contiguous blocks of a vector env's envs: env i lives
    on the worker whose block holds it, every command goes to all workers at once and their replies are
    joined in env order. A worker's exception comes back as a RuntimeError naming it and its envs."""

    def __init__(self, num_envs: int, processes: int, kwargs: dict[str, Any]):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        bounds = [num_envs * w // processes for w in range(processes + 1)]
        self.blocks = [(bounds[w], bounds[w + 1]) for w in range(processes)]
        self.conns, self.procs = [], []
        for first, end in self.blocks:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_group_worker, args=(child, kwargs, first, end - first), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._gather()  # every worker made its envs (or the first error is raised)

    def _gather(self) -> list[Any]:
        results, error = [], None
        for w, conn in enumerate(self.conns):
            first, end = self.blocks[w]
            try:
                status, result = conn.recv()
            except EOFError:
                status, result = "error", f"the process exited (exit code {self.procs[w].exitcode})"
            if status != "ok" and error is None:
                error = f"Meta-World worker {w} (envs {first}-{end - 1}) failed; every worker is closed:\n{result}"
            results.append(result)
        if error is not None:
            self.close()
            raise RuntimeError(error)
        return results

    def call(self, command: str, args: Sequence[Any] | None = None) -> list[Any]:
        """`command` on every worker (`args[w]` to worker w, or None) -> the envs' results, in env order."""
        if not self.conns:
            raise RuntimeError("the Meta-World workers are closed")
        for w, conn in enumerate(self.conns):
            try:
                conn.send((command, None if args is None else args[w]))
            except (BrokenPipeError, OSError):
                pass  # a dead worker: _gather names it
        return [row for rows in self._gather() for row in rows]

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for proc, conn in zip(self.procs, self.conns):
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
            conn.close()
        self.conns, self.procs = [], []


class MetaWorldVectorEnv(gym.vector.VectorEnv):
    """`num_envs` `MetaWorldEnv`s with same-step autoreset, torch tensors out (the contract of our torch
    vector envs, docs/envs.md): obs dict (e, ...) float32, reward (e,) float32, terminated / truncated (e,)
    bool; info: "is_success" (e,) bool, "task" (e instructions), "task_name", "variation" (e,) long,
    "elapsed_steps", "final_obs", "final_info" ("is_success", "episode_return", "episode_length", "task",
    "variation"), "_final_obs", "_final_info".

    processes: where the envs step. False (or 0): one after the other in this process; True: one process
    each; an int N >= 1: N worker processes (spawned), each stepping a contiguous block of about
    num_envs / N envs one after the other, so that many envs share a machine's cores without a process
    (~300 MB: Python, torch, MuJoCo) each. MuJoCo then steps on several cores; the observations, rewards
    and autoresets are the same wherever the envs step.
    `reset(seed=s)` gives env i variation s + i; each env then steps its variation by `num_envs`, so a
    run never repeats one. With several tasks, a `num_envs` that is a multiple of the number of tasks
    keeps each env on one task (each makes one Meta-World env per task it meets, 0.6 s each).
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": ["rgb_array"], "render_fps": CONTROL_FPS}

    def __init__(self, num_envs: int = 8, seed: int | None = None, device: torch.device | str = "cpu",
                 processes: bool | int = False, **kwargs: Any):
        if not (isinstance(num_envs, int) and not isinstance(num_envs, bool) and num_envs >= 1):
            raise ValueError(f"num_envs = {num_envs!r} is invalid: expected an int >= 1")
        if not isinstance(processes, (bool, int, np.integer)) or processes < 0:
            raise ValueError(f"processes = {processes!r} is invalid: expected false, true (one process an env) "
                             "or an int >= 0 (worker processes; 0 = none)")
        self.num_envs = num_envs
        self.device = torch.device(device)
        # the number of worker processes (0: the envs step here); True is one an env, and more workers than
        # envs would idle
        if isinstance(processes, bool):
            processes = num_envs if processes else 0
        self.processes = min(int(processes), num_envs)
        kwargs = {**kwargs, "variation_stride": num_envs}
        first = MetaWorldEnv(**kwargs)  # checks the options here, not in a worker
        self.tasks, self.max_episode_steps = first.tasks, first.max_episode_steps
        self.render_mode = first.render_mode
        self.single_observation_space = first.observation_space
        self.single_action_space = first.action_space
        if self.processes:
            first.close()
            self.envs: list[MetaWorldEnv] = []
            self._workers: _Workers | None = _Workers(num_envs, self.processes, kwargs)
        else:
            self.envs = [first] + [MetaWorldEnv(**kwargs) for _ in range(num_envs - 1)]
            self._workers = None
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._seed = seed
        self._started = False
        self._returns = np.zeros(num_envs)
        self._lengths = np.zeros(num_envs, dtype=np.int64)
        self._infos: list[dict[str, Any]] = [{} for _ in range(num_envs)]

    def _get(self, name: str) -> list[Any]:
        if self._workers is not None:
            return self._workers.call("get_attr", [name] * self.processes)
        return [getattr(env, name) for env in self.envs]

    @property
    def raw_obs(self) -> np.ndarray:
        """(e, 39) float64: Meta-World's observations (the scripted experts read them)."""
        return np.stack(self._get("raw_obs"))

    @property
    def task_names(self) -> list[str]:
        return list(self._get("task_name"))

    def _tensor(self, x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), dtype=dtype).to(self.device)

    def _stack(self, obs: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.stack([o[k] for o in obs])).to(self.device) for k in obs[0]}

    def _info(self) -> dict[str, Any]:
        return {"is_success": self._tensor([bool(i.get("is_success", False)) for i in self._infos], torch.bool),
                "task": [i["task"] for i in self._infos], "task_name": [i["task_name"] for i in self._infos],
                "variation": self._tensor([i["variation"] for i in self._infos], torch.long),
                "elapsed_steps": self._tensor(self._lengths.copy(), torch.long)}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        seed = self._seed if seed is None and not self._started else seed
        self._started, self._seed = True, None
        self._returns[:] = 0
        self._lengths[:] = 0
        if self._workers is not None:
            rows = self._workers.call("reset", [seed] * self.processes)
        else:
            rows = _reset_group(self.envs, 0, seed)
        self._infos = [info for _, info in rows]
        return self._stack([obs for obs, _ in rows]), self._info()

    def step(self, actions):
        actions = np.asarray(torch.as_tensor(actions).detach().cpu().numpy() if isinstance(actions, torch.Tensor)
                             else actions, dtype=np.float32)
        if self._workers is not None:
            rows = self._workers.call("step", [actions[a:b] for a, b in self._workers.blocks])
        else:
            rows = _step_group(self.envs, actions)
        obs, final_obs, rewards, terminated, truncated, finals, self._infos = (list(col) for col in zip(*rows))
        final = {k: [f[k] for f in finals] for k in ("is_success", "task", "variation")}
        return self._finish(self._stack(obs), self._stack(final_obs), np.asarray(rewards, np.float32),
                            np.asarray(terminated), np.asarray(truncated), final)

    def _finish(self, obs, final_obs, rewards, terminated, truncated, final):
        done_np = np.asarray(terminated) | np.asarray(truncated)
        self._returns += rewards
        self._lengths += 1
        final_info = {"is_success": self._tensor([bool(x) for x in final["is_success"]], torch.bool),
                      "episode_return": self._tensor(self._returns.copy(), torch.float32),
                      "episode_length": self._tensor(self._lengths.copy(), torch.long),
                      "task": list(final["task"]), "variation": self._tensor(final["variation"], torch.long)}
        self._returns[done_np] = 0
        self._lengths[done_np] = 0
        done = self._tensor(done_np, torch.bool)
        info = self._info()
        info["final_obs"], info["_final_obs"] = final_obs, done
        info["final_info"], info["_final_info"] = final_info, done.clone()
        return (obs, self._tensor(rewards, torch.float32), self._tensor(terminated, torch.bool),
                self._tensor(truncated, torch.bool), info)

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        frames = self._workers.call("render") if self._workers is not None else [env.render() for env in self.envs]
        return torch.from_numpy(np.stack(frames))

    def close_extras(self, **kwargs: Any) -> None:
        if self._workers is not None:
            self._workers.close()
        for env in self.envs:
            env.close()


class MetaWorldExpert:
    """Meta-World's scripted policy (`metaworld.policies`) of each env's current task, as our expert
    callable: `expert(env)` -> actions, (e, 4) float32 torch for a `MetaWorldVectorEnv`, (4,) float32 numpy
    for a `MetaWorldEnv` (either may be wrapped). The policies read Meta-World's full 39-d observation
    (`env.raw_obs`), whatever the env's `state` mode.

    noise_std: Gaussian action noise, then clipped to [-1, 1]; the env executes the noisy actions.
    record: which actions a collection records (`label`): "executed" (the noisy ones: a weaker expert) or
        "clean" (the expert's own, without the noise: DART, Laskey et al. 2017: the states drift off the
        expert's path and each is labelled with the expert's correction, so that a policy learns to recover).
    seed: the noise generator's seed.
    """

    mode = None  # no discrete modes (collect records a mode per episode only when the expert has one)
    RECORD = ("executed", "clean")

    def __init__(self, noise_std: float = 0.0, seed: int | None = None, record: str = "executed"):
        if not (isinstance(noise_std, (int, float)) and np.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std = {noise_std!r} is invalid: expected a finite number >= 0")
        if record not in self.RECORD:
            raise ValueError(f"record = {record!r} is invalid: expected one of {self.RECORD}")
        self.noise_std = float(noise_std)
        self.record = record
        self.rng = np.random.default_rng(seed)
        self._policies: dict[str, Any] = {}
        self.label = None  # the last call's actions to record when they differ from those returned (record="clean")

    def _policy(self, name: str):
        if name not in self._policies:
            from metaworld.policies import ENV_POLICY_MAP

            self._policies[name] = ENV_POLICY_MAP[name]()
        return self._policies[name]

    def act(self, raw_obs: np.ndarray, names: Sequence[str]) -> np.ndarray:
        import warnings

        with warnings.catch_warnings():  # "Constant(s) may be too high": Meta-World's own policies, clipped below
            warnings.simplefilter("ignore", UserWarning)
            # a copy each: some scripted policies shift parts of the observation in place (door-open's handle
            # x by -0.05), which would otherwise change the env's raw_obs behind its back
            raw = np.stack([self._policy(n).get_action(np.array(o, dtype=np.float64))
                            for o, n in zip(raw_obs, names)]).astype(np.float32)
        actions = raw
        if self.noise_std:
            actions = raw + self.rng.normal(0.0, self.noise_std, raw.shape).astype(np.float32)
        self.label = np.clip(raw, -1.0, 1.0) if self.record == "clean" else None
        return np.clip(actions, -1.0, 1.0)

    def __call__(self, env) -> Any:
        env = getattr(env, "unwrapped", env)
        if isinstance(env, MetaWorldVectorEnv):
            actions = torch.from_numpy(self.act(env.raw_obs, env.task_names)).to(env.device)
            self.label = None if self.label is None else torch.from_numpy(self.label).to(env.device)
            return actions
        if isinstance(env, MetaWorldEnv):
            actions = self.act(env.raw_obs[None], [env.task_name])[0]
            self.label = None if self.label is None else self.label[0]
            return actions
        raise TypeError(f"MetaWorldExpert needs a MetaWorldEnv or MetaWorldVectorEnv, got {type(env).__name__}")
