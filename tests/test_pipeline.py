"""scripts/pipeline.py end to end on a tiny run: collect, train, evaluate, with the policy's widths
taken from the dataset it collects ("auto")."""

from __future__ import annotations

import json

import pytest

from fmpolicy.errors import ConfigError
from tests.helpers import load_script

CONFIG = """
policy:
  state_dim: auto
  action_dim: auto
  chunk_size: 4
  n_action_steps: 2
  expert: {kind: mlp, width: 32, depth: 2, max_state_dim: auto, max_action_dim: auto}
  device: cpu
data: {root: unused}
train: {steps: 3, batch_size: 8, log_every: 1, save_every: 3, progress: false}
env: {id: fmpolicy/PointObstacle-v0, kwargs: {}}
"""


def test_pipeline_resolves_auto_widths_from_the_dataset_it_collects(tmp_path):
    config = tmp_path / "auto.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "run"
    result = load_script("pipeline").main(["--config", str(config), "--demos", "2", "--eval-episodes", "2",
                                           "--heads", "flow", "--out", str(out)])
    (row,) = result["results"]
    assert row["head"] == "flow" and 0.0 <= row["success_rate"] <= 1.0
    saved = json.loads((out / "flow" / "policy" / "config.json").read_text())["config"]
    # PointObstacle: state (x, y, vx, vy), action (ax, ay); the padded widths are the robot's own
    assert (saved["state_dim"], saved["action_dim"]) == (4, 2)
    assert (saved["expert"]["max_state_dim"], saved["expert"]["max_action_dim"]) == (4, 2)


def test_pipeline_checks_a_config_without_auto_values_before_collecting(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(CONFIG.replace("state_dim: auto\n  action_dim: auto", "state_dim: 4\n  action_dim: -2")
                      .replace("max_state_dim: auto, max_action_dim: auto", "max_state_dim: 4, max_action_dim: 2"))
    with pytest.raises(ConfigError, match="action_dim"):
        load_script("pipeline").main(["--config", str(config), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # nothing collected
