#!/usr/bin/env python
"""Does an FPO update move the policy, or only the CFM losses at the pairs it stored? (issue 14)

    python scripts/fpo_ratio_gap.py RUN_DIR [RUN_DIR ...] [--step 175] [--seed 123] [--json out.json]

For each `train_fpo.py` run: the checkpoint at `--step` (actor, critic, Adam state), one fresh rollout
with the run's config, GAE with its critic, then the run's own update (`update_policy`: its epochs,
minibatches and clamps). Then, for every chunk of that rollout, FPO's log ratio
mean_i(l_old_i - l_new_i) two ways:

- `stored`: at the m pairs (t_i, noise_i) drawn at rollout time, which the update optimised (what
  the trainer's ratio and clip see);
- `fresh`: at m new pairs drawn after the update, the old losses from a copy of the policy taken
  before it (an independent estimate of the same change of the CFM loss, which is what the
  likelihood ratio stands for).

Printed per run: mean |log ratio| of each, their correlation over chunks, and the part of the stored
one that the fresh one does not reproduce (`gap = mean |stored - fresh|`). A policy whose velocity can
vary fast in t (sinusoidal time features with periods down to 0.004) can lower the loss at the stored
times without changing it elsewhere: a large gap means the ratio the update clipped was mostly the
stored pairs' own noise.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
import yaml

import fmpolicy_envs  # noqa: F401  (registers the fmpolicy/ ids)
from fmpolicy.config import config_from_dict
from fmpolicy.io import atomic_write_json
from fmpolicy.rl.config import RLRunConfig
from fmpolicy.rl.gae import compute_gae
from fmpolicy.rl.objectives import compute_fpo_log_ratio
from fmpolicy.rl.rollout import RolloutCollector, make_vector_env
from fmpolicy.rl.trainer import UpdateBatch, make_actor, parameter_groups, update_policy
from fmpolicy.rl.value import ValueNet


def measure(run: Path, step: int, seed: int, init_from: str | None = None) -> dict:
    """One run's measure (see the module doc). The actor is built as the run built it (from its
    `init_from`, or `init_from` given here when that folder moved), then takes the checkpoint's weights."""
    saved = yaml.safe_load((run / "config.yaml").read_text())
    if init_from is not None:
        saved["init_from"] = init_from
    config = config_from_dict(RLRunConfig, saved)
    rc = config.rl
    device = torch.device("cpu")
    state = torch.load(run / "checkpoints" / f"step_{step:08d}" / "training_state.pt", weights_only=False)
    torch.manual_seed(seed)
    actor, pc = make_actor(config, device)
    actor.load_state_dict(state["actor"])
    critic = ValueNet(pc.state_dim, rc.value, pc.expert.prefix_dim, device)
    critic.load_state_dict(state["critic"])
    params = [p for p in actor.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameter_groups(actor, params, list(critic.parameters()), rc), lr=rc.lr,
                                 eps=rc.adam_eps)
    saved = optimizer.state_dict()
    saved["state"] = state["optimizer"]["state"]  # same parameter order (actor, then critic), other groups
    optimizer.load_state_dict(saved)
    k = rc.n_action_steps or pc.n_action_steps
    envs = make_vector_env(config.env.id, rc.num_envs, device, seed, config.env.kwargs)
    collector = RolloutCollector(envs, actor, critic, k, rc.gamma, device)
    collector.reset(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    r = collector.collect(rc.num_macro_steps, gen)
    adv, ret = compute_gae(r.rewards * rc.reward_scale, r.values, r.terminated, r.truncated, r.next_value,
                           r.final_values, gamma=rc.gamma ** k, lam=rc.gae_lambda)
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    batch = UpdateBatch(obs=r.obs, store={key: flat(v) for key, v in r.store.items()}, chunks=flat(r.chunks),
                        executed=flat(r.executed), advantages=flat(adv), returns=flat(ret), values=flat(r.values))
    before = copy.deepcopy(actor)
    b = batch.chunks.shape[0]
    order = [torch.randperm(b, generator=gen).chunk(rc.num_minibatches) for _ in range(rc.update_epochs)]
    update_policy(actor, critic, optimizer, batch, order, rc)
    with torch.no_grad():
        stored, _ = actor.log_ratio(batch.obs, batch.chunks, batch.store, None, batch.executed)
        t, noise = actor.sample_pairs(b, gen)
        old = before.policy.compute_cfm_losses(batch.obs, batch.chunks, t, noise)
        new = actor.policy.compute_cfm_losses(batch.obs, batch.chunks, t, noise)
        fresh = compute_fpo_log_ratio(old, new, "mean")
        unclamped = copy.copy(actor)  # the same weights, FPO's clamps off
        unclamped.fpo = dataclasses.replace(actor.fpo, clamp_old=None, clamp_log_ratio=None, clamp_pair_log_ratio=None,
                                            ratio_mode="mean")
        unclamped_stored, _ = unclamped.log_ratio(batch.obs, batch.chunks, batch.store, None, batch.executed)
    s, f, u = stored.numpy(), fresh.numpy(), unclamped_stored.numpy()
    return {"run": str(run), "step": step, "time_input": pc.expert.time_input,
            "time_periods": [pc.expert.time_min_period, pc.expert.time_max_period],
            "mean_abs_stored": float(np.abs(s).mean()), "mean_abs_stored_unclamped": float(np.abs(u).mean()),
            "mean_abs_fresh": float(np.abs(f).mean()), "corr": float(np.corrcoef(u, f)[0, 1]),
            "gap": float(np.abs(u - f).mean()), "chunks": int(b)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--step", type=int, default=175, help="the checkpoint to start from")
    p.add_argument("--seed", type=int, default=123, help="seed of the fresh rollout and pairs")
    p.add_argument("--json", type=Path, help="write the measures here")
    p.add_argument("--init-from", help="the policy the runs started from, when it is no longer where their "
                                       "config.yaml says")
    args = p.parse_args(argv)
    rows = [measure(run, args.step, args.seed, args.init_from) for run in args.runs]
    print("| run | time input | mean abs log ratio, stored pairs (unclamped) | fresh pairs | corr | gap |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ti = r["time_input"] if r["time_input"] == "raw" else f"sinusoidal {r['time_periods'][0]:g}-{r['time_periods'][1]:g}"
        print(f"| {r['run']} | {ti} | {r['mean_abs_stored']:.4f} ({r['mean_abs_stored_unclamped']:.4f}) | "
              f"{r['mean_abs_fresh']:.4f} | {r['corr']:.2f} | {r['gap']:.4f} |")
    if args.json:
        atomic_write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
