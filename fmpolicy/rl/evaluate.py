"""Evaluation of an RL actor: one episode in each of `num_envs` environments, fixed start states.

    stats = evaluate_actor(actor, envs, n_action_steps=k, zero_noise=True, seed=123)
    # {"return": mean undiscounted return, "return_std", "success": rate or None, "length", "episodes"}

Every env plays exactly one episode (what happens after its first episode ends is ignored), so short
episodes are not over-counted, and re-using the same `seed` re-plays the same start states: curves of
evaluations along a run compare like with like. Chunks are executed k steps at a time, as in the
rollouts. `zero_noise=True` is the deterministic policy (the flow integrated from zero initial noise,
or the Gaussian's squashed mean); `zero_noise=False` samples as the rollouts do (without FPO's extra
`action_noise_std`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fmpolicy.rl import observations


@torch.no_grad()
def evaluate_actor(actor, envs, n_action_steps: int, zero_noise: bool, seed: int,
                   generator: torch.Generator | None = None, max_env_steps: int = 100_000) -> dict[str, Any]:
    """Mean return / success / length over one episode per env of `envs` (reset with `seed`)."""
    device = actor.device
    obs, info = envs.reset(seed=seed)
    obs = observations.from_env(obs, info, device, uint8_images=True)  # as the rollouts see them
    e = envs.num_envs
    returns = torch.zeros(e, device=device)
    lengths = torch.zeros(e, device=device)
    running = torch.ones(e, dtype=torch.bool, device=device)  # still in its first episode
    success = torch.zeros(e, device=device)
    reported = False
    steps = 0
    while bool(running.any()):
        if steps >= max_env_steps:
            raise RuntimeError(f"evaluation: {int(running.sum())} of {e} episodes still running after "
                               f"{max_env_steps} env steps (an env without a time limit?)")
        chunk = actor.eval_act(obs, zero_noise=zero_noise, generator=generator)
        for j in range(n_action_steps):
            obs, r, term, trunc, info = envs.step(chunk[:, j])
            obs = observations.from_env(obs, info, device, uint8_images=True)
            done = (term | trunc).to(device)
            returns += running * r.to(device).float()
            lengths += running.float()
            ok = info.get("final_info", {}).get("is_success")
            if ok is not None:
                reported = True
                success = torch.where(done & running, torch.as_tensor(ok, device=device).float(), success)
            running &= ~done
            steps += 1
    ret = returns.cpu().numpy()
    return {"return": float(np.mean(ret)), "return_std": float(np.std(ret)), "episodes": e,
            "success": float(success.mean()) if reported else None, "length": float(lengths.mean())}
