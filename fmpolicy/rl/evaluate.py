"""Evaluation of an RL actor: one episode in each of `num_envs` environments, fixed start states.

    stats = evaluate_actor(actor, envs, n_action_steps=k, zero_noise=True, seed=123)
    # {"return": mean undiscounted return, "return_std", "success": rate or None, "length", "episodes"}
    # and, when the envs play several tasks (instructions), "success_by_task": {instruction: rate}

Every env plays exactly one episode (what happens after its first episode ends is ignored), so short
episodes are not over-counted, and re-using the same `seed` re-plays the same start states: curves of
evaluations along a run compare like with like. Chunks are executed k steps at a time, as in the
rollouts (with their `rl.rollout_delay`). `zero_noise=True` is the deterministic policy (the flow
integrated from zero initial noise, or the Gaussian's squashed mean); `zero_noise=False` samples as
the rollouts do (without FPO's extra `action_noise_std`).
"""

from __future__ import annotations

from typing import Any

import torch

from fmpolicy.evaluation import evaluate_policy


def evaluate_actor(actor, envs, n_action_steps: int, zero_noise: bool, seed: int,
                   generator: torch.Generator | None = None, max_env_steps: int = 100_000,
                   inference_delay: int = 0) -> dict[str, Any]:
    """Mean return / success / length over one episode per env of `envs` (reset with `seed`), through
    the package's one evaluation loop (`fmpolicy.evaluation.evaluate_policy`); `inference_delay`: as
    there (the chunks executed as in rollouts with rl.rollout_delay)."""
    r = evaluate_policy(None, envs, envs.num_envs, seed=seed, flag_keys=(), n_action_steps=n_action_steps,
                        inference_delay=inference_delay,
                        act=lambda obs: actor.eval_act(obs, zero_noise=zero_noise, generator=generator),
                        uint8_images=True, max_env_steps=max_env_steps)
    out = {"return": r.mean_return, "return_std": r.return_std, "episodes": r.episodes,
           "success": r.success_rate if r.success_reported else None, "length": r.mean_length}
    if r.success_reported and len(set(r.tasks)) > 1:  # a multi-task run: no task's loss hides in the mean
        out["success_by_task"] = {t: row["success_rate"] for t, row in r.success_by_task().items()}
    return out
