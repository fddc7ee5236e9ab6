"""scripts/probe_goal.py: the ridge probe in closed form, and the script on a tiny camera policy (Meta-World)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco: headless rendering

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import load_script  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_ridge_probe_recovers_a_linear_map_and_shrinks_with_lambda():
    probe = load_script("probe_goal")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5)) * [1, 10, 0.1, 3, 1] + 2.0  # unequal scales: the probe standardizes
    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    y = x @ w + b
    pred = probe.ridge_predict(x[:60], y[:60], x[60:], lam=0.0)
    np.testing.assert_allclose(pred, y[60:], atol=1e-8)  # least squares on a linear target: exact
    shrunk = probe.ridge_predict(x[:60], y[:60], x[60:], lam=10.0)  # a large lambda: towards the mean
    assert np.abs(shrunk - y[:60].mean(0)).mean() < np.abs(pred - y[:60].mean(0)).mean()


def test_the_probe_runs_on_a_camera_policy_and_its_baseline_is_the_held_out_spread(tmp_path):
    pytest.importorskip("metaworld")
    import torch

    from fmpolicy import FlowPolicy, PolicyConfig, make_expert_config
    from fmpolicy.config import EncoderConfig

    cams = ("observation.images.corner", "observation.images.topview")
    cfg = PolicyConfig(state_dim=4, action_dim=4, chunk_size=4, n_action_steps=2, device="cpu",
                       expert=make_expert_config("mlp", max_state_dim=4, max_action_dim=4, prefix_dim=16,
                                                 prefix_pool="attention"),
                       encoder=EncoderConfig(kind="vision_text", cameras=cams, image_size=32, vision_tower="conv",
                                             vision_hidden_size=8, vision_num_hidden_layers=1, vision_keypoints=4,
                                             text_hidden_size=16, text_intermediate_size=32, text_num_hidden_layers=1,
                                             text_num_attention_heads=2, max_text_tokens=8, out_dim=16))
    torch.manual_seed(0)
    policy = FlowPolicy(cfg)
    policy.fit_normalization(torch.randn(20, 4), torch.randn(20, 4, 4))
    policy.save_pretrained(tmp_path / "p")
    script = load_script("probe_goal")
    out = tmp_path / "probe.json"
    script.main(["--policy", str(tmp_path / "p"), "--train", "5", "--test", "3", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["features"] == 2 * 2 * 4  # two cameras, one token each of 4 keypoints' (x, y)
    frames = script.collect_frames("reach", ("corner", "topview"), 32, [*range(5), *range(10_000, 10_003)])
    expected = np.abs(frames["goal"][5:] - frames["goal"][:5].mean(0)).mean(0)
    np.testing.assert_allclose(row["goal_baseline_m"], expected, atol=1e-4)  # rounded to 0.1 mm
    assert all(np.isfinite(row["goal_error_m"])) and all(np.isfinite(row["hand_error_m"]))
    with pytest.raises(SystemExit):
        script.main(["--policy", str(tmp_path / "p"), "--train", "1"])
