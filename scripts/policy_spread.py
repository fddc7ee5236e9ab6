#!/usr/bin/env python
"""How stochastic is a flow policy where it acts? A check before RL fine-tuning (issues 15 / 17).

    python scripts/policy_spread.py --policy P [P ...] --env ID [--env-kwargs JSON] [--num-envs 8]
        [--steps 60] [--every 10] [--samples 32] [--seed 0] [--json out.json]

The first policy acts in `--num-envs` envs for `--steps` steps (its own sampled chunks); every
`--every` steps the observations are kept. On those observations, for each policy:

- `within`: the std of `--samples` sampled chunks at one observation, in environment action units,
  averaged over observations, chunk steps and action entries: how far apart the actions the policy
  would try at one state are (what an RL update can choose between);
- `across`: the std over observations of the mean chunk: how much the action depends on the state;
- `ratio` = within / across;
- `cfm_loss_t`: the CFM loss of the policy's own sampled chunks at fixed t (t = 1 is the data end),
  averaged over 16 noise draws: where along the path FPO's ratio gets its size from.

Why: FPO (and any likelihood-ratio policy gradient) improves a policy by moving probability between
the actions it tries at a state. A policy that imitation has made nearly deterministic (Meta-World
reach, the cpu transformer from 10 demonstrations: within 0.006 against 0.033 for the MLP expert,
docs/benchmarks/metaworld.md) gives its update almost nothing to choose between.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch

import fmpolicy_envs  # noqa: F401  (registers the fmpolicy/ ids)
from fmpolicy import FlowPolicy
from fmpolicy.io import atomic_write_json
from fmpolicy.rl.observations import Obs, from_env
from fmpolicy.rl.rollout import make_vector_env
from fmpolicy.sampling import sample_noise

T_GRID = (0.05, 0.3, 0.5, 0.7, 0.9, 0.97, 0.99)


def collect_observations(policy: FlowPolicy, env_id: str, env_kwargs: dict, num_envs: int, steps: int,
                         every: int, seed: int) -> list[Obs]:
    """Observation batches met by `policy` acting (one sampled action a step), every `every` steps."""
    device = policy.device
    env = make_vector_env(env_id, num_envs, device, seed, env_kwargs)
    generator = torch.Generator(device=device).manual_seed(seed)
    obs, info = env.reset(seed=seed)
    batches = []
    try:
        for step in range(steps):
            o = from_env(obs, info, device)
            if step % every == 0:
                batches.append(o)
            with torch.no_grad():
                action = policy.predict_action_chunk(o, generator=generator)[:, 0]
            obs, _, _, _, info = env.step(action)
    finally:
        env.close()
    return batches


@torch.no_grad()
def spread(policy: FlowPolicy, batches: Sequence[Obs], samples: int, seed: int) -> dict:
    """within / across / ratio (module doc) over the observation batches."""
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    within, across = [], []
    for obs in batches:
        chunks = torch.stack([policy.predict_action_chunk(obs, generator=generator) for _ in range(samples)])
        within.append(chunks.std(0).mean())
        across.append(chunks.mean(0).std(0).mean())
    w, a = torch.stack(within).mean().item(), torch.stack(across).mean().item()
    return {"within": w, "across": a, "ratio": w / a if a > 0 else float("inf")}


@torch.no_grad()
def loss_profile(policy: FlowPolicy, batches: Sequence[Obs], seed: int, ts: Sequence[float] = T_GRID,
                 pairs: int = 16) -> dict[str, float]:
    """The CFM loss of the policy's own sampled chunks at each t of `ts` (module doc)."""
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    cfg = policy.config
    sums = dict.fromkeys(ts, 0.0)
    for obs in batches:
        chunk = policy.predict_action_chunk(obs, generator=generator)
        b = chunk.shape[0]
        for t in ts:
            noise = sample_noise((b, pairs, cfg.chunk_size, cfg.expert.max_action_dim), generator=generator,
                                 device=policy.device, dtype=policy.dtype)
            tt = torch.full((b, pairs), t, device=policy.device, dtype=policy.dtype)
            sums[t] += policy.compute_cfm_losses(obs, chunk, tt, noise).mean().item() / len(batches)
    return {f"{t:g}": v for t, v in sums.items()}


def measure(policies: Sequence[str], env_id: str, env_kwargs: dict, num_envs: int = 8, steps: int = 60,
            every: int = 10, samples: int = 32, seed: int = 0) -> list[dict]:
    loaded = [FlowPolicy.from_pretrained(p, device="cpu").eval() for p in policies]
    batches = collect_observations(loaded[0], env_id, env_kwargs, num_envs, steps, every, seed)
    rows = []
    for path, policy in zip(policies, loaded):
        row = {"policy": str(path), **spread(policy, batches, samples, seed)}
        if policy.config.head == "flow":
            row["cfm_loss_t"] = loss_profile(policy, batches, seed)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", nargs="+", required=True, help="saved policies (the first one acts)")
    parser.add_argument("--env", required=True, help="a registered gymnasium id (fmpolicy/...: our envs)")
    parser.add_argument("--env-kwargs", default="{}", help="JSON keyword arguments of the env")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.samples < 2 or args.every < 1 or args.steps < 1:
        parser.error(f"--samples {args.samples} (>= 2), --every {args.every} (>= 1), --steps {args.steps} "
                     "(>= 1): out of range")
    rows = measure(args.policy, args.env, json.loads(args.env_kwargs), args.num_envs, args.steps, args.every,
                   args.samples, args.seed)
    print(json.dumps(rows))
    print(f"\n| policy | within | across | ratio | CFM loss of own samples at t = {', '.join(map(str, T_GRID))} |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        losses = " ".join(f"{v:.3g}" for v in r.get("cfm_loss_t", {}).values()) or "-"
        print(f"| {r['policy']} | {r['within']:.4f} | {r['across']:.4f} | {r['ratio']:.3f} | {losses} |")
    if args.json:
        atomic_write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
