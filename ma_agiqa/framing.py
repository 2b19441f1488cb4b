"""How an image is framed for the MLLM, without torch: the reference pads it to a square with the image
processor's mean colour (``expand2square``), and a fixed-size processor then brings the square to its side.

The job's decoding step can frame images itself (``Framing.of`` reads the processor's settings from its
preprocessor_config.json, no model loaded) and hand the MLLM's actors images at the size the processor uses
instead of up to ``max_image_side``; ``SemanticExtractor.frame`` leaves an image framed so unchanged.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from PIL import Image

from .config import MAX_IMAGE_SIDE
from .images import shrink


def fill_colour(image_mean) -> tuple[int, int, int]:
    """The reference's padding colour: the image processor's mean as 0-255 integers, truncated as it does."""
    if image_mean is None or len(image_mean) != 3:
        raise ValueError(f"the image processor states no 3-channel image_mean to pad images with (got {image_mean!r})")
    return tuple(int(x * 255) for x in image_mean)


def fixed_side(size: dict | None, crop_size: dict | None, do_center_crop: bool) -> int | None:
    """The square side a fixed-size image processor brings a square image to (CLIP's shortest edge and centre
    crop, SigLIP's height and width); None for a dynamic-resolution processor (Qwen2-VL's pixel budget)."""
    size = {k: v for k, v in dict(size or {}).items() if v is not None}
    crop = {k: v for k, v in dict(crop_size or {}).items() if v is not None}
    if do_center_crop and crop.get("height") and crop.get("height") == crop.get("width"):
        return int(crop["height"])
    if size.get("height") and size.get("height") == size.get("width"):
        return int(size["height"])
    if size.get("shortest_edge") and not size.get("longest_edge") and not size.get("max_pixels"):
        return int(size["shortest_edge"])
    return None


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The image centred on a square of ``fill`` colour, its side the image's longer side (the reference's
    ``expand2square``); a square image is returned as it is."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def image_processor_settings(model_id: str, base_dir: str | None = None, revision: str | None = None) -> dict:
    """An MLLM's image-processor settings as saved: ``preprocessor_config.json`` (the hub's files), or the
    ``image_processor`` entry of ``processor_config.json`` (where transformers 5 saves them)."""
    from .hub import resolve

    path = resolve(model_id, base_dir)

    def read(name: str) -> dict | None:
        if os.path.isdir(path):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                return None
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                file = hf_hub_download(model_id, name, revision=revision)
            except EntryNotFoundError:
                return None
        with open(file) as f:
            return json.load(f)

    settings = read("preprocessor_config.json")
    if settings is None:
        settings = (read("processor_config.json") or {}).get("image_processor")
    if not settings:
        raise FileNotFoundError(f"{model_id}: no image-processor settings (preprocessor_config.json or processor_config.json)")
    return settings


@dataclass(frozen=True)
class Framing:
    """``pad``: padded to a square of ``fill``, then resized to ``side`` (a fixed-size processor's); otherwise
    the image as it is for the processor's own resize and crop. Images are first shrunk to ``max_side``."""

    pad: bool
    fill: tuple[int, int, int]
    side: int | None
    max_side: int = MAX_IMAGE_SIDE

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = shrink(img, self.max_side)
        if not self.pad:
            return img
        img = expand_to_square(img, self.fill)
        if self.side is not None and img.size != (self.side, self.side):
            img = img.resize((self.side, self.side), Image.BICUBIC)
        return img

    @classmethod
    def of(cls, semantic, base_dir: str | None = None) -> "Framing":
        """A semantic config's framing, from its MLLM's preprocessor_config.json (a local folder's, or the hub's
        file alone): what a job's decoding step needs, without loading the model or importing torch."""
        settings = image_processor_settings(semantic.model_id, base_dir or getattr(semantic, "_base_dir", None),
                                            semantic.revision)
        size = dict(settings.get("size") or {})
        for key in ("min_pixels", "max_pixels"):  # Qwen2-VL's older files state the budget at the top level
            if key in settings:
                size[key] = settings[key]
        return cls(
            pad=semantic.framing == "pad", fill=fill_colour(settings.get("image_mean")),
            side=fixed_side(size, settings.get("crop_size"), bool(settings.get("do_center_crop", False))),
            max_side=semantic.max_image_side,
        )
