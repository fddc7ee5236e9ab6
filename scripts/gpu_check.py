#!/usr/bin/env python
"""One GPU check for the day a CUDA machine is lent: tests, bench and a short FPO run, in one JSON + a table.

Usage:
    python scripts/gpu_check.py                       # on a CUDA machine (`make gpu-check`); at most 8 minutes
    python scripts/gpu_check.py --out runs/h200/gpu_check.json
    python scripts/gpu_check.py --device cpu --quick  # the same steps on CPU, tiny sizes: tests the script itself

Steps, each with its own time budget (seconds, below) inside a total cap of 480 s; a step that fails or
runs out of time is recorded (status `failed`, with the error) and the next one still runs; a step
left without time is `skipped`:
1. `environment` (15 s): torch and CUDA versions, cuDNN, device name, compute capability, memory, the
   driver (`nvidia-smi`, where present), CPU, git commit.
2. `tests` (120 s): pytest of the CUDA tests (marked `gpu`, or skipped by a `skipif` when CUDA is absent:
   see SELECT_PLUGIN) in the test files that mention CUDA, in a subprocess; passed / failed / skipped. On
   CUDA, a run in which no test passed counts as failed (the GPU was not seen by pytest); on CPU they
   are all skipped, which is the expected result there.
3. `bench` (210 s): `scripts/bench.py --device <device> --json` (every section; with `--quick`,
   `--quick --only chunk,cache,envs,rl_update`), in a subprocess. Required figures: chunk latency at
   batch 1 and 64 (`--quick`: 1 and 4), prefix-cache speedup at both, the FPO vs Gaussian PPO update
   (ms and ratio) and environment steps/s at 4096 environments (`--quick`: 64).
4. `fpo` (120 s): a short `fmpolicy.rl.trainer.train_rl` run on the device, in a subprocess (this
   script with a hidden `--fpo-child`): configs/fpo_point.yaml from scratch with 1024 environments for
   10 iterations (`--quick`: configs/fpo_bandit.yaml, 64 environments, a width-32 expert, 3 iterations),
   out_dir in a temporary folder. Figures: the first-minibatch ratio deviation (`ratio_first_max_dev`,
   max over iterations; the trainer stops the run above 1e-6), seconds per iteration (median of the
   iterations after the first, which includes the warm-up), env steps/s, the final episode return.

Output: one JSON file (`--out`, default runs/gpu_check/gpu_check.json) and a markdown table, printed
and saved beside it (same name, `.md`), with the date and the device name. Exit status: 0 when every
step is ok, 1 when one is not, 2 when there is no CUDA device (unless `--device cpu`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"
TOTAL_CAP_S = 480.0  # the whole check, every step together
BUDGETS_S = {"environment": 15.0, "tests": 120.0, "bench": 210.0, "fpo": 120.0}
MIN_STEP_S = 5.0  # a step with less time than this left under the cap is skipped
FPO_MARK = "GPU_CHECK_FPO "  # prefix of the child's result line
RATIO_TOL = 1e-6  # fmpolicy.rl.trainer.RATIO_CHECK_TOL

# what the bench must have measured: chunk batches, environment count (bench.py's FULL / QUICK sizes)
BENCH_FULL = {"batches": (1, 64), "env_count": 4096}
BENCH_QUICK = {"batches": (1, 4), "env_count": 64}
BENCH_QUICK_SECTIONS = "chunk,cache,envs,rl_update"


# ---- steps ----------------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _tail(text: str, n: int = 2000) -> str:
    return text[-n:] if text else ""


def step_environment(args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    import torch

    from fmpolicy.machine import cpu_model

    facts: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpu": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        commit = _run(["git", "rev-parse", "HEAD"], timeout=min(5.0, timeout)).stdout.strip()
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], timeout=min(5.0, timeout)).stdout
        facts["git_commit"] = (commit + ("+dirty" if dirty.strip() else "")) or None
    except (OSError, subprocess.SubprocessError):
        facts["git_commit"] = None
    if args.device == "cuda":
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        facts.update(
            device_name=torch.cuda.get_device_name(index), device_count=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
            memory_total_gib=round(total / 2**30, 2), memory_free_gib=round(free / 2**30, 2),
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            bf16_supported=torch.cuda.is_bf16_supported())
        facts["driver"] = None
        try:  # torch.cuda does not expose the driver release; nvidia-smi does
            smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                       timeout=min(10.0, timeout))
            if smi.returncode == 0 and smi.stdout.strip():
                facts["driver"] = smi.stdout.strip().splitlines()[index].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    else:
        facts["device_name"] = facts["cpu"]
    return facts


# a pytest plugin (written to a temporary folder, loaded with -p) that keeps only the CUDA tests: those
# marked `gpu`, and those with a skipif whose reason names CUDA and whose condition is true exactly when
# CUDA is absent (`not torch.cuda.is_available()`). A CPU test that merely has "cuda" in its name (one
# checking the message without CUDA, say) is left out.
SELECT_PLUGIN = """
import pytest
import torch


def _needs_cuda(item):
    if item.get_closest_marker("gpu") is not None:
        return True
    absent = not torch.cuda.is_available()
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        cond = mark.args[0] if mark.args else mark.kwargs.get("condition")
        if "cuda" in reason.lower() and isinstance(cond, bool) and cond == absent:
            return True
    return False


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if _needs_cuda(item)]
    drop = [item for item in items if not _needs_cuda(item)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
"""


def cuda_test_files() -> list[str]:
    """Test files that mention CUDA or the `gpu` marker (this script's own tests excluded: they run on CPU)."""
    files = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if path.name == "test_gpu_check.py":
            continue
        if re.search(r"cuda|mark\.gpu", path.read_text(errors="replace")):
            files.append(str(path.relative_to(ROOT)))
    return files


def step_tests(args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    files = cuda_test_files()
    if not files:
        raise RuntimeError("no test file under tests/ mentions CUDA")
    with tempfile.TemporaryDirectory(prefix="gpu_check_tests_") as tmp:
        xml_path = Path(tmp) / "junit.xml"
        (Path(tmp) / "gpu_check_select.py").write_text(SELECT_PLUGIN)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check_select",
               f"--junitxml={xml_path}", *files]
        path = os.pathsep.join(x for x in (tmp, os.environ.get("PYTHONPATH")) if x)
        proc = _run(cmd, timeout, {"PYTHONPATH": path})
        if not xml_path.exists():
            raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {_tail(proc.stdout + proc.stderr)}")
        root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    result = {"files": files, "selected": counts["tests"],
              "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
              "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"],
              "failed_tests": failed, "exit_code": proc.returncode}
    if result["selected"] == 0:
        raise StepError("pytest selected no CUDA test", result)
    if result["failed"]:
        raise StepError(f"{result['failed']} CUDA test(s) failed: {failed}\n{_tail(proc.stdout)}", result)
    if args.device == "cuda" and result["passed"] == 0:
        raise StepError("no CUDA test passed (all skipped: pytest saw no CUDA device)", result)
    if proc.returncode not in (0, 5):
        raise StepError(f"pytest exited {proc.returncode}: {_tail(proc.stdout + proc.stderr)}", result)
    return result


def bench_figures(rows: list[dict], quick: bool) -> tuple[dict[str, Any], list[str]]:
    """The figures the check reports, from bench.py's rows, and the required ones that are missing."""
    want = BENCH_QUICK if quick else BENCH_FULL
    figures: dict[str, Any] = {}
    missing: list[str] = []

    def find(section: str, name: str | None = None, **match: Any) -> dict | None:
        for r in rows:
            if r.get("section") == section and (name is None or r.get("name") == name) and \
                    all(r.get(k) == v for k, v in match.items()):
                return r
        return None

    for b in want["batches"]:
        for k in (1, 10):
            r = find("chunk", batch=b, steps=k)
            if r is None:
                missing.append(f"chunk latency at batch {b}, {k} steps")
            else:
                figures[f"chunk_ms_b{b}_{k}steps"] = r["median_ms"]
        r = find("cache", "uncached", batch=b)
        if r is None:
            missing.append(f"prefix cache at batch {b}")
        else:
            figures[f"cache_speedup_b{b}"] = r["speedup"]
            figures[f"cache_max_abs_diff_b{b}"] = r["max_abs_diff"]
    fpo, ppo = find("rl_update", "fpo"), find("rl_update", "gaussian_ppo")
    if fpo is None or ppo is None:
        missing.append("FPO vs Gaussian PPO update")
    else:
        figures.update(rl_update_batch=fpo["batch"], fpo_update_ms=fpo["median_ms"],
                       ppo_update_ms=ppo["median_ms"], fpo_over_ppo=fpo["ratio"])
    r = find("envs", batch=want["env_count"])
    if r is None:
        missing.append(f"env steps/s at {want['env_count']} envs")
    else:
        figures[f"env_steps_per_s_{want['env_count']}"] = r["env_steps_per_s"]
    for b in want["batches"]:  # optional sections, reported when run
        r = find("overhead", "chunk", batch=b)
        if r is not None:
            figures[f"sampler_overhead_b{b}"] = r["overhead"]
    for name in ("fp32", "bf16"):
        r = find("train", name)
        if r is not None:
            figures[f"train_{name}_steps_per_s"] = r["steps_per_s"]
    bad = [k for k, v in figures.items() if not (isinstance(v, (int, float)) and math.isfinite(v))]
    missing += [f"{k} is not a finite number" for k in bad]
    return figures, missing


def step_bench(args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH), "--device", args.device, "--json"]
    if args.quick:
        cmd += ["--quick", "--only", BENCH_QUICK_SECTIONS]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    proc = _run(cmd, timeout)
    rows = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
    figures, missing = bench_figures(rows, args.quick)
    result = {"command": " ".join(cmd[1:]), "figures": figures, "rows": rows}
    if proc.returncode != 0:
        raise StepError(f"bench.py exited {proc.returncode}: {_tail(proc.stderr)}", result)
    if missing:
        raise StepError(f"bench.py did not give: {missing}", result)
    return result


def fpo_run_config(device: str, quick: bool, out_dir: str) -> tuple[str, list[str]]:
    """The config file and overrides of the short FPO run."""
    common = [f"rl.device={device}", f"policy.device={device}", f"rl.out_dir={out_dir}", "rl.progress=false",
              "rl.save_every=1000", "rl.seed=0"]
    if quick:  # 3 iterations of 64 one-step episodes, a width-32 expert: a few seconds on a CPU core
        return "configs/fpo_bandit.yaml", [*common, "rl.num_envs=64", "rl.total_env_steps=192",
                                           "policy.expert.width=32", "rl.value.width=32"]
    # from scratch (no imitation checkpoint in a fresh clone): 1024 envs x 20 macro-steps x 5 actions,
    # 10 iterations (the first two warm up the critic only; the ratio is checked at every one)
    return "configs/fpo_point.yaml", [*common, "init_from=''", "rl.lr=3.0e-4", "rl.num_envs=1024",
                                      "rl.total_env_steps=1024000"]


def fpo_child(args: argparse.Namespace) -> int:
    """Run the short FPO run in this process and print its figures as one line (the parent's `fpo` step)."""
    import statistics

    import torch

    from fmpolicy.rl.config import load_rl_config
    from fmpolicy.rl.trainer import train_rl

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path, overrides = fpo_run_config(args.device, args.quick, args.fpo_out)
    config = load_rl_config(str(ROOT / path), overrides)
    if config.env.id.startswith("fmpolicy/"):
        import fmpolicy_envs  # noqa: F401  (registers the fmpolicy/ envs)
    start = time.perf_counter()
    result = train_rl(config)
    wall = time.perf_counter() - start
    hist = [h for h in result.history if "ratio_first_max_dev" in h]
    secs = [h["seconds"] for h in hist]
    steady = secs[1:] or secs
    returns = [h["episode_return"] for h in hist if h.get("episode_return") is not None]
    steps_per_iteration = hist[0]["env_steps"] if hist else 0
    out = {
        "config": path, "overrides": overrides, "iterations": len(hist), "env_steps": hist[-1]["env_steps"],
        "ratio_first_max_dev": max(h["ratio_first_max_dev"] for h in hist),
        "first_iteration_s": secs[0], "seconds_per_iteration": statistics.median(steady),
        "env_steps_per_s": steps_per_iteration / statistics.median(steady),
        "first_return": returns[0] if returns else None, "final_return": returns[-1] if returns else None,
        "final_policy_loss": hist[-1].get("policy_loss"), "wall_s": wall,
        "actor_devices": sorted({p.device.type for p in result.actor.parameters()}),
    }
    print(FPO_MARK + json.dumps(out), flush=True)
    return 0


def step_fpo(args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpu_check_fpo_") as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--fpo-child", "--device", args.device,
               "--fpo-out", tmp]
        if args.quick:
            cmd.append("--quick")
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        proc = _run(cmd, timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(FPO_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the FPO run exited {proc.returncode}: {_tail(proc.stderr or proc.stdout)}")
    result = json.loads(lines[-1][len(FPO_MARK):])
    result["ratio_check_passed"] = result["ratio_first_max_dev"] <= RATIO_TOL
    problems = []
    if not result["ratio_check_passed"]:
        problems.append(f"ratio_first_max_dev = {result['ratio_first_max_dev']:.3g} > {RATIO_TOL}")
    if result["actor_devices"] != [args.device]:
        problems.append(f"the actor's weights are on {result['actor_devices']}, not {args.device}")
    for key in ("seconds_per_iteration", "final_return", "final_policy_loss"):
        v = result.get(key)
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            problems.append(f"{key} = {v} is not a finite number")
    if problems:
        raise StepError("; ".join(problems), result)
    return result


class StepError(RuntimeError):
    """A step failed, but measured something worth keeping."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


STEPS: dict[str, Callable[[argparse.Namespace, float], dict[str, Any]]] = {
    "environment": step_environment, "tests": step_tests, "bench": step_bench, "fpo": step_fpo}


# ---- run and report -------------------------------------------------------------------------------


def run_steps(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    steps: dict[str, dict[str, Any]] = {}
    for name, fn in STEPS.items():
        left = args.cap - (time.perf_counter() - start)
        budget = min(BUDGETS_S[name] * args.budget_scale, left)
        record: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "budget_s": round(budget, 1),
                                  "error": None, "result": None}
        if budget < MIN_STEP_S:
            record["error"] = f"skipped: {left:.0f} s left of the {args.cap:.0f} s cap"
        else:
            print(f"[gpu_check] {name} (budget {budget:.0f} s) ...", file=sys.stderr, flush=True)
            tick = time.perf_counter()
            try:
                record["result"] = fn(args, budget)
                record["status"] = "ok"
            except subprocess.TimeoutExpired:
                record.update(status="failed", error=f"timed out after {budget:.0f} s")
            except StepError as e:
                record.update(status="failed", error=str(e), result=e.result)
            except Exception as e:  # noqa: BLE001  (a step never aborts the others)
                record.update(status="failed", error=f"{type(e).__name__}: {e}\n{_tail(traceback.format_exc())}")
            record["seconds"] = round(time.perf_counter() - tick, 2)
            print(f"[gpu_check] {name}: {record['status']} in {record['seconds']:.1f} s", file=sys.stderr,
                  flush=True)
        steps[name] = record
    env = steps["environment"]["result"] or {}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device, "device_name": env.get("device_name"), "quick": args.quick,
        "cap_s": args.cap, "total_seconds": round(time.perf_counter() - start, 2),
        "ok": all(s["status"] == "ok" for s in steps.values()), "steps": steps,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.1e}"
        if abs(v) >= 1e4:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    steps = report["steps"]
    env = steps["environment"]["result"] or {}
    head = (f"GPU check, {report['date'][:10]}, device `{report['device']}`: {report['device_name']}"
            f" (torch {env.get('torch')}, CUDA {env.get('torch_cuda')}, driver {env.get('driver', '-')}"
            f"{', ' + str(env.get('memory_total_gib')) + ' GiB' if env.get('memory_total_gib') else ''})"
            f"{', quick' if report['quick'] else ''}; {report['total_seconds']:.0f} s of a "
            f"{report['cap_s']:.0f} s cap, commit {env.get('git_commit') or '-'}")
    lines = [head, "", "| step | status | seconds | figures / error |", "| --- | --- | --- | --- |"]
    for name, s in steps.items():
        r = s["result"] or {}
        if name == "environment":
            text = ", ".join(f"{k} {_fmt(r.get(k))}" for k in ("capability", "multiprocessors", "cudnn", "cpu_cores")
                             if k in r)
        elif name == "tests":
            text = (f"{r.get('passed')} passed, {r.get('failed')} failed, {r.get('skipped')} skipped "
                    f"of {r.get('selected')}" if r else "")
        elif name == "bench":
            text = f"{len(r.get('rows', []))} rows" if r else ""
        else:
            text = (f"{r.get('iterations')} iterations of {r.get('config')}" if r else "")
        if s["error"]:
            err = " ".join(s["error"].split())[:200].replace("|", "/")
            text = f"{text}; {err}" if text else err
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.1f} | {text} |")

    figs: list[tuple[str, Any]] = []
    b = (steps["bench"]["result"] or {}).get("figures", {})
    for key, v in b.items():
        m = re.fullmatch(r"chunk_ms_b(\d+)_(\d+)steps", key)
        if m:
            figs.append((f"chunk latency, batch {m[1]}, {m[2]} Euler step(s) (ms, median)", v))
        elif (m := re.fullmatch(r"cache_speedup_b(\d+)", key)):
            figs.append((f"prefix cache speedup, batch {m[1]}, p = 256 (`--quick`: 32) (x)", v))
        elif (m := re.fullmatch(r"sampler_overhead_b(\d+)", key)):
            figs.append((f"sampler overhead, batch {m[1]} (fraction)", v))
        elif (m := re.fullmatch(r"env_steps_per_s_(\d+)", key)):
            figs.append((f"PointObstacle env steps/s at {m[1]} envs", v))
        elif (m := re.fullmatch(r"train_(\w+)_steps_per_s", key)):
            figs.append((f"CFM training steps/s, {m[1]}", v))
    if "fpo_update_ms" in b:
        figs.append((f"FPO update (m = 8) / Gaussian PPO update, minibatch {b['rl_update_batch']} (ms)",
                     f"{_fmt(b['fpo_update_ms'])} / {_fmt(b['ppo_update_ms'])} = {_fmt(b['fpo_over_ppo'])}x"))
    f = steps["fpo"]["result"] or {}
    if f:
        figs += [("FPO run: first-minibatch ratio max deviation (<= 1e-6)", f.get("ratio_first_max_dev")),
                 ("FPO run: seconds per iteration (median after the first)", f.get("seconds_per_iteration")),
                 ("FPO run: env steps/s", f.get("env_steps_per_s")),
                 ("FPO run: episode return, first -> final", f"{_fmt(f.get('first_return'))} -> "
                                                            f"{_fmt(f.get('final_return'))}")]
    if figs:
        lines += ["", "| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {v if isinstance(v, str) else _fmt(v)} |" for k, v in figs]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default; exit 2 when there is none) or cpu (to test this script)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: bench --quick, the bandit FPO run")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check" / "gpu_check.json",
                        help="the JSON report (the markdown table goes beside it, .md)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of bench and the FPO run (default: theirs; 1 with --device cpu --quick)")
    parser.add_argument("--cap", type=float, default=TOTAL_CAP_S, help=f"total seconds (default {TOTAL_CAP_S:.0f})")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's budget")
    parser.add_argument("--fpo-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fpo-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None and args.device == "cpu" and args.quick:
        args.threads = 1  # a smoke run on a shared machine: one thread stalls least behind other processes
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads = {args.threads} is invalid: expected a positive int")
    if not args.cap > 0 or not args.budget_scale > 0:
        parser.error("--cap and --budget-scale must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fpo_child:
        return fpo_child(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no GPU. "
              "This check needs a CUDA machine and a CUDA build of torch (make setup TORCH_SPEC=\"torch==... "
              "--index-url <a CUDA wheel index>\"); to test the script itself on CPU: "
              "python scripts/gpu_check.py --device cpu --quick", file=sys.stderr)
        return 2
    report = run_steps(args)
    table = markdown(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from fmpolicy.io import atomic_write_text

    atomic_write_text(out, json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(out.with_suffix(".md"), table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
