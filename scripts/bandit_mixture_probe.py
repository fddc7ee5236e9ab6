#!/usr/bin/env python
"""Does reward maximisation keep two optima from scratch with *any* density family? PPO with a Gaussian
mixture whose log-likelihood is exact, on the two-optima bandit.

    python scripts/bandit_mixture_probe.py [--seeds 0,1,2,3,4] [--components 2] [--ent-coef 0]
        [--iterations 300] [--clip 0.05] [--reward-shape bump] [--json]

FPO from scratch ends on one optimum of `TwoOptimaBandit` in every run measured (docs/rl.md, "From
scratch"). Is that the flow's doing (its CFM-loss ratio, its missing entropy estimate), or what the
objective asks for? Here the policy is a K-component Gaussian mixture over the 2-D action (logits,
means, per-axis log stds; means drawn N(0, 0.1^2), log std -0.5, equal weights: a broad start about 0,
as a fresh flow's), whose log-likelihood and entropy are exact up to Monte Carlo. It is trained with
the clipped PPO objective (`--clip`; the bandit config's 0.05 by default), 256 samples an iteration, 4
epochs x 4 minibatches, Adam lr 3e-4, advantages = rewards standardised over the batch (one-step
episodes: the batch mean is the value), `fpo_bandit.yaml`'s update with an exact ratio instead of FPO's.
`--ent-coef c` adds c x the mixture's entropy, estimated with reparameterised samples of each component
(differentiable in the weights, means and stds): with it the optimum of E[r] + c H is the Boltzmann
density exp(r / c) / Z, which by symmetry puts half its mass on each optimum.

Every 25 iterations (JSON lines with --json): mean reward, the fractions of the samples within 0.3 of
each optimum (as the trainer's `near_optimum_pos/neg`), the mixture weights and means. Prints a table
per run and the summary: in how many seeds both optima keep >= 20% of the samples at the end.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch import Tensor, nn

from fmpolicy_envs.bandit import TwoOptimaBandit, mode_fractions


class Mixture(nn.Module):
    """A K-component Gaussian mixture over R^d with diagonal covariances."""

    def __init__(self, components: int, dim: int = 2, init_log_std: float = -0.5, mean_std: float = 0.1,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(components))
        self.mean = nn.Parameter(mean_std * torch.randn(components, dim, generator=generator))
        self.log_std = nn.Parameter(torch.full((components, dim), float(init_log_std)))

    @property
    def weights(self) -> Tensor:
        return self.logits.softmax(-1)

    def log_prob(self, a: Tensor) -> Tensor:
        """(b, d) -> (b,) exact log density."""
        z = (a[:, None, :] - self.mean[None]) / self.log_std.exp()[None]  # (b, K, d)
        comp = (-0.5 * z.pow(2) - self.log_std[None] - 0.5 * math.log(2 * math.pi)).sum(-1)  # (b, K)
        return (comp + self.logits.log_softmax(-1)[None]).logsumexp(-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
            eps = torch.randn(n, self.mean.shape[1], generator=generator)
            return self.mean[k] + self.log_std.exp()[k] * eps

    def entropy(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """-E[log p(a)] by n reparameterised samples of every component, weighted by the mixture weights:
        an unbiased estimate whose gradient reaches the weights, means and stds."""
        eps = torch.randn(n, *self.mean.shape, generator=generator)  # (n, K, d)
        a = self.mean[None] + self.log_std.exp()[None] * eps
        logp = self.log_prob(a.reshape(-1, a.shape[-1])).reshape(n, -1)  # (n, K)
        return -(self.weights * logp.mean(0)).sum()


def run(seed: int, args) -> list[dict]:
    """One PPO run; -> a row every `--log-every` iterations (and the last)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    policy = Mixture(args.components, generator=gen)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    env = TwoOptimaBandit(num_envs=args.batch, reward_shape=args.reward_shape)
    rows = []
    for it in range(1, args.iterations + 1):
        actions = policy.sample(args.batch, gen)
        rewards = env.reward(actions)
        with torch.no_grad():
            old_logp = policy.log_prob(actions)
        adv = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
        mb = args.batch // args.minibatches
        for _ in range(args.epochs):
            perm = torch.randperm(args.batch, generator=gen)
            for i in range(args.minibatches):
                idx = perm[i * mb:(i + 1) * mb]
                ratio = (policy.log_prob(actions[idx]) - old_logp[idx]).exp()
                surrogate = torch.min(ratio * adv[idx], ratio.clamp(1 - args.clip, 1 + args.clip) * adv[idx]).mean()
                loss = -surrogate
                if args.ent_coef:
                    loss = loss - args.ent_coef * policy.entropy(args.entropy_samples, gen)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
                opt.step()
        if it % args.log_every == 0 or it == args.iterations or it == 1:
            near_pos, near_neg = mode_fractions(actions)
            rows.append({"seed": seed, "iteration": it, "reward": float(rewards.mean()), "near_pos": near_pos,
                         "near_neg": near_neg, "weights": [round(w, 3) for w in policy.weights.tolist()],
                         "means": [[round(x, 3) for x in m] for m in policy.mean.tolist()],
                         "stds": [[round(x, 3) for x in s] for s in policy.log_std.exp().tolist()]})
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
    return rows


def both_kept(row: dict, floor: float = 0.2) -> bool:
    return row["near_pos"] >= floor and row["near_neg"] >= floor


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--components", type=int, default=2)
    p.add_argument("--ent-coef", type=float, default=0.0, help="weight of the mixture's entropy in the loss")
    p.add_argument("--entropy-samples", type=int, default=64, help="reparameterised samples per component")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--minibatches", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--clip", type=float, default=0.05)
    p.add_argument("--reward-shape", choices=("bump", "goal"), default="bump")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--json", action="store_true", help="print every logged row as a JSON line")
    args = p.parse_args(argv)
    if args.components < 1:
        raise SystemExit(f"--components {args.components}: expected an int >= 1")
    if args.batch % args.minibatches:
        raise SystemExit(f"--batch {args.batch}: expected a multiple of --minibatches {args.minibatches}")
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {s: run(s, args) for s in seeds}
    print(f"PPO, {args.components}-component Gaussian mixture, ent_coef {args.ent_coef}, clip {args.clip}, "
          f"{args.reward_shape} reward; cells: mean reward, near +, near -")
    its = [r["iteration"] for r in runs[seeds[0]]]
    print("seed " + " ".join(f"{'it ' + str(i):>17}" for i in its) + "  weights at the end")
    for s, rows in runs.items():
        cells = " ".join(f"{r['reward']:.2f} +{r['near_pos']:.2f} -{r['near_neg']:.2f}".rjust(17) for r in rows)
        print(f"{s:>4} {cells}  {rows[-1]['weights']}")
    kept = sum(both_kept(rows[-1]) for rows in runs.values())
    summary = {"components": args.components, "ent_coef": args.ent_coef, "clip": args.clip,
               "reward_shape": args.reward_shape, "iterations": args.iterations, "seeds": seeds,
               "both_kept": kept, "final": [rows[-1] for rows in runs.values()]}
    print(f"both optima kept (>= 20% of the samples each) at iteration {args.iterations}: {kept} of {len(seeds)}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
