"""scripts/policy_spread.py: the spread of a policy's sampled chunks, checked where it is known exactly."""

from __future__ import annotations

import json

import pytest
import torch

from fmpolicy import FlowPolicy, NormalizationConfig, PolicyConfig, make_expert_config
from tests.helpers import load_script, randomized

pytestmark = pytest.mark.usefixtures("one_thread")


def point_policy(head: str) -> FlowPolicy:
    cfg = PolicyConfig(state_dim=4, action_dim=2, chunk_size=8, n_action_steps=4, device="cpu", head=head,
                       expert=make_expert_config("tiny"),
                       normalization=NormalizationConfig(state="identity", action="identity"))
    return FlowPolicy(cfg).eval()


def test_spread_and_loss_profile_where_they_are_known(tmp_path):
    """A flow whose velocity is 0 samples its initial noise: within-state std 1, the std over states of
    the mean of n samples ~1/sqrt(n), and a CFM loss of its own samples of E|a - eps|^2 = 2 at every t.
    A regression head ignores the noise: within-state std exactly 0."""
    flow = point_policy("flow")
    with torch.no_grad():
        for p in flow.net.parameters():
            p.zero_()
    flow.save_pretrained(tmp_path / "flow")
    regression = point_policy("regression")
    randomized(regression.net, 0, scale=0.1)  # (at initialisation its zero gates hide the state)
    regression.save_pretrained(tmp_path / "regression")
    out = tmp_path / "spread.json"
    load_script("policy_spread").main(["--policy", str(tmp_path / "flow"), str(tmp_path / "regression"),
                                       "--env", "fmpolicy/PointObstacle-v0", "--num-envs", "6", "--steps", "6",
                                       "--every", "3", "--samples", "64", "--json", str(out)])
    flow_row, regression_row = json.loads(out.read_text())
    assert abs(flow_row["within"] - 1.0) < 0.05
    assert 0.125 * 0.6 < flow_row["across"] < 0.125 * 1.4  # 1/sqrt(64), from 6 states
    assert set(flow_row["cfm_loss_t"]) == {"0.05", "0.3", "0.5", "0.7", "0.9", "0.97", "0.99"}
    for t, loss in flow_row["cfm_loss_t"].items():
        assert abs(loss - 2.0) < 0.5, (t, loss)
    assert regression_row["within"] == 0.0 and regression_row["across"] > 0
    assert "cfm_loss_t" not in regression_row


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        load_script("policy_spread").main(["--policy", "x", "--env", "fmpolicy/PointObstacle-v0", "--samples", "1"])
