"""A small convolutional vision tower that ends in a spatial softmax: image -> K keypoints (x, y).

Why: a goal the camera shows as a marker of a pixel or two (Meta-World's reach / push / pick-place goal
sites at 64 px) must be *located*, and from ten demonstrations a task there are ten goals to learn from.
Convolutions find the marker wherever it is (they are translation-equivariant), and the spatial softmax
turns "where" into two numbers the policy can read linearly; a ViT with 16-pixel patches has to learn the
marker's place inside each patch from those ten goals. The layout is the one of Levine et al. 2016
("End-to-end training of deep visuomotor policies") and robomimic's / Diffusion Policy's image encoders,
much smaller (CPU-sized), with GroupNorm instead of BatchNorm (no running statistics to drift between
training and control time). Measured on Meta-World MT10 from two 64-px cameras (docs/benchmarks/metaworld.md,
Prove-it 2): the tasks whose target is the object itself went to 100%, the marker tasks stayed at 0-40%:
locating a marker in a test image is not yet the policy going there: learning to read it takes far more
distinct goals than 10 demonstrations show (scripts/probe_goal.py --fit-tower).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


class SpatialSoftmax(nn.Module):
    """(n, K, h, w) maps -> (n, K, 2): the expected (x, y) in [-1, 1] under each map's softmax over h*w.

    x runs left to right, y top to bottom, both from the centre of the first cell to the centre of the
    last. The temperature is learned (starting at 1): a sharper softmax for a small marker.
    """

    def __init__(self) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, maps: Tensor) -> Tensor:
        n, k, h, w = maps.shape
        ys = torch.linspace(-1.0, 1.0, h, device=maps.device, dtype=maps.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=maps.device, dtype=maps.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2): [..., 0] = x, [..., 1] = y
        weights = torch.softmax(rearrange(maps, "n k h w -> n k (h w)") / self.log_temperature.exp(), dim=-1)
        return weights @ rearrange(grid, "h w c -> (h w) c")  # (n, K, 2)


class ConvKeypointTower(nn.Module):
    """(n, 3, s, s) normalized pixels -> (n, 1, 2K) tokens: one token a camera, its K keypoints' (x, y).

    A 4x4 stride-4 stem (each 4x4 pixel cell to `width` features, s -> s / 4: a one-pixel marker is one of
    its 48 inputs), `layers` 3x3 convolutions at stride 1 (context: a lone red pixel against the red arm),
    each GroupNorm + ReLU, then a 1x1 convolution to K maps and a spatial softmax. At s = 64 the keypoints
    live on a 16 x 16 grid (4 pixels a cell); the softmax's expectation places them between cells. The
    stem is patchify-style because 3x3 convolutions at full resolution cost 3-4x more on a CPU.
    """

    def __init__(self, width: int, layers: int, keypoints: int):
        super().__init__()
        groups = next(g for g in (8, 4, 2, 1) if width % g == 0)

        body: list[nn.Module] = [nn.Conv2d(3, width, 4, stride=4), nn.GroupNorm(groups, width), nn.ReLU()]
        for _ in range(layers):
            body += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(groups, width), nn.ReLU()]
        self.body = nn.Sequential(*body)
        self.keypoint_maps = nn.Conv2d(width, keypoints, 1)
        self.spatial_softmax = SpatialSoftmax()
        self.hidden_size = 2 * keypoints  # width of the one token per camera
        self.num_tokens = 1

    def forward(self, pixels: Tensor) -> Tensor:
        points = self.spatial_softmax(self.keypoint_maps(self.body(pixels)))  # (n, K, 2)
        return rearrange(points, "n k c -> n 1 (k c)")
