#!/usr/bin/env python
"""Where does a Meta-World policy fail? Per held-out episode: where its hand was when it first closed the
gripper, relative to the object, whether the object moved, how near it came to the goal (issue 17).

    python scripts/trace_metaworld.py --policy P|expert --task pick-place [--episodes 10] [--seed 10000]
                                      [--max-steps 500] [--sampler euler:30] [--noise random|zero] [--noise-seed S]
                                      [--json out.json]

Each episode is goal variation `--seed + i` of `--task` in a fresh reset of one `MetaWorldEnv` (the
policy's cameras, image size and state mode: proprio for a 4-d state, full for 39-d), run with the
policy's chunks (`n_action_steps` of each; random initial noise, episode i's from a generator seeded with
`--noise-seed` (default `--seed`) + i, or zero) or, with `--policy expert`, with Meta-World's scripted
policy on the same starts. Entries 4:7 of
Meta-World's observation are the task's object (the puck, the peg, a handle...), 36:39 its goal.

Per episode: `success` and the step it came at; `close_step`, the first step whose gripper action
exceeds +0.5 (Meta-World closes the fingers on positive actions) and `hand_minus_object_at_close` (m, xyz:
the hand's offset from the object then; the scripted pick-place policy closes 0.4 cm off the puck in x
and y, 6.7 cm above it: the hand's point sits above the fingertips); `object_moved` (the largest distance
of the object from its start); `min_hand_to_goal` (of that hand point, observation 0:3: not the
fingertip point reach's success is measured at, so it does not decide reach's success) and
`final_object_to_goal` (m); `object_set_down`, how often the object, once lifted more than 5 cm above its
start height, came back within 1 cm of it (carried, then put down again: peg-insert-side's failures lift the
peg to the hole's height and lower it to the table instead of pushing it in). The summary holds the success
rate, over the episodes that closed the gripper the mean absolute hand-object offset at the close per axis,
and the share of failed and of successful episodes with a set-down.

Why: a camera policy's success rate alone does not say whether it failed to find the object, to grasp
it, or to carry it to a goal it cannot see (docs/benchmarks/metaworld.md, Prove-it 2).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco: headless rendering

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fmpolicy import FlowPolicy  # noqa: E402
from fmpolicy.config import IMAGES_PREFIX  # noqa: E402
from fmpolicy.errors import FmPolicyError  # noqa: E402
from fmpolicy.evaluation import parse_sampler  # noqa: E402
from fmpolicy.io import atomic_write_json  # noqa: E402
from fmpolicy_envs.metaworld_env import GOAL, HAND, OBJECT  # noqa: E402  (positions in the 39-d observation)

CLOSE = 0.5  # a gripper action above this closes the fingers
LIFTED, DOWN = 0.05, 0.01  # m above the object's start height: lifted, and back down (set_downs)


def set_downs(heights: Sequence[float], start: float, lifted: float = LIFTED, down: float = DOWN) -> int:
    """How often an object's height went from more than `lifted` above `start` back to within `down` of it."""
    count, up = 0, False
    for z in heights:
        if not up and z > start + lifted:
            up = True
        elif up and z < start + down:
            up, count = False, count + 1
    return count


def make_env(task: str, policy: FlowPolicy | None):
    """A `MetaWorldEnv` with what the policy reads: its cameras at its image size, its state mode."""
    from fmpolicy_envs.metaworld_env import STATE_MODES, MetaWorldEnv

    if policy is None:
        return MetaWorldEnv(task=task, state="full")
    modes = {width: name for name, width in STATE_MODES.items()}
    if policy.config.state_dim not in modes:
        raise SystemExit(f"--policy: state_dim = {policy.config.state_dim} is not a Meta-World state "
                         f"(expected one of {sorted(modes)}: {modes})")
    enc = policy.encoder.config if policy.encoder is not None else None
    cameras = tuple(c[len(IMAGES_PREFIX):] for c in enc.cameras) if enc is not None else ()
    return MetaWorldEnv(task=task, state=modes[policy.config.state_dim], cameras=cameras,
                        image_size=enc.image_size if enc is not None else 64)


def run_episode(env, variation: int, act, max_steps: int) -> dict:
    """One episode of `act(obs, info) -> action (4,)` from goal variation `variation` -> its trace."""
    obs, info = env.reset(options={"variation": variation})
    start, goal = env.raw_obs[OBJECT].copy(), env.raw_obs[GOAL].copy()
    row: dict = {"variation": variation, "task": env.task_name, "success": False, "steps": None,
                 "object_start": start.round(4).tolist(), "goal": goal.round(4).tolist(),
                 "close_step": None, "hand_minus_object_at_close": None}
    moved, to_goal, heights = 0.0, np.inf, []
    for t in range(max_steps):
        action = np.asarray(act(obs, info), dtype=np.float32)
        if row["close_step"] is None and action[3] > CLOSE:
            row["close_step"] = t
            row["hand_minus_object_at_close"] = (env.raw_obs[HAND] - env.raw_obs[OBJECT]).round(4).tolist()
        obs, _, terminated, truncated, info = env.step(action)
        moved = max(moved, float(np.linalg.norm(env.raw_obs[OBJECT] - start)))
        heights.append(float(env.raw_obs[OBJECT][2]))
        to_goal = min(to_goal, float(np.linalg.norm(env.raw_obs[HAND] - goal)))
        if info["is_success"]:
            row["success"], row["steps"] = True, t + 1
        if terminated or truncated:
            break
    row.update(object_moved=round(moved, 4), min_hand_to_goal=round(to_goal, 4),
               final_object_to_goal=round(float(np.linalg.norm(env.raw_obs[OBJECT] - goal)), 4),
               object_set_down=set_downs(heights, float(start[2])))
    return row


def policy_actor(policy: FlowPolicy, seed: int, zero_noise: bool, sampler=None):
    """act(obs, info) for one episode: `n_action_steps` of each chunk, then a new chunk."""
    generator = torch.Generator().manual_seed(seed)
    queue: list[np.ndarray] = []

    def act(obs, info):
        if not queue:
            query = {k: torch.as_tensor(v)[None] for k, v in obs.items() if k.startswith("observation.")}
            query["task"] = [info["task"]]
            noise = policy.zero_noise(1) if zero_noise and policy.config.head == "flow" else None
            with torch.no_grad():
                chunk = policy.predict_action_chunk(query, noise=noise, generator=generator, sampler=sampler)[0]
            queue.extend(chunk[:policy.config.n_action_steps].cpu().numpy())
        return queue.pop(0)

    return act


def summarize(rows: list[dict]) -> dict:
    closed = [r for r in rows if r["hand_minus_object_at_close"] is not None]
    out = {"episodes": len(rows), "success_rate": float(np.mean([r["success"] for r in rows])),
           "closed": len(closed), "object_moved_5cm": float(np.mean([r["object_moved"] > 0.05 for r in rows]))}
    if closed:
        offsets = np.abs(np.array([r["hand_minus_object_at_close"] for r in closed]))
        out["mean_abs_hand_minus_object_at_close"] = offsets.mean(0).round(4).tolist()
    for name, ok in (("failures", False), ("successes", True)):
        group = [r for r in rows if r["success"] == ok and "object_set_down" in r]
        if group:
            out[f"set_down_in_{name}"] = float(np.mean([r["object_set_down"] > 0 for r in group]))
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", required=True, help="a directory written by save_pretrained, or 'expert'")
    p.add_argument("--task", default="pick-place", help="one Meta-World task")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=10_000, help="first goal variation (held out: >= 10000)")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--noise", default="random", choices=("random", "zero"), help="initial noise of each chunk")
    p.add_argument("--noise-seed", type=int, help="episode i draws its noise from a generator seeded with this + i "
                   "(default: --seed): other draws on the same goals")
    p.add_argument("--sampler", metavar="METHOD:STEPS", help="integrate with this instead of the policy's own")
    p.add_argument("--json", help="write the episodes and the summary here (atomically)")
    args = p.parse_args(argv)
    for name in ("episodes", "max_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)} is invalid: expected >= 1")
    from fmpolicy_envs.metaworld_env import MetaWorldExpert

    try:
        policy = None if args.policy == "expert" else FlowPolicy.from_pretrained(args.policy, device="cpu").eval()
        if args.sampler and policy is None:
            p.error(f"--sampler = {args.sampler!r}: the scripted expert samples nothing (expected a flow policy)")
        sampler = parse_sampler(args.sampler, policy) if args.sampler else None
        env = make_env(args.task, policy)
    except (FmPolicyError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    rows = []
    for i in range(args.episodes):
        if policy is None:
            expert = MetaWorldExpert()
            act = lambda obs, info: expert(env)  # noqa: E731
        else:
            noise_seed = args.seed if args.noise_seed is None else args.noise_seed
            act = policy_actor(policy, noise_seed + i, args.noise == "zero", sampler)
        rows.append(run_episode(env, args.seed + i, act, args.max_steps))
        print(json.dumps(rows[-1]), flush=True)
    env.close()
    summary = {"policy": args.policy, "task": args.task, "seed": args.seed, "noise": args.noise,
               "noise_seed": args.noise_seed,
               "sampler": args.sampler, **summarize(rows)}
    print(json.dumps(summary))
    if args.json:
        atomic_write_json(args.json, {"summary": summary, "episodes": rows})
    return summary


if __name__ == "__main__":
    main()
