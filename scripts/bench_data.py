#!/usr/bin/env python
"""Data-path benchmark: training from streamed video against the same data held in memory, and the
memory a streamed run needs on a dataset far larger than an in-memory run could hold.

Usage:
    python scripts/bench_data.py                        # both sections, readable table (JSON lines first)
    python scripts/bench_data.py --only speed --steps 40 --rounds 2
    python scripts/bench_data.py --only memory --big-frames 250000 --limit-gb 0.3
    python scripts/bench_data.py --quick                # smoke run: tiny model, small data, few steps

Data (generated under --work, /tmp/fmpolicy_bench_data by default, reused when present; never in the
repository):
- `goals64_video`: `scripts/collect_demos.py --env fmpolicy/PointObstacle-v0 --env-kwargs
  '{"n_goals": 2}' --image-size 64 --video --episodes 200 --num-envs 64 --seed 0` (8,422 frames, 2.5 MB).
- `big_video` (memory section): the same frames again and again, as long episodes (the source's
  episodes concatenated, --episode-frames frames each) written by `DatasetWriter(video=True)` until it
  holds --big-frames frames. The content does not matter for memory, only the number of frames to
  index and decode.

Sections (`--only`):
- `speed`: training steps/s of the `configs/point_goals_vl.yaml` policy (`--model small`: a quarter
  of its widths) at batch 64 (`--batch`) on `goals64_video`, streamed (`data.stream=true`,
  `data.num_workers=2`: each worker decodes the video frames of whole batches) against in memory
  (`data.stream=false`: every frame decoded once at the start), with `--threads` torch threads in the
  training process (1 by default: on a 2-core machine the two workers need the other core, and a
  second intra-op thread that loses its core to a worker, or to another job, stalls every step at
  OpenMP's barriers: measured 0.3 to 28 steps/s from interval to interval with 2 threads under load). Each run is a fresh process
  (`scripts/train.py`'s code path, `train_imitation`); the figure is the median of the trainer's own
  `steps_per_s` log over its intervals after the first (warm-up: worker start, first batches).
  The two kinds alternate (`--rounds` each) so that both see the same load. Figure: `ratio` =
  in-memory steps/s / streamed steps/s (goal <= 1.25).
- `memory`: peak memory of a training run sampled every 0.1 s from /proc over the process and its
  DataLoader workers: `peak_rss_mb` (sum of their RSS; it counts pages that forked workers share with
  the parent more than once) and `peak_pss_mb` (sum of PSS, shared pages divided among the sharers:
  the memory the run really takes). In memory on `goals64_video` against streamed on `big_video`.
  `in_memory_need_gb` is `ChunkDataset.in_memory_bytes()` (what `all_windows` would hold: decoded
  images, action chunks, indices); `--limit-gb` states the memory an in-memory run may take, and
  `big_over_limit` = the big dataset's need / that limit (the goal: ~10).

Every row carries `machine` (CPU, torch, threads, the 1-minute load average before and after). On a
shared machine the figures move with the other jobs: compare runs on the same machine, and
re-measure on a quiet one before quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VL_CONFIG = ROOT / "configs" / "point_goals_vl.yaml"
SMALL = ["policy.expert.width=32", "policy.expert.num_heads=2", "policy.expert.depth=2", "policy.expert.prefix_dim=32",
         "policy.encoder.out_dim=32", "policy.encoder.vision_hidden_size=32", "policy.encoder.vision_num_hidden_layers=1"]


# ---- the child: one training run ------------------------------------------------------------------

def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train as `scripts/train.py` would (in this process) and report the trainer's logged speed."""
    sys.path.insert(0, str(ROOT))
    from fmpolicy.config import ImitationConfig, load_config
    from fmpolicy.data import ChunkDataset
    from fmpolicy.training.imitation import train_imitation

    import torch

    torch.set_num_threads(spec["threads"])
    config = load_config(ImitationConfig, spec["config"], spec["overrides"])
    start = time.perf_counter()
    dataset = ChunkDataset(config.data.root, config.policy.chunk_size, image_keys=list(config.data.image_keys))
    train_imitation(config, dataset, overwrite=True)
    wall = time.perf_counter() - start
    log = [json.loads(line) for line in (Path(config.train.out_dir) / "log.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in log[1:]] or [r["steps_per_s"] for r in log]
    return {"steps_per_s": statistics.median(rates), "intervals": len(rates), "wall_s": wall,
            "frames": len(dataset), "in_memory_need_gb": dataset.in_memory_bytes() / 1024 ** 3}


# ---- the parent: run a child, watch its memory ------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB (0, 0 when it is gone)."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one training in a fresh process; its result and the peak RSS / PSS of it and its workers."""
    cmd = [sys.executable, __file__, "--run-one", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak_rss = peak_pss = peak_workers = 0
    while proc.poll() is None:
        pids = [proc.pid, *_children(proc.pid)]
        mem = [_memory_kb(p) for p in pids]
        peak_rss, peak_pss = max(peak_rss, sum(m[0] for m in mem)), max(peak_pss, sum(m[1] for m in mem))
        peak_workers = max(peak_workers, len(pids) - 1)
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"training run failed ({proc.returncode}): {err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_rss_mb=peak_rss / 1024, peak_pss_mb=peak_pss / 1024, workers_seen=peak_workers)
    return result


def machine() -> dict[str, Any]:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "load_1min": os.getloadavg()[0]}


# ---- data -----------------------------------------------------------------------------------------

def collect(out: Path, episodes: int, image_size: int) -> Path:
    if not (out / "meta" / "stats.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "collect_demos.py"), "--env", "fmpolicy/PointObstacle-v0",
                        "--env-kwargs", json.dumps({"n_goals": 2}), "--image-size", str(image_size), "--video",
                        "--episodes", str(episodes), "--num-envs", "64", "--seed", "0", "--out", str(out),
                        "--no-progress"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def make_big(source: Path, out: Path, frames: int, episode_frames: int) -> Path:
    """A video dataset of `frames` frames: the source's episodes concatenated into long episodes."""
    import numpy as np

    from fmpolicy.data import ChunkDataset, DatasetWriter

    src = ChunkDataset(source, chunk_size=1)
    if (out / "meta" / "stats.json").exists() and ChunkDataset(out, 1, image_keys=[]).num_frames >= frames:
        return out
    w = src.all_windows()
    cam = src.image_keys[0]
    state, action, images = w["observation.state"].numpy(), w["action"][:, 0].numpy(), w[cam].numpy()
    features = {"observation.state": {"dtype": "float32", "shape": [src.state_dim]},
                "action": {"dtype": "float32", "shape": [src.action_dim]},
                cam: {"dtype": "uint8", "shape": list(images.shape[1:])}}
    n = len(state)
    with DatasetWriter(out, fps=src.fps, features=features, robot_type="point_mass_2d", video=True,
                       episodes_per_file=10, env_info={"bench_data": "source repeated", "source": str(source)}) as writer:
        start = writer.num_frames % n
        while writer.num_frames < frames:
            length = min(episode_frames, frames - writer.num_frames)
            rows = (start + np.arange(length)) % n
            writer.add_episode({"observation.state": state[rows], "action": action[rows], cam: images[rows]},
                               task=src.tasks[0])
            start = int(rows[-1] + 1) % n
            print(f"  big dataset: {writer.num_frames} / {frames} frames", file=sys.stderr, flush=True)
        writer.finalize()
    return out


def dir_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1024 ** 3


# ---- sections ---------------------------------------------------------------------------------------

def base_overrides(args, root: Path, out: Path) -> list[str]:
    return [f"data.root={root}", f"train.out_dir={out}", "policy.device=cpu", "train.progress=false",
            f"train.batch_size={args.batch}", f"train.steps={args.steps}", f"train.log_every={args.log_every}",
            f"train.save_every={args.steps}", "train.keep_checkpoints=1", f"train.seed={args.seed}",
            *(SMALL if args.model == "small" else [])]


def speed(args, work: Path) -> list[dict[str, Any]]:
    data = collect(work / "goals64_video", args.episodes, 64)
    results: dict[str, list[dict]] = {"in_memory": [], "streamed": []}
    kinds = {"in_memory": ["data.stream=false"],
             "streamed": ["data.stream=true", f"data.num_workers={args.workers}"]}
    for r in range(args.rounds):
        for kind in (list(kinds) if r % 2 == 0 else list(kinds)[::-1]):  # alternate who goes first
            with tempfile.TemporaryDirectory(dir=work) as out:
                spec = {"config": str(VL_CONFIG), "threads": args.threads,
                        "overrides": base_overrides(args, data, Path(out) / "run") + kinds[kind]}
                results[kind].append(measure(spec))
    rows = []
    for kind, runs in results.items():
        sps = [x["steps_per_s"] for x in runs]
        rows.append({"section": "speed", "kind": kind, "model": args.model, "batch": args.batch,
                     "workers": args.workers if kind == "streamed" else 0, "threads": args.threads,
                     "frames": runs[0]["frames"],
                     "steps_per_s": statistics.median(sps), "steps_per_s_runs": sps,
                     "peak_pss_mb": max(x["peak_pss_mb"] for x in runs)})
    rows[0]["ratio"] = rows[0]["steps_per_s"] / rows[1]["steps_per_s"]  # in memory / streamed
    return rows


def memory(args, work: Path) -> list[dict[str, Any]]:
    small = collect(work / "goals64_video", args.episodes, 64)
    big = make_big(small, work / f"big_video_{args.big_frames}", args.big_frames, args.episode_frames)
    rows = []
    for kind, root, extra in (("in_memory", small, ["data.stream=false"]),
                              ("streamed", big, ["data.stream=true", f"data.num_workers={args.workers}"])):
        with tempfile.TemporaryDirectory(dir=work) as out:
            spec = {"config": str(VL_CONFIG), "threads": args.threads,
                    "overrides": base_overrides(args, root, Path(out) / "run") + extra + ["train.steps=" + str(args.memory_steps)]}
            res = measure(spec)
        need = res["in_memory_need_gb"]
        rows.append({"section": "memory", "kind": kind, "model": args.model, "threads": args.threads,
                     "frames": res["frames"],
                     "dataset_gb_on_disk": dir_gb(root), "in_memory_need_gb": need, "limit_gb": args.limit_gb,
                     "over_limit": need / args.limit_gb, "peak_rss_mb": res["peak_rss_mb"],
                     "peak_pss_mb": res["peak_pss_mb"], "workers": res["workers_seen"],
                     "steps_per_s": res["steps_per_s"]})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["section", "kind", "model", "frames", "workers", "steps_per_s", "ratio", "dataset_gb_on_disk",
            "in_memory_need_gb", "over_limit", "peak_rss_mb", "peak_pss_mb"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(v):
        return "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(fmt(r.get(c)) for c in cols) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="speed,memory", help="comma-separated sections: speed, memory")
    p.add_argument("--work", default="/tmp/fmpolicy_bench_data", help="where the generated data and runs go")
    p.add_argument("--model", choices=["vl", "small"], default="vl",
                   help="configs/point_goals_vl.yaml as it is, or a quarter of its widths")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the training process (1: the 2 workers need the other core)")
    p.add_argument("--steps", type=int, default=40, help="training steps per speed run")
    p.add_argument("--log-every", type=int, default=5, help="steps per logged speed interval")
    p.add_argument("--rounds", type=int, default=2, help="speed runs of each kind, alternating")
    p.add_argument("--episodes", type=int, default=200, help="episodes of the collected dataset")
    p.add_argument("--big-frames", type=int, default=250_000, help="frames of the big dataset")
    p.add_argument("--episode-frames", type=int, default=2000, help="frames per episode of the big dataset")
    p.add_argument("--limit-gb", type=float, default=0.3, help="the memory an in-memory run may take (stated)")
    p.add_argument("--memory-steps", type=int, default=20, help="training steps per memory run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: small model, small data, few steps")
    p.add_argument("--json", action="store_true", help="JSON lines only, no table")
    p.add_argument("--run-one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return []
    if args.quick:
        args.model, args.steps, args.log_every, args.rounds, args.episodes = "small", 6, 2, 1, 16
        args.big_frames, args.episode_frames, args.memory_steps, args.batch = 3000, 500, 4, 16
        args.work = str(Path(args.work) / "quick")
    sections = [s for s in args.only.split(",") if s]
    unknown = sorted(set(sections) - {"speed", "memory"})
    if unknown:
        p.error(f"--only: unknown sections {unknown}: expected some of ['speed', 'memory']")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    before = machine()
    rows: list[dict[str, Any]] = []
    for name in sections:
        rows += {"speed": speed, "memory": memory}[name](args, work)
    info = {**before, "load_1min_after": os.getloadavg()[0]}
    for r in rows:
        r["machine"] = info
        print(json.dumps(r))
    if not args.json:
        print()
        print(table(rows))
        print(f"\nmachine: {info}")
    return rows


if __name__ == "__main__":
    main()
