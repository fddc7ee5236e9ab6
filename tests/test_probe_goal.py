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


def test_the_probe_runs_on_a_camera_policy_and_its_baseline_is_the_held_out_spread(tmp_path, monkeypatch):
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
    script.main(["--policy", str(tmp_path / "p"), "--train", "5", "--test", "3", "--json", str(out),
                 "--fit-tower", "2", "5", "--fit-steps", "2", "--frames", str(tmp_path / "frames")])
    (row,) = json.loads(out.read_text())
    (cached,) = (tmp_path / "frames").glob("*.npz")
    assert cached.name == "reach_corner+topview_32px_5_3.npz"
    assert row["fit_tower_steps"] == 2 and sorted(row["fit_tower_goal_error_m"]) == ["2", "5"]
    assert all(np.isfinite(e).all() and len(e) == 3 for e in row["fit_tower_goal_error_m"].values())
    assert row["features"] == 2 * 2 * 4  # two cameras, one token each of 4 keypoints' (x, y)
    frames = script.collect_frames("reach", ("corner", "topview"), 32, [*range(5), *range(10_000, 10_003)])
    expected = np.abs(frames["goal"][5:] - frames["goal"][:5].mean(0)).mean(0)
    np.testing.assert_allclose(row["goal_baseline_m"], expected, atol=1e-4)  # rounded to 0.1 mm
    assert all(np.isfinite(row["goal_error_m"])) and all(np.isfinite(row["hand_error_m"]))
    def no_rendering(*args, **kwargs):
        raise AssertionError("--frames: the cached frames were rendered again")

    monkeypatch.setattr(script, "collect_frames", no_rendering)
    again = tmp_path / "again.json"
    script.main(["--policy", str(tmp_path / "p"), "--train", "5", "--test", "3", "--json", str(again),
                 "--frames", str(tmp_path / "frames")])
    (row_again,) = json.loads(again.read_text())
    for key in ("goal_error_m", "goal_baseline_m", "hand_error_m", "hand_baseline_m"):
        assert row_again[key] == row[key]  # the same frames, the same float64 ridge fit
    with np.load(cached) as z:
        stale = {k: z[k] for k in z.files}
    np.savez(cached, **{**stale, "image_corner": np.zeros((8, 3, 16, 16), np.uint8)})  # another size's frames
    with pytest.raises(SystemExit, match="corner frames of shape"):
        script.main(["--policy", str(tmp_path / "p"), "--train", "5", "--test", "3", "--frames", str(tmp_path / "frames")])
    with pytest.raises(SystemExit):
        script.main(["--policy", str(tmp_path / "p"), "--train", "1"])
    with pytest.raises(SystemExit):  # more goals to fit on than train frames
        script.main(["--policy", str(tmp_path / "p"), "--train", "5", "--fit-tower", "6"])


def _marker_frames(n: int, size: int, seed: int):
    """(n, 3, size, size) grey frames with one red pixel; its 'goal' = (column, row) in metres at 1 cm a pixel, z fixed."""
    import torch

    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(0, size, n), rng.integers(0, size, n)
    images = torch.full((n, 3, size, size), 0.5)
    images[torch.arange(n), :, torch.from_numpy(rows), torch.from_numpy(cols)] = torch.tensor([1.0, 0.0, 0.0])
    goal = np.stack([cols * 0.01, rows * 0.01, np.full(n, 0.2)], axis=1)
    return images, goal


def test_a_fresh_tower_fitted_on_many_goals_reads_held_out_ones_and_on_two_does_not():
    import torch

    from fmpolicy.config import EncoderConfig

    script = load_script("probe_goal")
    size, n_train = 16, 256
    images, goal = _marker_frames(n_train + 64, size, seed=0)
    batch = {"observation.images.top": images, "task": ["reach"] * len(goal)}
    cfg = EncoderConfig(kind="vision_text", cameras=("observation.images.top",), image_size=size, vision_tower="conv",
                        vision_hidden_size=8, vision_num_hidden_layers=1, vision_keypoints=4, freeze_vision=True,
                        text_hidden_size=16, text_intermediate_size=32, text_num_hidden_layers=1,
                        text_num_attention_heads=2, max_text_tokens=8, out_dim=16)
    baseline = np.abs(goal[n_train:] - goal[:n_train].mean(0)).mean(0)  # ~4 cm in x and y, 0 in z
    torch.set_num_threads(1)
    many = script.fit_tower(cfg, batch, goal, n_train, n_train, steps=400)
    two = script.fit_tower(cfg, batch, goal, 2, n_train, steps=400)
    assert len(many) == 3 and many[2] < 1e-3  # z never varies: the head's bias learns it
    assert max(many[:2]) < 0.35 * baseline[:2].min(), (many, baseline)  # located on frames it never saw
    assert min(two[:2]) > 0.5 * baseline[:2].min(), (two, baseline)  # from two goals it cannot generalize
