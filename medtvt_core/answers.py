"""Parsing of ``<think> ... </think><answer> A; B </answer>`` texts, shared by rewards and metrics.

Rules (one place, so a reward and a metric never disagree):

* Tags are the exact lowercase strings ``<answer>`` / ``</answer>`` (``<think>`` / ``</think>``).
* A text has an answer only if it holds exactly one ``<answer>`` and exactly one ``</answer>``,
  opening before closing.  Several or nested ``<answer>`` tags make the answer invalid (``None``):
  a model must not hedge by listing several answers.
* The answer is a ``;``-separated list; items are stripped, inner whitespace is collapsed,
  empty items are dropped.  Names equal to a canonical disease up to case and whitespace
  become that canonical name; any other name is kept in a case-folded form (so it matches
  the same unknown name elsewhere, and counts as a wrong prediction against canonical truth).
* Everything is linear-time ``str`` work (``find``/``count``/``split``), no regular
  expressions, so a megabyte of model output costs well under a millisecond per scan.

The reference code's own rules (``grpo_train.py`` / ``evaluate.py`` of MedTVT-R1) are kept
apart, exactly, in :func:`reference_answer`, :func:`reference_labels` and
:func:`reference_format_ok`: its regexes, first match, exact case-sensitive labels, no cap.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterable

from .data.labels import DISEASES  # the data layer owns the 7 categories (paper order)

__all__ = [
    "DISEASES", "MAX_ANSWER_CHARS", "THINK_OPEN", "THINK_CLOSE", "ANSWER_OPEN", "ANSWER_CLOSE",
    "completion_text", "extract_answer", "parse_diseases", "answer_set", "is_well_formatted",
    "normalize_name", "REFERENCE_ANSWER_RE", "REFERENCE_FORMAT_RE", "reference_answer", "reference_labels",
    "reference_format_ok",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

#: An ``<answer>`` longer than this is not a disease list: :func:`answer_set` treats it as
#: invalid (``None``), which bounds the parse cost of runaway completions.
MAX_ANSWER_CHARS = 10_000


def completion_text(completion: Any) -> str:
    """Text of a plain or conversational completion (TRL's two formats).

    A string is returned as is; a message list gives the content of its last assistant
    message (last message if none has a role); content given as parts
    (``[{"type": "text", "text": ...}]``) is joined; ``None`` gives ``""``.

    >>> completion_text("<answer> Sepsis </answer>")
    '<answer> Sepsis </answer>'
    >>> completion_text([{"role": "assistant", "content": "hi"}])
    'hi'
    >>> completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    'ab'
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        msgs = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in msgs if m.get("role") == "assistant"]
        chosen = assistant[-1] if assistant else (msgs[-1] if msgs else None)
        return "" if chosen is None else _content_text(chosen.get("content"))
    return str(completion)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # multimodal parts
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return str(content)


def extract_answer(text: Any) -> str | None:
    """Stripped text between the single ``<answer>`` and ``</answer>``, else ``None``.

    ``None`` when a tag is missing, closes before it opens, or appears more than once.

    >>> extract_answer("<think> t </think><answer> Sepsis; Pneumonia </answer>")
    'Sepsis; Pneumonia'
    >>> extract_answer("no tags") is None
    True
    >>> extract_answer("<answer> A </answer><answer> B </answer>") is None
    True
    >>> extract_answer("<answer></answer>")
    ''
    """
    if not isinstance(text, str):
        return None
    i = text.find(ANSWER_OPEN)
    if i < 0:
        return None
    start = i + len(ANSWER_OPEN)
    j = text.find(ANSWER_CLOSE, start)
    if j < 0:
        return None
    if text.find(ANSWER_OPEN, start) >= 0 or text.find(ANSWER_CLOSE, j + 1) >= 0 or text.find(ANSWER_CLOSE, 0, i) >= 0:
        return None
    return text[start:j].strip()


def normalize_name(name: str) -> str:
    """Matching key of a disease name: inner whitespace collapsed, case folded.

    >>> normalize_name("  atrial   FIBRILLATION ")
    'atrial fibrillation'
    """
    return " ".join(name.split()).casefold()


@lru_cache(maxsize=16)
def _canonical_map(vocabulary: tuple[str, ...]) -> dict[str, str]:
    return {normalize_name(d): d for d in vocabulary}


def parse_diseases(text: str | None, vocabulary: Iterable[str] = DISEASES) -> set[str]:
    """Set of names in a ``;``-separated list (not the tagged text: see :func:`answer_set`).

    Known names (up to case/whitespace) become their canonical spelling in ``vocabulary``;
    unknown ones are kept normalised (:func:`normalize_name`).

    >>> sorted(parse_diseases(" sepsis ;; PNEUMONIA; Flu ;"))
    ['Pneumonia', 'Sepsis', 'flu']
    >>> parse_diseases("")
    set()
    """
    if not text:
        return set()
    canon = _canonical_map(tuple(vocabulary))
    out: set[str] = set()
    for item in text.split(";"):
        key = normalize_name(item)
        if key:
            out.add(canon.get(key, key))
    return out


def answer_set(value: Any, *, bare_ok: bool = False, vocabulary: Iterable[str] = DISEASES) -> frozenset[str] | None:
    """Disease set of a tagged text, a bare list or an iterable of names; ``None`` if none.

    * ``str`` with tags: the parsed ``<answer>`` content; invalid/missing answer, or one
      longer than :data:`MAX_ANSWER_CHARS`, -> ``None``.
    * ``str`` without any of the four tags: parsed as a bare ``A; B`` list if ``bare_ok``
      (labels columns such as TRL's ``solution``), else ``None``.  A text with a
      ``<think>`` block but no valid answer is a broken report, never a bare list: ``None``.
    * set/list/tuple of names: normalised like :func:`parse_diseases`; a list of message
      dicts is a conversation: its assistant text (:func:`completion_text`).
    * ``None`` -> ``None``.

    >>> sorted(answer_set("<answer> Sepsis </answer>"))
    ['Sepsis']
    >>> answer_set("Sepsis") is None, sorted(answer_set("Sepsis", bare_ok=True))
    (True, ['Sepsis'])
    >>> sorted(answer_set(["hypertension", "Sepsis"]))
    ['Hypertension', 'Sepsis']
    """
    if value is None:
        return None
    if isinstance(value, str):
        ans = extract_answer(value)
        if ans is None:
            if bare_ok and len(value) <= MAX_ANSWER_CHARS and not any(t in value for t in _TAGS):
                return frozenset(parse_diseases(value, vocabulary))
            return None
        if len(ans) > MAX_ANSWER_CHARS:
            return None
        return frozenset(parse_diseases(ans, vocabulary))
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        return answer_set(completion_text(value), bare_ok=bare_ok, vocabulary=vocabulary)  # a conversation
    if isinstance(value, (set, frozenset, list, tuple)):
        canon = _canonical_map(tuple(vocabulary))
        keys = (normalize_name(str(v)) for v in value if v is not None)
        return frozenset(canon.get(k, k) for k in keys if k)
    return answer_set(completion_text(value), bare_ok=bare_ok, vocabulary=vocabulary)


def is_well_formatted(text: Any) -> bool:
    """True iff ``text`` is exactly ``<think>...</think>`` then ``<answer>...</answer>``.

    Whitespace is allowed before, between and after the two blocks; each of the four tags
    must occur exactly once.

    >>> is_well_formatted(" <think> r </think>\\n<answer> Sepsis </answer>\\n")
    True
    >>> is_well_formatted("<think> r </think> so: <answer> Sepsis </answer>")
    False
    >>> is_well_formatted("<think> r </think><answer> A </answer><answer> B </answer>")
    False
    """
    if not isinstance(text, str):
        return False
    s = text.strip()
    if not (s.startswith(THINK_OPEN) and s.endswith(ANSWER_CLOSE)):
        return False
    for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE):
        if s.count(tag) != 1:
            return False
    tc = s.find(THINK_CLOSE)
    ao = s.find(ANSWER_OPEN)
    return tc < ao and not s[tc + len(THINK_CLOSE):ao].strip()


# ----------------------------------------------------------------------------- the reference's rules
#: ``grpo_train.py`` / ``evaluate.py``: the first ``<answer>`` block (non-greedy, across lines).
REFERENCE_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
#: ``grpo_train.py``'s format rule, used with ``fullmatch`` on the left-stripped completion.
REFERENCE_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def reference_answer(text: str) -> str | None:
    """Group 1 of ``REFERENCE_ANSWER_RE.search(text)`` (unstripped), ``None`` without a match.

    Same result as the bare search, in linear time: when no ``</answer>`` follows the first
    ``<answer>``, no later ``<answer>`` can match either, but the regex engine would retry
    from each of them and rescan the rest of the text (quadratic on 1 MB of open tags).

    >>> reference_answer("<answer> A </answer><answer> B </answer>")
    ' A '
    >>> reference_answer("</answer> x <answer> A") is None
    True
    """
    i = text.find(ANSWER_OPEN)
    if i < 0 or text.find(ANSWER_CLOSE, i + len(ANSWER_OPEN)) < 0:
        return None
    return REFERENCE_ANSWER_RE.search(text, i).group(1)  # matches at i: a close tag follows


def reference_labels(text: str) -> set[str] | None:
    """Label set of the reference: first answer, ``strip``, ``split(";")``, strip, drop empties.

    Labels are compared as exact strings (case, inner spaces and unknown names kept).
    ``None`` when the text has no ``<answer>...</answer>``.

    >>> sorted(reference_labels("<think>t</think><answer> Sepsis ; sepsis;; </answer>"))
    ['Sepsis', 'sepsis']
    >>> reference_labels("Sepsis") is None
    True
    """
    ans = reference_answer(text)
    if ans is None:
        return None
    # = {x.strip() for x in ans.strip().split(";") if x.strip()}: the outer strip only trims
    # the first and last items, which their own strip trims anyway (one pass, no double strip)
    labels = set(map(str.strip, ans.split(";")))
    labels.discard("")
    return labels


def reference_format_ok(text: str) -> bool:
    """``REFERENCE_FORMAT_RE.fullmatch(text.lstrip())`` matches.

    Anything (tags included) may sit inside the two blocks; only whitespace between them and
    before the first; nothing, not even a newline, after the last ``</answer>``.  The
    ``endswith`` test gives the same answer as the regex alone (the pattern ends with that
    literal) and spares it a rescan of the text from every ``</think>`` when it would fail.

    >>> reference_format_ok(" <think> a </think>\\n<answer> B </answer>")
    True
    >>> reference_format_ok("<think> a </think><answer> B </answer>\\n")
    False
    """
    s = text.lstrip()
    return s.endswith(ANSWER_CLOSE) and REFERENCE_FORMAT_RE.fullmatch(s) is not None
