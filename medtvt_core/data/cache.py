"""Feature cache: frozen-encoder outputs stored once per input, reused across epochs and stages.

An entry is the ``[N, C]`` output of ``Encoder.encode`` for one input, in a safetensors file
keyed by (a) the encoder's identity (class, config and backbone weights), (b) the modality's
preprocessing fingerprint (its options and fitted statistics), (c) the input's content hash
and (d) the view (``train`` or ``eval``).  Changing any of them gives a new key, so stale
features are never served.  Writes go to a temporary file that is renamed into place, so a
killed run leaves either a whole entry or none; an entry that fails to read back is deleted
and re-encoded with a warning.

Random views: a modality whose training ``load`` is random (``ModalityReader.is_random(True)``,
e.g. CXR random crops, as in the paper) is **not** cached in training: each epoch sees a fresh
crop, encoded on the fly, so augmentation stays exactly as specified.  Its deterministic
evaluation view is cached.  To cache CXR in training as well, choose centre crops for training
(``cxr`` option ``train_crop: center``): the trade is explicit, not hidden in the cache.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..contracts import Encoder, ModalityReader
from ..errors import DataError
from ..io import atomic_path
from ..plugin_calls import encode_checked

log = logging.getLogger("medtvt.data")

CACHE_FORMAT = "medtvt-features-1"


def _device_of(module: torch.nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def encode_frozen(encoder: Encoder, x: torch.Tensor, refs: Sequence[str] | None = None) -> torch.Tensor:
    """``encoder.encode(x)`` in eval mode without gradients, on the encoder's device; returns CPU features.

    Checked by :func:`medtvt_core.plugin_calls.encode_checked`: an encoder that raises or returns other
    than ``feature_shape`` is an error naming it (and ``refs``, the inputs), not a broken cache entry."""
    was_training = encoder.training
    encoder.eval()
    try:
        out = encode_checked(encoder, x.to(_device_of(encoder)), refs=refs)
    finally:
        encoder.train(was_training)
    return out.detach().to("cpu")


class FeatureCache:
    """Directory of safetensors entries ``<dir>/<modality>/<key[:2]>/<key>.safetensors``."""

    def __init__(self, directory: str | Path, *, dtype: torch.dtype = torch.float32):
        self.directory = Path(directory)
        self.dtype = dtype
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        # (modality, ref, root, file sizes and mtimes) -> content hash: inputs are hashed once per
        # process unless their files change, not at every epoch.
        self._content: dict[tuple[Any, ...], str] = {}

    # ------------------------------------------------------------------ keys
    def content_key(self, modality: ModalityReader, ref: str, *, root: Path) -> str:
        files = modality.files_of(ref, root=root)
        try:
            stamp = tuple((str(f), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()])
        except FileNotFoundError as exc:
            raise DataError(f"{modality.name} reference {ref!r}: file {exc.filename} does not exist") from None
        memo = (modality.name, ref, str(root), stamp)
        key = self._content.get(memo)
        if key is None:
            key = self._content[memo] = modality.content_key(ref, root=root)
        return key

    def entry_key(self, encoder_id: str, modality: ModalityReader, ref: str, *, root: Path, train: bool = False) -> str:
        view = "train" if train else "eval"
        parts = [CACHE_FORMAT, encoder_id, modality.name, modality.preprocess_fingerprint(), view,
                 self.content_key(modality, ref, root=root), str(self.dtype)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:40]

    def path_of(self, modality_name: str, key: str) -> Path:
        return self.directory / modality_name / key[:2] / f"{key}.safetensors"

    # ------------------------------------------------------------------ entries
    def load(self, modality_name: str, key: str) -> torch.Tensor | None:
        """The cached features, or None when absent or unreadable (an unreadable entry is removed)."""
        from safetensors import safe_open

        path = self.path_of(modality_name, key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
                    raise ValueError("metadata does not match the entry's key")
                t = f.get_tensor("features")
            if t.ndim != 2:
                raise ValueError(f"features have shape {tuple(t.shape)}, expected [N, C]")
        except Exception as exc:  # any read failure means a damaged entry: re-encode, never crash
            self.corrupt += 1
            warnings.warn(f"feature cache entry {path} is unreadable ({type(exc).__name__}: {exc}); re-encoding it",
                          RuntimeWarning, stacklevel=2)
            path.unlink(missing_ok=True)
            return None
        return t

    def store(self, modality_name: str, key: str, features: torch.Tensor, meta: Mapping[str, str] | None = None) -> Path:
        """Write one entry atomically (:func:`medtvt_core.io.atomic_path`)."""
        from safetensors.torch import save_file

        if features.ndim != 2:
            raise ValueError(f"features must be [N, C], got {tuple(features.shape)}")
        path = self.path_of(modality_name, key)
        metadata = {**{k: str(v) for k, v in (meta or {}).items()}, "key": key, "format": CACHE_FORMAT}
        with atomic_path(path, durable=False) as tmp:  # an entry lost in a crash is re-encoded
            save_file({"features": features.detach().to("cpu", self.dtype).contiguous()}, str(tmp), metadata=metadata)
        return path

    def get_or_encode(self, encoder: Encoder, modality: ModalityReader, ref: str, *, root: Path, train: bool = False,
                      encoder_id: str | None = None) -> torch.Tensor:
        """Features ``[N, C]`` of one input: from the cache, else loaded, encoded (eval, no grad) and stored.

        ``encoder_id``: ``encoder.identity()`` computed once by the caller (hashing the weights
        per sample would cost more than the cache saves).
        """
        if modality.is_random(train):
            raise ValueError(f"modality {modality.name!r} is random in training: its features must not be cached")
        eid = encoder_id or encoder.identity()
        key = self.entry_key(eid, modality, ref, root=root, train=train)
        t = self.load(modality.name, key)
        if t is not None:
            self.hits += 1
            return t
        self.misses += 1
        x = modality.load(ref, root=root, train=train)
        feats = encode_frozen(encoder, x.unsqueeze(0), [ref])[0]
        self.store(modality.name, key, feats, {"modality": modality.name, "ref": ref, "encoder": eid})
        return feats.to(self.dtype)


# ---------------------------------------------------------------------- pre-encoding
class _RefLoader(torch.utils.data.Dataset):
    """Loads the inputs still missing from the cache (indices into ``refs``)."""

    def __init__(self, modality: ModalityReader, refs: list[str], root: Path, train: bool):
        self.modality, self.refs, self.root, self.train = modality, refs, root, train

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.modality.load(self.refs[i], root=self.root, train=self.train), ""
        except DataError as err:
            return i, None, str(err)


def _collate_refs(items: list[tuple[int, torch.Tensor | None, str]]) -> list[tuple[int, torch.Tensor | None, str]]:
    return items


def encode_dataset(dataset: Any, *, batch_size: int = 32, num_workers: int = 0,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict[str, Any]]:
    """Fill the cache for every cacheable input of ``dataset``, encoding in batches.

    Encoders run in eval mode without gradients.  Inputs that fail to load are reported and,
    when the dataset skips bad samples, their records are dropped from it (counted in
    ``dataset.skipped``); with ``on_bad_sample="fail"`` the first failure raises.
    Returns per modality ``{"cached": n, "encoded": n, "failed": [(ref, reason), ...]}``.
    """
    cache = dataset.cache
    if cache is None or not dataset.encoders:
        raise ValueError("encode_dataset needs a dataset built with encoders and a cache")
    report: dict[str, dict[str, Any]] = {}
    for name in dataset.cached_modalities:
        mod, enc, eid = dataset.modalities[name], dataset.encoders[name], dataset.encoder_ids[name]
        refs = dataset.references(name)
        todo: list[tuple[str, str]] = []
        failed: list[tuple[str, str]] = []
        for ref in refs:
            try:
                key = cache.entry_key(eid, mod, ref, root=dataset.root, train=dataset.train)
            except DataError as err:
                failed.append((ref, str(err)))
                continue
            if not cache.path_of(name, key).is_file():
                todo.append((ref, key))
        cached = len(refs) - len(todo) - len(failed)
        loader = torch.utils.data.DataLoader(_RefLoader(mod, [r for r, _ in todo], dataset.root, dataset.train),
                                             batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_refs)
        done = encoded = 0
        for items in loader:
            ok = [(i, x) for i, x, _ in items if x is not None]
            failed.extend((todo[i][0], msg) for i, x, msg in items if x is None)
            if ok:
                feats = encode_frozen(enc, torch.stack([x for _, x in ok]), [todo[i][0] for i, _ in ok])
                for (i, _), f in zip(ok, feats):
                    ref, key = todo[i]
                    cache.store(name, key, f, {"modality": name, "ref": ref, "encoder": eid})
                encoded += len(ok)
            done += len(items)
            if progress:
                progress(name, done, len(todo))
        for ref, msg in failed:
            dataset.drop_reference(name, ref, msg)
        report[name] = {"cached": cached, "encoded": encoded, "failed": failed}
    return report
