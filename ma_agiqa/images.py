"""The one image preprocessing of the project, shared by training, evaluation and scoring.

Decoding never raises anything but :class:`ImageError`, whose ``kind`` names the failure, so that a
pipeline can turn a bad image into an error row instead of losing its batch.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import QualityViews
from .errors import DEFAULT_MAX_PIXELS, MAX_ASPECT_RATIO, ImageError


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Decode bytes into an RGB image with its EXIF orientation applied.

    The size is checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing. Transparent images are composited over white, as a viewer shows them.
    """
    if not data:
        raise ImageError("empty", "0-byte file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError("not_image", f"not a decodable image ({len(data)} bytes)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError("too_large", str(e)) from None
        except Exception as e:  # noqa: BLE001 - Pillow raises many types on garbage headers
            raise ImageError("not_image", f"{type(e).__name__}: {e}") from None
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError("not_image", f"invalid size {width}x{height}")
        if width * height > max_pixels:
            raise ImageError(
                "too_large", f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
            )
        if max(width, height) / min(width, height) > max_aspect:
            raise ImageError("extreme_aspect", f"{width}x{height} is more than {max_aspect:g} times longer than it is wide")
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError("truncated", f"{type(e).__name__}: {e}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError("too_large", str(e)) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block must not cost the image
        pass
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError("bad_mode", f"cannot convert mode {mode} to RGB: {e}") from None


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


def resize_for_semantic(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink very large images before they reach the MLLM's processor (which resizes them anyway), so
    that batches moved between pipeline stages stay small."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "QualityViews",
    "augment",
    "decode_image",
    "image_to_uint8",
    "normalize",
    "quality_pixels",
    "quality_views",
    "resize_for_semantic",
    "to_rgb",
]
