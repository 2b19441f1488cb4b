"""The one image preprocessing of the project, shared by training, evaluation and scoring: a decoded RGB
image (``images.decode_image``) to the quality branch's views, 8-bit for moving between processes and
normalised where the model runs; and the training augmentation."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import QualityViews


def image_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def quality_pixels(
    img: Image.Image, views: QualityViews, train: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The views of one image for the quality branch, still 8-bit: [V, 3, size, size] uint8. Pipelines move
    these (4x smaller than floats) and normalise where the model runs."""
    s = views.size
    if views.mode == "resize":
        if not views.antialias:
            return resize_cubic(image_to_uint8(img), s).unsqueeze(0)
        return image_to_uint8(img.resize((s, s), Image.BICUBIC)).unsqueeze(0)
    x = image_to_uint8(_at_least(img, s))
    _, h, w = x.shape
    if train:
        top = int(torch.randint(0, h - s + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - s + 1, (1,), generator=generator))
        positions = [(top, left)]
    else:
        positions = _grid_positions(h, w, s, views.num_crops)
    return torch.stack([x[:, t : t + s, l : l + s] for t, l in positions])


def resize_cubic(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, size, size] by bicubic interpolation without antialiasing: the kernel of
    OpenCV's ``INTER_CUBIC`` (a = -0.75, pixel centres aligned, edges replicated), which the reference
    resizes with, so a shrink samples the image instead of low-passing it first."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    y = F.interpolate(x.unsqueeze(0).float(), size=(size, size), mode="bicubic", align_corners=False, antialias=False)
    return y[0].round().clamp(0, 255).to(torch.uint8)


def normalize(pixels: torch.Tensor, views: QualityViews) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 normalised with the backbone's mean and std."""
    mean = torch.tensor(views.mean, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(views.std, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def quality_views(
    img: Image.Image, views: QualityViews, train: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The normalised views of one image for the quality branch: [V, 3, size, size] float32."""
    return normalize(quality_pixels(img, views, train, generator), views)


def _at_least(img: Image.Image, size: int) -> Image.Image:
    """Upscale an image whose shorter side is below ``size`` so that a crop fits."""
    w, h = img.size
    if min(w, h) >= size:
        return img
    scale = size / min(w, h)
    return img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)


def _grid_positions(h: int, w: int, size: int, n: int) -> list[tuple[int, int]]:
    """``n`` deterministic crop positions spread evenly over the image (row-major over a square grid)."""
    side = math.ceil(math.sqrt(n))
    ys = np.linspace(0, h - size, side).round().astype(int) if side > 1 else [(h - size) // 2]
    xs = np.linspace(0, w - size, side).round().astype(int) if side > 1 else [(w - size) // 2]
    grid = [(int(y), int(x)) for y in ys for x in xs]
    if n < len(grid):  # spread the chosen ones over the grid instead of taking its first rows
        grid = [grid[i] for i in np.linspace(0, len(grid) - 1, n).round().astype(int)]
    return grid


def augment(x, generator: torch.Generator | None = None, p: float = 0.7):
    """Training augmentation on [V, 3, H, W] (or a tuple of such maps, all given the same draws): a
    horizontal flip (of the last axis), then a rot90 by 1-3 quarter turns, each with probability ``p``. The
    reference flips the other axis: its ``np.fliplr`` on a [C, H, W] array reverses H, a vertical flip, after
    its rot90. Over the quarter turns both give the same eight orientations, with different weights for the
    flip alone (ours mirrors left-right, its up-down)."""
    maps = x if isinstance(x, tuple) else (x,)
    if float(torch.rand((), generator=generator)) < p:
        maps = tuple(m.flip(-1) for m in maps)
    if float(torch.rand((), generator=generator)) < p:
        k = int(torch.randint(1, 4, (1,), generator=generator))
        maps = tuple(torch.rot90(m, k, dims=(-2, -1)) for m in maps)
    return maps if isinstance(x, tuple) else maps[0]
