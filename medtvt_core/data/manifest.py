"""The dataset manifest (``<root>/medtvt_dataset.json``): QA files, splits and modality statistics.

Statistics that preprocessing needs from the training split (the lab mean percentiles) are
computed once by ``ModalityReader.fit`` and stored here, keyed by the modality's class, options and
training references; a later run restores them with ``ModalityReader.set_stats`` instead of
recomputing or re-reading them per sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel

from ..contracts import ModalityReader
from ..errors import DataError
from .schema import QARecord
from ..io import atomic_write_text

log = logging.getLogger("medtvt.data")

MANIFEST_NAME = "medtvt_dataset.json"
MANIFEST_FORMAT = "medtvt-dataset"
MANIFEST_VERSION = 1


def manifest_path(root: str | Path) -> Path:
    return Path(root) / MANIFEST_NAME


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """The manifest of ``root``, or None when there is none."""
    p = manifest_path(root)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"dataset manifest {p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise DataError(f"dataset manifest {p}: 'format' must be {MANIFEST_FORMAT!r}")
    if data.get("version") != MANIFEST_VERSION:
        raise DataError(f"dataset manifest {p}: version {data.get('version')!r} is not supported; allowed: {MANIFEST_VERSION}")
    return data


def write_manifest(root: str | Path, data: Mapping[str, Any]) -> Path:
    """Write the manifest atomically (temp file + rename)."""
    p = manifest_path(root)
    body = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **{k: v for k, v in data.items() if k not in ("format", "version")}}
    atomic_write_text(p, json.dumps(body, indent=1, sort_keys=False))
    return p


def fit_key(modality: ModalityReader, refs: Sequence[str]) -> str:
    """Identity of a fit: modality class, options and the set of training references."""
    cfg = getattr(modality, "config", None)
    opts = cfg.model_dump_json() if isinstance(cfg, BaseModel) else ""
    h = hashlib.sha256(f"{type(modality).__module__}.{type(modality).__qualname__}:{opts}".encode())
    for r in sorted(set(refs)):
        h.update(r.encode() + b"\0")
    return h.hexdigest()[:24]


def training_refs(records: Sequence[QARecord], modality: ModalityReader) -> list[str]:
    """Unique references of ``modality`` in the training records, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        ref = r.ref(modality.record_field)
        if ref is not None:
            seen.setdefault(ref, None)
    return list(seen)


def prepare_stats(root: str | Path, modalities: Mapping[str, ModalityReader], train_records: Sequence[QARecord], *,
                  persist: bool = True) -> dict[str, dict[str, Any]]:
    """Give every modality its training statistics: restored from the manifest when they match, else fitted.

    Fitted statistics are written back to the manifest when ``persist`` (a read-only root only
    logs a warning).  Returns ``{modality: stats}`` for the modalities that have any.
    """
    root = Path(root)
    manifest = read_manifest(root) or {}
    stored: dict[str, Any] = dict(manifest.get("stats") or {})
    out: dict[str, dict[str, Any]] = {}
    changed = False
    for name, mod in modalities.items():
        refs = training_refs(train_records, mod)
        key = fit_key(mod, refs)
        entry = stored.get(name)
        if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("stats"), dict):
            mod.set_stats(entry["stats"])
            out[name] = entry["stats"]
            continue
        stats = mod.fit(refs, root) if refs else {}
        if stats:
            mod.set_stats(stats)
            out[name] = stats
            stored[name] = {"key": key, "n_refs": len(refs), "stats": stats}
            changed = True
    if changed and persist:
        try:
            write_manifest(root, {**manifest, "stats": stored})
        except OSError as exc:
            log.warning("could not store modality statistics in %s (%s); they will be recomputed next time",
                        manifest_path(root), exc)
    return out
