#!/usr/bin/env python
"""FPO vs Gaussian PPO on one task over several seeds: runs, mean and spread, curves.

    python scripts/rl_compare.py --config configs/fpo_pendulum.yaml --seeds 0,1,2 [--jobs 2] \
        [--out runs/compare/pendulum] [--gaussian "rl.clip=0.2"] [--flow ""] [key=value ...]

Each (method, seed) is one `scripts/train_fpo.py` run in `<out>/<method>_s<seed>`, started as a
subprocess with OMP_NUM_THREADS=1 (`--jobs` at a time). A run that finished already (its `policy/`
exists) is read, not re-run; a killed one is resumed from its last checkpoint, so the command can
simply be run again. Shared `key=value` overrides apply to both methods; `--flow` / `--gaussian` add
per-method ones (space separated).

Per run it reads `log.jsonl`: the last evaluation (`eval_return`, zero initial noise / the Gaussian's
mean; `eval_return_sampled`) and the mean rollout episode return over the last 10% of iterations.
Prints a table (mean and standard deviation over seeds, the median of the final evaluations: seeds
can split between outcomes, per-seed values) and writes `<out>/results.json` and `<out>/curves.png`
(rollout return and evaluation return against env steps, mean +- std over seeds). "best eval" is the
maximum over a run's evaluations: a picked maximum, biased upwards, shown to tell a late decline from
a policy that never got there; the final one is the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fmpolicy.io import atomic_write, atomic_write_json

SCRIPT = Path(__file__).resolve().parent / "train_fpo.py"


def run_one(config: str, out: Path, method: str, seed: int, overrides: list[str], name: str = "") -> dict:
    """One `train_fpo.py` run of `method` ("flow" or "gaussian") in `<out>/<name or method>_s<seed>`: started,
    resumed or only read (see the module docstring)."""
    run = out / f"{name or method}_s{seed}"
    if not (run / "policy").is_dir():
        args = [sys.executable, str(SCRIPT), "--config", config, f"rl.policy_type={method}", f"rl.seed={seed}",
                f"rl.out_dir={run}", "rl.progress=false", "--resume", *overrides]  # a fresh start when nothing to resume
        run.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        start = time.perf_counter()
        with open(run / "stdout.txt", "a") as log:
            code = subprocess.call(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            raise RuntimeError(f"{' '.join(args)} failed with exit code {code}: see {run / 'stdout.txt'}")
        print(f"{name or method} seed {seed}: {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return summarize(run)


def summarize(run: Path) -> dict:
    history = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    its = [h for h in history if h.get("iteration", 0) > 0]
    tail = its[-max(1, len(its) // 10):]
    returns = [h["episode_return"] for h in tail if h.get("episode_return") is not None]
    evals = [h for h in history if h.get("eval_return") is not None]
    return {
        "run": str(run),
        "env_steps": its[-1]["env_steps"],
        "minutes": its[-1].get("elapsed_s", sum(h["seconds"] for h in its)) / 60,
        "final_rollout_return": float(np.mean(returns)) if returns else None,
        "final_eval_return": evals[-1]["eval_return"] if evals else None,
        "final_eval_return_sampled": evals[-1].get("eval_return_sampled") if evals else None,
        # the best of all evaluations: a picked maximum, biased upwards; the final one is the result
        "best_eval_return": max(h["eval_return"] for h in evals) if evals else None,
        "curve": [(h["env_steps"], h["episode_return"]) for h in its if h.get("episode_return") is not None],
        "eval_curve": [(h["env_steps"], h["eval_return"]) for h in evals],
    }


def _stats(values: list) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "median": None, "values": []}
    return {"mean": float(np.mean(v)), "std": float(np.std(v)), "median": float(np.median(v)), "values": v}


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, ylabel in ((axes[0], "curve", "rollout episode return"),
                            (axes[1], "eval_curve", "evaluation return (zero noise / mean)")):
        for method, runs in results.items():
            curves = [r.get(key) for r in runs if len(r.get(key) or []) > 1]
            if not curves:
                continue
            grid = np.linspace(max(c[0][0] for c in curves), min(c[-1][0] for c in curves), 100)
            ys = np.stack([np.interp(grid, *zip(*c)) for c in curves])
            m, s = ys.mean(0), ys.std(0)
            label = {"flow": "FPO", "gaussian": "Gaussian PPO"}.get(method, method)
            ax.plot(grid, m, label=f"{label} ({len(curves)} seeds)")
            ax.fill_between(grid, m - s, m + s, alpha=0.25)
        ax.set_xlabel("env steps")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="flow,gaussian")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each on one thread)")
    p.add_argument("--out", help="default runs/compare/<config name>")
    p.add_argument("--flow", default="", help="extra overrides for FPO runs, space separated")
    p.add_argument("--gaussian", default="rl.clip=0.2", help="extra overrides for Gaussian PPO runs")
    p.add_argument("overrides", nargs="*", help="overrides for both methods, e.g. rl.total_env_steps=100000")
    args = p.parse_args(argv)
    out = Path(args.out or Path("runs/compare") / Path(args.config).stem)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    jobs = [(m, s, [*args.overrides, *getattr(args, m, "").split()]) for m in methods for s in seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(lambda j: run_one(args.config, out, *j), jobs))
    results: dict[str, list] = {m: [] for m in methods}
    for (m, _, _), r in zip(jobs, done):
        results[m].append(r)

    summary = {m: {key: _stats([r[key] for r in runs])
                   for key in ("final_eval_return", "final_eval_return_sampled", "best_eval_return",
                               "final_rollout_return", "minutes")}
               for m, runs in results.items()}
    print(f"\n{args.config}: seeds {seeds}, {done[0]['env_steps']} env steps per run")
    print(f"{'method':<10} {'eval return (zero noise)':>26} {'median':>8} {'rollout return (last 10%)':>27} "
          f"{'best eval':>18} {'minutes':>8}  per seed (eval)")
    for m, s in summary.items():
        e, r, b = s["final_eval_return"], s["final_rollout_return"], s["best_eval_return"]
        fmt = lambda d: f"{d['mean']:.1f} +- {d['std']:.1f}" if d["mean"] is not None else "-"  # noqa: E731
        median = f"{e['median']:.1f}" if e["median"] is not None else "-"
        print(f"{m:<10} {fmt(e):>26} {median:>8} {fmt(r):>27} {fmt(b):>18} {s['minutes']['mean']:>8.1f}  "
              f"{', '.join(f'{v:.1f}' for v in e['values'])}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"config": args.config, "seeds": seeds, "overrides": args.overrides,
                                             "flow": args.flow, "gaussian": args.gaussian,
                                             "summary": summary, "runs": results})
    plot(results, out / "curves.png", f"{Path(args.config).stem}: {len(seeds)} seeds")
    print(f"\nresults: {out / 'results.json'}; curves: {out / 'curves.png'}")
    return {"summary": summary, "runs": results}


if __name__ == "__main__":
    main()
