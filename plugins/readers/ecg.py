"""Modality ``ecg``: a 12-lead ECG from a WFDB record (``.hea`` + signal files), leads selected by name."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator

from medtvt_core import hookimpl
from medtvt_core.contracts import Modality, PluginConfig
from medtvt_core.data.formats import MIMIC_IV_ECG_LEADS
from medtvt_core.errors import DataError

from .common import one_line as _one_line
from .common import resolve as _resolve

log = logging.getLogger("medtvt.data")


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


@hookimpl
def medtvt_register_modalities(register):
    register("ecg", EcgModality, config=EcgConfig)
