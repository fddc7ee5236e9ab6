"""scripts/gpu_check.py: its CPU smoke run (`--device cpu --quick`) gives every step and figure, and
without CUDA it refuses to run (exit 2). The CUDA run itself needs a GPU machine (README, Benchmarks)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_quick_cpu_run_reports_every_step(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert list(steps) == ["environment", "tests", "bench", "fpo"]
    assert {name: s["status"] for name, s in steps.items()} == dict.fromkeys(steps, "ok"), \
        {name: s["error"] for name, s in steps.items()}
    assert proc.returncode == 0 and report["ok"], proc.stderr
    assert report["device"] == "cpu" and report["device_name"] and report["date"]
    assert report["total_seconds"] <= report["cap_s"]

    env = steps["environment"]["result"]
    assert env["torch"] == torch.__version__ and env["cpu_cores"] >= 1

    tests = steps["tests"]["result"]  # the CUDA tests are found, and skipped here
    assert tests["selected"] > 0 and tests["failed"] == 0
    assert tests["skipped"] + tests["passed"] == tests["selected"]

    figures = steps["bench"]["result"]["figures"]
    for key in ("chunk_ms_b1_10steps", "chunk_ms_b4_10steps", "cache_speedup_b1", "cache_speedup_b4",
                "fpo_update_ms", "ppo_update_ms", "fpo_over_ppo", "env_steps_per_s_64"):
        assert finite(figures[key]) and figures[key] > 0, (key, figures)
    assert figures["cache_max_abs_diff_b4"] < 1e-4

    fpo = steps["fpo"]["result"]
    assert fpo["iterations"] == 3 and fpo["actor_devices"] == ["cpu"]
    assert fpo["ratio_first_max_dev"] <= 1e-6 and fpo["ratio_check_passed"]
    for key in ("seconds_per_iteration", "env_steps_per_s", "final_return", "first_iteration_s"):
        assert finite(fpo[key]), (key, fpo)

    table = (tmp_path / "check.md").read_text()
    assert table in proc.stdout
    assert report["date"][:10] in table and report["device_name"] in table
    for name in steps:
        assert f"| {name} | ok |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_device_it_exits_2(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          timeout=120, env=ENV, cwd=ROOT)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--device cpu" in proc.stderr
    assert not out.exists()


def test_missing_bench_figures_are_named():
    gc = load_script()
    row = {"section": "chunk", "name": "predict_action_chunk", "batch": 1, "steps": 10, "median_ms": 3.0}
    figures, missing = gc.bench_figures([row, {**row, "steps": 1, "median_ms": math.nan}], quick=False)
    assert figures["chunk_ms_b1_10steps"] == 3.0
    assert "chunk latency at batch 64, 10 steps" in missing
    assert "env steps/s at 4096 envs" in missing and "FPO vs Gaussian PPO update" in missing
    assert "chunk_ms_b1_1steps is not a finite number" in missing
