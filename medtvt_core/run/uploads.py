"""Uploaded files -> the ``inputs`` of :func:`~medtvt_core.run.diagnose.diagnose` (``medtvt app``).

Nothing here knows a modality by name: a modality's files are staged into a directory of their
own under their own names (a ``.zip`` is unpacked), and the file to give the reader is the one
whose :meth:`~medtvt_core.contracts.ModalityReader.files_of` covers every file uploaded (a WFDB header
names its signal files). A reader with a key column (a table such as the labs CSV) gets its row
shown as an editable table. Example patients come from a run's test split. No gradio import:
the HTTP API and the page share this module.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from ..data.schema import normalise_ref
from ..errors import DataError

__all__ = ["MAX_UNZIPPED_BYTES", "stage_files", "choose_input", "public_message", "table_of_row",
           "write_table_row", "example_patients", "signal_figure", "image_figure", "attribution_figure",
           "gates_figure"]

#: Refuse archives that unpack to more than this (a zip bomb would fill the disk).
MAX_UNZIPPED_BYTES = 1 << 30


def _safe_name(name: str) -> str:
    """The base name of an uploaded file (browsers and zips may send a path); never '.', '..' or empty."""
    base = PurePosixPath(str(name).replace("\\", "/")).name
    if base in ("", ".", ".."):
        raise DataError(f"uploaded file {name!r}: no usable file name")
    return base


def stage_files(modality: str, uploads: Sequence[tuple[str, Path]], dest: Path) -> list[Path]:
    """Copy ``(name, path)`` uploads of one modality into the new directory ``dest`` under their base
    names; a ``.zip`` is unpacked there (its files, without folders). Two files of one name are an error."""
    dest.mkdir(parents=True, exist_ok=False)
    out: list[Path] = []

    def target(name: str, where: str) -> Path:
        t = dest / _safe_name(name)
        if t.exists():
            raise DataError(f"{modality}: two uploaded files are named {t.name} ({where}); allowed: distinct names")
        out.append(t)
        return t

    for name, src in uploads:
        if not _safe_name(name).lower().endswith(".zip"):
            shutil.copyfile(src, target(name, name))
            continue
        try:
            zf = zipfile.ZipFile(src)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{_safe_name(name)}: not a readable zip archive ({exc}); allowed: a .zip of the "
                            f"{modality} files") from None
        with zf:
            # __MACOSX/ holds Finder's resource forks, not the user's files
            members = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
            if sum(i.file_size for i in members) > MAX_UNZIPPED_BYTES:
                raise DataError(f"{_safe_name(name)}: unpacks to more than {MAX_UNZIPPED_BYTES >> 20} MiB")
            if not members:
                raise DataError(f"{_safe_name(name)}: the zip archive holds no file")
            for i in members:
                try:
                    with zf.open(i) as fi, open(target(i.filename, f"in {_safe_name(name)}"), "wb") as fo:
                        shutil.copyfileobj(fi, fo)
                except (zipfile.BadZipFile, OSError, EOFError) as exc:
                    raise DataError(f"{_safe_name(name)}: member {i.filename} is unreadable ({exc})") from None
    return out


def choose_input(reader: Any, files: Sequence[Path], extras: Mapping[str, str]) -> str:
    """The one staged file to give ``reader`` (the others must be files it reads with it).

    With several files the candidate whose ``files_of`` covers the most of them wins; when it
    does not cover all, the reader's own error is raised if it cannot read the candidate, else
    an error names the files it would leave unread (nothing is dropped silently).
    """
    files = sorted(files)
    if len(files) == 1:
        return str(files[0])
    staged = {f.resolve() for f in files}
    best, covered = files[0], -1
    for f in files:
        try:
            r, root, ref = reader.for_input(str(f), dict(extras))
            reads = {Path(p).resolve() for p in r.files_of(ref, root=root)}
        except (DataError, ValueError):
            continue
        if len(staged & reads) > covered:
            best, covered, unread = f, len(staged & reads), staged - reads
    if covered == len(staged):
        return str(best)
    if covered >= 0:
        r, root, ref = reader.for_input(str(best), dict(extras))
        r.load(ref, root=root, train=False)  # its own DataError says what is wrong with the files
        names = ", ".join(sorted(p.name for p in unread))
        raise DataError(f"{best.name}: the {reader.name} reader does not read {names} with it; "
                        f"allowed: one {reader.name} input and the files it names")
    return str(best)  # no candidate is readable: the reader's error comes from loading it


def public_message(msg: str, dirs: Sequence[Path]) -> str:
    """An error message without the server's temporary directories (the user sees their file names)."""
    for d in dirs:
        for form in {str(Path(d).resolve()), str(d)}:
            msg = msg.replace(form + "/", "").replace(form, "")
    return msg


# ---------------------------------------------------------------------- tables
def _key_column(reader: Any) -> str | None:
    return getattr(getattr(reader, "config", None), "key_column", None)


def table_of_row(reader: Any, path: Path, key: str | None) -> tuple[list[str], list[list[str]]]:
    """``(header, [[column, value], ...])``: the row ``key`` (or the only row) of a reader's CSV, as
    text exactly as stored, after the reader has validated the file (its errors are raised)."""
    import pandas as pd

    col = _key_column(reader)
    if col is None:
        raise DataError(f"{reader.name}: the reader has no key column; no table to show")
    r, root, ref = reader.for_input(str(path), {"id": key} if key else {})
    r.load(ref, root=root, train=False)  # validates the file and finds the row
    # keep_default_na=False: cells keep their text ("NA" stays "NA"), so writing them back reproduces
    # the file the reader parsed
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    rows = [i for i, k in enumerate(df[col].tolist()) if normalise_ref(k) == normalise_ref(ref)]
    header = [str(c) for c in df.columns]
    return header, [[c, str(df.iloc[rows[0]][c])] for c in header]


def write_table_row(reader: Any, header: Sequence[str], rows: Sequence[Sequence[Any]], path: Path) -> str:
    """Write an edited ``[[column, value], ...]`` table as a one-row CSV; return its key."""
    col = _key_column(reader)
    got = [str(r[0]) for r in rows]
    if list(header) and got != list(header):
        raise DataError(f"{reader.name} table: its columns changed ({len(got)} rows, expected the CSV's "
                        f"{len(header)} columns in order); allowed: editing the value column only")
    values = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in (r[1] for r in rows)]
    key = dict(zip(got, values)).get(col or "", "")
    if not key.strip():
        raise DataError(f"{reader.name} table: the {col} value is empty; allowed: the row's id")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(got)
        w.writerow(values)
    return key


# ---------------------------------------------------------------------- examples
def example_patients(run_dir: Path | None, model: Any, processor: Any, n: int = 3) -> list[dict[str, Any]]:
    """Up to ``n`` test patients of a run: ``[{"id", "inputs": {modality: (files, extras)}}]``.

    A record's reference that is not one of the files its reader reads (the labs row id) goes to
    the reader's single extra option. Empty when the run's data is absent.
    """
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        return []
    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    data = cfg.get("data") or {}
    root = Path(data["root"]) if data.get("root") else Path(run_dir) / "data"
    qa = root / (data.get("test_file") or "qa/disease_test.json")
    if not qa.is_file():
        return []
    try:
        records = json.loads(qa.read_text())
    except ValueError:
        return []
    out = []
    for rec in records[:n]:
        inputs: dict[str, tuple[list[Path], dict[str, str]]] = {}
        for m in model.modalities:
            reader = processor.readers[m]
            refs = rec.get(type(reader).record_field) or []
            if not refs:
                continue
            ref = str(refs[0])
            files = [Path(p) for p in reader.files_of(ref, root=root)]
            extras = type(reader).cli_extras
            names_a_file = any(p.name.startswith(Path(ref).name) for p in files)  # a path (maybe less its suffix)
            given = {next(iter(extras)): ref} if not names_a_file and len(extras) == 1 else {}
            if all(p.is_file() for p in files):
                inputs[m] = (files, given)
        if inputs:
            out.append({"id": str(rec.get("id") or len(out)), "inputs": inputs})
    return out


# ---------------------------------------------------------------------- figures (matplotlib, Agg)
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def signal_figure(x: Any, names: Sequence[str] | None, fs: float | None, title: str) -> Any:
    """The channels of a ``[channels, time]`` sample stacked in one panel, in their own units, each
    shifted by one fixed offset (the ECG as the encoder receives it). One axes, not one per lead:
    twelve subplots took ten times as long to draw and encode."""
    plt = _plt()
    x = x.detach().cpu().float().numpy()
    c, t = x.shape
    names = list(names) if names and len(names) == c else [f"ch {i}" for i in range(c)]
    time = np.arange(t) / fs if fs else np.arange(t)
    centred = x - np.median(x, axis=1, keepdims=True)
    spread = float(np.percentile(np.abs(centred), 99.5)) if centred.size else 0.0
    step = 2.2 * spread if spread > 0 else 1.0
    fig, ax = plt.subplots(figsize=(10, 0.45 * c + 1.0))
    for i in range(c):
        ax.plot(time, centred[i] - i * step, lw=0.6, color="black")
    ax.set_yticks([-i * step for i in range(c)], names, fontsize=8)
    ax.set_ylim(-(c - 0.4) * step, 0.6 * step)
    ax.set_xlim(time[0], time[-1])
    ax.set_xlabel("time (s)" if fs else "sample")
    ax.grid(alpha=0.3)
    ax.set_title(f"{title} (leads {step:.2g} units apart)", fontsize=10)
    fig.tight_layout()
    return fig


def image_figure(x: Any, mean: Sequence[float] | None, std: Sequence[float] | None, title: str) -> Any:
    """A ``[3, H, W]`` sample with its normalisation undone (the radiograph as the encoder sees it)."""
    plt = _plt()
    x = x.detach().cpu().float()
    if mean is not None and std is not None:
        x = x * x.new_tensor(list(std))[:, None, None] + x.new_tensor(list(mean))[:, None, None]
    img = x.clamp(0, 1).permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.imshow(img)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def attribution_figure(att: Mapping[str, Any] | None) -> Any:
    """Per disease, P(named) with every modality and without each (``diagnose``'s attribution)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    p = (att or {}).get("p_named") or {}
    if not p:
        ax.text(0.5, 0.5, "no disease named in the sampled reports" if att else "attribution off (0 samples)",
                ha="center", va="center")
        ax.set_axis_off()
        return fig
    without = att.get("p_named_without") or {}
    series = [("every modality", p)] + [(f"without {m}", v) for m, v in without.items()]
    diseases = list(p)
    h = 0.8 / len(series)
    for k, (label, vals) in enumerate(series):
        ax.barh([i + k * h for i in range(len(diseases))], [vals[d] for d in diseases], height=h, label=label)
    ax.set_yticks([i + h * (len(series) - 1) / 2 for i in range(len(diseases))], diseases, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"P(disease named), {att.get('samples')} sampled reports per condition")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def gates_figure(weights: Mapping[str, float] | None) -> Any:
    """The fusion's per-modality weights (the CAO gates), one bar each."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 2.6))
    if not weights:
        ax.text(0.5, 0.5, "this fusion weighs no modality", ha="center", va="center")
        ax.set_axis_off()
        return fig
    ax.bar(list(weights), list(weights.values()), color="tab:blue")
    for i, v in enumerate(weights.values()):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("gate")
    ax.set_ylim(0, max(1.0, max(weights.values()) * 1.15))
    fig.tight_layout()
    return fig
