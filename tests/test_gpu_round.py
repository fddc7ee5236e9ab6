"""scripts/gpu_round.sh, the one prepared command for a lent GPU machine, runs each of its steps on
tiny sizes on CPU (DEVICE=cpu QUICK=1) and records them, so that a GPU session does not spend its few
minutes on a broken script."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_round_runs_every_step_on_cpu_and_records_it(tmp_path):
    pytest.importorskip("websockets")
    out = tmp_path / "round"
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "QUICK": "1", "GPU_PYTHON": sys.executable}
    client = os.environ.get("OPENPI_CLIENT_PYTHON")  # `make test` sets it: the serving step then runs for real
    if client:
        env["CLIENT_PYTHON"] = client
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_round.sh")], env=env, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    steps = dict(re.findall(r"^(\w+) rc=(\d+) ", (out / "steps.txt").read_text(), re.M))
    assert set(steps) == {"gpu_check", "bench", "serving", "thread_probe"}, steps
    for name in ("gpu_check", "bench", "thread_probe"):
        assert steps[name] == "0", (name, (out / f"{name}.txt").read_text()[-2000:])
    assert json.loads((out / "gpu_check.json").read_text())["steps"]
    assert any(line.startswith("{") for line in (out / "bench.txt").read_text().splitlines())
    assert "main_us" in json.loads((out / "thread_probe.txt").read_text().strip().splitlines()[-1])
    if client:
        assert steps["serving"] == "0", (out / "serving.txt").read_text()[-2000:]
        rows = json.loads((out / "serving.json").read_text())["rows"]
        assert [(r["clients"], r["batching"]) for r in rows] == [(1, "window"), (1, "protocol"), (2, "window"),
                                                                 (2, "protocol")]
        assert all(r["rtt_ms_median"] > 0 for r in rows)
