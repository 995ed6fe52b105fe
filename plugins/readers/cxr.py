"""Modality ``cxr``: a chest radiograph (JPEG/PNG, grey or colour) resized, cropped and normalised."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from medtvt_core import hookimpl
from medtvt_core.contracts import ModalityReader, PluginConfig
from medtvt_core.data.formats import IMAGENET_MEAN, IMAGENET_STD
from medtvt_core.errors import DataError

from .common import one_line as _one_line
from .common import resolve as _resolve


class CxrConfig(PluginConfig):
    resize: int = Field(400, ge=1, description="the shorter image side is resized to this many pixels")
    crop: int = Field(224, ge=1, description="side of the square crop fed to the encoder")
    train_crop: Literal["random", "center"] = Field(
        "random", description="crop in training: random (as the paper; bypasses the feature cache) or center (cacheable)")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="per-channel normalisation mean (ImageNet)")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="per-channel normalisation std (ImageNet)")
    data_dir: str = Field("", description="directory of the images, relative to the dataset root or absolute")

    @model_validator(mode="after")
    def _crop_fits(self) -> "CxrConfig":
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class CxrModality(ModalityReader):
    """Chest radiograph (JPEG/PNG, grey or colour) -> float32 ``[3, crop, crop]`` with torchvision.transforms.v2.

    Pipeline, as the reference's: resize the shorter side to ``resize`` (PIL bilinear with
    antialias, what torchvision does for PIL images), crop ``crop`` (random in training when
    ``train_crop == "random"``, else centre), scale to [0, 1], RGB, ImageNet mean/std.
    Pillow decodes the whole file (``Image.load()``); a truncated file is an error unless the
    process has set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` (this module never does).
    """

    name: ClassVar[str] = "cxr"
    placeholder: ClassVar[str] = "<cxr>"
    record_field: ClassVar[str] = "image"
    cli_help: ClassVar[str] = "chest radiograph, JPEG or PNG"
    config_class: ClassVar[type[PluginConfig]] = CxrConfig

    def __init__(self, **options: Any):
        from torchvision.transforms import v2

        self.config = cfg = CxrConfig(**options)
        resize = v2.Resize(cfg.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        # Grey becomes RGB after the crop, not before: PIL resizes each band with the same kernel,
        # so the result equals converting first (checked against the reference in the tests) at a
        # third of the resizing cost on large radiographs.
        tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.RGB(),
                v2.Normalize(list(cfg.mean), list(cfg.std))]
        self._eval = v2.Compose([resize, v2.CenterCrop(cfg.crop), *tail])
        self._train = v2.Compose([resize, v2.RandomCrop(cfg.crop), *tail])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.config.crop, self.config.crop)

    def files_of(self, ref: str, *, root: Path) -> list[Path]:
        return [_resolve(root, self.config.data_dir, ref)]

    def is_random(self, train: bool) -> bool:
        return bool(train) and self.config.train_crop == "random"

    def load(self, ref: str, *, root: Path, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """The preprocessed image; a random crop is drawn from ``generator`` (seed 0 when None)."""
        from PIL import Image

        path = _resolve(root, self.config.data_dir, ref)
        where = f"image {path}"
        if not path.is_file():
            raise DataError(f"{where} does not exist")
        try:
            with Image.open(path) as im:
                im.load()  # decode everything now: a truncated file fails here, not later
                im = self._working_mode(im, where)
                if not self.is_random(train):
                    out = self._eval(im)
                else:
                    # v2.RandomCrop draws from torch's global RNG: seed a forked copy from the
                    # caller's generator so the crop is reproducible and the global state untouched.
                    g = generator if generator is not None else torch.Generator().manual_seed(0)
                    seed = int(torch.randint(0, 2**62, (1,), generator=g))
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        out = self._train(im)
        except DataError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{where}: unreadable image ({type(exc).__name__}: {_one_line(exc)}); allowed: a complete JPEG or PNG") from None
        return out.as_subclass(torch.Tensor).contiguous()

    @staticmethod
    def _working_mode(im: Any, where: str) -> Any:
        """The image as 8-bit grey ("L"), RGB, or float grey in [0, 1] ("F", from 16-bit grey)."""
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grey (PNG): convert("RGB") would clip at 255, so keep the depth as float in
            # [0, 1] (white = 65535); ToDtype leaves float images unscaled.
            f = (im if im.mode == "I" else im.convert("I")).convert("F")
            return f.point(lambda v: v / 65535.0)
        if im.mode == "L":
            return im
        if im.mode in ("1", "LA"):
            return im.convert("L")
        if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "PA", "LAB", "HSV"):
            return im.convert("RGB")
        raise DataError(f"{where}: unsupported image mode {im.mode!r}; allowed: grey (8/16-bit) or colour")


@hookimpl
def medtvt_register_modalities(register):
    register("cxr", CxrModality, config=CxrConfig)
