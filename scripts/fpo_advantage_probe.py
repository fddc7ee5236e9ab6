#!/usr/bin/env python
"""What FPO's update does to a policy when the advantages carry no information (or a little).

    python scripts/fpo_advantage_probe.py [--advantages noise|positive|negative|nearest] [--signal 0.3]
        [--policy flow|gaussian] [--iterations 120] [--seed 0] [rl.clip=0.005 rl.fpo.normalizer_samples=1 ...]
        ['policy.expert={kind: transformer, width: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0, ...}']

One state, 2-D actions. The flow policy (an MLP expert, width 128, depth 3) first imitates two modes at
(+0.5, 0) and (-0.5, 0) (std 0.1; `--bc-steps` Adam steps of 256); the Gaussian policy (PPO's baseline)
starts at its initialisation (mean about 0, std 0.1). Then `--iterations` FPO / PPO updates
(`fmpolicy.rl.trainer.update_policy`, 256 samples an iteration, 4 epochs x 4 minibatches, lr 3e-4, clip
0.05, m = 8, mean ratio: `configs/fpo_bandit.yaml`'s update) with advantages drawn independently of the
actions: standard normal (`noise`), or only its positive (`positive`) or negative (`negative`) part,
unstandardised for the latter two (pass `rl.normalize_advantages=false`). Under all three the exact
policy gradient is zero in expectation: a change of the policy is the update's own doing. `--signal s`
adds s x (a_y / 0.1) to every advantage: a real preference for +y, to see how fast it is learnt.
`nearest`: the advantage is minus the distance to the nearer mode, so both modes are equally good (the
middle row of the GridWorld in one state): the exact gradient narrows each mode and keeps their shares;
an update that moves the shares picks a side by itself. `policy.expert...` overrides swap the expert
(e.g. the tiny transformer of docs/rl.md's GridWorld runs).

Every 10 iterations: the samples' mean and std per axis, the fractions within 0.3 of each mode
(`near+`, `near-`), and the update's approximate KL and clip fraction per minibatch step, as JSON lines;
the last line is the summary. docs/rl.md, "Advantages without information".
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from fmpolicy.config import apply_overrides, config_from_dict
from fmpolicy.rl.config import RLRunConfig
from fmpolicy.rl.trainer import UpdateBatch, make_actor, parameter_groups, update_policy
from fmpolicy.rl.value import ValueNet

MODES = torch.tensor([[0.5, 0.0], [-0.5, 0.0]])


def check_overrides(pairs: list[str]) -> list[str]:
    """The probe fixes the task: only the update (rl.<field>=<value>) and the expert (policy.expert...) may change."""
    for pair in pairs:
        if "=" not in pair or not pair.startswith(("rl.", "policy.expert")):
            raise SystemExit(f"override {pair!r}: expected rl.<field>=<value> or policy.expert<...>=<value>")
    return pairs


def main(argv: list[str] | None = None) -> dict:
    """Run the probe; -> the summary (also printed as the last JSON line)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", choices=("flow", "gaussian"), default="flow")
    p.add_argument("--advantages", choices=("noise", "positive", "negative", "nearest"), default="noise")
    p.add_argument("--signal", type=float, default=0.0, help="weight of a real preference for +y in the advantages")
    p.add_argument("--iterations", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bc-steps", type=int, default=1500, help="imitation steps of the flow's two-mode start")
    p.add_argument("--batch", type=int, default=256, help="samples an iteration")
    p.add_argument("--time-input", choices=("raw", "sinusoidal"), default="raw", help="the flow expert's time input")
    p.add_argument("overrides", nargs="*", help="rl.<field>=<value>, e.g. rl.clip=0.005")
    args = p.parse_intermixed_args(argv)
    torch.set_num_threads(1)
    b = args.batch
    rl = {"policy_type": args.policy, "num_envs": b, "num_macro_steps": 1, "update_epochs": 4,
          "num_minibatches": 4, "lr": 3e-4, "clip": 0.05, "max_grad_norm": 0.5, "vf_coef": 0.0, "device": "cpu",
          "fpo": {"num_pairs": 8, "ratio_mode": "mean", "time_sampling": "uniform", "clamp_log_ratio": 10.0},
          "gaussian": {"squash": "clip", "init_log_std": math.log(0.1)}, "value": {"width": 16, "depth": 1}}
    cfg = config_from_dict(RLRunConfig, apply_overrides({
        "policy": {"state_dim": 1, "action_dim": 2, "chunk_size": 1, "n_action_steps": 1,
                   "expert": {"kind": "mlp", "width": 128, "depth": 3, "time_input": args.time_input,
                              "max_state_dim": 1, "max_action_dim": 2},
                   "normalization": {"state": "identity", "action": "identity"},
                   "sampler": {"method": "euler", "num_steps": 10}},
        "rl": rl, "env": {"id": "fmpolicy/TwoOptimaBandit-v0"}}, check_overrides(args.overrides)))
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    actor, _ = make_actor(cfg, torch.device("cpu"))

    def obs(n: int) -> dict:
        return {"observation.state": torch.zeros(n, 1)}

    if args.policy == "flow":  # the two-mode start
        policy = actor.policy
        opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
        for _ in range(args.bc_steps):
            target = MODES[torch.randint(0, 2, (256,), generator=g)] + 0.1 * torch.randn(256, 2, generator=g)
            loss, _ = policy.compute_loss({**obs(256), "action": target[:, None]}, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        actor.train(True)
    critic = ValueNet(1, cfg.rl.value, None, torch.device("cpu"))
    params = [q for q in actor.parameters() if q.requires_grad]
    optimizer = torch.optim.Adam(parameter_groups(actor, params, list(critic.parameters()), cfg.rl), lr=cfg.rl.lr, eps=1e-5)

    def measure() -> dict:
        with torch.no_grad():
            if args.policy == "flow":
                a = actor.policy.predict_action_chunk(obs(4000), generator=g)
            else:
                a = actor.eval_act(obs(4000), zero_noise=False, generator=g)
        a = a.reshape(-1, 2)
        near = (torch.cdist(a, MODES) < 0.3).float().mean(0)
        return {"mean": [round(x, 3) for x in a.mean(0).tolist()], "std": [round(x, 3) for x in a.std(0).tolist()],
                "near+": round(near[0].item(), 3), "near-": round(near[1].item(), 3)}

    start = measure()
    print(json.dumps({"iteration": 0, **start}), flush=True)
    record = {}
    for it in range(1, args.iterations + 1):
        o = obs(b)
        with torch.no_grad():
            chunk, store = actor.act(o, g)
        adv = torch.randn(b, generator=g)
        if args.advantages == "nearest":
            adv = -torch.cdist(chunk[:, 0].float(), MODES).min(1).values
        elif args.advantages == "positive":
            adv = adv.clamp(min=0)
        elif args.advantages == "negative":
            adv = adv.clamp(max=0)
        if args.signal:
            adv = adv + args.signal * chunk[:, 0, 1] / 0.1
        batch = UpdateBatch(obs=o, store=store, chunks=chunk, executed=torch.ones(b, 1, dtype=torch.bool),
                            advantages=adv, returns=torch.zeros(b), values=torch.zeros(b))
        minibatches = [torch.randperm(b, generator=g).chunk(cfg.rl.num_minibatches) for _ in range(cfg.rl.update_epochs)]
        try:
            stats, _ = update_policy(actor, critic, optimizer, batch, minibatches, cfg.rl, iteration=it)
        except FloatingPointError as e:  # a policy spread without bound (negative advantages, plain FPO)
            record = {"iteration": it, "stopped": str(e)}
            print(json.dumps(record), flush=True)
            break
        if it % 10 == 0:
            n = float(stats["updates"])
            record = {"iteration": it, **measure(), **{k: round(float(stats[k]) / n, 4) for k in ("approx_kl", "clip_fraction")}}
            print(json.dumps(record), flush=True)
    summary = {"summary": True, "policy": args.policy, "expert": cfg.policy.expert.kind, "advantages": args.advantages, "signal": args.signal,
               "seed": args.seed, "overrides": args.overrides, "start": start, "end": record}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
