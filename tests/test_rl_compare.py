"""scripts/rl_compare.py: several seeds of both methods as subprocesses, summary, re-run reads results."""

from __future__ import annotations

import json

import numpy as np

from tests.helpers import load_script


def test_compare_runs_both_methods_over_seeds_and_reuses_finished_runs(tmp_path):
    script = load_script("rl_compare")
    argv = ["--config", "configs/fpo_bandit.yaml", "--seeds", "0,1", "--jobs", "2", "--out", str(tmp_path),
            "rl.total_env_steps=256", "rl.num_envs=64", "rl.eval_every=2", "rl.eval_episodes=16",
            "policy.expert.width=32", "rl.value.width=16", "rl.device=cpu"]
    first = script.main(argv)
    runs = first["runs"]
    assert {m: len(r) for m, r in runs.items()} == {"flow": 2, "gaussian": 2}
    for method, rs in runs.items():
        evals = first["summary"][method]["final_eval_return"]
        assert evals["mean"] == np.mean([r["final_eval_return"] for r in rs])
        assert evals["median"] == np.median([r["final_eval_return"] for r in rs])
        assert all(r["env_steps"] == 256 for r in rs)
        assert all(r["best_eval_return"] == max(v for _, v in r["eval_curve"]) >= r["final_eval_return"] for r in rs)
        assert all(len(r["eval_curve"]) == 3 for r in rs)  # before the first update, at 2 and at 4 iterations
    # per-method overrides reached their runs: the Gaussian runs use clip 0.2, FPO keeps 0.05
    cfg = (tmp_path / "gaussian_s1" / "config.yaml").read_text()
    assert "clip: 0.2" in cfg and "clip: 0.05" in (tmp_path / "flow_s0" / "config.yaml").read_text()
    # running again reads the finished runs instead of training them again
    log = tmp_path / "flow_s0" / "log.jsonl"
    before = log.stat().st_mtime_ns
    again = script.main(argv)
    assert log.stat().st_mtime_ns == before
    assert again["summary"] == first["summary"]
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0, 1]
    assert (tmp_path / "curves.png").is_file()
