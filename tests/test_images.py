import io

import numpy as np
import pytest
import torch
from PIL import Image

from ma_agiqa.config import QualityViews
from ma_agiqa.images import ImageError, decode_image
from ma_agiqa.preprocess import augment, quality_views


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "img",
    [
        Image.new("L", (30, 20), 128),
        Image.new("LA", (30, 20), (128, 255)),
        Image.new("P", (30, 20), 3),
        Image.new("RGBA", (30, 20), (10, 20, 30, 255)),
        Image.new("I;16", (30, 20), 65535),
        Image.new("1", (30, 20), 1),
    ],
    ids=lambda im: im.mode,
)
def test_every_mode_becomes_rgb(img):
    out = decode_image(encode(img))
    assert out.mode == "RGB" and out.size == (30, 20)


def test_cmyk_jpeg_becomes_rgb():
    out = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    assert out.mode == "RGB"
    r, g, b = np.asarray(out)[8, 8]
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red


def test_transparent_pixels_composite_over_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    arr = np.asarray(decode_image(encode(img)))
    assert tuple(arr[1, 1]) == (255, 255, 255)
    assert tuple(arr[0, 0]) == (255, 0, 0)


def test_16_bit_range_is_scaled_to_8_bit():
    img = Image.new("I;16", (4, 4), 0)
    img.putpixel((0, 0), 65535)
    arr = np.asarray(decode_image(encode(img)))
    assert arr[0, 0, 0] == 255 and arr[1, 1, 0] == 0


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"", "empty"),
        (b"this is not an image at all, just some text" * 10, "not_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "not_image"),
    ],
)
def test_bad_bytes_give_a_typed_error(data, kind):
    with pytest.raises(ImageError) as err:
        decode_image(data)
    assert err.value.kind == kind


def test_truncated_real_image(agiqa_sample):
    data = (agiqa_sample / "images" / "AttnGAN_normal_001.jpg").read_bytes()
    with pytest.raises(ImageError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.kind == "truncated"


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (12000, 12000), 0))  # 144 MP that compresses to a few KB
    assert len(bomb) < 100_000
    with pytest.raises(ImageError) as err:
        decode_image(bomb)
    assert err.value.kind == "too_large"
    with pytest.raises(ImageError):
        decode_image(encode(Image.new("RGB", (20, 20))), max_pixels=399)
    assert decode_image(encode(Image.new("RGB", (20, 20))), max_pixels=400).size == (20, 20)


def test_resize_view_is_the_reference_single_view(agiqa_images):
    views = quality_views(agiqa_images[0], QualityViews())
    assert views.shape == (1, 3, 224, 224) and views.dtype == torch.float32
    assert -1.01 <= float(views.min()) and float(views.max()) <= 1.01  # mean=std=0.5 maps [0,1] to [-1,1]


def test_test_crops_are_deterministic_and_distinct(agiqa_images):
    cfg = QualityViews(mode="crops", num_crops=5)
    a = quality_views(agiqa_images[0], cfg)
    b = quality_views(agiqa_images[0], cfg)
    assert a.shape == (5, 3, 224, 224)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[-1])


def test_train_crop_is_random_and_small_images_are_upscaled():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    cfg = QualityViews(mode="crops")
    g = torch.Generator().manual_seed(1)
    crops = [quality_views(img, cfg, train=True, generator=g) for _ in range(4)]
    assert any(not torch.equal(crops[0], c) for c in crops[1:])
    small = quality_views(Image.new("RGB", (100, 50)), cfg)
    assert small.shape == (1, 3, 224, 224)


def test_augment_keeps_shape_and_changes_pixels():
    x = torch.randn(1, 3, 224, 224)
    g = torch.Generator().manual_seed(0)
    outs = [augment(x, g) for _ in range(8)]
    assert all(o.shape == x.shape for o in outs)
    assert any(not torch.equal(o, x) for o in outs)
    assert torch.equal(augment(x, g, p=0.0), x)
