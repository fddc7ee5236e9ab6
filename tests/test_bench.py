"""The benchmark script runs end to end (`--quick`) and reports sane figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
SECTIONS = {"chunk", "overhead", "cache", "train", "encoder", "envs", "rl_update"}


def test_bench_quick_json():
    # one thread: on a shared 2-core machine two threads can stall behind other processes, and a smoke
    # run only needs to finish quickly, not to measure anything
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", "--threads", "1"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]  # every line is one JSON object
    assert rows and all(isinstance(r, dict) for r in rows)
    assert {r["section"] for r in rows} == SECTIONS

    for r in rows:
        for key in ("preset", "device", "batch", "median_ms", "p90_ms", "machine"):
            assert key in r, (key, r)
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0, r
        assert math.isfinite(r["p90_ms"]) and r["p90_ms"] >= r["median_ms"], r
        assert {"cpu", "torch", "threads"} <= set(r["machine"]), r["machine"]

    chunk_steps = {r["steps"] for r in rows if r["section"] == "chunk"}
    assert chunk_steps == {1, 5, 10}
    overhead = [r for r in rows if r["section"] == "overhead" and r["name"] == "chunk"]
    assert overhead and all(math.isfinite(r["overhead"]) and r["overhead"] > -1 for r in overhead)

    uncached = [r for r in rows if r["section"] == "cache" and r["name"] == "uncached"]
    assert uncached
    for r in uncached:
        assert r["max_abs_diff"] < 1e-4, r  # the prefix cache gives the same chunk as recomputing
        assert r["prefix_effect"] > 1e-3, r  # ... and the prefix does reach the chunk
        assert math.isfinite(r["speedup"]) and r["speedup"] > 0

    train = {r["name"]: r for r in rows if r["section"] == "train"}
    assert set(train) == {"fp32", "bf16"}
    assert all(math.isfinite(r["steps_per_s"]) and r["steps_per_s"] > 0 for r in train.values())
    assert math.isfinite(train["bf16"]["ratio"]) and train["bf16"]["ratio"] > 0


def test_profile_sampling_reports_where_a_chunk_spends_its_time_and_refuses_graphs_without_cuda():
    from fmpolicy.scripting import load_script

    profile = load_script("profile_sampling", SCRIPT.parent)
    policy, obs = profile.make_case("bench", profile.torch.device("cpu"), 2, seed=0)
    result = profile.profile_variant(policy, obs, chunks=2, warmup=1, top=5)
    assert result["wall_ms"] > 0 and result["device_ms"] is None  # no GPU kernels to sum on CPU
    assert 0 < len(result["top"]) <= 5
    times = [row["ms_per_chunk"] for row in result["top"]]
    assert times == sorted(times, reverse=True) and times[0] > 0
    # the expert's matrix products are among the operators a chunk runs
    assert any("addmm" in row["name"] or "linear" in row["name"] for row in result["top"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    bad = subprocess.run([sys.executable, str(SCRIPT.parent / "profile_sampling.py"), "--device", "cpu",
                          "--variants", "eager,graphs"], capture_output=True, text=True, timeout=300, env=env,
                         cwd=SCRIPT.parents[1])
    assert bad.returncode == 2 and "--variants ['graphs'] invalid on cpu" in bad.stderr


def test_thread_probe_reports_each_situation_as_json():
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "thread_probe.py"), "--calls", "50", "--chunks", "2",
                           "--json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = {"main_us", "other_thread_us", "main_while_other_lives_us", "main_after_other_ended_us",
            "main_while_small_op_thread_lives_us", "chunk_main_ms", "chunk_new_thread_ms", "chunk_new_thread_1_thread_ms"}
    assert keys <= set(r) and r["torch_threads"] >= 1
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in keys)
