#!/usr/bin/env python
"""Few-demonstration imitation, then FPO fine-tuning vs continued imitation for the same wall time.

    python scripts/finetune_experiment.py [--out runs/finetune] [--demos 10] [--fpo-iterations 150] [--pull 0.1]

1. `pipeline.py` with `configs/point_obstacle_few.yaml`: the scripted expert's `--demos` episodes,
   imitation (an MLP flow expert) -> `<out>/bc/flow/policy`, evaluated over `--eval-episodes`.
2. `train_fpo.py` with `configs/fpo_point_finetune.yaml` from that policy for `--fpo-iterations`
   iterations (its own evaluations every `rl.eval_every` iterations, on fixed start states)
   -> `<out>/fpo/policy`. Its wall time T is measured, evaluations included. Then the same with the
   pull towards the imitation policy (`rl.fpo.ref_coef=<--pull>`, 0 = skip) -> `<out>/fpo_pull/policy`:
   the demonstrations go round the obstacle both ways; without the config's `fpo.normalizer_samples`
   FPO alone kept only one of them (docs/rl.md).
3. Continued imitation: the imitation run resumed from its last checkpoint on the same demonstrations
   for as many more steps as fit in T (at the steps/s the first run measured) -> `<out>/bc/flow`.
4. All the policies evaluated by `evaluate.py` on the same `--eval-episodes` episodes (seed 10000,
   random initial noise as deployed): success and which way round the obstacle (above / below), a
   table, `<out>/results.json`, `<out>/finetune.png` (success against time) and `<out>/paths.png`.

Steps 1 and 3 change `<out>/bc/flow` in place: run the experiment in a fresh `--out`.
Extra `key=value` arguments override the FPO config (e.g. `rl.lr=3.0e-4`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fmpolicy.config import ImitationConfig, load_config
from fmpolicy.io import atomic_write, atomic_write_json
from fmpolicy.rl.config import load_rl_config
from fmpolicy.scripting import load_script

HERE = Path(__file__).resolve().parent
evaluate, pipeline, train, train_fpo = (load_script(n, HERE) for n in ("evaluate", "pipeline", "train", "train_fpo"))

BC_CONFIG = "configs/point_obstacle_few.yaml"
FPO_CONFIG = "configs/fpo_point_finetune.yaml"
ENV = "fmpolicy/PointObstacle-v0"


def _evaluate(policy: Path, episodes: int, out: Path) -> dict:
    return evaluate.main(["--policy", str(policy), "--env", ENV, "--episodes", str(episodes), "--out", str(out),
                          "--render-size", "0"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--demos", type=int, default=10, help="expert episodes for imitation")
    p.add_argument("--bc-steps", type=int, default=0, help="imitation steps (0: the config's train.steps)")
    p.add_argument("--fpo-iterations", type=int, default=150, help="FPO iterations (rollout + update)")
    p.add_argument("--eval-episodes", type=int, default=200)
    p.add_argument("--pull", type=float, default=0.1, help="fpo.ref_coef of the FPO arm with the pull (0: no such arm)")
    p.add_argument("--overwrite", action="store_true", help="move the runs of an earlier experiment in --out aside")
    p.add_argument("overrides", nargs="*", help="overrides for the FPO config, e.g. rl.lr=3.0e-4")
    args = p.parse_args(argv)
    out = Path(args.out)
    bc_run = out / "bc" / "flow"

    # ---- 1. imitation from few demonstrations ----
    bc_config = load_config(ImitationConfig, BC_CONFIG)
    bc_steps = args.bc_steps or bc_config.train.steps
    start = time.perf_counter()
    pipeline.main(["--config", BC_CONFIG, "--heads", "flow", "--demos", str(args.demos), "--eval-episodes",
                   str(args.eval_episodes), "--out", str(out / "bc"), f"train.steps={bc_steps}",
                   *(["--overwrite"] if args.overwrite else [])])
    bc_seconds = time.perf_counter() - start
    bc_log = [json.loads(line) for line in (bc_run / "log.jsonl").read_text().splitlines()]
    steps_per_s = sum(r["steps_per_s"] for r in bc_log) / len(bc_log)
    results = {"bc": {**_evaluate(bc_run / "policy", args.eval_episodes, out / "eval_bc"), "steps": bc_steps,
                      "train_seconds": bc_seconds}}

    # ---- 2. FPO from the imitation policy ----
    rl = load_rl_config(FPO_CONFIG, args.overrides).rl
    steps_per_iteration = rl.num_envs * rl.num_macro_steps * (rl.n_action_steps or bc_config.policy.n_action_steps)

    def run_fpo(name: str, extra: list[str]) -> float:
        """FPO from the imitation policy into <out>/<name>; -> its wall time in seconds."""
        start = time.perf_counter()
        fpo = train_fpo.main(["--config", FPO_CONFIG, f"init_from={bc_run / 'policy'}", f"rl.out_dir={out / name}",
                              f"rl.total_env_steps={steps_per_iteration * args.fpo_iterations}", "rl.progress=false",
                              *(["--overwrite"] if args.overwrite else []), *args.overrides, *extra])
        seconds = time.perf_counter() - start
        results[name] = {**_evaluate(out / name / "policy", args.eval_episodes, out / f"eval_{name}"),
                         "train_seconds": seconds, "iterations": args.fpo_iterations,
                         "curve": [{k: h.get(k) for k in ("iteration", "env_steps", "elapsed_s", "eval_success",
                                                          "eval_success_sampled", "eval_return")}
                                   for h in fpo.history if "eval_success" in h]}
        return seconds

    fpo_seconds = run_fpo("fpo", [])
    if args.pull:
        run_fpo("fpo_pull", [f"rl.fpo.ref_coef={args.pull}"])

    # ---- 3. continued imitation for the same wall time ----
    extra = max(1, round(fpo_seconds * steps_per_s))
    start = time.perf_counter()
    train.main(["--config", BC_CONFIG, f"data.root={out / 'bc' / 'data' / 'default'}", f"train.out_dir={bc_run}",
                f"train.steps={bc_steps + extra}", f"train.save_every={bc_steps + extra}", "--resume",
                "--allow-change", "train.steps"])  # continued on purpose: a longer cosine than the first run's
    results["bc_continued"] = {**_evaluate(bc_run / "policy", args.eval_episodes, out / "eval_bc_continued"),
                               "steps": bc_steps + extra, "train_seconds": time.perf_counter() - start}

    # ---- table, JSON, plot ----
    print(f"\n{ENV}: imitation on {args.demos} demonstrations, then {fpo_seconds / 60:.1f} more minutes of FPO "
          f"or of imitation; {args.eval_episodes} evaluation episodes each (seed 10000)")
    print(f"{'policy':<32} {'extra minutes':>13} {'success':>8} {'95% interval':>15} {'collisions':>10} "
          f"{'above':>6} {'below':>6}")
    names = {"bc": f"imitation ({bc_steps} steps)", "fpo": f"+ FPO ({args.fpo_iterations} it.)",
             "fpo_pull": f"+ FPO with pull {args.pull} ({args.fpo_iterations} it.)",
             "bc_continued": f"+ imitation ({extra} steps)"}
    for key, r in results.items():
        lo, hi = r["ci95"]
        minutes = 0.0 if key == "bc" else r["train_seconds"] / 60
        print(f"{names[key]:<32} {minutes:>13.1f} {100 * r['success_rate']:>7.1f}% "
              f"{f'[{100 * lo:.1f}, {100 * hi:.1f}]':>15} {100 * r['collision_rate']:>9.1f}% "
              f"{100 * r['passed_above']:>5.1f}% {100 * r['passed_below']:>5.1f}%")
    atomic_write_json(out / "results.json", results)
    plot(results, out / "finetune.png")
    plot_paths(results, out, out / "paths.png")
    print(f"\nresults: {out / 'results.json'}; plots: {out / 'finetune.png'}, {out / 'paths.png'}")
    return results


def plot_paths(results: dict, out: Path, path: Path) -> None:
    """The recorded paths of each arm side by side (evaluate.py's trajectories.png), titled with its
    success rate and which way round the obstacle its episodes went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"bc": "imitation", "fpo": "+ FPO", "fpo_pull": "+ FPO with pull", "bc_continued": "+ imitation"}
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4.8), squeeze=False)
    for ax, (key, r) in zip(axes[0], results.items()):
        ax.imshow(plt.imread(out / f"eval_{key}" / "trajectories.png"))
        ax.axis("off")
        ax.set_title(f"{labels[key]}: success {100 * r['success_rate']:.1f}%\nround the obstacle above "
                     f"{100 * r['passed_above']:.1f}%, below {100 * r['passed_below']:.1f}%", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


def plot(results: dict, path: Path) -> None:
    """FPO's evaluation success against wall time (with and without the pull), with the two imitation
    end points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (key, label) in enumerate((("fpo", "FPO"), ("fpo_pull", "FPO with pull"))):
        if key not in results:
            continue
        curve = results[key]["curve"]
        ax.plot([c["elapsed_s"] / 60 for c in curve], [c["eval_success"] for c in curve], "o-", color=f"C{i}",
                label=f"{label}, zero initial noise")
        ax.plot([c["elapsed_s"] / 60 for c in curve], [c["eval_success_sampled"] for c in curve], "x--",
                color=f"C{i}", label=f"{label}, random initial noise")
    ax.plot([0], [results["bc"]["success_rate"]], "ks", label="imitation (start)")
    more = results["bc_continued"]["steps"] - results["bc"]["steps"]
    ax.plot([results["bc_continued"]["train_seconds"] / 60], [results["bc_continued"]["success_rate"]], "rs",
            label=f"imitation continued ({more} more steps)")
    ax.set_xlabel("minutes after imitation (2-core CPU)")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    main()
