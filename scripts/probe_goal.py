#!/usr/bin/env python
"""Does a camera policy's vision tower see the goal? A linear probe on Meta-World frames (issue 17, Prove-it 2).

    python scripts/probe_goal.py --policy P [P ...] [--task reach] [--train 200] [--test 100] [--json out.json]
                                 [--fit-tower 50 1000 [--fit-steps 3000]] [--frames DIR]

Frames: `--train` goal variations from 0 (the demonstrations' range) and `--test` held-out ones from
10000, each the reset frame after 0-29 random actions (so the arm is not always at its start pose),
rendered with the cameras and size each policy's encoder reads. For each policy its vision tower's output
(the encoder's backbone `images`, before the projection: a conv tower's keypoints, a ViT's patch tokens)
is flattened and a ridge regression (standardized inputs, lambda 1e-3 per frame) is fitted from it to
the goal's xyz (Meta-World's full observation, entries 36:39) and to the hand's (entries 0:3) on the
train frames. Printed: the mean absolute error on the test frames per axis, in metres, against
predicting the train mean. Meta-World's reach succeeds within 5 cm of the goal.

Why: a policy that fails where the goal is a one-pixel marker either does not see the marker (the
tower's output does not hold the goal) or does not act on it; the probe tells which.

`--fit-tower N [N ...]`: the ceiling instead of the policy's tower. A *fresh* vision tower of the policy's
architecture (its encoder config; new weights: random, or the pretrained ones the config names) and an MLP
head are trained together on the goal itself (Adam, lr 1e-3, batches of min(64, N), `--fit-steps`) from the
first N train frames, i.e. from N distinct goals, and tested on the held-out frames. Privileged labels: a diagnostic of what the images and the
architecture allow, and of how many goals it takes to learn to read them, never a way to train a policy.
(Meta-World reach at 64 px, the conv tower of configs/metaworld_mt10_vision_conv.yaml: docs/benchmarks/metaworld.md.)

`--frames DIR`: keep the rendered frames there, one .npz per (task, cameras, size, --train, --test), written
atomically, and read them back on the next call instead of rendering again (a frame costs ~0.75 s: a fresh
env per goal variation; 1,200 frames are 15 minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco: headless rendering

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import fmpolicy_envs  # noqa: E402,F401  (registers the fmpolicy/ ids)
from fmpolicy import FlowPolicy  # noqa: E402
from fmpolicy.config import IMAGES_PREFIX  # noqa: E402
from fmpolicy.encoders import make_encoder  # noqa: E402
from fmpolicy.io import atomic_write, atomic_write_json  # noqa: E402

from fmpolicy_envs.metaworld_env import GOAL, HAND  # noqa: E402  (positions in the 39-d observation)


def collect_frames(task: str, cameras: tuple[str, ...], size: int, variations: Sequence[int]) -> dict:
    """-> images {camera: (n, 3, size, size)}, goal (n, 3), hand (n, 3), instruction."""
    import gymnasium as gym

    env = gym.make("fmpolicy/MetaWorld-v0", task=task, state="full", cameras=cameras, image_size=size)
    images: dict[str, list] = {c: [] for c in cameras}
    goal, hand, instruction = [], [], ""
    for v in variations:
        obs, info = env.reset(seed=v)
        rng = np.random.default_rng(v)
        for _ in range(int(rng.integers(0, 30))):
            obs, _, _, _, info = env.step(rng.uniform(-1, 1, 4).astype(np.float32))
        for c in cameras:
            images[c].append(obs[IMAGES_PREFIX + c])
        goal.append(obs["observation.state"][GOAL])
        hand.append(obs["observation.state"][HAND])
        instruction = info["task"]
    env.close()
    return {"images": {c: np.stack(x) for c, x in images.items()}, "goal": np.stack(goal), "hand": np.stack(hand),
            "instruction": instruction}


def cached_frames(directory: str | None, task: str, cameras: tuple[str, ...], size: int, n_train: int,
                  n_test: int) -> dict:
    """collect_frames of variations 0 .. n_train-1 and 10000 .. 10000+n_test-1, through the cache `directory`."""
    variations = [*range(n_train), *range(10_000, 10_000 + n_test)]
    if directory is None:
        return collect_frames(task, cameras, size, variations)
    path = Path(directory) / f"{task}_{'+'.join(cameras)}_{size}px_{n_train}_{n_test}.npz"
    if path.exists():
        with np.load(path) as z:
            frames = {"images": {c: z[f"image_{c}"] for c in cameras}, "goal": z["goal"], "hand": z["hand"],
                      "instruction": str(z["instruction"])}
        for c, x in frames["images"].items():
            if x.shape != (len(variations), 3, size, size):
                raise SystemExit(f"--frames {directory}: {path.name} holds {c} frames of shape {x.shape}, expected "
                                 f"{(len(variations), 3, size, size)}; delete the file to render them again")
        return frames
    frames = collect_frames(task, cameras, size, variations)
    atomic_write(path, lambda f: np.savez(f, goal=frames["goal"], hand=frames["hand"],
                                          instruction=np.array(frames["instruction"]),
                                          **{f"image_{c}": x for c, x in frames["images"].items()}))
    return frames


def ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, lam: float = 1e-3) -> np.ndarray:
    """Ridge regression on standardized inputs (+ a bias), in float64 -> predictions for x_test."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a = np.c_[(x_train - mu) / sd, np.ones(len(x_train))]
    b = np.c_[(x_test - mu) / sd, np.ones(len(x_test))]
    w = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ y_train)
    return b @ w


def fit_tower(encoder_config, batch: dict, goal: np.ndarray, n_fit: int, n_train: int, steps: int,
              seed: int = 0) -> list[float]:
    """A fresh tower of `encoder_config`'s architecture + an MLP head trained on the goal of frames [0, n_fit)
    -> the mean absolute error (m) per axis on the held-out frames [n_train, end)."""
    torch.manual_seed(seed)
    encoder = make_encoder(dataclasses.replace(encoder_config, freeze_vision=False)).train()
    y = torch.from_numpy(goal).float()
    mean = y[:n_fit].mean(0)
    scale = y[:n_fit].std(0).clamp_min(1e-6) if n_fit > 1 else torch.ones(3)  # targets standardized per axis

    def features(rows: Tensor) -> Tensor:
        sub = {k: v[rows] if isinstance(v, Tensor) else [v[i] for i in rows.tolist()] for k, v in batch.items()}
        return encoder.backbone(sub)["images"].flatten(1)

    width = features(torch.arange(1)).shape[1]
    head = nn.Sequential(nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 3))
    trained = [p for p in encoder.parameters() if p.requires_grad]  # the vision tower (a frozen text model stays)
    optimizer = torch.optim.Adam([*trained, *head.parameters()], lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, n_fit, (min(64, n_fit),), generator=generator)
        loss = (head(features(rows)) - (y[rows] - mean) / scale).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder.eval()
    with torch.no_grad():
        held_out = torch.arange(n_train, len(y))
        pred = torch.cat([head(features(r)) for r in held_out.split(256)]) * scale + mean
    return (pred - y[held_out]).abs().mean(0).double().numpy().round(4).tolist()


def probe(policy_dir: str, task: str, n_train: int, n_test: int, fit: Sequence[int] = (), fit_steps: int = 3000,
          frames_dir: str | None = None) -> dict:
    policy = FlowPolicy.from_pretrained(policy_dir, device="cpu")
    encoder = policy.encoder
    if encoder is None or not encoder.config.cameras:
        raise SystemExit(f"--policy {policy_dir}: the policy reads no camera (policy.encoder.cameras is empty)")
    cameras = tuple(c[len(IMAGES_PREFIX):] for c in encoder.config.cameras)
    frames = cached_frames(frames_dir, task, cameras, encoder.config.image_size, n_train, n_test)
    batch = {IMAGES_PREFIX + c: torch.from_numpy(x) for c, x in frames["images"].items()}
    batch["task"] = [frames["instruction"]] * (n_train + n_test)
    with torch.no_grad():
        feats = encoder.eval().backbone(batch)["images"].flatten(1).double().numpy()  # (n, k * n_patches * e)
    result = {"policy": policy_dir, "task": task, "features": feats.shape[1], "train": n_train, "test": n_test}
    for name in ("goal", "hand"):
        y = frames[name].astype(np.float64)
        pred = ridge_predict(feats[:n_train], y[:n_train], feats[n_train:])
        result[f"{name}_error_m"] = np.abs(pred - y[n_train:]).mean(0).round(4).tolist()
        result[f"{name}_baseline_m"] = np.abs(y[n_train:] - y[:n_train].mean(0)).mean(0).round(4).tolist()
    if fit:
        result["fit_tower_steps"] = fit_steps
        result["fit_tower_goal_error_m"] = {str(n): fit_tower(encoder.config, batch, frames["goal"], n, n_train, fit_steps)
                                            for n in fit}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", nargs="+", required=True, help="directories written by save_pretrained")
    parser.add_argument("--task", default="reach", help="a Meta-World task (its goal is entries 36:39)")
    parser.add_argument("--train", type=int, default=200, help="frames to fit on (variations 0, 1, ...)")
    parser.add_argument("--test", type=int, default=100, help="held-out frames (variations 10000, ...)")
    parser.add_argument("--json", default=None, help="also write the results here (atomically)")
    parser.add_argument("--fit-tower", type=int, nargs="*", default=[], metavar="N",
                        help="also train a fresh tower of the policy's architecture on the goal of the first N train "
                             "frames (N distinct goals; privileged labels: the ceiling) and test it on the held-out ones")
    parser.add_argument("--fit-steps", type=int, default=3000, help="training steps of each --fit-tower fit")
    parser.add_argument("--frames", default=None, metavar="DIR",
                        help="keep the rendered frames here and reuse them on the next call (one .npz per task, "
                             "cameras, size, --train and --test)")
    args = parser.parse_args(argv)
    for name in ("train", "test"):
        if getattr(args, name) < 2:
            parser.error(f"--{name} = {getattr(args, name)} is invalid: expected at least 2 frames")
    for n in args.fit_tower:
        if not 1 <= n <= args.train:
            parser.error(f"--fit-tower {n} is invalid: expected 1 .. --train ({args.train}) goals")
    if args.fit_steps < 1:
        parser.error(f"--fit-steps = {args.fit_steps} is invalid: expected >= 1")
    results = [probe(p, args.task, args.train, args.test, args.fit_tower, args.fit_steps, args.frames)
               for p in args.policy]
    print(f"{'policy':48s} {'goal error x y z (m)':>24s} {'predict the mean':>22s} {'hand error x y z (m)':>24s}")
    for r in results:
        fmt = lambda v: " ".join(f"{x:.3f}" for x in v)  # noqa: E731
        print(f"{r['policy'][-48:]:48s} {fmt(r['goal_error_m']):>24s} {fmt(r['goal_baseline_m']):>22s} "
              f"{fmt(r['hand_error_m']):>24s}")
        for n, err in r.get("fit_tower_goal_error_m", {}).items():
            print(f"{'  a fresh tower trained on ' + n + ' goals':48s} {fmt(err):>24s}")
    print(json.dumps(results))
    if args.json:
        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
