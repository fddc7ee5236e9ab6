"""Random-shift image augmentation (`train.image_shift`): exact pad-and-crop, and a training run that
shifts, resumes bit-exactly and differs from one that does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fmpolicy.config import TrainConfig
from fmpolicy.errors import ConfigError
from fmpolicy.training.augment import draw_shifts, shift_batch, shift_images
from tests.helpers import cut_after_checkpoint, load_script

ROOT = Path(__file__).resolve().parents[1]
train_script = load_script("train")
collect_demos = load_script("collect_demos")


def pad_and_crop(images: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """The definition: a replicate pad of `pad` pixels, then the H x W window at (pad + dy, pad + dx)."""
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    flat = images.reshape(b, -1, h, w).double()
    padded = F.pad(flat, (pad, pad, pad, pad), mode="replicate")
    out = torch.stack([padded[i, :, pad + dy: pad + dy + h, pad + dx: pad + dx + w]
                       for i, (dy, dx) in enumerate(shifts.tolist())])
    return out.reshape(images.shape).to(images.dtype)


@pytest.mark.parametrize("shape", [(6, 3, 9, 11), (5, 2, 3, 8, 8)])
def test_shift_equals_replicate_pad_then_crop(shape):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(shape, generator=g)
    shifts = draw_shifts(shape[0], 3, g)
    torch.testing.assert_close(shift_images(images, shifts), pad_and_crop(images, shifts, 3), atol=0, rtol=0)
    as_bytes = (images * 255).to(torch.uint8)  # uint8 stays uint8, the same pixels moved
    moved = shift_images(as_bytes, shifts)
    assert moved.dtype == torch.uint8 and torch.equal(moved, pad_and_crop(as_bytes, shifts, 3))
    assert torch.equal(shift_images(images, torch.zeros(shape[0], 2, dtype=torch.long)), images)


def test_a_shift_moves_the_content_by_that_many_pixels():
    img = torch.zeros(1, 1, 10, 10)
    img[0, 0, 4, 6] = 1.0  # one bright pixel
    out = shift_images(img, torch.tensor([[2, -3]]))  # read from (y + 2, x - 3): the content moves up 2, right 3
    assert out[0, 0].nonzero().tolist() == [[2, 9]]


def test_shifts_are_uniform_over_the_range_and_follow_the_generator():
    a = draw_shifts(4000, 2, torch.Generator().manual_seed(1))
    b = draw_shifts(4000, 2, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.long
    counts = torch.bincount((a + 2).flatten(), minlength=5)
    assert counts.numel() == 5 and counts.min() > 0.17 * 8000 and counts.max() < 0.23 * 8000  # 1/5 each


def test_shift_batch_moves_the_cameras_only():
    g = torch.Generator().manual_seed(2)
    batch = {"observation.images.top": torch.rand(4, 3, 8, 8, generator=g),
             "observation.images.top_is_pad": torch.zeros(4, dtype=torch.bool),
             "observation.state": torch.rand(4, 2, generator=g), "task": ["a", "b", "c", "d"]}
    shifts = torch.tensor([[1, 0], [0, 1], [-1, -1], [2, 2]])
    out = shift_batch(batch, shifts)
    assert torch.equal(out["observation.images.top"], shift_images(batch["observation.images.top"], shifts))
    for k in ("observation.images.top_is_pad", "observation.state", "task"):
        assert out[k] is batch[k]


def test_bad_shift_settings_are_named():
    with pytest.raises(ConfigError, match="image_shift"):
        TrainConfig(image_shift=-1)
    with pytest.raises(ValueError, match="shifts"):
        shift_images(torch.zeros(2, 3, 4, 4), torch.zeros(3, 2, dtype=torch.long))


@pytest.fixture(scope="module")
def goals_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "goals"
    collect_demos.main(["--env", "fmpolicy/PointObstacle-v0", "--episodes", "4", "--num-envs", "4", "--out", str(out),
                        "--env-kwargs", json.dumps({"n_goals": 2}), "--image-size", "16", "--no-progress"])
    return out


def _train(data: Path, out: Path, *overrides: str, resume: bool = False):
    argv = ["--config", str(ROOT / "configs" / "point_goals_vl.yaml"), f"data.root={data}", f"train.out_dir={out}",
            "policy.expert.width=32", "policy.expert.depth=1", "policy.expert.num_heads=2",
            "policy.expert.time_embed_dim=32", "policy.expert.prefix_dim=16", "policy.encoder.out_dim=16",
            "policy.encoder.image_size=16", "policy.device=cpu", "train.progress=false", "train.warmup_steps=2",
            "train.batch_size=8", "train.log_every=1", *overrides]
    return train_script.main(argv + (["--resume"] if resume else []))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "policy" / "model.safetensors"))


def test_training_with_shifts_resumes_exactly_and_differs_from_training_without(goals_data, tmp_path, one_thread):
    common = ("train.steps=4", "train.save_every=2", "train.image_shift=2")
    _train(goals_data, tmp_path / "full", *common)
    cut = tmp_path / "cut"
    _train(goals_data, cut, *common)
    cut_after_checkpoint(cut, 2, 4)
    _train(goals_data, cut, *common, resume=True)  # the shift generator resumes with the rest
    full, resumed = _weights(tmp_path / "full"), _weights(cut)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    _train(goals_data, tmp_path / "plain", "train.steps=4", "train.save_every=2")
    plain = _weights(tmp_path / "plain")
    # the same data, draws of t and noise and initial weights: only the shifted images differ
    assert any(not torch.equal(full[k], plain[k]) for k in full if k.startswith("encoder.vision"))


def test_shifts_with_a_frozen_backbone_run_it_every_step(goals_data, tmp_path, one_thread, capsys):
    _train(goals_data, tmp_path / "frozen", "train.steps=2", "train.image_shift=1",
           "policy.encoder.freeze_vision=true", "policy.encoder.freeze_text=true")
    out = capsys.readouterr().out
    assert "train.image_shift = 1: the frozen encoder runs every step" in out
    assert "cached the frozen encoder's outputs" not in out
