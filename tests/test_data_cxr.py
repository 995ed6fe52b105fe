"""CXR reader on real JPEG/PNG files written with Pillow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from medtvt_core.data.formats import IMAGENET_MEAN, IMAGENET_STD
from medtvt_core.errors import DataError
from medtvt_plugins.readers.cxr import CxrModality


def gradient(w: int, h: int) -> np.ndarray:
    return (np.add.outer(np.arange(h) * 255 // (h - 1), np.arange(w) * 0)).astype(np.uint8)


@pytest.fixture
def grey_jpeg(tmp_path):
    Image.fromarray(gradient(480, 640), mode="L").save(tmp_path / "g.jpg", quality=90)
    return "g.jpg"


def test_grey_jpeg_shape_channels_and_normalisation(tmp_path, grey_jpeg):
    x = CxrModality().load(grey_jpeg, root=tmp_path)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    raw = x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)  # grey -> 3 equal channels
    # Centre crop of a vertical gradient: the middle row sits near mid-grey.
    assert raw[0, 112].mean().item() == pytest.approx(0.5, abs=0.03)


def test_uniform_rgb_png_normalises_per_channel(tmp_path):
    Image.new("RGB", (500, 420), (128, 64, 200)).save(tmp_path / "c.png")
    x = CxrModality().load("c.png", root=tmp_path)
    want = (torch.tensor([128, 64, 200]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x.mean(dim=(1, 2)), want.float(), atol=1e-4)


def test_sixteen_bit_png_keeps_its_scale(tmp_path):
    Image.fromarray(np.full((410, 410), 65535 // 2, dtype=np.uint16)).save(tmp_path / "d.png")
    raw = CxrModality(mean=(0, 0, 0), std=(1, 1, 1)).load("d.png", root=tmp_path)
    assert raw.mean().item() == pytest.approx(0.5, abs=1e-3)


def test_random_crop_only_in_training(tmp_path, grey_jpeg):
    mod = CxrModality()
    ev = mod.load(grey_jpeg, root=tmp_path, train=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ev, mod.load(grey_jpeg, root=tmp_path))
    a = mod.load(grey_jpeg, root=tmp_path, train=True, generator=torch.Generator().manual_seed(1))
    b = mod.load(grey_jpeg, root=tmp_path, train=True, generator=torch.Generator().manual_seed(1))
    crops = {mod.load(grey_jpeg, root=tmp_path, train=True, generator=torch.Generator().manual_seed(s))[0, 0, 0].item()
             for s in range(6)}
    assert torch.equal(a, b) and len(crops) > 1
    assert mod.is_random(True) and not mod.is_random(False)
    centre = CxrModality(train_crop="center")
    assert not centre.is_random(True)
    assert torch.equal(centre.load(grey_jpeg, root=tmp_path, train=True, generator=torch.Generator().manual_seed(3)), ev)


def test_small_image_is_upscaled_to_the_resize_side(tmp_path):
    Image.fromarray(gradient(100, 120), mode="L").save(tmp_path / "s.jpg")
    assert CxrModality().load("s.jpg", root=tmp_path).shape == (3, 224, 224)


def test_jpeg_cut_in_half_is_an_error(tmp_path, grey_jpeg):
    p = tmp_path / grey_jpeg
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(DataError, match=r"g\.jpg: unreadable image .*truncated"):
        CxrModality().load(grey_jpeg, root=tmp_path)


def test_not_an_image_and_missing_file(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match="unreadable image"):
        CxrModality().load("x.jpg", root=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        CxrModality().load("nope.jpg", root=tmp_path)


def test_config_is_checked():
    with pytest.raises(ValidationError):
        CxrModality(resize=200, crop=224)
    with pytest.raises(ValidationError):
        CxrModality(unknown=1)
    assert CxrModality(resize=256, crop=192).sample_shape == (3, 192, 192)
