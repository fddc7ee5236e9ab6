#!/usr/bin/env python
"""The imitation pipeline end to end: collect demonstrations, train the flow policy and the MSE
baseline with the same backbone, evaluate both, print the table.

    python scripts/pipeline.py --config configs/point_obstacle.yaml [--demos 200] [--eval-episodes 200] \
        [--out runs/point_obstacle] [key.sub=value ...]

Steps (each is also a script of its own):
1. `collect_demos.py`: the task's scripted expert (multimodal) in the batched env -> `<out>/data`, a
   LeRobot v3.0 dataset (cameras as PNG images, or mp4 video with `data.video: true`)
   (skipped when the dataset already holds enough episodes). With several embodiments
   (`data.roots` in the config), one dataset per robot.
2. `train.py` twice: `policy.head=flow` and `policy.head=regression` -> `<out>/flow`, `<out>/regression`
   (`--resume` continues killed runs).
3. `evaluate.py`: success rate with a 95% interval over `--eval-episodes` episodes per robot, plots in
   `<out>/<head>/eval*`.
The table goes to stdout and `<out>/results.json`. `env.id` may be any id `collect_demos.py` takes
(ours, `fmpolicy/MetaWorld-v0` with `env.kwargs: {tasks: mt10, state: full}`; multi-task envs add one
row per instruction). `env.collect_kwargs` (optional) holds env options for the demonstrations only, over
`env.kwargs` (Meta-World's `steps_after_success: 20`: demonstrations that go on past the success);
`--spread POOL` (Meta-World) puts the demonstrations at goal variations that cover the starts
(`collect_demos.py --spread`); `--only-success` keeps only demonstrations that succeed (with `--spread`, a
failed one is replaced by the nearest variation of its cluster; with `env.collect_kwargs.max_episode_steps`:
those that succeed within that many steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fmpolicy.config import (DEFAULT_EMBODIMENT, DataConfig, ImitationConfig, dataset_auto_fields, load_config,
                             read_config_dict)
from fmpolicy.io import atomic_write_json
from fmpolicy.scripting import load_script


HERE = Path(__file__).resolve().parent
collect_demos, evaluate, train = (load_script(n, HERE) for n in ("collect_demos", "evaluate", "train"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--demos", type=int, default=200, help="expert episodes to collect (per robot)")
    p.add_argument("--eval-episodes", type=int, default=200, help="evaluation episodes (per robot)")
    p.add_argument("--heads", default="flow,regression", help="which policies to train, comma separated")
    p.add_argument("--out", help="run folder (default runs/<config name>)")
    p.add_argument("--seed", type=int, default=0, help="data collection seed (evaluation uses 10000+)")
    p.add_argument("--spread", type=int, default=None, metavar="POOL",
                   help="Meta-World: demonstrations at the goal variations among POOL that cover the starts "
                        "(collect_demos.py --spread)")
    p.add_argument("--only-success", action="store_true",
                   help="keep only the demonstrations that succeed (collect_demos.py --only-success)")
    p.add_argument("--resume", action="store_true", help="resume killed training runs")
    p.add_argument("--overwrite", action="store_true",
                   help="move earlier training runs in the folder aside (<run>.old-<time>) and train again")
    p.add_argument("overrides", nargs="*", help="dotted overrides for training, e.g. train.steps=500")
    args = p.parse_args(argv)

    out = Path(args.out or Path("runs") / Path(args.config).stem)
    # widths given as "auto" come from the datasets this script is about to collect: such a config is
    # checked in full once they exist (step 2); any other is checked now, before the collection
    plan = read_config_dict(args.config, args.overrides)
    if not dataset_auto_fields(plan):
        load_config(ImitationConfig, args.config, args.overrides)
    env = plan.get("env") or {}
    if not env.get("id"):
        sys.exit(f"error: {args.config} has no env.id: the pipeline needs the task to collect and evaluate")
    # one (embodiment, env kwargs) per robot: several when the config lists embodiments
    embodiments = (plan.get("policy") or {}).get("embodiments") or [{"name": DEFAULT_EMBODIMENT}]
    robots = env.get("robots") or {embodiments[0]["name"]: env.get("kwargs", {})}
    video = bool((plan.get("data") or {}).get("video", DataConfig.video))
    # env.collect_kwargs: options for the demonstrations only, over env.kwargs (e.g. Meta-World's
    # steps_after_success: demonstrations that go on past the success; the evaluation keeps env.kwargs)
    collect_kwargs = env.get("collect_kwargs") or {}
    if not isinstance(collect_kwargs, dict):
        sys.exit(f"error: env.collect_kwargs = {collect_kwargs!r} is invalid: expected a mapping of env options")

    # ---- 1. demonstrations ----
    roots = {}
    for i, (name, kwargs) in enumerate(robots.items()):
        root = out / "data" / name
        task_kwargs = {k: v for k, v in {**kwargs, **collect_kwargs}.items() if k != "image_size"}  # the camera is collect's own flag
        camera = ["--image-size", str(kwargs["image_size"])] if kwargs.get("image_size") else []
        camera += ["--video"] if camera and video else []
        collect_demos.main(["--env", env["id"], "--episodes", str(args.demos), "--num-envs", str(min(64, args.demos)),
                            "--out", str(root), "--seed", str(args.seed + 100 * i), "--env-kwargs",
                            json.dumps(task_kwargs), *camera, *(["--spread", str(args.spread)] if args.spread else []),
                            *(["--only-success"] if args.only_success else []), "--no-progress"])
        roots[name] = str(root)
    data_override = ([f"data.roots={json.dumps(roots)}"] if len(roots) > 1 else [f"data.root={next(iter(roots.values()))}"])
    load_config(ImitationConfig, args.config, [*args.overrides, *data_override])  # "auto" widths resolve now

    # ---- 2. training, 3. evaluation ----
    results = []
    for head in args.heads.split(","):
        run = out / head
        start = time.perf_counter()
        train.main(["--config", args.config, *args.overrides, *data_override, f"policy.head={head}",
                    f"train.out_dir={run}", *(["--resume"] if args.resume else []),
                    *(["--overwrite"] if args.overwrite else [])])
        minutes = (time.perf_counter() - start) / 60
        for name, kwargs in robots.items():
            summary = evaluate.main(["--policy", str(run / "policy"), "--env", env["id"], "--env-kwargs", json.dumps(kwargs),
                                     "--episodes", str(args.eval_episodes), "--out", str(run / f"eval_{name}"),
                                     *(["--embodiment", name] if len(robots) > 1 else [])])
            results.append({"head": head, "robot": name, "train_minutes": minutes, **summary})

    # ---- table ----
    print(f"\n{env['id']}: {args.demos} demonstrations per robot, {args.eval_episodes} evaluation episodes per robot")
    print(f"{'policy':<11} {'robot':<10} {'train min':>9} {'success':>8} {'95% interval':>15} {'collisions':>10}")
    for r in results:
        lo, hi = r["ci95"]
        coll = f"{100 * r['collision_rate']:.1f}%" if "collision_rate" in r else "-"
        print(f"{r['head']:<11} {r['robot']:<10} {r['train_minutes']:>9.1f} {100 * r['success_rate']:>7.1f}% "
              f"{f'[{100 * lo:.1f}, {100 * hi:.1f}]':>15} {coll:>10}")
        for task, row in r.get("success_by_task", {}).items():  # multi-task envs (Meta-World MT10)
            print(f"{'':<11} {'':<10} {'':>9} {100 * row['success_rate']:>7.1f}%   {task}")
    atomic_write_json(out / "results.json", results)
    print(f"\nresults: {out / 'results.json'}; plots: {out}/<policy>/eval_<robot>/")
    return {"results": results}


if __name__ == "__main__":
    main()
