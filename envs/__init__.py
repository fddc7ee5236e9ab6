"""Gymnasium environments with batched torch cores and multimodal scripted experts.

Importing this package registers `fmpolicy/PointObstacle-v0`, `fmpolicy/ArmReach-v0` and
`fmpolicy/Push-v0` (single env: `gymnasium.make`; batched torch: `gymnasium.make_vec(...,
vectorization_mode="vector_entry_point")` or the `*VectorEnv` classes directly), and the two RL test
beds `fmpolicy/TwoOptimaBandit-v0` and `fmpolicy/TwoGoalGridWorld-v0` (bandit.py, gridworld.py: no
scripted experts; the batched class is the vector env). See docs/envs.md.
`fmpolicy/MetaWorld-v0` wraps Meta-World (optional: `pip install -e '.[metaworld]'`; metaworld_env.py,
imported only when the id is made; docs/benchmarks/metaworld.md).
This package never imports `fmpolicy`.
"""

from __future__ import annotations

import gymnasium as gym

from .bandit import TwoOptimaBandit, TwoOptimaBanditEnv
from .core_arm import ArmReachCore, ArmReachExpert
from .core_base import ModalExpert, TorchCore
from .core_point import PointObstacleCore, PointObstacleExpert
from .core_push import PushCore, PushExpert
from .gridworld import TwoGoalGridWorld, TwoGoalGridWorldEnv
from .gym_env import IMAGE_KEY, STATE_KEY, ArmReachEnv, PointObstacleEnv, PushEnv, TorchCoreEnv
from .vector_env import ArmReachVectorEnv, PointObstacleVectorEnv, PushVectorEnv, TorchVectorEnv

# id -> (env class, vector env class, core class, expert class)
TASKS = {
    "fmpolicy/PointObstacle-v0": (PointObstacleEnv, PointObstacleVectorEnv, PointObstacleCore, PointObstacleExpert),
    "fmpolicy/ArmReach-v0": (ArmReachEnv, ArmReachVectorEnv, ArmReachCore, ArmReachExpert),
    "fmpolicy/Push-v0": (PushEnv, PushVectorEnv, PushCore, PushExpert),
}


# external benchmarks behind our contract: id -> (module, env class, vector env class); made lazily
EXTERNAL = {
    "fmpolicy/MetaWorld-v0": ("metaworld_env", "MetaWorldEnv", "MetaWorldVectorEnv"),
}


def make_expert(env_id: str, seed: int | None = None, **kwargs) -> ModalExpert:
    """The scripted expert of a registered id; call it as expert(core) -> actions (e, a) (Meta-World:
    expert(env), and kwargs such as noise_std)."""
    if env_id == "fmpolicy/MetaWorld-v0":
        from .metaworld_env import MetaWorldExpert

        return MetaWorldExpert(seed=seed, **kwargs)
    if env_id not in TASKS:
        raise ValueError(f"unknown env id {env_id!r}; expected one of {sorted(TASKS) + sorted(EXTERNAL)}")
    return TASKS[env_id][3](seed=seed)


def _register() -> None:
    for env_id, (env_cls, vec_cls, core_cls, _) in TASKS.items():
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point=f"{__name__}.gym_env:{env_cls.__name__}",
            vector_entry_point=f"{__name__}.vector_env:{vec_cls.__name__}",
            max_episode_steps=core_cls.max_episode_steps,
        )


# RL test beds: id -> (env class, batched vector env class); each keeps its own time limit
RL_TEST_BEDS = {
    "fmpolicy/TwoOptimaBandit-v0": (TwoOptimaBanditEnv, TwoOptimaBandit),
    "fmpolicy/TwoGoalGridWorld-v0": (TwoGoalGridWorldEnv, TwoGoalGridWorld),
}


def _register_test_beds() -> None:
    for env_id, (env_cls, vec_cls) in RL_TEST_BEDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=f"{env_cls.__module__}:{env_cls.__name__}",
                         vector_entry_point=f"{vec_cls.__module__}:{vec_cls.__name__}")


def _register_external() -> None:
    for env_id, (module, env_cls, vec_cls) in EXTERNAL.items():
        if env_id not in gym.registry:  # string entry points: the optional dependency loads on make
            gym.register(id=env_id, entry_point=f"{__name__}.{module}:{env_cls}",
                         vector_entry_point=f"{__name__}.{module}:{vec_cls}")


_register()
_register_test_beds()
_register_external()

__all__ = [
    "IMAGE_KEY", "STATE_KEY", "TASKS", "RL_TEST_BEDS", "EXTERNAL", "make_expert",
    "TwoOptimaBandit", "TwoOptimaBanditEnv", "TwoGoalGridWorld", "TwoGoalGridWorldEnv",
    "TorchCore", "ModalExpert", "TorchCoreEnv", "TorchVectorEnv",
    "PointObstacleCore", "PointObstacleExpert", "PointObstacleEnv", "PointObstacleVectorEnv",
    "ArmReachCore", "ArmReachExpert", "ArmReachEnv", "ArmReachVectorEnv",
    "PushCore", "PushExpert", "PushEnv", "PushVectorEnv",
]
