"""Modality ``lab``: the 50 blood tests of one admission from a Symile-MIMIC labs CSV."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator

from medtvt_core import hookimpl
from medtvt_core.contracts import ModalityReader, PluginConfig
from medtvt_core.data.schema import normalise_ref
from medtvt_core.errors import DataError

from .common import one_line as _one_line

log = logging.getLogger("medtvt.data")


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


class LabModality(ModalityReader):
    """Labs of one admission: 50 percentiles (missing -> training mean) + 50 measured flags.

    The CSV is read and validated once per file and kept in memory; the training means come
    from :meth:`fit` (or :meth:`set_stats` with what ``fit`` returned, as stored in the dataset
    manifest).
    """

    name: ClassVar[str] = "lab"
    placeholder: ClassVar[str] = "<lab>"
    record_field: ClassVar[str] = "lab"
    cli_help: ClassVar[str] = "Symile-format labs CSV (the row is --lab-id, or the CSV's only row)"
    cli_extras: ClassVar[dict[str, str]] = {"id": "row of --lab: its key column value (hadm_id by default)"}
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

    def for_input(self, value: str, extras: dict[str, str]) -> tuple["LabModality", Path, str]:
        """A reader of the user's CSV with this reader's training statistics (never refitted on one
        row), the CSV's directory, and the row (``extras["id"]``, or the only row)."""
        unknown = sorted(set(extras) - {"id"})
        if unknown:
            raise ValueError(f"unknown extra option(s) {unknown}; allowed: id")
        path = Path(value).expanduser().resolve()
        reader = type(self)(**{**self.config.model_dump(), "csv": str(path)})
        if self._stats is not None:
            reader.set_stats(self._stats)
        key = extras.get("id")
        if key is None:
            rows = list(reader.table(path.parent).rows)
            if len(rows) != 1:
                raise DataError(f"labs CSV {path}: {len(rows)} rows; pick one with --lab-id (its {self.config.key_column})")
            key = rows[0]
        return reader, path.parent, str(key)

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
        # A Symile-MIMIC percentile is a rank within the training split: a fraction in [0, 1]
        # (docs/method.md, "Labs"); 7.5 would be a percent or a raw value in the wrong column.
        out_of_range = (pct < 0) | (pct > 1)  # NaN (an empty cell, a missing lab) compares False
        if out_of_range.any():
            i, j = (int(v) for v in np.argwhere(out_of_range)[0])
            ids = ", ".join(f"{c} {df[c].iloc[i]}" for c in dict.fromkeys([cfg.key_column, "subject_id"]) if c in cols)
            raise DataError(f"labs CSV {path}: line {i + 2} (row {i}: {ids}), column {labs[j] + suf!r}: "
                            f"percentile {df[labs[j] + suf].iloc[i]} is outside [0, 1]; allowed: a number in [0, 1] "
                            "or an empty cell")
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


@hookimpl
def medtvt_register_modalities(register):
    register("lab", LabModality, config=LabConfig)
