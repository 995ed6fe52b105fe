"""Modality ``cxr``: a chest radiograph (JPEG/PNG, grey or colour) resized, cropped and normalised."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from medtvt_core import hookimpl
from medtvt_core.contracts import Modality, PluginConfig
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


class CxrModality(Modality):
    """Chest radiograph (JPEG/PNG, grey or RGB): resize, crop, ImageNet-normalise to ``[3, crop, crop]``.

    Pillow decodes the whole file (``Image.load()``); a truncated file is an error unless the
    process has set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` (this module never does).
    """

    name: ClassVar[str] = "cxr"
    placeholder: ClassVar[str] = "<cxr>"
    record_field: ClassVar[str] = "image"
    config_class: ClassVar[type[PluginConfig]] = CxrConfig

    def __init__(self, **options: Any):
        self.config = CxrConfig(**options)
        self._mean = np.asarray(self.config.mean, dtype=np.float32)[:, None, None]
        self._std = np.asarray(self.config.std, dtype=np.float32)[:, None, None]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.config.crop, self.config.crop)

    def files_of(self, ref: str, *, root: Path) -> list[Path]:
        return [_resolve(root, self.config.data_dir, ref)]

    def is_random(self, train: bool) -> bool:
        return bool(train) and self.config.train_crop == "random"

    def load(self, ref: str, *, root: Path, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        from PIL import Image

        cfg = self.config
        path = _resolve(root, cfg.data_dir, ref)
        where = f"image {path}"
        if not path.is_file():
            raise DataError(f"{where} does not exist")
        try:
            with Image.open(path) as im:
                im.load()  # decode everything now: a truncated file fails here, not later
                im, scale = self._working_mode(im, where)
                w, h = im.size
                s = cfg.resize / min(w, h)
                nw, nh = max(cfg.resize, round(w * s)), max(cfg.resize, round(h * s))
                im = im.resize((nw, nh), Image.Resampling.BILINEAR)
                c = cfg.crop
                if self.is_random(train):
                    g = generator if generator is not None else torch.Generator().manual_seed(0)
                    top = int(torch.randint(0, nh - c + 1, (1,), generator=g))
                    left = int(torch.randint(0, nw - c + 1, (1,), generator=g))
                else:
                    top, left = (nh - c) // 2, (nw - c) // 2
                arr = np.asarray(im.crop((left, top, left + c, top + c)), dtype=np.float32) / scale
        except DataError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{where}: unreadable image ({type(exc).__name__}: {_one_line(exc)}); allowed: a complete JPEG or PNG") from None
        arr = np.repeat(arr[None], 3, axis=0) if arr.ndim == 2 else arr.transpose(2, 0, 1)
        out = (arr - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    @staticmethod
    def _working_mode(im: Any, where: str) -> tuple[Any, float]:
        """Image in a mode to resize in, and the value of white. Grey stays one channel (cheaper)."""
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey (PNG): keep the depth
            return (im if im.mode == "I" else im.convert("I")).convert("F"), 65535.0
        if im.mode == "L":
            return im, 255.0
        if im.mode in ("1", "LA"):
            return im.convert("L"), 255.0
        if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "PA", "LAB", "HSV"):
            return im.convert("RGB"), 255.0
        raise DataError(f"{where}: unsupported image mode {im.mode!r}; allowed: grey (8/16-bit) or colour")


@hookimpl
def medtvt_register_modalities(register):
    register("cxr", CxrModality, config=CxrConfig)
