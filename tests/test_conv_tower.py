"""The conv vision tower (fmpolicy/encoders/conv.py): the spatial softmax's closed form, a tower that learns to
locate a one-pixel marker at positions it never saw, and the tower inside `VisionTextEncoder` (shapes, masks,
save / load, config errors). Tiny models: CPU, seconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from fmpolicy.encoders import EncoderConfig, load_encoder, make_encoder, save_encoder
from fmpolicy.encoders.conv import ConvKeypointTower, SpatialSoftmax
from fmpolicy.errors import ConfigError

TOP, WRIST = "observation.images.top", "observation.images.wrist"
CONV = dict(kind="vision_text", vision_tower="conv", cameras=(TOP, WRIST), image_size=32, vision_hidden_size=8,
            vision_num_hidden_layers=1, vision_keypoints=4, text_hidden_size=32, text_intermediate_size=64,
            text_num_hidden_layers=1, max_text_tokens=16, out_dim=24)
P = 2 + 16  # one token a camera, then the instruction


def test_the_spatial_softmax_returns_the_place_of_a_sharp_peak_and_the_centre_of_a_flat_map():
    maps = torch.zeros(2, 3, 5, 7, dtype=torch.float64)
    maps[0, 0, 0, 0] = maps[0, 1, 4, 6] = maps[0, 2, 1, 3] = 1e3  # top-left, bottom-right, row 1 column 3
    points = SpatialSoftmax().double()(maps)  # (2, 3, 2): (x, y)
    assert torch.allclose(points[0], torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, -0.5]], dtype=torch.float64))
    assert torch.allclose(points[1], torch.zeros(3, 2, dtype=torch.float64), atol=1e-12)  # flat: the centre
    # two equal peaks: the midpoint
    maps = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    maps[0, 0, 2, 0] = maps[0, 0, 2, 4] = 1e3
    assert torch.allclose(SpatialSoftmax().double()(maps)[0, 0], torch.zeros(2, dtype=torch.float64), atol=1e-12)


def marker_images(xy: torch.Tensor, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 2) pixel columns / rows -> (n, 3, size, size): a brown table with texture noise and a one-pixel red
    marker, plus a large red blob (an arm) elsewhere, which the marker must not be confused with."""
    g = torch.Generator().manual_seed(seed)
    n = xy.shape[0]
    img = torch.tensor([0.45, 0.30, 0.20])[None, :, None, None] + 0.05 * torch.rand(n, 3, size, size, generator=g)
    arm = torch.randint(0, size - 6, (n, 2), generator=g)
    for i in range(n):
        c, r = arm[i].tolist()
        img[i, :, r:r + 6, c:c + 6] = torch.tensor([0.7, 0.1, 0.1])[:, None, None]
        img[i, :, xy[i, 1], xy[i, 0]] = torch.tensor([0.95, 0.05, 0.05])
    return img


def test_the_tower_learns_to_locate_a_one_pixel_marker_at_places_it_never_saw():
    """Trained on markers at 512 places, it finds them at 128 other places within 2 pixels (predicting the
    centre is 7 pixels off): the convolutions are translation-equivariant and the softmax turns the place into
    numbers."""
    torch.manual_seed(0)
    size = 32
    g = torch.Generator().manual_seed(1)
    cells = torch.cartesian_prod(torch.arange(2, size - 2), torch.arange(2, size - 2))  # (784, 2) columns, rows
    places = cells[torch.randperm(len(cells), generator=g)]
    train_xy, test_xy = places[:512], places[512:640]  # disjoint
    x_train, x_test = marker_images(train_xy, size, seed=2), marker_images(test_xy, size, seed=3)
    to_unit = lambda xy: (xy.float() + 0.5) / size * 2 - 1  # noqa: E731  pixel centres -> [-1, 1]
    tower = ConvKeypointTower(width=8, layers=1, keypoints=8)
    readout = nn.Linear(16, 2)
    opt = torch.optim.Adam([*tower.parameters(), *readout.parameters()], lr=3e-3)
    for step in range(300):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = (readout(tower(x_train[idx])[:, 0]) - to_unit(train_xy[idx])).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err_px = (readout(tower(x_test)[:, 0]) - to_unit(test_xy)).abs() * size / 2  # in pixels
    assert err_px.mean() < 2.0, err_px.mean()


def test_an_encoder_with_the_conv_tower_has_one_token_a_camera_and_masks_a_missing_one():
    torch.manual_seed(0)
    enc = make_encoder(EncoderConfig(**CONV))
    g = torch.Generator().manual_seed(0)
    batch = {TOP: torch.rand(3, 3, 32, 32, generator=g), WRIST: torch.rand(3, 3, 32, 32, generator=g),
             "task": ["push the puck", "reach", "open the drawer"]}
    prefix, mask = enc(batch)
    assert prefix.shape == (3, P, 24) and mask.shape == (3, P) and enc.num_tokens == P
    assert mask[:, :2].all() and torch.isfinite(prefix).all()
    # the camera token follows its image, not the other camera's
    moved = {**batch, TOP: batch[TOP].flip(-1)}
    other, _ = enc(moved)
    assert not torch.allclose(other[:, 0], prefix[:, 0]) and torch.equal(other[:, 1], prefix[:, 1])
    # a missing camera is masked and not computed
    prefix1, mask1 = enc({TOP: batch[TOP], "task": batch["task"]})
    assert mask1[:, 0].all() and not mask1[:, 1].any() and torch.equal(prefix1[:, 0], prefix[:, 0])
    # the tower trains with the policy (freeze_vision false) and its gradient reaches the stem
    enc = make_encoder(EncoderConfig(**CONV, freeze_vision=False))
    enc(batch)[0].square().mean().backward()
    assert enc.vision.body[0].weight.grad.abs().sum() > 0


def test_an_encoder_with_the_conv_tower_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    enc = make_encoder(EncoderConfig(**CONV, freeze_vision=False))
    with torch.no_grad():
        enc.vision.spatial_softmax.log_temperature.fill_(-1.0)  # not the initial value: the load must restore it
    save_encoder(enc, tmp_path / "enc")
    back = load_encoder(tmp_path / "enc")
    assert back.config == enc.config
    batch = {TOP: torch.rand(2, 3, 32, 32), WRIST: torch.rand(2, 3, 32, 32), "task": ["a", "b"]}
    assert torch.equal(back(batch)[0], enc(batch)[0])


@pytest.mark.parametrize("overrides, field", [
    (dict(vision_tower="resnet"), "vision_tower"),
    (dict(image_size=30), "image_size"),
    (dict(vision_path="/some/siglip"), "vision_path"),
    (dict(vision_keypoints=0), "vision_keypoints"),
    (dict(kind="vlm"), "vision_tower"),
])
def test_conv_tower_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"EncoderConfig\.{field} = "):
        EncoderConfig(**{**CONV, **overrides})
