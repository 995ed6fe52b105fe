"""Modality ``ecg``: an ECG from a WFDB record (``.hea`` + signal files), leads selected by name."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator

from medtvt_core import hookimpl
from medtvt_core.contracts import ModalityReader, PluginConfig
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
        "error", description="NaN samples: reject the record (default), interpolate linearly per lead, or zero (as the "
                             "reference: resampled first, so a lead holding a NaN becomes all zeros; counted, warned)")
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
# FLAC-compressed formats: their sample count is in the stream header, not in the file size.
_FLAC_FMTS = ("508", "516", "524")
_HEADER_ALLOWED = ("a header wfdb.rdheader reads: a record line (name, signal count, sampling rate, samples "
                   "per signal), then one line per signal; '#' comment lines and blank lines may appear anywhere")


class EcgModality(ModalityReader):
    """ECG from a single-segment WFDB record (``.hea`` + signal files), leads selected by name.

    Each lead is read at its own rate (frame rate x samples per frame), cut or padded to
    ``duration_s`` and Fourier-resampled to ``target_fs``: the output is float32
    ``[len(leads), target_fs * duration_s]`` in physical units.
    """

    name: ClassVar[str] = "ecg"
    placeholder: ClassVar[str] = "<ecg>"
    record_field: ClassVar[str] = "ECG"
    cli_help: ClassVar[str] = "WFDB record: its .hea header or path without extension (signal files beside it)"
    config_class: ClassVar[type[PluginConfig]] = EcgConfig

    def __init__(self, **options: Any):
        self.config = EcgConfig(**options)
        self.nan_filled_records = 0  # records whose NaNs a fill policy replaced (reported, never silent)
        self.nan_filled_samples = 0
        # (header path, size, mtime) -> the signal files it names: the feature cache asks for an input's
        # files at every access to key it, and parsing a header with wfdb costs ~15 ms (it was 90% of a
        # demo PT epoch); a changed header has a new stamp and is parsed again.
        self._files_named: dict[tuple[str, int, int], tuple[str, ...]] = {}

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
        """The header and the signal files it names (parsed by ``wfdb.rdheader``).

        Without a header: the header and ``<record>.dat`` (so a missing record is reported);
        with an unparseable one: the header only (``load`` says what is wrong with it).
        """
        rec = self.record_path(ref, root)
        hea = rec.with_name(rec.name + ".hea")
        if not hea.is_file():
            return [hea, rec.with_name(rec.name + ".dat")]
        st = hea.stat()
        stamp = (str(hea), st.st_size, st.st_mtime_ns)
        names = self._files_named.get(stamp)
        if names is None:
            try:
                header = self._read_header(rec, "")
            except DataError:
                return [hea]
            names = self._files_named[stamp] = tuple(dict.fromkeys(header.file_name))
        return [hea, *(rec.parent / f for f in names)]

    def load(self, ref: str, *, root: Path, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.config
        path = self.record_path(ref, root)
        where = f"ECG record {path}"
        hea = path.with_name(path.name + ".hea")
        if not hea.is_file():
            raise DataError(f"{where}: file {hea.name} does not exist")
        header = self._read_header(path, where)
        for fname in dict.fromkeys(header.file_name):
            if not (path.parent / fname).is_file():
                raise DataError(f"{where}: file {fname} does not exist")
        idx = self._lead_index(header.sig_name, where)  # before reading samples: fail fast on the wrong record kind
        self._check_file_sizes(header, path, where)
        spf = [int(s or 1) for s in (header.samps_per_frame or [1] * header.n_sig)]
        # Several samples per frame: only the expanded read keeps every sample (the default
        # smooth_frames=True averages each frame, which changes values and checksums). With one
        # sample per frame both reads hold the same samples; the smoothed one is used then because
        # wfdb 4.3's expanded digital read fails on format 61 (its dtype '>i2').
        expanded = any(s > 1 for s in spf)
        rec = self._read(path, header, expanded, where)
        digital = list(rec.e_d_signal) if expanded else [rec.d_signal[:, i] for i in range(rec.n_sig)]
        for i, d in enumerate(digital):
            want = rec.sig_len * spf[i]
            if len(d) != want:
                raise DataError(f"{where}: header says {want} samples of signal {rec.sig_name[i]!r}, "
                                f"{rec.file_name[i]} holds {len(d)}; allowed: a signal file holding what its header declares")
        if cfg.verify_checksum:
            self._verify_checksums(rec, expanded, where)
        phys = rec.dac(expanded=expanded, return_res=64)  # digital -> physical units; invalid samples become NaN
        xs = [np.asarray(phys[i] if expanded else phys[:, i], dtype=np.float64) for i in idx]
        frame_fs = float(rec.fs)
        xs = self._fix_length(xs, [frame_fs * spf[i] for i in idx], rec.sig_len, frame_fs, where)
        xs = self._fix_nans(xs, where)
        out = self._resample(xs)
        if cfg.nan_policy == "zero":
            # The reference's order (docs/method.md, "ECG preprocessing"): resample, then NaN -> 0; the
            # Fourier resampling has spread each NaN over its whole lead, so that lead becomes zeros.
            out[np.isnan(out)] = 0.0
        return torch.from_numpy(out)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _read_header(path: Path, where: str) -> Any:
        """The record's header as ``wfdb.rdheader`` parses it; DataError unless one usable segment."""
        import wfdb

        hea = path.with_name(path.name + ".hea")
        try:
            header = wfdb.rdheader(str(path))
        except Exception as exc:  # wfdb raises HeaderSyntaxError, IndexError, ValueError, ... for bad headers
            raise DataError(f"{where}: unparseable WFDB header {hea.name} ({type(exc).__name__}: {_one_line(exc)}); "
                            f"allowed: {_HEADER_ALLOWED}") from None
        if isinstance(header, wfdb.MultiRecord) or getattr(header, "seg_name", None):
            raise DataError(f"{where}: {hea.name} is a multi-segment header; allowed: a single-segment record")
        n_lines = len(header.file_name or [])
        if not header.n_sig or n_lines != header.n_sig:
            # wfdb accepts a record line declaring more signals than there are signal lines.
            raise DataError(f"{where}: {hea.name} declares {header.n_sig or 0} signal(s) but has {n_lines} signal line(s); "
                            f"allowed: {_HEADER_ALLOWED}, at least one signal")
        if not header.sig_len or not header.fs:
            raise DataError(f"{where}: {hea.name} declares {header.sig_len or 0} samples at {header.fs or 0} Hz; "
                            "allowed: a record with a sampling rate and samples (the samples-per-signal field is required)")
        return header

    def _read(self, path: Path, header: Any, expanded: bool, where: str) -> Any:
        """Digital samples of the whole record; on failure DataError naming the signal file that fails."""
        import wfdb

        try:
            return wfdb.rdrecord(str(path), physical=False, smooth_frames=not expanded)
        except Exception as exc:  # wfdb and its decoders (numpy, libsndfile) raise many types for broken files
            first = exc
        # Read each signal file alone to say which one is broken (only on this failure path).
        for fname in dict.fromkeys(header.file_name):
            chans = [i for i, f in enumerate(header.file_name) if f == fname]
            try:
                wfdb.rdrecord(str(path), physical=False, smooth_frames=not expanded, channels=chans)
            except Exception as exc:
                fmts = ", ".join(dict.fromkeys(header.fmt[i] for i in chans))
                raise DataError(f"{where}: unreadable signal file {fname} ({type(exc).__name__}: {_one_line(exc)}); "
                                f"allowed: a complete file in WFDB format {fmts} holding {header.sig_len} frames") from None
        raise DataError(f"{where}: unreadable WFDB record ({type(first).__name__}: {_one_line(first)})") from None

    def _verify_checksums(self, rec: Any, expanded: bool, where: str) -> None:
        """Header checksums vs the samples, modulo 2^16 (headers store them signed or unsigned).

        Skewed signals are not checked: the header's sum is over the stored order, but wfdb
        returns skewed samples shifted into place (the first ``skew`` dropped, invalid ones
        appended), so their sum cannot reproduce it.
        """
        if rec.checksum is None:
            return
        calc = rec.calc_checksum(expanded=expanded)
        skew = rec.skew or [None] * rec.n_sig
        skipped = [f"{rec.sig_name[i]} (skew {skew[i]})" for i in range(rec.n_sig) if skew[i]]
        bad = [rec.sig_name[i] for i, (want, got) in enumerate(zip(rec.checksum, calc))
               if not skew[i] and want is not None and (int(want) - int(got)) % 65536]
        if skipped:
            log.info("%s: checksum of skewed signal(s) %s not verified: wfdb returns skewed samples shifted, "
                     "so their sum cannot reproduce the header's", where, ", ".join(skipped))
        if bad:
            raise DataError(f"{where}: checksum mismatch in lead(s) {', '.join(bad)}: the signal file content does not "
                            "match its header (16-bit sums); allowed: an intact record, or verify_checksum=false")

    def _check_file_sizes(self, rec: Any, path: Path, where: str) -> None:
        """Signal files must hold exactly the samples the header declares (wfdb reads a longer file silently)."""
        per_file: dict[str, list[int]] = {}
        for i, fname in enumerate(rec.file_name):
            per_file.setdefault(fname, []).append(i)
        spf = [int(s or 1) for s in (rec.samps_per_frame or [1] * rec.n_sig)]
        for fname, idx in per_file.items():
            fmts = {rec.fmt[i] for i in idx}
            offs = {(rec.byte_offset or [None] * rec.n_sig)[i] or 0 for i in idx}
            if len(fmts) != 1 or len(offs) != 1:
                continue
            fmt, off = fmts.pop(), offs.pop()
            f = path.parent / fname
            frame = sum(spf[i] for i in idx)
            per = "samples per lead" if frame == len(idx) else "frames"
            if fmt in _FLAC_FMTS:
                held = self._flac_frames(f)  # sample count from the stream header; a cut stream fails in _read
                if held is not None and held != rec.sig_len * spf[idx[0]] + off:
                    raise DataError(f"{where}: header says {rec.sig_len} {per} but {fname} holds "
                                    f"{(held - off) / spf[idx[0]]:.0f} (FLAC stream of {held} samples per channel)")
                continue
            if fmt not in _FMT_BITS:
                continue
            expected = math.ceil(rec.sig_len * frame * _FMT_BITS[fmt] / 8) + off
            size = f.stat().st_size
            if not (expected <= size <= expected + 1):
                held = (size - off) * 8 / _FMT_BITS[fmt] / frame
                raise DataError(f"{where}: header says {rec.sig_len} {per} but {fname} holds "
                                f"{held:.0f} ({size} bytes, expected {expected})")

    @staticmethod
    def _flac_frames(f: Path) -> int | None:
        """Samples per channel a FLAC signal file declares, or None when soundfile cannot tell."""
        try:
            import soundfile

            return int(soundfile.info(str(f)).frames)
        except Exception:  # not FLAC, or unreadable: _read names the file
            return None

    def _lead_index(self, names: Sequence[str], where: str) -> list[int]:
        """Indices of the configured leads in the record's signals, in configured order."""
        index: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            index.setdefault(n.strip().lower(), []).append(i)
        missing = [lead for lead in self.config.leads if lead.lower() not in index]
        if missing:
            raise DataError(f"{where}: missing lead(s) {', '.join(missing)}; file has {', '.join(names)}; "
                            f"required: {', '.join(self.config.leads)}")
        twice = [lead for lead in self.config.leads if len(index[lead.lower()]) > 1]
        if twice:
            raise DataError(f"{where}: lead(s) {', '.join(twice)} appear more than once in the header; "
                            "allowed: unique names for the configured leads")
        return [index[lead.lower()][0] for lead in self.config.leads]

    def _fix_length(self, xs: list[np.ndarray], fs: list[float], n_frames: int, frame_fs: float,
                    where: str) -> list[np.ndarray]:
        """Crop or pad every lead to ``duration_s`` at its own rate; the decision is per record (in frames).

        A record within half a frame of ``duration_s`` is kept whole (a non-integer rate such as
        62.4725 Hz never gives exactly ``duration_s``); resampling then stretches it by under one frame.
        """
        cfg = self.config
        want_frames = int(round(cfg.duration_s * frame_fs))
        if n_frames == want_frames:
            return xs
        have = f"{n_frames / frame_fs:g} s ({n_frames} samples at {frame_fs:g} Hz)"
        wants = [int(round(cfg.duration_s * f)) for f in fs]
        if n_frames > want_frames:
            if cfg.crop == "error":
                raise DataError(f"{where}: {have} is longer than {cfg.duration_s:g} s; set crop to 'start' or 'center' to accept it")
            starts = [0 if cfg.crop == "start" else (len(x) - w) // 2 for x, w in zip(xs, wants)]
            return [x[s:s + w] for x, s, w in zip(xs, starts, wants)]
        if cfg.pad == "error":
            raise DataError(f"{where}: {have} is shorter than {cfg.duration_s:g} s; set pad to 'edge' or 'zero' to accept it")
        mode = "edge" if cfg.pad == "edge" else "constant"
        log.warning("%s: padded %s to %g s with %s values", where, have, cfg.duration_s, cfg.pad)
        return [np.pad(x, (0, w - len(x)), mode=mode) for x, w in zip(xs, wants)]

    def _fix_nans(self, xs: list[np.ndarray], where: str) -> list[np.ndarray]:
        bad = [np.isnan(x) for x in xs]
        count = int(sum(b.sum() for b in bad))
        if not count:
            return xs
        cfg = self.config
        leads = [cfg.leads[i] for i, b in enumerate(bad) if b.any()]
        desc = f"{count} NaN sample(s) in lead(s) {', '.join(leads)}"
        if cfg.nan_policy == "error":
            raise DataError(f"{where}: {desc}; set nan_policy to 'interpolate' or 'zero' to accept such records")
        if count > cfg.max_nan_fraction * sum(x.size for x in xs):
            raise DataError(f"{where}: {desc} exceed max_nan_fraction={cfg.max_nan_fraction:g} of the samples")
        out = []
        for i, (x, b) in enumerate(zip(xs, bad)):
            if b.any() and cfg.nan_policy != "zero":  # zero: filled after resampling (load)
                x = x.copy()
                if not (~b).any():
                    raise DataError(f"{where}: lead {cfg.leads[i]} is entirely NaN; nothing to interpolate from")
                else:
                    t = np.arange(x.size)
                    x[b] = np.interp(t[b], t[~b], x[~b])
            out.append(x)
        self.nan_filled_records += 1
        self.nan_filled_samples += count
        how = "zeroed: each such lead entirely, after resampling, as the reference" if cfg.nan_policy == "zero" \
            else "interpolated"
        log.warning("%s: %s %s (nan_policy=%s; records fixed so far: %d)", where, desc, how, cfg.nan_policy,
                    self.nan_filled_records)
        return out

    def _resample(self, xs: list[np.ndarray]) -> np.ndarray:
        """Fourier resampling of each lead to ``n_samples`` (``scipy.signal.resample``, as the reference).

        A lead holding a NaN (``nan_policy: zero``) goes through the resampler even at the target
        length, as in the reference, which always resamples: its output is then NaN throughout."""
        from scipy.signal import resample

        n_out = self.n_samples
        if len({x.size for x in xs}) == 1:  # one rate (the usual 12-lead case): one call over all leads
            x = np.stack(xs)
            out = x if x.shape[1] == n_out and not np.isnan(x).any() else resample(x, n_out, axis=1)
        else:  # several rates: each lead from its own length
            out = np.stack([x if x.size == n_out and not np.isnan(x).any() else resample(x, n_out) for x in xs])
        return np.ascontiguousarray(out, dtype=np.float32)


@hookimpl
def medtvt_register_modalities(register):
    register("ecg", EcgModality, config=EcgConfig)
