"""MedTVT-QA records: pydantic schema, placeholder rules and file reading.

A record (the reference format plus our ``"lab"`` field and an optional ``"id"``)::

    {"id": "p10000032-disease",
     "messages": [{"role": "user", "content": "... <ecg> ... <cxr> ... <lab> ..."},
                  {"role": "assistant", "content": "<think> ... </think><answer> A; B </answer>"}],
     "ECG": ["mimic-iv-ecg/files/p1000/p10000032/s40000017/40000017"],
     "image": ["mimic-cxr-jpg/files/p10/p10000032/s50000017/ab12...jpg"],
     "lab": ["20000017"]}

The modality fields are not fixed: each registered modality names its field
(``ModalityReader.record_field``) and its placeholder (``ModalityReader.placeholder``).  Rules checked for
every known modality: the field holds one reference (a string or an integer id, alone or in
a one-element list) exactly when the question holds its placeholder once; the answer never
holds a placeholder.  Other keys are kept and ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator

from ..errors import DataError
from ..io import atomic_write_text


class ModalityFields(Protocol):
    """What the schema needs of a modality (a ModalityReader class or instance)."""

    name: str
    placeholder: str
    record_field: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty string")
        return v


class QARecord(BaseModel):
    """One question/answer pair with its modality references (extra keys are kept)."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    messages: list[Message]
    _file: str = PrivateAttr("")
    _index: int = PrivateAttr(-1)

    @field_validator("id", mode="before")
    @classmethod
    def _id_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("messages")
    @classmethod
    def _two_turns(cls, v: list[Message]) -> list[Message]:
        if [m.role for m in v] != ["user", "assistant"]:
            raise ValueError(f"must be exactly [user, assistant] turns, got [{', '.join(m.role for m in v)}]")
        return v

    @property
    def question(self) -> str:
        return self.messages[0].content

    @property
    def answer(self) -> str:
        return self.messages[1].content

    @property
    def where(self) -> str:
        """``file[index]`` of the record, for messages."""
        return f"{self._file}[{self._index}]"

    def ref(self, field: str) -> str | None:
        """The single reference held by ``field`` (normalised to str), or None when absent."""
        refs = _refs(getattr(self, "__pydantic_extra__", None) or {}, field)
        return refs[0] if refs else None


@dataclass(frozen=True)
class RecordProblem:
    """A schema violation: file, record index, field path, what is wrong and what is allowed."""

    file: str
    index: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.index is None else f"{self.file}: record {self.index}"
        return f"{where}: field {self.field!r}: {self.message}"


def _refs(extra: Mapping[str, Any], field: str) -> list[str]:
    v = extra.get(field)
    if v is None:
        return []
    items = v if isinstance(v, list) else [v]
    return [normalise_ref(x) for x in items]


def normalise_ref(x: Any) -> str:
    """A reference as a string; integer-valued numbers (``20000017``, ``20000017.0``) lose the decimals."""
    if isinstance(x, bool):
        raise TypeError("a reference cannot be a boolean")
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    if isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, str):
        s = x.strip()
        head, dot, tail = s.partition(".")
        if dot and head.isdigit() and tail and set(tail) == {"0"}:
            return head
        return s
    raise TypeError(f"a reference must be a string or a number, got {type(x).__name__}")


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<record>"


def check_record(raw: Any, index: int, file: str, modalities: Sequence[ModalityFields]) -> tuple[QARecord | None, list[RecordProblem]]:
    """Validate one raw record; return the record (None when unusable) and its problems."""
    problems: list[RecordProblem] = []

    def bad(field: str, msg: str) -> None:
        problems.append(RecordProblem(file, index, field, msg))

    if not isinstance(raw, dict):
        bad("<record>", f"must be a JSON object, got {type(raw).__name__}")
        return None, problems
    try:
        rec = QARecord.model_validate(raw)
    except ValidationError as err:
        for e in err.errors():
            bad(_field_path(tuple(e["loc"])), e["msg"])
        return None, problems
    rec._file, rec._index = file, index
    extra = rec.__pydantic_extra__ or {}
    q, a = rec.question, rec.answer
    for m in modalities:
        field, ph = m.record_field, m.placeholder
        value = extra.get(field)
        try:
            refs = _refs(extra, field)
        except TypeError as exc:
            bad(field, f"{exc}; allowed: a path or id, alone or in a one-element list")
            continue
        if isinstance(value, list) and len(value) > 1:
            bad(field, f"holds {len(value)} references; allowed: exactly one per modality")
            continue
        if refs and not refs[0]:
            bad(field, "is an empty string; allowed: a path or id")
            continue
        n = q.count(ph)
        if refs and n == 0:
            bad("messages[0].content", f"has no {ph} placeholder although field {field!r} references {refs[0]!r}")
        elif not refs and n > 0:
            bad(field, f"is missing or empty although the question holds the {ph} placeholder")
        elif n > 1:
            bad("messages[0].content", f"holds the {ph} placeholder {n} times; allowed: once")
        if ph in a:
            bad("messages[1].content", f"holds the placeholder {ph}; placeholders belong in the question only")
    return (None if problems else rec), problems


def read_qa_file(path: str | Path, modalities: Sequence[ModalityFields], *, label: str | None = None,
                 collect: bool = False) -> tuple[list[QARecord], list[RecordProblem]]:
    """Read a MedTVT-QA JSON list and validate every record.

    ``label``: how the file is named in messages (default: the path).  ``collect=False`` raises
    :class:`DataError` at the first problem; ``collect=True`` returns the good records and all
    problems.  Records without an ``id`` get ``"<file stem>:<index>"``; duplicate ids are problems.
    """
    p = Path(path)
    name = label or str(p)
    if not p.is_file():
        raise DataError(f"QA file {name} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"QA file {name} is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"QA file {name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, list):
        raise DataError(f"QA file {name}: top level must be a JSON list of records, got {type(data).__name__}")
    records: list[QARecord] = []
    problems: list[RecordProblem] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(data):
        rec, probs = check_record(raw, i, name, modalities)
        if rec is not None:
            if rec.id is None:
                rec.id = f"{p.stem}:{i}"
            if rec.id in seen:
                probs = [RecordProblem(name, i, "id", f"{rec.id!r} repeats record {seen[rec.id]}; ids must be unique")]
                rec = None
            else:
                seen[rec.id] = i
        if probs and not collect:
            raise DataError(str(probs[0]))
        problems.extend(probs)
        if rec is not None:
            records.append(rec)
    return records, problems


def write_qa_file(path: str | Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write records as a JSON list (UTF-8, atomically)."""
    atomic_write_text(path, json.dumps(list(records), indent=1, ensure_ascii=False))
