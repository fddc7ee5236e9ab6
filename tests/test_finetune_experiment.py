"""The fine-tuning experiment end to end at toy size: imitation, FPO from it (with and without the pull
towards it), continued imitation."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import load_script

pytest.importorskip("fmpolicy_envs")


def test_finetune_experiment_runs_all_four_arms_on_the_same_evaluation(tmp_path):
    torch.set_num_threads(1)
    script = load_script("finetune_experiment")
    out = tmp_path / "ft"
    results = script.main(["--out", str(out), "--demos", "3", "--bc-steps", "30", "--fpo-iterations", "2",
                           "--eval-episodes", "8", "rl.num_envs=8", "rl.num_macro_steps=3", "rl.eval_every=1",
                           "rl.eval_episodes=8", "rl.critic_warmup_iterations=1"])
    assert set(results) == {"bc", "fpo", "fpo_pull", "bc_continued"}
    assert all(r["episodes"] == 8 and 0.0 <= r["success_rate"] <= 1.0 for r in results.values())
    assert all(0.0 <= r["passed_above"] + r["passed_below"] <= 1.0 for r in results.values())
    # both FPO arms logged their evaluations from iteration 0 (the imitation policy) to the end
    assert [c["iteration"] for c in results["fpo"]["curve"]] == [0, 1, 2]
    first, first_pull = results["fpo"]["curve"][0], results["fpo_pull"]["curve"][0]
    assert first_pull == {**first, "elapsed_s": first_pull["elapsed_s"]}  # the same start, the same evaluation
    # only the second arm pulls towards the imitation policy
    assert "ref_coef: 0.1" in (out / "fpo_pull" / "config.yaml").read_text()
    assert "ref_coef: 0.0" in (out / "fpo" / "config.yaml").read_text()
    assert results["fpo"]["curve"][0]["elapsed_s"] < results["fpo"]["curve"][-1]["elapsed_s"]
    # continued imitation resumed the first run (same log, more steps) instead of starting over
    assert results["bc_continued"]["steps"] > results["bc"]["steps"] == 30
    log = [json.loads(line) for line in (out / "bc" / "flow" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == results["bc_continued"]["steps"]
    assert (out / "finetune.png").is_file() and (out / "paths.png").is_file()
    assert json.loads((out / "results.json").read_text())["fpo"]["iterations"] == 2
