"""Safe reading and writing of weight files.

* :func:`load_state_file` reads ``.safetensors`` with safetensors and ``.pt/.pth/.ckpt/.bin`` with
  ``torch.load(weights_only=True)``.  A pickle that needs full unpickling (it names classes or
  functions, which unpickling would import and call: arbitrary code execution) is refused with a
  :class:`~medtvt_core.errors.CheckpointError` unless the caller passes ``trust=True``.
* :func:`select_state` picks the tensor dict out of a loaded object (an entry such as
  ``"ecg_model"`` or ``"state_dict"``, a key prefix such as ``"labs_encoder."``).
* :func:`load_into` loads a state dict into a module and names every wrong key and shape.
* :func:`save_safetensors` writes a state dict atomically (temporary file, then ``os.replace``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pathlib
import pickle
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .errors import CheckpointError
from .io import atomic_path

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
TRUST_HINT = "trust_checkpoint=True in the encoder options or --trust-checkpoint on the command line"

# Inert standard-library classes that Lightning checkpoints often carry in ``hyper_parameters``
# (argparse namespaces, paths).  Rebuilding them runs no user code, so they are allowed for the
# weights-only unpickler; anything else still needs ``trust``.
_INERT_GLOBALS: list[Any] = [
    argparse.Namespace,
    pathlib.Path,
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
]

_MAX_NAMES = 6


def _names(items: Iterable[str], limit: int = _MAX_NAMES) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _torch_reason(exc: BaseException) -> str:
    """The informative line of torch's multi-line weights-only error."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            reason = line[len("WeightsUnpickler error:"):].strip()
            return reason.split(" was not an allowed global")[0]
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _inert_globals() -> Any:
    # Only add what is not allowed yet: leaving the context removes what it added, and must not
    # remove globals the user allowed on purpose.
    have = set(map(id, torch.serialization.get_safe_globals()))
    return torch.serialization.safe_globals([g for g in _INERT_GLOBALS if id(g) not in have])


def _unsafe_globals(path: Path) -> list[str]:
    try:
        with _inert_globals():
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) pickles cannot be scanned statically
        return []


def step_checkpoints(out_dir: str | os.PathLike[str] | None, prefix: str = "checkpoint-") -> list[Path]:
    """The ``<prefix><step>`` folders under ``out_dir``, oldest step first (10 after 9, not after 1)."""
    if out_dir is None or not Path(out_dir).is_dir():
        return []
    found = [(int(p.name[len(prefix):]), p) for p in Path(out_dir).iterdir()
             if p.is_dir() and p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]
    return [p for _, p in sorted(found)]


def check_file(path: str | os.PathLike[str], *, what: str = "checkpoint") -> Path:
    """Return ``path`` as a :class:`Path`; raise :class:`CheckpointError` if it is not a file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{what} file {p} does not exist")
    if not p.is_file():
        raise CheckpointError(f"{what} path {p} is not a file")
    return p


def load_state_file(path: str | os.PathLike[str], *, trust: bool = False) -> Any:
    """Read a weight file onto the CPU without running code from it unless ``trust`` is set.

    ``.safetensors`` gives a ``dict[str, Tensor]``; pickled files give whatever was saved
    (usually a dict).  Raises :class:`CheckpointError` for a missing, unreadable or unsafe file.
    """
    p = check_file(path)
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"cannot read safetensors file {p}: {_torch_reason(exc)}") from exc
    if suffix not in PICKLE_SUFFIXES:
        allowed = ", ".join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        raise CheckpointError(f"checkpoint {p}: unsupported file type {p.suffix or '(none)'!r}; allowed: {allowed}")
    try:
        with _inert_globals():
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"cannot read checkpoint {p}: {_torch_reason(exc)}") from exc
        unsafe = _unsafe_globals(p)
        detail = f"it references {_names(unsafe)}" if unsafe else _torch_reason(exc)
        if not trust:
            raise CheckpointError(
                f"checkpoint {p} needs full unpickling ({detail}), which can execute arbitrary code from the file; "
                f"if you trust its source, pass {TRUST_HINT}"
            ) from exc
        logger.warning("loading %s with full unpickling (%s) because the checkpoint is trusted", p, detail)
        try:
            # The one place a checkpoint is fully unpickled: only after the user explicitly trusted
            # it, and only after the safe loader above has refused it.
            return torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as exc2:  # e.g. the classes it names are not installed
            raise CheckpointError(f"cannot unpickle trusted checkpoint {p}: {type(exc2).__name__}: {_torch_reason(exc2)}") from exc2
    except Exception as exc:  # truncated zip, garbage bytes, ...
        raise CheckpointError(f"cannot read checkpoint {p}: {type(exc).__name__}: {_torch_reason(exc)}") from exc


def select_state(obj: Any, *, entry: str | Iterable[str] | None = None, prefix: str = "",
                 where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Pick the ``dict[str, Tensor]`` of a loaded checkpoint.

    ``entry``: key (or candidate keys, first present wins) of the dict that holds the state; when
    none is present the object itself must be a state dict.  ``prefix``: keep only keys starting
    with it and strip it (other keys are ignored).  Non-tensor values are an error.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a dict of tensors, found {type(obj).__name__}")
    entries = [entry] if isinstance(entry, str) else list(entry or ())
    state: Any = obj
    for e in entries:
        if e in obj:
            state = obj[e]
            where = f"{where}[{e!r}]"
            break
    else:
        if entries and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(
                f"{where}: no {' or '.join(repr(e) for e in entries)} entry and not a plain state dict; "
                f"top-level keys: {_names(map(str, obj))}"
            )
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}: expected a dict of tensors, found {type(state).__name__}")
    if prefix:
        picked = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
        if not picked:
            raise CheckpointError(f"{where}: no key starts with {prefix!r}; keys look like {_names(map(str, state), 3)}")
        state = picked
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where}: entries that are not tensors: {_names(bad)}")
    return dict(state)


def strip_common_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Strip ``prefix`` (e.g. ``"module."`` of DataParallel) when every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _aliases(module: nn.Module) -> list[list[str]]:
    """Groups of state-dict keys that are the same tensor in ``module`` (a module registered twice)."""
    groups: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for k, v in module.state_dict(keep_vars=True).items():
        if v.numel() == 0:
            continue
        groups.setdefault((v.data_ptr(), v.numel(), tuple(v.stride())), []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True,
              where: str = "checkpoint") -> Any:
    """``module.load_state_dict(state, strict)`` with one-line errors naming wrong keys and shapes.

    A shape mismatch is always an error; missing / unexpected keys only when ``strict``.  Keys that
    are one tensor in the module (a submodule registered twice) must hold equal values.
    Returns torch's ``_IncompatibleKeys``.
    """
    expected = module.state_dict()
    what = type(module).__name__
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    shapes = [
        f"{k} expected {tuple(expected[k].shape)} found {tuple(state[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if shapes:
        problems.append(f"shape mismatch: {_names(shapes, 4)}")
    if strict and missing:
        problems.append(f"missing keys: {_names(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if problems:
        raise CheckpointError(f"{where} does not match {what} ({len(expected)} keys): " + "; ".join(problems))
    for group in _aliases(module):
        present = [k for k in group if k in state]
        for k in present[1:]:
            if not torch.equal(state[present[0]].to(state[k].dtype), state[k]):
                raise CheckpointError(
                    f"{where}: keys {present[0]} and {k} are one shared tensor in {what} but differ in the checkpoint"
                )
    return module.load_state_dict(dict(state), strict=strict)


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` to ``path`` as safetensors atomically; return the path.

    Tensors are moved to the CPU and made contiguous; tensors sharing memory (a module
    registered under two names) are copied so every key is stored and loads strictly.
    """
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"cannot save {p}: entry {k!r} is a {type(v).__name__}, not a tensor")
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.numel() == 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[k] = t
    with atomic_path(p) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return p


_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 8 MiB chunks; memoised per (path, size, mtime) in this process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    digest = _HASHES.get(key)
    if digest is None:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
        digest = _HASHES[key] = h.hexdigest()
    return digest
