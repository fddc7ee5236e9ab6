#!/usr/bin/env python
"""Two optima, two modes: FPO fine-tuning of a two-mode imitation policy against Gaussian PPO.

    python scripts/bandit_modes.py [--out runs/bandit_modes] [--seeds 0,1,2] [--jobs 2] [key=value ...]

On `TwoOptimaBandit` with the goal reward (1 within `width` of either optimum, 0 elsewhere) both optima
are equally good. Steps:

1. Demonstrations: `--demos` actions, half drawn around each optimum (N(optimum, `--spread`^2), clipped
   to the box), at the bandit's constant state.
2. Imitation: the config's flow policy fitted to them with the CFM loss (`--bc-steps` AdamW steps of
   256) -> `<out>/imitation`. For comparison, the maximum-likelihood tanh-Gaussian of the same
   demonstrations (what a Gaussian policy would imitate: one mode between the two).
3. Fine-tuning (`configs/fpo_bandit_finetune.yaml`), each seed a resumable `train_fpo.py` subprocess
   (as `rl_compare.py` runs them, `--jobs` at a time):
   `fpo_ref`: FPO from the imitation policy with the pull towards it (`fpo.ref_coef`, the config's 0.1);
   `fpo`: the same without the pull (`fpo.ref_coef=0`);
   `ppo`: Gaussian PPO (clip 0.2) from scratch: a Gaussian cannot start from a two-mode flow.
4. Noise probe: FPO updates from the imitation policy with advantages drawn independently of the
   actions (standard normal), where the exact policy gradient is zero in expectation: how much of each
   mode the update noise alone removes, with and without the pull (`--probe-iterations`, `--probe-seeds`).

Mode fractions are those the trainer logs (`near_optimum_pos` / `near_optimum_neg`: actions within 0.3
of (0.6, 0.6) / (-0.6, -0.6)). Prints tables, writes `<out>/results.json` and `<out>/modes.png`.
Extra `key=value` arguments override the fine-tuning config for every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fmpolicy import FlowPolicy
from fmpolicy.batch import STATE
from fmpolicy.config import PolicyConfig
from fmpolicy.io import atomic_write, atomic_write_json
from fmpolicy.rl.actors import FlowActor
from fmpolicy_envs.bandit import OPTIMA, TwoOptimaBandit, mode_fractions
from fmpolicy.rl.config import RLRunConfig, load_rl_config
from fmpolicy.rl.objectives import compute_policy_surrogate, normalize_advantages
from fmpolicy.scripting import load_script

rl_compare = load_script("rl_compare", Path(__file__).resolve().parent)

CONFIG = "configs/fpo_bandit_finetune.yaml"
METHODS = {  # name -> (policy type, overrides on top of the config)
    "fpo_ref": ("flow", []),
    "fpo": ("flow", ["rl.fpo.ref_coef=0"]),
    "ppo": ("gaussian", ["rl.clip=0.2", "init_from=''"]),
}
LABELS = {"fpo_ref": "FPO + pull to the imitation policy", "fpo": "FPO, no pull", "ppo": "Gaussian PPO (from scratch)"}
TABLE_ITERATIONS = (1, 25, 50, 100, 200, 300)


def two_mode_demos(n: int, spread: float, seed: int) -> torch.Tensor:
    """(n, 2) demonstrated actions: a fair coin picks the optimum, then N(optimum, spread^2), clipped."""
    g = torch.Generator().manual_seed(seed)
    optima = torch.tensor(OPTIMA)
    which = torch.randint(0, len(OPTIMA), (n,), generator=g)
    return (optima[which] + spread * torch.randn(n, 2, generator=g)).clamp(-1.0, 1.0)


def fit_imitation(config: PolicyConfig, demos: torch.Tensor, steps: int, seed: int, lr: float = 1e-3) -> FlowPolicy:
    """The flow policy fitted to the demonstrations (constant zero state) by `steps` CFM steps of 256."""
    torch.manual_seed(seed)
    policy = FlowPolicy(config)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, demos.shape[0], (256,), generator=g)
        batch = {STATE: torch.zeros(256, config.state_dim), "action": demos[idx][:, None, :]}
        loss, _ = policy.compute_loss(batch, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy.eval()


def action_summary(actions: torch.Tensor, env: TwoOptimaBandit) -> dict:
    """Mean reward and the two mode fractions of (b, 2) actions."""
    pos, neg = mode_fractions(actions)
    return {"return": float(env.reward(actions).mean()), "near_pos": pos, "near_neg": neg}


def gaussian_imitation(demos: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Samples (n, 2) of the maximum-likelihood diagonal Gaussian of atanh(demos), squashed by tanh."""
    u = torch.atanh(demos.clamp(-0.999, 0.999))
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(u.mean(0) + u.std(0) * torch.randn(n, 2, generator=g))


def noise_probe(policy_dir: Path, config: RLRunConfig, iterations: int, ref_coef: float, seed: int,
                every: int = 10) -> list[dict]:
    """The FPO update loop of `config.rl` (epochs, minibatches, clip, Adam, gradient clip) from the saved
    policy, with the advantages replaced by standard-normal draws independent of the actions.
    -> [{"iteration", "near_pos", "near_neg"}] every `every` iterations (4,000 samples each)."""
    rc = config.rl
    torch.manual_seed(seed)
    actor = FlowActor(FlowPolicy.from_pretrained(policy_dir), dataclasses.replace(rc.fpo, ref_coef=ref_coef))
    optimizer = torch.optim.Adam(actor.parameters(), lr=rc.lr, eps=1e-5)
    g = torch.Generator().manual_seed(seed)
    b = rc.num_envs
    out = []
    for it in range(iterations + 1):
        if it % every == 0 or it == iterations:
            with torch.no_grad():
                a = actor.act({STATE: torch.zeros(4000, 1)}, g)[0][:, 0]
            pos, neg = mode_fractions(a)
            out.append({"iteration": it, "near_pos": pos, "near_neg": neg})
        if it == iterations:
            break
        obs = {STATE: torch.zeros(b, 1)}
        chunk, store = actor.act(obs, g)
        adv = torch.randn(b, generator=g)
        for _ in range(rc.update_epochs):
            for idx in torch.randperm(b, generator=g).chunk(rc.num_minibatches):
                o, s = {STATE: obs[STATE][idx]}, {k: v[idx] for k, v in store.items()}
                log_ratio, _ = actor.log_ratio(o, chunk[idx], s)
                a_mb = normalize_advantages(adv[idx]) if rc.normalize_advantages else adv[idx]
                loss = compute_policy_surrogate(log_ratio.exp(), a_mb, rc.clip, rc.surrogate).mean()
                reg = actor.regularizer(o, s)
                if reg is not None:
                    loss = loss + reg[0]
                optimizer.zero_grad()
                loss.backward()
                if rc.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(actor.parameters(), rc.max_grad_norm)
                optimizer.step()
    return out


def mode_curve(run: Path) -> list[dict]:
    """[{"iteration", "return", "near_pos", "near_neg"}] from a run's log."""
    history = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{"iteration": h["iteration"], "return": h["episode_return"], "near_pos": h["near_optimum_pos"],
             "near_neg": h["near_optimum_neg"]} for h in history if h.get("iteration", 0) > 0]


def both_modes_kept(point: dict, threshold: float = 0.2) -> bool:
    """Each optimum holds at least `threshold` of the actions."""
    return min(point["near_pos"], point["near_neg"]) >= threshold


def plot(curves: dict[str, list[list[dict]]], probes: dict[str, list[list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, runs in curves.items():
        for i, run in enumerate(runs):
            its = [p["iteration"] for p in run]
            kw = {"color": f"C{list(curves).index(name)}", "alpha": 0.8,
                  "label": LABELS.get(name, name) if i == 0 else None}
            axes[0].plot(its, [p["return"] for p in run], **kw)
            axes[1].plot(its, [min(p["near_pos"], p["near_neg"]) for p in run], **kw)
    for name, runs in probes.items():
        color = "C1" if name == "no pull" else "C0"  # the colours of the runs without / with the pull
        for j, probe in enumerate(runs):
            its = [p["iteration"] for p in probe]
            axes[2].plot(its, [min(p["near_pos"], p["near_neg"]) for p in probe], color=color, alpha=0.8,
                         label=name if j == 0 else None)
    titles = ("rollout return (goal reward)", "fraction near the less-used optimum",
              "noise probe (action-independent advantages):\nfraction near the less-used optimum")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _at(run: list[dict], iteration: int) -> dict | None:
    return next((p for p in run if p["iteration"] == iteration), None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--out", default="runs/bandit_modes")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    p.add_argument("--demos", type=int, default=2000)
    p.add_argument("--spread", type=float, default=0.25, help="std of the demonstrations around each optimum")
    p.add_argument("--bc-steps", type=int, default=3000)
    p.add_argument("--bc-seed", type=int, default=0, help="seed of the imitation policy's weights and CFM noise")
    p.add_argument("--probe-iterations", type=int, default=100, help="0: no noise probe")
    p.add_argument("--probe-seeds", default="0,1,2")
    p.add_argument("overrides", nargs="*", help="overrides for every run, e.g. rl.total_env_steps=25600")
    args = p.parse_args(argv)
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]
    imitation = out / "imitation"
    overrides = [*args.overrides, f"init_from={imitation}"]
    config = load_rl_config(args.config, overrides)
    env = TwoOptimaBandit(num_envs=1, **config.env.kwargs)

    # ---- 1-2. demonstrations and imitation ----
    demos = two_mode_demos(args.demos, args.spread, seed=0)
    if not (imitation / "config.json").is_file():
        fit_imitation(config.policy, demos, args.bc_steps, seed=args.bc_seed).save_pretrained(imitation)
    policy = FlowPolicy.from_pretrained(imitation)
    with torch.no_grad():
        flow_actions = policy.predict_action_chunk({STATE: torch.zeros(4000, 1)},
                                                   generator=torch.Generator().manual_seed(1))[:, 0]
    start = {"demonstrations": action_summary(demos, env),
             "flow imitation": action_summary(flow_actions, env),
             "Gaussian imitation": action_summary(gaussian_imitation(demos, 4000, seed=1), env)}

    # ---- 3. fine-tuning runs ----
    names = args.methods.split(",")
    jobs = [(name, seed) for name in names for seed in seeds]

    def run(job: tuple[str, int]) -> Path:
        name, seed = job
        kind, extra = METHODS[name]
        rl_compare.run_one(args.config, out, kind, seed, [*overrides, *extra], name=name)
        return out / f"{name}_s{seed}"

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        dirs = list(pool.map(run, jobs))
    curves: dict[str, list[list[dict]]] = {name: [] for name in names}
    for (name, _), d in zip(jobs, dirs):
        curves[name].append(mode_curve(d))

    # ---- 4. noise probe ----
    probes = {}
    if args.probe_iterations:
        ref = config.rl.fpo.ref_coef or 0.1
        probe_seeds = [int(s) for s in args.probe_seeds.split(",")]
        probes = {name: [noise_probe(imitation, config, args.probe_iterations, coef, seed=s) for s in probe_seeds]
                  for name, coef in (("no pull", 0.0), (f"ref_coef {ref}", ref))}

    # ---- report ----
    print(f"\n{args.config}, goal radius {env.width}: return / near + / near - of 4,000 sampled actions")
    for name, s in start.items():
        print(f"  {name:<20} {s['return']:.2f} / {s['near_pos']:.2f} / {s['near_neg']:.2f}")
    iterations = [i for i in TABLE_ITERATIONS if all(_at(r, i) for rs in curves.values() for r in rs)]
    last = min(r[-1]["iteration"] for rs in curves.values() for r in rs)
    iterations = sorted(set(iterations) | {last})
    print(f"\nrollouts (cells: return, near +, near -; one line per seed {seeds})")
    print(f"{'run':<11} " + " ".join(f"{'it ' + str(i):>17}" for i in iterations) + "  both kept at the end")
    summary = {}
    for name, runs in curves.items():
        kept = [both_modes_kept(_at(r, last)) for r in runs]
        summary[name] = {"both_modes_kept": kept, "final": [_at(r, last) for r in runs]}
        for seed, r in zip(seeds, runs):
            cells = " ".join(f"{c['return']:.2f} +{c['near_pos']:.2f} -{c['near_neg']:.2f}".rjust(17)
                             for c in (_at(r, i) for i in iterations))
            print(f"{name + ' s' + str(seed):<11} {cells}  {kept[seeds.index(seed)]}")
    for name, runs in probes.items():
        for seed, probe in zip(args.probe_seeds.split(","), runs):
            print(f"noise probe, {name}, seed {seed}: "
                  + ", ".join(f"it {q['iteration']}: +{q['near_pos']:.2f} -{q['near_neg']:.2f}" for q in probe))
    results = {"config": args.config, "overrides": args.overrides, "seeds": seeds, "demos": args.demos,
               "spread": args.spread, "bc_steps": args.bc_steps, "start": start, "summary": summary,
               "curves": curves, "noise_probe": probes}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    plot(curves, probes, out / "modes.png")
    print(f"\nresults: {out / 'results.json'}; plot: {out / 'modes.png'}")
    return results


if __name__ == "__main__":
    main()
