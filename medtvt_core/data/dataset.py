"""Torch dataset and collator over MedTVT-QA records, with modality masks and the feature cache.

Item (dict): ``id``, ``prompt`` (question; placeholders of modalities absent for the sample or
not in use are replaced by ``"(<name> not available)"``), ``answer``, ``labels`` (the
``<answer>`` categories, ``[]`` when none), ``present`` ``{modality: bool}``, ``inputs``
``{modality: preprocessed tensor}`` and ``features`` ``{modality: cached frozen features [N, C]}``;
each present modality is in exactly one of the two.

Batch (:class:`Collator`): ``ids``, ``prompts``, ``answers``, ``labels``, ``modality_names``
(mask column order), ``modality_mask`` BoolTensor ``[B, M]``, ``modality_inputs`` and
``modality_features``: ``{modality: Tensor[n_present, ...]}`` with only the rows of samples
that have the modality, in batch order (a key is absent when no sample has it), and
``n_skipped`` (items dropped because they failed to load, see ``on_bad_sample``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch

from ..contracts import Encoder, ModalityReader
from ..errors import ConfigError, DataError
from ..plugins import Catalog, get_catalog
from .cache import FeatureCache
from .labels import parse_answer
from .manifest import prepare_stats
from .schema import QARecord, read_qa_file

log = logging.getLogger("medtvt.data")

OnBad = Literal["skip", "fail"]


def absent_text(name: str) -> str:
    """What replaces the placeholder of an absent modality in a prompt: the one rule used by training,
    modality dropout, evaluation by subsets, attribution and ``medtvt diagnose``."""
    return f"({name} not available)"


@dataclass(frozen=True)
class SkippedSample:
    """A record left out of training or evaluation, and why."""

    where: str  # "file[index]" or the file alone
    id: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.where}{f' ({self.id})' if self.id else ''}: {self.reason}"


def all_finite(x: torch.Tensor) -> bool:
    """No NaN/inf in a CPU tensor (numpy: torch's CPU isfinite().all() costs milliseconds here)."""
    return bool(np.isfinite(x.detach().cpu().numpy()).all())


def read_input(reader: ModalityReader, ref: str, *, root: Path | None, train: bool, what: str,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """``reader.load`` checked against the reader's contract: its ``sample_shape`` and finite values
    (a :class:`DataError` that starts with ``what`` otherwise); how datasets and ``diagnose`` read a
    sample's raw input (the feature cache reads, then encodes, in :mod:`.cache`)."""
    x = reader.load(ref, root=root, train=train, generator=generator)
    if tuple(x.shape) != tuple(reader.sample_shape) or not all_finite(x):
        raise DataError(f"{what}: the reader returned shape {tuple(x.shape)} (expected {tuple(reader.sample_shape)}) "
                        f"or non-finite values")
    return x


# ---------------------------------------------------------------------- modalities
def registered_modalities(catalog: Catalog | None = None) -> dict[str, type[ModalityReader]]:
    """Every modality class of the catalog (default: the process-wide one), by name."""
    catalog = get_catalog() if catalog is None else catalog
    return {n: catalog.modalities.get(n) for n in catalog.modalities.list()}


# ---------------------------------------------------------------------- dataset
class QADataset(torch.utils.data.Dataset):
    """QA records with their modality inputs (or cached features) and a per-sample modality mask.

    ``modalities``: readers in use, in mask-column order.  ``known``: every registered modality
    class (their placeholders are validated and, when not in use, replaced by text).
    ``encoders`` + ``cache``: serve ``features[m]`` from the cache for each modality whose load is
    deterministic in this mode; the others (random training crops) keep ``inputs[m]``.
    ``encoder_ids``: ``encoder.identity()`` per modality when already computed.
    ``on_bad_sample``: ``"fail"`` raises :class:`DataError` at the first bad record; ``"skip"``
    leaves it out, logs the reason and appends it to :attr:`skipped`.
    Records that reference none of the modalities in use are dropped (counted in
    :attr:`n_without_modality`): they would train on text alone.
    """

    def __init__(self, records: Sequence[QARecord], *, root: str | Path, modalities: Mapping[str, ModalityReader],
                 known: Mapping[str, type[ModalityReader]] | None = None, train: bool = False, on_bad_sample: OnBad = "fail",
                 encoders: Mapping[str, Encoder] | None = None, cache: FeatureCache | None = None, seed: int = 0,
                 encoder_ids: Mapping[str, str] | None = None, skipped: Sequence[SkippedSample] = ()):
        if on_bad_sample not in ("skip", "fail"):
            raise ConfigError(f"on_bad_sample must be 'skip' or 'fail', got {on_bad_sample!r}")
        if not modalities:
            raise ConfigError("a dataset needs at least one modality in use")
        self.root = Path(root)
        self.modalities = dict(modalities)
        self.modality_names = list(self.modalities)
        self._all = {**dict(known or {}), **{n: type(m) for n, m in self.modalities.items()}}
        self.train = train
        self.on_bad_sample: OnBad = on_bad_sample
        self.seed = seed
        self.epoch = 0
        #: Modalities absent for every sample (evaluation by available modalities).
        self.withheld: frozenset[str] = frozenset()
        #: Modality dropout ``{modality: p}`` and the salt of its draws (the stage); see :meth:`absent_of`.
        self.dropout: dict[str, float] = {}
        self.dropout_salt = ""
        self.skipped: list[SkippedSample] = list(skipped)
        self.encoders = {m: e for m, e in (encoders or {}).items() if m in self.modalities}
        self.cache: FeatureCache | None = None
        self.encoder_ids: dict[str, str] = {}
        self.cached_modalities: list[str] = []
        if cache is not None:
            self.attach_cache(self.encoders, cache, encoder_ids=encoder_ids)
        fields = [mod.record_field for mod in self.modalities.values()]
        self.records = [r for r in records if any(r.ref(f) is not None for f in fields)]
        self.n_without_modality = len(records) - len(self.records)
        if self.n_without_modality:
            log.info("%d record(s) reference none of the modalities in use (%s) and are left out",
                     self.n_without_modality, ", ".join(self.modality_names))

    def attach_cache(self, encoders: Mapping[str, Encoder], cache: FeatureCache,
                     encoder_ids: Mapping[str, str] | None = None) -> None:
        """Serve the frozen features of ``encoders`` from ``cache`` for every modality whose load is
        deterministic in this mode (random training crops keep their raw inputs)."""
        self.encoders = {m: e for m, e in encoders.items() if m in self.modalities}  # checked when built (build.py)
        self.cache = cache
        # Identity hashes every backbone weight: once here (or by the caller), not once per sample.
        ids = dict(encoder_ids or {})
        self.encoder_ids = {m: ids.get(m) or e.identity() for m, e in self.encoders.items()}
        self.cached_modalities = [m for m in self.modality_names
                                  if m in self.encoders and not self.modalities[m].is_random(self.train)]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_files(cls, root: str | Path, files: Sequence[str | Path], modalities: Mapping[str, ModalityReader], *,
                   known: Mapping[str, type[ModalityReader]] | None = None, catalog: Catalog | None = None,
                   on_bad_sample: OnBad = "fail", check_files: bool = True, **kwargs: Any) -> "QADataset":
        """Read QA files (relative to ``root``), validate them and build the dataset."""
        root = Path(root)
        known = dict(known) if known is not None else registered_modalities(catalog)
        schema_mods = list({**known, **{n: type(m) for n, m in modalities.items()}}.values())
        records: list[QARecord] = []
        skipped: list[SkippedSample] = []
        for f in files:
            recs, problems = read_qa_file(root / f, schema_mods, label=str(f), collect=on_bad_sample == "skip")
            records.extend(recs)
            first: dict[int | None, str] = {}  # one entry per bad record: its first problem
            for p in problems:
                first.setdefault(p.index, f"field {p.field!r}: {p.message}")
            for index, reason in first.items():
                skipped.append(SkippedSample(f"{f}[{index}]" if index is not None else str(f), None, reason))
                log.warning("skipping %s", skipped[-1])
        ds = cls(records, root=root, modalities=modalities, known=known, on_bad_sample=on_bad_sample, skipped=skipped, **kwargs)
        if check_files:
            ds.check_files()
        return ds

    def check_files(self) -> None:
        """Drop (skip) or reject (fail) records whose input files do not exist."""
        missing: dict[tuple[str, str], str] = {}
        for name in self.modality_names:
            mod = self.modalities[name]
            for ref in self.references(name):
                for f in mod.files_of(ref, root=self.root):
                    if not f.is_file():
                        missing[(name, ref)] = f"{name} input {f} does not exist"
                        break
        for (name, ref), msg in missing.items():
            self.drop_reference(name, ref, msg)

    def references(self, modality: str) -> list[str]:
        """Unique references of ``modality`` in the records, in first-seen order."""
        field = self.modalities[modality].record_field
        return list(dict.fromkeys(r for rec in self.records if (r := rec.ref(field)) is not None))

    def drop_reference(self, modality: str, ref: str, reason: str) -> None:
        """Leave out the records using input ``ref`` of ``modality`` (``fail``: raise instead)."""
        field = self.modalities[modality].record_field
        bad = [r for r in self.records if r.ref(field) == ref]
        if not bad:
            return
        if self.on_bad_sample == "fail":
            raise DataError(f"{bad[0].where} ({bad[0].id}): field {field!r}: {reason}")
        for r in bad:
            self._skip(r, f"field {field!r}: {reason}")
        ids = {id(r) for r in bad}
        self.records = [r for r in self.records if id(r) not in ids]

    def _skip(self, rec: QARecord, reason: str) -> None:
        s = SkippedSample(rec.where, rec.id, reason)
        self.skipped.append(s)
        log.warning("skipping %s", s)

    def subset(self, keep: Sequence[QARecord]) -> "QADataset":
        """The same dataset over the records ``keep`` (shared readers, cache and skip list)."""
        ids = {id(r) for r in keep}
        out = copy.copy(self)
        out.records = [r for r in self.records if id(r) in ids]
        return out

    def masked(self, *, withheld: Sequence[str] = (), dropout: Mapping[str, float] | None = None,
               salt: str = "") -> "QADataset":
        """The same dataset with modalities ``withheld`` absent for every sample and, when ``dropout``
        is given, modality dropout (see :meth:`absent_of`; ``salt``, e.g. the stage, varies its draws)."""
        bad = [m for m in [*withheld, *(dropout or {})] if m not in self.modalities]
        if bad:
            raise ConfigError(f"modality {bad[0]!r} is not in use (modalities: {', '.join(self.modality_names)})")
        out = copy.copy(self)
        out.withheld = frozenset(withheld)
        out.dropout = {m: float(p) for m, p in (dropout or {}).items() if p > 0}
        out.dropout_salt = salt
        return out

    def absent_of(self, index: int) -> frozenset[str]:
        """Modalities in use that sample ``index`` presents as absent: the withheld ones, and those that
        modality dropout leaves out. Dropout draws, per modality the record has, ``u < p[m]`` from a
        generator of (seed, epoch, index, salt), never the global RNG; when it would leave out every
        modality the record has, one of them (drawn by the same generator) is kept."""
        rec = self.records[index]
        gone = set(self.withheld)
        if self.dropout:
            have = [m for m in self.modality_names
                    if m not in gone and rec.ref(self.modalities[m].record_field) is not None]
            if len(have) > 1:
                g = self._generator(index, f"modality-dropout:{self.dropout_salt}")
                u = torch.rand(len(have), generator=g).tolist()
                drop = [m for m, x in zip(have, u) if x < self.dropout.get(m, 0.0)]
                if len(drop) == len(have):  # the floor: one modality is kept
                    drop.pop(int(torch.randint(len(drop), (1,), generator=g)))
                gone.update(drop)
        return frozenset(gone)

    def set_epoch(self, epoch: int) -> None:
        """Random views (training crops) depend on (seed, epoch, index, modality), not on worker state."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.records)

    def prompt_of(self, rec: QARecord, absent: frozenset[str] = frozenset()) -> str:
        """The question with the placeholder of every modality absent for the sample (not in use, not
        in the record, or in ``absent``) replaced by :func:`absent_text`."""
        q = rec.question
        for name, cls in self._all.items():
            if cls.placeholder in q and (name not in self.modalities or name in absent
                                         or rec.ref(cls.record_field) is None):
                q = q.replace(cls.placeholder, absent_text(name))
        return q

    def _generator(self, index: int, modality: str) -> torch.Generator:
        s = (self.seed * 1_000_003 + self.epoch * 10_007 + index) * 65_537 + zlib.crc32(modality.encode())
        return torch.Generator().manual_seed(s % (2**63))

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        rec = self.records[index]
        absent = self.absent_of(index) if (self.withheld or self.dropout) else frozenset()
        present: dict[str, bool] = {}
        inputs: dict[str, torch.Tensor] = {}
        features: dict[str, torch.Tensor] = {}
        for name in self.modality_names:
            mod = self.modalities[name]
            ref = rec.ref(mod.record_field) if name not in absent else None
            present[name] = ref is not None
            if ref is None:
                continue
            try:
                if name in self.cached_modalities:
                    features[name] = self.cache.get_or_encode(  # type: ignore[union-attr]
                        self.encoders[name], mod, ref, root=self.root, train=self.train, encoder_id=self.encoder_ids[name])
                else:
                    gen = self._generator(index, name) if mod.is_random(self.train) else None
                    inputs[name] = read_input(mod, ref, root=self.root, train=self.train, generator=gen,
                                              what=f"{name} input {ref!r}")
            except DataError as err:
                reason = f"field {mod.record_field!r}: {err}"
                if self.on_bad_sample == "fail":
                    raise DataError(f"{rec.where} ({rec.id}): {reason}") from None
                self._skip(rec, reason)
                return None
        return {"id": rec.id, "prompt": self.prompt_of(rec, absent), "answer": rec.answer,
                "labels": parse_answer(rec.answer) or [], "present": present, "inputs": inputs, "features": features}

    def collator(self) -> "Collator":
        return Collator(self.modality_names)


class Collator:
    """Stacks items into a batch (see the module docstring); ``None`` items (skipped) are dropped."""

    def __init__(self, modality_names: Sequence[str]):
        self.modality_names = list(modality_names)

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [it for it in items if it is not None]
        names = self.modality_names
        mask = torch.zeros(len(kept), len(names), dtype=torch.bool)
        inputs: dict[str, torch.Tensor] = {}
        features: dict[str, torch.Tensor] = {}
        for j, m in enumerate(names):
            raw: list[torch.Tensor] = []
            cached: list[torch.Tensor] = []
            for b, it in enumerate(kept):
                if not it["present"].get(m, False):
                    continue
                mask[b, j] = True
                if m in it["features"]:
                    cached.append(it["features"][m])
                elif m in it["inputs"]:
                    raw.append(it["inputs"][m])
                else:
                    raise ValueError(f"item {it['id']}: modality {m!r} is present but has neither inputs nor features")
            if raw and cached:
                raise ValueError(f"modality {m!r}: a batch mixes raw inputs and cached features")
            if raw:
                inputs[m] = torch.stack(raw)
            if cached:
                features[m] = torch.stack(cached)
        return {
            "ids": [it["id"] for it in kept],
            "prompts": [it["prompt"] for it in kept],
            "answers": [it["answer"] for it in kept],
            "labels": [it["labels"] for it in kept],
            "modality_names": list(names),
            "modality_mask": mask,
            "modality_inputs": inputs,
            "modality_features": features,
            "n_skipped": len(items) - len(kept),
        }


# ---------------------------------------------------------------------- splits
def holdout(records: Sequence[QARecord], fraction: float) -> tuple[list[QARecord], list[QARecord]]:
    """``(kept, held out)``: each record is held out when the hash of its id falls below ``fraction``,
    so the choice depends on the record alone (not on the file order, the seed or the other records)."""
    def u(r: QARecord) -> float:
        return int.from_bytes(hashlib.sha256(f"holdout:{r.id}".encode()).digest()[:8], "big") / 2**64

    out = [r for r in records if u(r) < fraction]
    held = {id(r) for r in out}
    return [r for r in records if id(r) not in held], out


def open_splits(root: str | Path, *, modalities: Mapping[str, ModalityReader], pt_files: Sequence[str] = (),
                train_file: str | None = None, test_file: str | None = None, val_file: str | None = None,
                on_bad_sample: OnBad = "fail",
                known: Mapping[str, type[ModalityReader]] | None = None, catalog: Catalog | None = None,
                encoders: Mapping[str, Encoder] | None = None, cache: FeatureCache | None = None,
                seed: int = 0, persist_stats: bool = True, fit_stats: bool = True) -> dict[str, QADataset]:
    """Datasets ``"pt"`` (PT files), ``"train"``, ``"test"`` and ``"val"`` (disease files) sharing the readers.

    Statistics (lab mean percentiles) come from the manifest or are fitted on the training
    records (PT + train files) before any sample is read (stored in the manifest when
    ``persist_stats``; ``fit_stats=False`` keeps the readers' own, e.g. a saved model's);
    ``"pt"``/``"train"`` use training views, ``"test"``/``"val"`` evaluation views.  Missing arguments give
    no dataset for that split.
    """
    known = dict(known) if known is not None else registered_modalities(catalog)
    ids = {m: e.identity() for m, e in (encoders or {}).items() if m in modalities} if cache is not None else None
    common = dict(known=known, on_bad_sample=on_bad_sample, encoders=encoders, cache=cache, seed=seed, encoder_ids=ids)
    out: dict[str, QADataset] = {}
    if pt_files:
        out["pt"] = QADataset.from_files(root, pt_files, modalities, train=True, check_files=False, **common)
    if train_file:
        out["train"] = QADataset.from_files(root, [train_file], modalities, train=True, check_files=False, **common)
    if test_file:
        out["test"] = QADataset.from_files(root, [test_file], modalities, train=False, check_files=False, **common)
    if val_file:
        out["val"] = QADataset.from_files(root, [val_file], modalities, train=False, check_files=False, **common)
    if fit_stats:
        training = [r for k in ("pt", "train") if k in out for r in out[k].records]
        prepare_stats(root, modalities, training, persist=persist_stats)
    for ds in out.values():
        ds.check_files()
    return out
