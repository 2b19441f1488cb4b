"""Image decoding, shared by training, evaluation, scoring and the report: bytes to an RGB Pillow image,
without torch (``preprocess.py`` turns decoded images into the model's tensors).

Decoding never raises anything but :class:`ImageError`, whose ``kind`` names the failure, so that a
pipeline can turn a bad image into an error row instead of losing its batch.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


def shrink(img: Image.Image, max_side: int) -> Image.Image:
    """Very large images shrunk (bicubic) so that their longer side is ``max_side``: the MLLM's processor
    resizes them anyway, and batches moved between pipeline stages stay small."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


__all__ = ["DEFAULT_MAX_PIXELS", "ImageError", "decode_image", "shrink", "to_rgb"]
