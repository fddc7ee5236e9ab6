#!/usr/bin/env python
"""Evaluate a saved policy in a vectorized environment: success rate with a 95% interval.

    python scripts/evaluate.py --policy runs/point_obstacle_flow/policy --env fmpolicy/PointObstacle-v0 \
        --episodes 200 [--env-kwargs '{"n_links": 3}'] [--out runs/point_obstacle_flow/eval]
    python scripts/evaluate.py --policy runs/mw/policy --env fmpolicy/MetaWorld-v0 --env-kwargs '{"tasks": "mt10"}' \
        --num-envs 10 --episodes 500 --seed 10000        # held-out goal variations (>= 10000)
    python scripts/evaluate.py --policy runs/pend/policy --env InvertedPendulum-v5 --success-key is_success

`--noise zero` samples every chunk from initial noise 0 (the flow's deterministic chunk, as RL's own
evaluations do) instead of random noise; the summary records which. `--sampler rk4:5` (METHOD[:STEPS])
integrates each chunk with another method or step count than the policy's own (recorded as `sampler`).

--env is any registered gymnasium id: ours through their vector entry points, any other through
gymnasium's sync (or --vectorization async: one process per env) vector env with same-step autoreset, a
flat observation read as `observation.state` (cast to float32) and success read from
`info[--success-key]` (`fmpolicy.gym_adapter`); `--obs-map` maps dict observation keys to ours.

Writes `<out>/eval.json` (success rate, Wilson 95% interval, mean return and length, collision
rate, `state_z_max`: per state entry the largest |normalized state| the policy was given, with a warning
printed past 100 of the imitation data's standard deviations; on PointObstacle the fractions of episodes
that went round the obstacle above and below),
`<out>/trajectories.png` (the first episodes' xy paths: state dims 0 and 1) and `<out>/frames.png`
(an image strip of a few episodes), and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fmpolicy import FlowPolicy
from fmpolicy.config import resolve_device
from fmpolicy.errors import FmPolicyError
from fmpolicy.evaluation import EvalResult, evaluate_policy, parse_sampler
from fmpolicy.io import atomic_write, atomic_write_json
from fmpolicy.normalize import far_state_warning


def make_envs(env_id: str, num_envs: int, device: str, seed: int, kwargs: dict, success_key: str = "is_success",
              obs_map: dict | None = None, vectorization: str = "sync"):
    import fmpolicy_envs  # noqa: F401  (registers our ids)
    from fmpolicy.gym_adapter import make_vector_env

    return make_vector_env(env_id, num_envs, seed=seed, device=device, kwargs=kwargs, success_key=success_key,
                           obs_map=obs_map, vectorization=vectorization)


def swap_words(a: str, b: str):
    """A task_map that exchanges two words in each instruction ("go to the red goal" <-> "... blue ...")."""
    def swap(tasks: list[str]) -> list[str]:
        return [" ".join(b if w == a else a if w == b else w for w in t.split(" ")) for t in tasks]
    return swap


def instruction_followed(result: EvalResult, envs) -> float | None:
    """Fraction of episodes whose robot reached the goal its instruction names: came within the
    success radius of that goal's centre, widened by the goals' start noise (two-goal PointObstacle:
    goals named in fmpolicy_envs.core_point.GOAL_NAMES, drawn near core.goal_centres). With a swapped
    instruction the episode does not end there (the env's own goal is the other one), so the whole
    path counts, not its end. None for tasks without named goals."""
    from fmpolicy_envs import core_point

    core = getattr(envs.unwrapped, "core", None)
    if not result.tasks or not hasattr(core, "goal_centres") or len(core.goal_centres) < 2:
        return None
    centres = core.goal_centres.cpu().numpy()
    named = [next((i for i, n in enumerate(core_point.GOAL_NAMES) if f" {n} " in f" {t} "), None) for t in result.tasks]
    reach = core.success_radius + core.start_noise * np.sqrt(2)
    hits = [i is not None and bool(np.nanmin(np.linalg.norm(path[:, :2] - centres[i], axis=-1)) < reach)
            for path, i in zip(result.paths, named)]
    return float(np.mean(hits))


def obstacle_sides(result: EvalResult, env_id: str) -> dict[str, float] | None:
    """PointObstacle: the fractions of episodes that went round the obstacle (at the origin) above and
    below it, by the sign of y where the path first reaches x >= 0 (the expert's two modes). Episodes
    that never got that far count in neither. None for other tasks."""
    if "PointObstacle" not in env_id or result.paths is None or not len(result.paths):
        return None
    above = below = 0
    for path in result.paths:
        xy = path[~np.isnan(path[:, 0]), :2]
        crossed = np.flatnonzero(xy[:, 0] >= 0)
        if len(crossed):
            y = xy[crossed[0], 1]
            above, below = above + int(y > 0), below + int(y < 0)
    n = len(result.paths)
    return {"passed_above": above / n, "passed_below": below / n}


def plot_trajectories(result: EvalResult, path: Path, title: str, env_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    if "PointObstacle" in env_id:
        ax.add_patch(plt.Circle((0, 0), 0.25, color="0.7", label="obstacle"))
    for s in result.states:
        ax.plot(s[:, 0], s[:, 1], lw=1, alpha=0.7)
        ax.plot(s[:1, 0], s[:1, 1], "k.", ms=4)
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def save_strip(frames: np.ndarray, path: Path, columns: int = 8) -> None:
    """frames (T, e, 3, H, W) uint8 -> one row per episode, `columns` frames evenly spaced in time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.linspace(0, len(frames) - 1, columns).round().astype(int)
    rows = [np.concatenate([frames[i, j].transpose(1, 2, 0) for i in t], axis=1) for j in range(frames.shape[1])]
    plt.imsave(path, np.concatenate(rows, axis=0))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="directory written by save_pretrained (e.g. <run>/policy)")
    p.add_argument("--env", required=True, help="registered gymnasium id (ours, Meta-World's adapter, or any other)")
    p.add_argument("--success-key", default="is_success", help="the info entry that says an episode succeeded")
    p.add_argument("--obs-map", default="{}", help='JSON {env key: our key} for dict observations, e.g. '
                                                   '\'{"agent_pos": "observation.state"}\'')
    p.add_argument("--vectorization", default="sync", choices=("sync", "async"),
                   help="for ids without our vector env: environments in this process or one process each")
    p.add_argument("--env-kwargs", default="{}", help="JSON task options, e.g. '{\"n_links\": 3}'")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--num-envs", type=int, default=100, help="environments stepped together")
    p.add_argument("--seed", type=int, default=10_000, help="evaluation seed (keep it apart from training data seeds)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N: policy and environments")
    p.add_argument("--record", type=int, default=16, help="episodes kept for the plots")
    p.add_argument("--render-size", type=int, default=64, help="pixels of the image strip frames (0 = none)")
    p.add_argument("--embodiment", help="robot name, for a policy trained on several (policy.embodiments)")
    p.add_argument("--swap-instruction", metavar="A,B",
                   help="swap two words in every instruction (e.g. red,blue) and report how often the robot "
                        "reaches the goal the *given* instruction names (two-goal PointObstacle)")
    p.add_argument("--noise", default="random", choices=("random", "zero"),
                   help="initial noise of each chunk: random (drawn from --seed's generator) or zero (the flow's "
                        "deterministic chunk, as RL's own evaluations sample)")
    p.add_argument("--n-action-steps", type=int, help="chunk steps executed before the next chunk is sampled "
                   "(default: the policy's own n_action_steps)")
    p.add_argument("--inference-delay", type=int, default=0,
                   help="control steps an inference takes: each next chunk is sampled that many steps before the "
                        "current one runs out and runs from its own step d, as an asynchronous deployment executes "
                        "it ('latest', docs/serving.md) and FPO with rl.rollout_delay trains it (default 0: synchronous)")
    p.add_argument("--sampler", metavar="METHOD[:STEPS]",
                   help="integrate each chunk with this sampler instead of the policy's own, e.g. euler:30 or rk4:5 "
                        "(a flow policy; steps default to the policy's own)")
    p.add_argument("--out", help="output folder (default: <policy>/../eval)")
    args = p.parse_args(argv)
    try:
        kwargs = json.loads(args.env_kwargs)
        obs_map = json.loads(args.obs_map)
        device = str(resolve_device(args.device, "--device"))  # no CUDA for "cuda": a message, not a traceback
        policy = FlowPolicy.from_pretrained(args.policy, device=device)
        sampler = parse_sampler(args.sampler, policy) if args.sampler else None
        envs = make_envs(args.env, min(args.num_envs, args.episodes), device, args.seed, kwargs,
                         success_key=args.success_key, obs_map=obs_map, vectorization=args.vectorization)
        gen = torch.Generator(device).manual_seed(args.seed)
        task_map = swap_words(*args.swap_instruction.split(",")) if args.swap_instruction else None
        result = evaluate_policy(policy, envs, args.episodes, seed=args.seed, record=args.record,
                                 render_size=args.render_size, generator=gen, embodiment=args.embodiment,
                                 task_map=task_map, zero_noise=args.noise == "zero",
                                 n_action_steps=args.n_action_steps, inference_delay=args.inference_delay,
                                 sampler=sampler)
    except (FmPolicyError, json.JSONDecodeError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    out = Path(args.out) if args.out else Path(args.policy).parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    summary = {"policy": str(args.policy), "env": args.env, "env_kwargs": kwargs, "seed": args.seed,
               "embodiment": args.embodiment, "noise": args.noise,
               "n_action_steps": args.n_action_steps or policy.config.n_action_steps,
               "inference_delay": args.inference_delay,
               "sampler": vars(sampler or policy.config.sampler) if policy.config.head == "flow" else None,
               "head": policy.config.head, **result.summary()}
    by_task = result.success_by_task()
    if len(by_task) > 1:
        summary["success_by_task"] = by_task
    sides = obstacle_sides(result, args.env)
    if sides is not None:
        summary.update(sides)
    followed = instruction_followed(result, envs)
    if followed is not None:
        summary["swap_instruction"] = args.swap_instruction
        summary["reached_instructed_goal"] = followed
    atomic_write_json(out / "eval.json", summary)
    lo, hi = result.ci95
    line = (f"{args.env} {kwargs or ''} {policy.config.head}: success {100 * result.success_rate:.1f}% "
            f"[{100 * lo:.1f}, {100 * hi:.1f}] over {result.episodes} episodes" + (", zero noise" if args.noise == "zero" else ""))
    title = f"{args.env} {json.dumps(kwargs) if kwargs else ''}\n{policy.config.head}: success {100 * result.success_rate:.1f}% " \
            f"[{100 * lo:.1f}, {100 * hi:.1f}], {result.episodes} episodes"
    plot_trajectories(result, out / "trajectories.png", title, args.env)
    if len(result.frames):
        save_strip(result.frames[:, :4], out / "frames.png")
    if sides is not None:
        line += (f"; round the obstacle above {100 * sides['passed_above']:.1f}%, "
                 f"below {100 * sides['passed_below']:.1f}%")
    if followed is not None:
        line += f"; reached the goal the given instruction names: {100 * followed:.1f}%"
    print(line)
    if result.state_z_max is not None:
        warning = far_state_warning(torch.tensor(result.state_z_max), "in this evaluation")
        if warning:
            print(warning)
    if len(by_task) > 1:
        for task, row in by_task.items():
            print(f"  {row['success_rate'] * 100:5.1f}% [{100 * row['ci95'][0]:.1f}, {100 * row['ci95'][1]:.1f}] "
                  f"of {row['episodes']:4d}  {task}")
    return summary


if __name__ == "__main__":
    main()
