"""scripts/trace_metaworld.py: per-episode traces of a Meta-World policy (the scripted expert, a tiny camera
policy) and their summary."""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco: headless rendering

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import load_script  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
trace = load_script("trace_metaworld")


def test_the_summary_averages_the_offsets_of_the_episodes_that_closed():
    rows = [{"success": True, "hand_minus_object_at_close": [0.01, -0.02, 0.07], "object_moved": 0.2, "object_set_down": 0},
            {"success": False, "hand_minus_object_at_close": [-0.03, 0.0, 0.05], "object_moved": 0.01,
             "object_set_down": 2},
            {"success": False, "hand_minus_object_at_close": None, "object_moved": 0.0, "object_set_down": 0}]
    s = trace.summarize(rows)
    assert s["episodes"] == 3 and s["closed"] == 2
    assert s["set_down_in_failures"] == 0.5 and s["set_down_in_successes"] == 0.0
    assert s["success_rate"] == pytest.approx(1 / 3) and s["object_moved_5cm"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(s["mean_abs_hand_minus_object_at_close"], [0.02, 0.01, 0.06])


def test_set_downs_count_lifts_that_come_back_to_the_start_height():
    start = 0.03
    assert trace.set_downs([0.03, 0.05, 0.09, 0.12, 0.035, 0.03], start) == 1  # lifted 9 cm, put back
    assert trace.set_downs([0.03, 0.1, 0.035, 0.1, 0.03, 0.1], start) == 2  # twice, then held up
    assert trace.set_downs([0.03, 0.07, 0.05, 0.07], start) == 0  # never back within 1 cm
    assert trace.set_downs([0.03, 0.075, 0.031], start) == 0  # never lifted past 5 cm
    assert trace.set_downs([], start) == 0


def test_the_scripted_expert_closes_on_the_puck_and_places_it(tmp_path):
    pytest.importorskip("metaworld")
    out = tmp_path / "trace.json"
    summary = trace.main(["--policy", "expert", "--task", "pick-place", "--episodes", "2", "--max-steps", "150",
                          "--json", str(out)])
    assert summary["success_rate"] == 1.0 and summary["closed"] == 2 and summary["object_moved_5cm"] == 1.0
    x, y, z = summary["mean_abs_hand_minus_object_at_close"]
    assert x < 0.01 and y < 0.01 and 0.03 < z < 0.1  # on the puck in x, y; the hand's point sits above the fingers
    saved = json.loads(out.read_text())
    assert saved["summary"] == summary and [r["variation"] for r in saved["episodes"]] == [10_000, 10_001]
    for row in saved["episodes"]:
        assert row["success"] and 0 < row["close_step"] < row["steps"]
        assert row["final_object_to_goal"] < 0.07  # pick-place succeeds within 7 cm
        assert row["object_set_down"] == 0


def test_a_camera_policy_is_traced_reproducibly_and_bad_input_is_refused(tmp_path):
    pytest.importorskip("metaworld")
    import torch

    from fmpolicy import FlowPolicy, PolicyConfig, make_expert_config
    from fmpolicy.config import EncoderConfig

    def save(head: str):
        cfg = PolicyConfig(state_dim=4, action_dim=4, chunk_size=4, n_action_steps=2, device="cpu", head=head,
                           expert=make_expert_config("mlp", max_state_dim=4, max_action_dim=4, prefix_dim=16),
                           encoder=EncoderConfig(kind="vision_text", cameras=("observation.images.corner",),
                                                 image_size=16, vision_tower="conv", vision_hidden_size=8,
                                                 vision_num_hidden_layers=1, vision_keypoints=4, text_hidden_size=16,
                                                 text_intermediate_size=32, text_num_hidden_layers=1,
                                                 text_num_attention_heads=2, max_text_tokens=8, out_dim=16))
        torch.manual_seed(0)
        policy = FlowPolicy(cfg)
        policy.fit_normalization(torch.randn(20, 4), torch.randn(20, 4, 4))
        policy.save_pretrained(tmp_path / head)
        return str(tmp_path / head)

    flow = save("flow")
    args = ["--policy", flow, "--task", "reach", "--episodes", "2", "--max-steps", "6"]
    runs = []
    for name in ("a", "b"):
        trace.main(args + ["--json", str(tmp_path / f"{name}.json")])
        runs.append(json.loads((tmp_path / f"{name}.json").read_text())["episodes"])
    first, again = runs
    assert len(first) == 2 and all(len(r["goal"]) == 3 and r["object_moved"] >= 0 for r in first)
    assert first == again  # each episode's noise comes from its own seeded generator
    other = trace.main(args + ["--noise-seed", "7", "--json", str(tmp_path / "c.json")])
    assert other["noise_seed"] == 7
    moved = json.loads((tmp_path / "c.json").read_text())["episodes"]
    assert [r["goal"] for r in moved] == [r["goal"] for r in first] and moved != first  # same goals, other draws
    zero = trace.main(args + ["--noise", "zero", "--sampler", "rk4:2"])
    assert zero["episodes"] == 2 and zero["sampler"] == "rk4:2"
    with pytest.raises(SystemExit):
        trace.main(["--policy", save("regression"), "--task", "reach", "--sampler", "euler:5"])
    with pytest.raises(SystemExit):
        trace.main(args + ["--episodes", "0"])
    with pytest.raises(SystemExit, match="not-a-task|unknown|expected"):
        trace.main(["--policy", flow, "--task", "not-a-task", "--episodes", "1"])
