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


# ---------------------------------------------------------------- oracle: the reference's torchvision v1 pipeline
def reference(path, resize: int = 400, crop: int = 224) -> torch.Tensor:
    """The reference-style pipeline: v1 transforms on ``convert("RGB")`` (PIL bilinear with antialias)."""
    from torchvision import transforms as T

    t = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with Image.open(path) as im:
        return t(im.convert("RGB"))


def textured(w: int, h: int, channels: int, seed: int = 0) -> np.ndarray:
    """Smooth gradient plus fine noise: resampling and crop offsets both show in the values."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 100 + 60 * np.sin(xx / 37.0) * np.cos(yy / 53.0)
    img = base[..., None] + rng.normal(0, 25, (h, w, channels)) + 30 * np.arange(channels)
    return np.clip(img, 0, 255).astype(np.uint8).squeeze()


# Only float rounding may differ: the same PIL bilinear resize (antialiased) and the same crop box.
ORACLE_ATOL = 1e-5


@pytest.mark.parametrize("name,make", [
    ("big_grey.jpg", lambda p: Image.fromarray(textured(2544, 3056, 1), mode="L").save(p, quality=92)),
    ("wide_rgb.png", lambda p: Image.fromarray(textured(641, 479, 3), mode="RGB").save(p)),
    ("tall_palette.png", lambda p: Image.fromarray(textured(450, 733, 3), mode="RGB").quantize(64).save(p)),
    ("rgba.png", lambda p: Image.fromarray(np.dstack([textured(500, 420, 3), textured(500, 420, 1)]), mode="RGBA").save(p)),
])
def test_matches_torchvision_v1_reference(tmp_path, name, make):
    make(tmp_path / name)
    want = reference(tmp_path / name)
    got = CxrModality().load(name, root=tmp_path)
    assert got.shape == want.shape == (3, 224, 224) and got.dtype == torch.float32 and type(got) is torch.Tensor
    assert (got - want).abs().max().item() <= ORACLE_ATOL


def test_other_sizes_match_the_reference(tmp_path):
    Image.fromarray(textured(3056, 2544, 3), mode="RGB").save(tmp_path / "landscape.jpg", quality=90)
    want = reference(tmp_path / "landscape.jpg", resize=256, crop=192)
    got = CxrModality(resize=256, crop=192).load("landscape.jpg", root=tmp_path)
    assert (got - want).abs().max().item() <= ORACLE_ATOL


def test_random_crop_reproducible_per_seed_and_leaves_global_rng(tmp_path):
    Image.fromarray(textured(640, 800, 1), mode="L").save(tmp_path / "r.png")
    mod = CxrModality()
    state = torch.get_rng_state()
    crops = [mod.load("r.png", root=tmp_path, train=True, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    again = mod.load("r.png", root=tmp_path, train=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is forked, not advanced
    assert torch.equal(again, crops[2])
    assert all(not torch.equal(crops[i], crops[j]) for i in range(4) for j in range(i + 1, 4))
    # Each crop is a 224 x 224 window of the reference-resized image (found by its top-left 4 x 4 patch).
    from torchvision import transforms as T

    with Image.open(tmp_path / "r.png") as im:
        full = T.Compose([T.Resize(400), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(im.convert("RGB"))
    windows = full[0].unfold(0, 4, 1).unfold(1, 4, 1)  # [H-3, W-3, 4, 4]
    for c in crops:
        hits = ((windows - c[0, :4, :4]).abs().amax(dim=(2, 3)) <= ORACLE_ATOL).nonzero().tolist()
        assert any((full[:, t:t + 224, l:l + 224] - c).abs().max() <= ORACLE_ATOL for t, l in hits)


def test_unsupported_mode_is_named(tmp_path):
    Image.fromarray(np.zeros((300, 300), dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: unsupported image mode 'F'; allowed: grey \(8/16-bit\) or colour"):
        CxrModality().load("f.tif", root=tmp_path)
