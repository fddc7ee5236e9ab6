#!/usr/bin/env python
"""Does a GridWorld policy send actions to both goals where they are equally far? (FPO paper's result)

    python scripts/gridworld_modes.py RUN_DIR [RUN_DIR ...] [--samples 2000] [--per-state 400]
        [--seed 0] [--png docs/img/gridworld_paper_actions.png] [--json out.json] [--start] [--boundary]

RUN_DIR is an `rl.out_dir` of `scripts/train_fpo.py` on `fmpolicy/TwoGoalGridWorld-v0` (its final
`policy/`, or a saved policy directory itself; with `--start`, the untrained policy the run began
from, rebuilt from its `config.yaml` and `rl.seed`: does the start already lean to one goal?). For
each policy, on the middle row (observation y = 0: both goal rows 11 moves away), sampling the flow
from fresh initial noise:

- `up` / `down`: fractions of `--samples` actions (spread evenly over the row's 25 cells) whose move
  goes up / down (a_y rounds to +1 / -1; `vertical_split` of the env);
- `split_states`: how many of the row's cells send at least 25% of `--per-state` actions each way;
- `peaks`: the number of separated peaks of the histogram of a_y over those `--samples` actions
  (`count_peaks`: 48 bins on [-r, r], r = max(6, 99th percentile of |a_y|), smoothed, peaks of >= 10% of the highest one, a dip between
  two of at most half the lower peak); `two_peaks` when it is >= 2;
- `rows`: up / down of the rows -3..+3 around the middle (the same count of samples each);
- with `--boundary`: where between the rows the up/down boundary lies and how wide the band of split
  positions is (`boundary`: the flow is also queried at fractional rows).

Prints a table, writes the measures as JSON (`--json`, default `<first run>/gridworld_modes.json`) and,
with `--png`, a picture with a row per policy: one sampled action per cell (arrows; goal rows shaded)
and the middle row's a_y histogram.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from fmpolicy import FlowPolicy
from fmpolicy.batch import STATE
from fmpolicy.io import atomic_write, atomic_write_json
from fmpolicy_envs.gridworld import TwoGoalGridWorld, vertical_split

HIST_RANGE, HIST_BINS = 6.0, 48  # a_y histogram: 48 bins on [-r, r], r = max(6, the 99th percentile of |a_y|)
#   (wide: the flow samples far outside [-1, 1], and further the longer it trains)
SPLIT_MIN = 0.25  # a "split" state sends at least this fraction of its actions each way


def count_peaks(counts, min_height: float = 0.1, max_dip: float = 0.5) -> int:
    """Separated peaks of a histogram (its counts, (n,)): smoothed with [1, 2, 1] / 4, the local maxima of
    at least `min_height` x the highest are candidates; two neighbouring candidates count as separate
    when the lowest bin between them is at most `max_dip` x the lower of the two, else the lower is
    dropped. 0 for an empty histogram."""
    c = np.asarray(counts, dtype=float)
    if c.sum() <= 0:
        return 0
    s = np.convolve(np.pad(c, 1), [0.25, 0.5, 0.25], mode="valid")
    top = s.max()
    padded = np.pad(s, 1, constant_values=-np.inf)
    cand = [i for i in range(len(s)) if s[i] >= min_height * top and s[i] >= padded[i] and s[i] > padded[i + 2]]
    peaks: list[int] = []
    for i in cand:
        if peaks and s[peaks[-1]:i + 1].min() > max_dip * min(s[peaks[-1]], s[i]):
            if s[i] > s[peaks[-1]]:
                peaks[-1] = i  # not separated: keep the higher one
            continue
        peaks.append(i)
    return len(peaks)


def sample_actions(policy: FlowPolicy, positions: torch.Tensor, env: TwoGoalGridWorld,
                   generator: torch.Generator) -> torch.Tensor:
    """One sampled action (b, 2) per grid position (b, 2), from fresh initial noise."""
    obs = {STATE: env.observe(positions).to(policy.device)}
    noise = policy.sample_noise(positions.shape[0], generator)
    return policy.predict_action_chunk(obs, noise=noise)[:, 0].float().cpu()


def row_positions(env: TwoGoalGridWorld, row: int, n: int) -> torch.Tensor:
    """n positions (n, 2) on the row `row` cells above the middle, cycling through its x."""
    x = torch.arange(n) % env.size
    return torch.stack([x, torch.full_like(x, env.center + row)], dim=-1)


def measure(policy: FlowPolicy, samples: int = 2000, per_state: int = 400, seed: int = 0,
            size: int = 25) -> dict:
    """The middle row's split (see the module docstring) of one policy, and its raw a_y samples."""
    env = TwoGoalGridWorld(num_envs=1, size=size)
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    a = sample_actions(policy, row_positions(env, 0, samples), env, gen)
    up, down = vertical_split(a)
    r = max(HIST_RANGE, math.ceil(float(a[:, 1].abs().quantile(0.99))))
    edges = np.linspace(-r, r, HIST_BINS + 1)
    counts, _ = np.histogram(a[:, 1].numpy(), bins=edges)  # samples outside the range are left out (`outside`)
    per_cell = []
    for x in range(env.size):
        pos = torch.tensor([[x, env.center]]).expand(per_state, 2)
        per_cell.append(vertical_split(sample_actions(policy, pos, env, gen)))
    split = sum(1 for u, d in per_cell if u >= SPLIT_MIN and d >= SPLIT_MIN)
    rows = {}
    for row in range(-3, 4):
        rows[f"{row:+d}"] = [round(v, 4) for v in vertical_split(sample_actions(policy, row_positions(env, row, samples), env, gen))]
    peaks = count_peaks(counts)
    return {"up": up, "down": down, "split_states": split, "states": env.size, "peaks": peaks, "two_peaks": peaks >= 2,
            "a_y_hist": {"edges": [round(float(e), 3) for e in edges], "counts": counts.tolist(),
                         "outside": int(samples - counts.sum())},
            "per_state": [[round(u, 4), round(d, 4)] for u, d in per_cell], "rows": rows,
            "a_y_mean": float(a[:, 1].mean()), "a_y_std": float(a[:, 1].std())}


def plot(runs: list[tuple[str, FlowPolicy, dict]], path: Path, seed: int = 0, size: int = 25) -> None:
    """A row per (title, policy, measure): one sampled action per non-goal cell (an arrow from the cell's
    centre, clipped to [-1, 1]; blue moves up, red down, grey stays) and the middle row's a_y
    histogram, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = TwoGoalGridWorld(num_envs=1, size=size)
    ys, xs = torch.meshgrid(torch.arange(2, size - 2), torch.arange(size), indexing="ij")
    pos = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 5.2 * len(runs)), gridspec_kw={"width_ratios": [1.1, 1]},
                             squeeze=False)
    for (title, policy, result), (ax, hx) in zip(runs, axes):
        gen = torch.Generator(device=policy.device).manual_seed(seed + 1)
        a = sample_actions(policy, pos, env, gen).clamp(-1, 1)
        dy = TwoGoalGridWorld.moves(a)[:, 1].numpy()
        colors = np.where(dy > 0, "tab:blue", np.where(dy < 0, "tab:red", "0.5"))
        for y0 in (-0.5, size - 2.5):
            ax.axhspan(y0, y0 + 2, color="gold", alpha=0.35, lw=0)
        ax.axhline(env.center, color="0.3", lw=0.6, ls=":")
        ax.quiver(pos[:, 0], pos[:, 1], a[:, 0], a[:, 1], color=colors, angles="xy", scale_units="xy", scale=1.6,
                  width=0.004)
        ax.set(xlim=(-0.5, size - 0.5), ylim=(-0.5, size - 0.5), aspect="equal", xlabel="x", ylabel="y",
               title=f"{title}: one sampled action per cell")
        edges, counts = result["a_y_hist"]["edges"], result["a_y_hist"]["counts"]
        hx.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="0.4")
        hx.axvline(0.5, color="tab:blue", ls="--", lw=0.8)
        hx.axvline(-0.5, color="tab:red", ls="--", lw=0.8)
        hx.set(xlabel="a_y on the middle row (dashed: +-0.5, where moves begin)", ylabel="count",
               title=f"up {result['up']:.2f} / down {result['down']:.2f}, split states {result['split_states']}/"
                     f"{result['states']}, peaks {result['peaks']}")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)


def boundary(policy: FlowPolicy, per_point: int = 200, seed: int = 0, size: int = 25, span: int = 3,
             steps_per_row: int = 8) -> dict:
    """Where the policy's up/down boundary lies between the rows, and how wide its split band is.

    The policy is queried between the grid's rows too (positions y = middle + k / `steps_per_row` for
    |k / steps_per_row| <= `span`; every x; `per_point` samples each): a net that is smooth in the state
    must pass from "up" to "down" somewhere, and where it does it sends actions both ways. `profile`:
    per offset (in rows from the middle) the mean up / down and how many of the `size` x positions are
    split (>= SPLIT_MIN each way). `boundary_row`: the offset where up / (up + down), averaged over x,
    first crosses 1/2 from below (linear between the two offsets around it; None if it never does).
    `split_rows`: the split band's area in rows (split points / size / steps_per_row). A policy keeps
    both GridWorld modes on its middle row when its boundary sits there (|boundary_row| < 1/2)."""
    env = TwoGoalGridWorld(num_envs=1, size=size)
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    profile, n_split = [], 0
    for k in range(-span * steps_per_row, span * steps_per_row + 1):
        pos = torch.stack([torch.arange(size).float().repeat_interleave(per_point),
                           torch.full((size * per_point,), env.center + k / steps_per_row)], dim=-1)
        a = sample_actions(policy, pos, env, gen).reshape(size, per_point, 2)
        cells = [vertical_split(a[x]) for x in range(size)]
        split = sum(1 for u, d in cells if u >= SPLIT_MIN and d >= SPLIT_MIN)
        n_split += split
        profile.append({"row": k / steps_per_row, "up": round(sum(u for u, _ in cells) / size, 4),
                        "down": round(sum(d for _, d in cells) / size, 4), "split": split})
    share = [q["up"] / max(q["up"] + q["down"], 1e-9) for q in profile]
    row = None
    for i in range(1, len(profile)):
        if share[i - 1] < 0.5 <= share[i]:
            w = (0.5 - share[i - 1]) / (share[i] - share[i - 1])
            row = round(profile[i - 1]["row"] + w / steps_per_row, 3)
            break
    return {"boundary_row": row, "split_rows": round(n_split / size / steps_per_row, 3), "profile": profile}


def load_policy(run: Path, start: bool = False) -> FlowPolicy:
    """The run's saved policy, or with `start` the untrained one it began from: rebuilt from its
    `config.yaml` under its `rl.seed`, as `scripts/train_fpo.py` builds it (`seed_everything`, then
    `make_actor`), so that the tilt a run inherits from its initial weights can be measured."""
    if not start:
        return FlowPolicy.from_pretrained(run / "policy" if (run / "policy").is_dir() else run, device="cpu").eval()
    from fmpolicy.rl.config import load_rl_config
    from fmpolicy.rl.trainer import make_actor
    from fmpolicy.run import seed_everything

    if not (run / "config.yaml").is_file():
        raise SystemExit(f"--start: {run} has no config.yaml; expected an rl.out_dir of scripts/train_fpo.py")
    config = load_rl_config(str(run / "config.yaml"))
    if config.init_from:
        raise SystemExit(f"--start: {run} began from init_from={config.init_from}, not untrained weights: measure "
                         "that policy folder instead")
    seed_everything(config.rl.seed)
    actor, _ = make_actor(config, torch.device("cpu"))
    return actor.policy.eval()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (rl.out_dir) or saved policy folders")
    p.add_argument("--samples", type=int, default=2000, help="middle-row samples for up/down and the histogram")
    p.add_argument("--per-state", type=int, default=400, help="samples at each middle-row cell for split_states")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--start", action="store_true",
                   help="measure the untrained policy each run began from (its config.yaml and rl.seed), not its result")
    p.add_argument("--png", type=Path, help="picture of every run's policy (a row each)")
    p.add_argument("--labels", default="", help="titles of the runs in the picture, separated by ; (default: the paths)")
    p.add_argument("--json", type=Path, help="where to write the measures (default <first run>/gridworld_modes.json)")
    p.add_argument("--boundary", action="store_true",
                   help="also locate the up/down boundary between the rows (rows -3..+3 in eighths, `boundary`)")
    args = p.parse_args(argv)
    labels = args.labels.split(";") if args.labels else [str(run) for run in args.runs]
    if len(labels) != len(args.runs):
        p.error(f"--labels has {len(labels)} titles for {len(args.runs)} runs")
    results, pictured = {}, []
    for run, label in zip(args.runs, labels):
        policy = load_policy(run, args.start)
        results[str(run)] = measure(policy, args.samples, args.per_state, args.seed)
        if args.boundary:
            results[str(run)]["boundary"] = boundary(policy, seed=args.seed)
        pictured.append((label, policy, results[str(run)]))
    if args.png:
        plot(pictured, args.png, seed=args.seed)
    print(f"| run | middle row up / down | split states (>= {SPLIT_MIN:.0%} each way) | a_y peaks | rows -3..+3 up / down |")
    print("| --- | --- | --- | --- | --- |")
    for run, r in results.items():
        rows = ", ".join(f"{u:.2f}/{d:.2f}" for u, d in r["rows"].values())
        print(f"| {run} | {r['up']:.2f} / {r['down']:.2f} | {r['split_states']} of {r['states']} | {r['peaks']} | {rows} |")
    if args.boundary:
        print("\n| run | boundary row (up/down crosses 1/2) | split band (rows) |\n| --- | --- | --- |")
        for run, r in results.items():
            b = r["boundary"]
            where = "none" if b["boundary_row"] is None else f"{b['boundary_row']:+.2f}"
            print(f"| {run} | {where} | {b['split_rows']:.2f} |")
    out = args.json or args.runs[0] / "gridworld_modes.json"
    atomic_write_json(out, results, indent=1)
    return results


if __name__ == "__main__":
    main()
