"""Built-in modality readers: ``ecg`` (WFDB), ``cxr`` (JPEG/PNG), ``lab`` (Symile-MIMIC CSV).

Each reads one reference of a QA record (relative to the dataset root) into a float32 tensor
and raises :class:`~medtvt_core.errors.DataError` with a one-line reason when the input is bad.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from medtvt_core import hookimpl
from medtvt_core.contracts import Modality, PluginConfig
from medtvt_core.data.formats import IMAGENET_MEAN, IMAGENET_STD, MIMIC_IV_ECG_LEADS
from medtvt_core.data.schema import normalise_ref
from medtvt_core.errors import DataError

log = logging.getLogger("medtvt.data")


def _resolve(root: Path, data_dir: str, ref: str) -> Path:
    base = Path(root) / data_dir if data_dir else Path(root)
    return base / ref  # an absolute ``ref`` or ``data_dir`` wins, as pathlib does


# =========================================================================== ECG
class EcgConfig(PluginConfig):
    leads: tuple[str, ...] = Field(MIMIC_IV_ECG_LEADS, min_length=1,
                                   description="lead names in output order, matched case-insensitively to the file's leads")
    target_fs: float = Field(100.0, gt=0, description="output sampling rate in Hz (Fourier resampling from the file's rate)")
    duration_s: float = Field(10.0, gt=0, description="output duration in seconds (samples = target_fs * duration_s)")
    crop: Literal["start", "center", "error"] = Field(
        "start", description="a longer record: keep the first or the central duration_s seconds, or reject it")
    pad: Literal["error", "edge", "zero"] = Field(
        "error", description="a shorter record: reject it (default), repeat the edge values, or pad with zeros")
    nan_policy: Literal["error", "interpolate", "zero"] = Field(
        "error", description="NaN samples: reject the record (default), interpolate linearly per lead, or set to 0 (counted, warned)")
    max_nan_fraction: float = Field(0.1, ge=0, le=1,
                                    description="with a fill policy, reject records with more NaN samples than this fraction")
    verify_checksum: bool = Field(True, description="compare the header's per-lead checksums with the signal (detects corrupt .dat bytes)")
    data_dir: str = Field("", description="directory of the WFDB records, relative to the dataset root or absolute")

    @field_validator("leads")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        low = [x.lower() for x in v]
        if len(set(low)) != len(low):
            raise ValueError(f"duplicate lead names in {list(v)} (compared case-insensitively)")
        return v


# Bits per sample of WFDB storage formats, to check a signal file against its header.
_FMT_BITS = {"8": 8, "16": 16, "24": 24, "32": 32, "61": 16, "80": 8, "160": 16, "212": 12, "310": 32 / 3, "311": 32 / 3}


class EcgModality(Modality):
    """12-lead ECG from a WFDB record (``.hea`` + ``.dat``), leads selected by name."""

    name: ClassVar[str] = "ecg"
    placeholder: ClassVar[str] = "<ecg>"
    record_field: ClassVar[str] = "ECG"
    config_class: ClassVar[type[PluginConfig]] = EcgConfig

    def __init__(self, **options: Any):
        self.config = EcgConfig(**options)
        self.nan_filled_records = 0  # records whose NaNs a fill policy replaced (reported, never silent)
        self.nan_filled_samples = 0

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (len(self.config.leads), self.n_samples)

    @property
    def n_samples(self) -> int:
        return int(round(self.config.target_fs * self.config.duration_s))

    def record_path(self, ref: str, root: Path) -> Path:
        """WFDB record path without extension (``.hea``/``.dat`` in ``ref`` are accepted)."""
        p = _resolve(root, self.config.data_dir, ref)
        return p.with_suffix("") if p.suffix in (".hea", ".dat") else p

    def files_of(self, ref: str, *, root: Path) -> list[Path]:
        rec = self.record_path(ref, root)
        hea = rec.with_name(rec.name + ".hea")
        files = [hea]
        if hea.is_file():
            # Signal files named in the header (MIMIC-IV-ECG: one <record>.dat).
            for line in hea.read_text(errors="replace").splitlines()[1:]:
                tok = line.split()
                if tok and not line.startswith("#"):
                    f = rec.parent / tok[0]
                    if f not in files:
                        files.append(f)
        else:
            files.append(rec.with_name(rec.name + ".dat"))
        return files

    def load(self, ref: str, *, root: Path, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        import wfdb

        cfg = self.config
        path = self.record_path(ref, root)
        where = f"ECG record {path}"
        for f in self.files_of(ref, root=root):
            if not f.is_file():
                raise DataError(f"{where}: file {f.name} does not exist")
        try:
            rec = wfdb.rdrecord(str(path), physical=False)
        except Exception as exc:  # wfdb raises many types for broken files
            try:
                header = wfdb.rdheader(str(path))
            except Exception:
                header = None
            if header is not None:
                self._check_file_sizes(header, path, where)  # names the usual cause: a short signal file
            raise DataError(f"{where}: unreadable WFDB record ({type(exc).__name__}: {_one_line(exc)})") from None
        d = rec.d_signal
        if d is None or d.ndim != 2 or d.shape[0] != rec.sig_len:
            got = None if d is None else d.shape[0]
            raise DataError(f"{where}: header says {rec.sig_len} samples per lead, signal holds {got}")
        self._check_file_sizes(rec, path, where)
        if cfg.verify_checksum and rec.checksum is not None:
            calc = rec.calc_checksum()
            bad = [rec.sig_name[i] for i, (a, b) in enumerate(zip(rec.checksum, calc)) if a != b]
            if bad:
                raise DataError(f"{where}: checksum mismatch in lead(s) {', '.join(bad)}: the .dat content does not match its header")
        phys = rec.dac(return_res=64)  # digital -> physical units; invalid samples become NaN
        x = self._select_leads(phys, rec.sig_name, where)  # [L, n]
        fs = float(rec.fs)
        x = self._fix_length(x, fs, where)
        x = self._fix_nans(x, where)
        n_out = self.n_samples
        if x.shape[1] != n_out:
            from scipy.signal import resample

            x = resample(x, n_out, axis=1)  # Fourier resampling, as the reference
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    # ------------------------------------------------------------------ helpers
    def _check_file_sizes(self, rec: Any, path: Path, where: str) -> None:
        """Signal files must hold exactly the samples the header declares (wfdb reads a longer file silently)."""
        per_file: dict[str, list[int]] = {}
        for i, fname in enumerate(rec.file_name):
            per_file.setdefault(fname, []).append(i)
        for fname, idx in per_file.items():
            fmts = {rec.fmt[i] for i in idx}
            offs = {(rec.byte_offset or [None] * rec.n_sig)[i] or 0 for i in idx}
            spf = rec.samps_per_frame or [1] * rec.n_sig
            if len(fmts) != 1 or len(offs) != 1 or (fmt := fmts.pop()) not in _FMT_BITS:
                continue
            f = path.parent / fname
            frame = sum(spf[i] for i in idx)
            expected = math.ceil(rec.sig_len * frame * _FMT_BITS[fmt] / 8) + offs.pop()
            size = f.stat().st_size
            if not (expected <= size <= expected + 1):
                held = size * 8 / _FMT_BITS[fmt] / frame
                raise DataError(f"{where}: header says {rec.sig_len} samples per lead but {fname} holds "
                                f"{held:.0f} ({size} bytes, expected {expected})")

    def _select_leads(self, phys: np.ndarray, names: Sequence[str], where: str) -> np.ndarray:
        index: dict[str, int] = {}
        for i, n in enumerate(names):
            key = n.strip().lower()
            if key in index:
                raise DataError(f"{where}: lead {n!r} appears twice in the header; lead names must be unique")
            index[key] = i
        missing = [lead for lead in self.config.leads if lead.lower() not in index]
        if missing:
            raise DataError(f"{where}: missing lead(s) {', '.join(missing)}; file has {', '.join(names)}; "
                            f"required: {', '.join(self.config.leads)}")
        return phys[:, [index[lead.lower()] for lead in self.config.leads]].T.astype(np.float64)

    def _fix_length(self, x: np.ndarray, fs: float, where: str) -> np.ndarray:
        cfg = self.config
        want = int(round(cfg.duration_s * fs))
        n = x.shape[1]
        if n == want:
            return x
        have = f"{n / fs:g} s ({n} samples at {fs:g} Hz)"
        if n > want:
            if cfg.crop == "error":
                raise DataError(f"{where}: {have} is longer than {cfg.duration_s:g} s; set crop to 'start' or 'center' to accept it")
            start = 0 if cfg.crop == "start" else (n - want) // 2
            return x[:, start:start + want]
        if cfg.pad == "error":
            raise DataError(f"{where}: {have} is shorter than {cfg.duration_s:g} s; set pad to 'edge' or 'zero' to accept it")
        mode = "edge" if cfg.pad == "edge" else "constant"
        log.warning("%s: padded %s to %g s with %s values", where, have, cfg.duration_s, cfg.pad)
        return np.pad(x, ((0, 0), (0, want - n)), mode=mode)

    def _fix_nans(self, x: np.ndarray, where: str) -> np.ndarray:
        bad = np.isnan(x)
        count = int(bad.sum())
        if not count:
            return x
        cfg = self.config
        leads = [cfg.leads[i] for i in np.flatnonzero(bad.any(axis=1))]
        desc = f"{count} NaN sample(s) in lead(s) {', '.join(leads)}"
        if cfg.nan_policy == "error":
            raise DataError(f"{where}: {desc}; set nan_policy to 'interpolate' or 'zero' to accept such records")
        if count > cfg.max_nan_fraction * x.size:
            raise DataError(f"{where}: {desc} exceed max_nan_fraction={cfg.max_nan_fraction:g} of the samples")
        x = x.copy()
        if cfg.nan_policy == "zero":
            x[bad] = 0.0
        else:
            t = np.arange(x.shape[1])
            for i in np.flatnonzero(bad.any(axis=1)):
                ok = ~bad[i]
                if not ok.any():
                    raise DataError(f"{where}: lead {cfg.leads[i]} is entirely NaN; nothing to interpolate from")
                x[i, ~ok] = np.interp(t[~ok], t[ok], x[i, ok])
        self.nan_filled_records += 1
        self.nan_filled_samples += count
        log.warning("%s: %s replaced by nan_policy=%s (records fixed so far: %d)", where, desc, cfg.nan_policy,
                    self.nan_filled_records)
        return x


# =========================================================================== CXR
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


# =========================================================================== LAB
class LabConfig(PluginConfig):
    csv: str = Field("labs.csv", description="Symile-MIMIC labs CSV, relative to the dataset root or absolute")
    key_column: str = Field("hadm_id", description="column holding the id a QA record's 'lab' field refers to")
    n_labs: int = Field(50, ge=1, description="number of labs expected in the CSV (each '<itemid>' + '<itemid>_percentile')")
    labs: tuple[str, ...] | None = Field(None, description="item ids to use; None: every '<itemid>_percentile' column of the CSV")
    percentile_suffix: str = Field("_percentile", description="suffix of the percentile columns")

    @model_validator(mode="after")
    def _count(self) -> "LabConfig":
        if self.labs is not None and len(self.labs) != self.n_labs:
            raise ValueError(f"labs lists {len(self.labs)} item ids but n_labs is {self.n_labs}")
        return self


class _LabTable:
    """The CSV indexed by key: percentiles [rows, n_labs] (NaN = not measured), raw values, row map."""

    def __init__(self, path: Path, labs: list[str], pct: np.ndarray, raw: np.ndarray, rows: dict[str, int]):
        self.path, self.labs, self.pct, self.raw, self.rows = path, labs, pct, raw, rows


class LabModality(Modality):
    """Labs of one admission: 50 percentiles (missing -> training mean) + 50 measured flags.

    The CSV is read and validated once per file and kept in memory; the training means come
    from :meth:`fit` (or :meth:`set_stats` with what ``fit`` returned, as stored in the dataset
    manifest).
    """

    name: ClassVar[str] = "lab"
    placeholder: ClassVar[str] = "<lab>"
    record_field: ClassVar[str] = "lab"
    config_class: ClassVar[type[PluginConfig]] = LabConfig

    def __init__(self, **options: Any):
        self.config = LabConfig(**options)
        self._tables: dict[Path, _LabTable] = {}
        self._lock = threading.Lock()
        self._stats: dict[str, Any] | None = None
        self._fill: np.ndarray | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (2 * self.config.n_labs,)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers may pickle the modality: the lock cannot travel, the parsed tables do.
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def csv_path(self, root: Path) -> Path:
        return (Path(root) / self.config.csv).resolve()

    def files_of(self, ref: str, *, root: Path) -> list[Path]:
        return [self.csv_path(root)]

    # ------------------------------------------------------------------ table
    def table(self, root: Path) -> _LabTable:
        """The parsed, validated CSV (read once per path)."""
        path = self.csv_path(root)
        with self._lock:
            t = self._tables.get(path)
            if t is None:
                t = self._tables[path] = self._read(path)
            return t

    def _read(self, path: Path) -> _LabTable:
        import pandas as pd

        cfg = self.config
        if not path.is_file():
            raise DataError(f"labs CSV {path} does not exist")
        try:
            df = pd.read_csv(path, dtype=str)
        except Exception as exc:
            raise DataError(f"labs CSV {path}: unreadable ({type(exc).__name__}: {_one_line(exc)})") from None
        cols = [str(c) for c in df.columns]
        if cfg.key_column not in cols:
            raise DataError(f"labs CSV {path}: column {cfg.key_column!r} is missing; columns start {cols[:6]}")
        suf = cfg.percentile_suffix
        if cfg.labs is not None:
            labs = sorted(cfg.labs)
        else:
            labs = sorted(c[: -len(suf)] for c in cols if c.endswith(suf))
        for lab in labs:
            for col in (lab + suf, lab):
                if col not in cols:
                    raise DataError(f"labs CSV {path}: column {col!r} is missing; every lab needs '<itemid>' and '<itemid>{suf}'")
        orphans = [c for c in cols if re.fullmatch(r"\d+", c) and c not in labs]
        if cfg.labs is None and orphans:
            raise DataError(f"labs CSV {path}: column {orphans[0] + suf!r} is missing (lab {orphans[0]!r} has raw values only)")
        if len(labs) != cfg.n_labs:
            raise DataError(f"labs CSV {path}: found {len(labs)} labs with percentile columns, expected n_labs={cfg.n_labs}")

        def numeric(col: str) -> np.ndarray:
            s = df[col]
            v = pd.to_numeric(s, errors="coerce")
            wrong = v.isna() & s.notna()
            if wrong.any():
                i = int(np.flatnonzero(wrong.to_numpy())[0])
                raise DataError(f"labs CSV {path}: line {i + 2} (row {i}), column {col!r}: {s.iloc[i]!r} is not a number; "
                                "allowed: a number or an empty cell")
            out = v.to_numpy(dtype=np.float64)
            if np.isinf(out).any():
                i = int(np.flatnonzero(np.isinf(out))[0])
                raise DataError(f"labs CSV {path}: line {i + 2} (row {i}), column {col!r}: infinite value")
            return out

        # A lab counts as measured when its percentile is present (the vector uses percentiles).
        pct = np.stack([numeric(lab + suf) for lab in labs], axis=1) if labs else np.zeros((len(df), 0))
        raw = np.stack([numeric(lab) for lab in labs], axis=1) if labs else np.zeros((len(df), 0))
        rows: dict[str, int] = {}
        for i, k in enumerate(df[cfg.key_column].tolist()):
            if k is None or (isinstance(k, float) and math.isnan(k)) or not str(k).strip():
                raise DataError(f"labs CSV {path}: line {i + 2} (row {i}), column {cfg.key_column!r}: empty key")
            key = normalise_ref(k)
            if key in rows:
                raise DataError(f"labs CSV {path}: line {i + 2} (row {i}), column {cfg.key_column!r}: "
                                f"{key!r} repeats line {rows[key] + 2}; keys must be unique")
            rows[key] = i
        return _LabTable(path, labs, pct, raw, rows)

    def _row(self, ref: str, root: Path) -> tuple[_LabTable, int]:
        t = self.table(root)
        key = normalise_ref(ref)
        i = t.rows.get(key)
        if i is None:
            raise DataError(f"labs CSV {t.path}: no row with {self.config.key_column} = {key!r}")
        return t, i

    # ------------------------------------------------------------------ stats
    def fit(self, refs: Sequence[str], root: Path) -> dict[str, Any]:
        """Mean percentile of each lab over the (unique) training rows ``refs``; sets and returns the stats."""
        t = self.table(root)
        idx = sorted({self._row(r, root)[1] for r in refs})
        if not idx:
            raise DataError(f"labs CSV {t.path}: no training rows to compute mean percentiles from")
        sub = t.pct[idx]
        means: dict[str, float] = {}
        for j, lab in enumerate(t.labs):
            col = sub[:, j]
            col = col[~np.isnan(col)]
            if col.size == 0:
                # No training value at all: the median percentile is the neutral fill; say so.
                log.warning("labs CSV %s: lab %s is never measured in the %d training rows; its fill value is 0.5",
                            t.path, lab, len(idx))
                means[lab] = 0.5
            else:
                means[lab] = float(col.mean())
        stats = {"labs": list(t.labs), "mean_percentile": means, "n_train_rows": len(idx)}
        self.set_stats(stats)
        return stats

    def set_stats(self, stats: dict[str, Any]) -> None:
        try:
            labs = list(stats["labs"])
            means = stats["mean_percentile"]
            self._fill = np.asarray([float(means[lab]) for lab in labs], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"lab statistics are malformed ({type(exc).__name__}: {exc}); expected the dict fit() returns") from None
        if len(labs) != self.config.n_labs:
            raise DataError(f"lab statistics cover {len(labs)} labs, expected n_labs={self.config.n_labs}")
        self._stats = {"labs": labs, "mean_percentile": {lab: float(means[lab]) for lab in labs},
                       "n_train_rows": stats.get("n_train_rows")}

    @property
    def stats(self) -> dict[str, Any] | None:
        return self._stats

    def preprocess_fingerprint(self) -> str:
        # The training means change the output vector, so they are part of the preprocessing.
        stats = json.dumps(self._stats, sort_keys=True) if self._stats else "no-stats"
        return hashlib.sha256(f"{super().preprocess_fingerprint()}:{stats}".encode()).hexdigest()[:16]

    def content_key(self, ref: str, *, root: Path) -> str:
        t, i = self._row(ref, root)
        h = hashlib.sha256(json.dumps(t.labs).encode())
        h.update(np.ascontiguousarray(t.pct[i]).tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ load
    def load(self, ref: str, *, root: Path, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        t, i = self._row(ref, root)
        if self._stats is None or self._fill is None:
            raise DataError("lab modality has no training statistics: call fit() on the training split or set_stats() "
                            "with the stats stored in the dataset manifest")
        if self._stats["labs"] != t.labs:
            raise DataError(f"labs CSV {t.path}: its labs differ from those the training statistics were computed on")
        p = t.pct[i]
        measured = ~np.isnan(p)
        vec = np.concatenate([np.where(measured, p, self._fill), measured.astype(np.float64)])
        return torch.from_numpy(vec.astype(np.float32))

    def raw_values(self, ref: str, *, root: Path) -> dict[str, float]:
        """Measured raw values of a row, item id -> value (for reports and checks)."""
        t, i = self._row(ref, root)
        return {lab: float(v) for lab, v in zip(t.labs, t.raw[i]) if not math.isnan(v)}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@hookimpl
def medtvt_register_modalities(register):
    register("ecg", EcgModality, config=EcgConfig)
    register("cxr", CxrModality, config=CxrConfig)
    register("lab", LabModality, config=LabConfig)
