"""Built-in GRPO rewards: the reference's ``format`` and ``jaccard``, and normalised variants.

Each is a plain function with TRL's reward contract
``reward(prompts, completions, **kwargs) -> list[float | None]``, so it can be passed to
``trl.GRPOTrainer(reward_funcs=[...])`` as is, and TRL rewards can be registered here.

=====================  ================================================================
registered name        rule
=====================  ================================================================
``format``             the reference's ``format_reward`` (MedTVT-R1 ``grpo_train.py``)
``jaccard``            the reference's ``Jaccard_reward``
``format-strict``      each tag exactly once, whitespace allowed before/after the blocks
``jaccard-normalized`` one valid ``<answer>``, names matched up to case and whitespace
``exact_set``          normalised sets equal (1/0)
``disease_f1``         normalised per-sample F1
=====================  ================================================================

* ``completions``: plain strings or conversational message lists (TRL's two formats).
* Ground truth (label rewards only): the dataset column ``solution`` (TRL's name) or, if
  absent, ``answer`` (the medtvt dataset's assistant text).  ``None`` gives the reward
  ``None`` (TRL turns it into NaN: it adds nothing to the weighted sum and is left out of
  logged means).
* Reference rules (``format``, ``jaccard``): :func:`medtvt_core.answers.reference_format_ok`
  and :func:`~medtvt_core.answers.reference_labels`: the first ``<answer>`` block, labels
  compared as exact strings, no length cap; a ground truth without a block scores 0.0 as
  in the reference.  Ground truth must be text (a list of names raises ``ConfigError``).
* Normalised rules (the other four): :func:`medtvt_core.answers.answer_set`: exactly one
  ``<answer>`` block of at most 10,000 characters, names case-folded, whitespace collapsed,
  mapped to the canonical categories; a completion without it scores 0.  A ``solution``
  may also be a bare ``"A; B"`` list or a list of names; an ``answer`` (assistant text)
  without a valid block, or any invalid tagged text, gives ``None``.  Unknown names stay
  in the predicted set and count as wrong predictions.
* Extra kwargs TRL passes (``completion_ids``, ``trainer_state``, ``log_extra``,
  ``log_metric``, other dataset columns) are accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any, Callable

from medtvt_core import hookimpl
from medtvt_core.answers import (answer_set, completion_text, is_well_formatted, reference_format_ok,
                                 reference_labels)
from medtvt_core.errors import ConfigError

__all__ = ["format_reward", "jaccard_reward", "format_strict_reward", "jaccard_normalized_reward",
           "exact_set_reward", "disease_f1_reward", "REWARDS"]

LABEL_COLUMNS = ("solution", "answer")


def _truth_column(name: str, n: int, kwargs: dict[str, Any]) -> tuple[str, list[Any]]:
    for col in LABEL_COLUMNS:
        if kwargs.get(col) is not None:
            truths = list(kwargs[col])
            if len(truths) != n:
                raise ConfigError(
                    f"reward {name!r}: column {col!r} has {len(truths)} entries for {n} completions; "
                    "pass one ground truth per completion"
                )
            return col, truths
    cols = sorted(k for k in kwargs if k not in ("completion_ids", "trainer_state", "log_extra", "log_metric"))
    raise ConfigError(
        f"reward {name!r} needs a ground-truth column named 'solution' or 'answer'; got columns {cols}"
    )


def _truths(name: str, n: int, kwargs: dict[str, Any]) -> list[Any]:
    return _truth_column(name, n, kwargs)[1]


def _label_reward(name: str, completions: list[Any], kwargs: dict[str, Any],
                  score: Callable[[frozenset[str], frozenset[str]], float]) -> list[float | None]:
    col, truths = _truth_column(name, len(completions), kwargs)
    # `answer` is the dataset's assistant text: it must hold the block.  `solution` is TRL's
    # label column, where a bare "A; B" list is the usual form.
    bare_ok = col == "solution"
    out: list[float | None] = []
    for completion, truth in zip(completions, truths):
        gold = answer_set(truth, bare_ok=bare_ok)
        if gold is None:
            out.append(None)
            continue
        pred = answer_set(completion_text(completion))
        out.append(0.0 if pred is None else score(pred, gold))
    return out


def format_reward(prompts: list[Any] | None = None, completions: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """The reference's format reward: 1.0 iff ``<think>.*?</think>\\s*<answer>.*?</answer>`` fullmatches.

    Matched with ``re.DOTALL`` on the left-stripped completion: leading whitespace is
    allowed, trailing text (a newline too) is not, tags may repeat inside the blocks.

    >>> format_reward(completions=["<think> ST elevation </think>\\n<answer> Coronary Artery Disease </answer>",
    ...                            "<answer> Sepsis </answer>",
    ...                            "<think> a </think> text <answer> Sepsis </answer>",
    ...                            "<think> a </think><answer> Sepsis </answer>\\n",
    ...                            [{"role": "assistant", "content": "<think>a</think><answer>b</answer>"}]])
    [1.0, 0.0, 0.0, 0.0, 1.0]
    """
    return [1.0 if reference_format_ok(completion_text(c)) else 0.0 for c in completions or []]


def format_strict_reward(prompts: list[Any] | None = None, completions: list[Any] | None = None,
                         **kwargs: Any) -> list[float | None]:
    """1.0 iff the completion is ``<think>...</think>`` then ``<answer>...</answer>``, else 0.0.

    Whitespace may surround and separate the two blocks; each tag must occur exactly once.

    >>> format_strict_reward(completions=["<think> a </think>\\n<answer> Sepsis </answer>\\n",
    ...                                   "<think> a <think> b </think><answer> Sepsis </answer>"])
    [1.0, 0.0]
    """
    return [1.0 if is_well_formatted(completion_text(c)) else 0.0 for c in completions or []]


def _jaccard(p: AbstractSet[str], g: AbstractSet[str]) -> float:
    union = len(p | g)
    return len(p & g) / union if union else 0.0


def _reference_truth(name: str, truth: Any) -> str | None:
    if truth is None or isinstance(truth, str):
        return truth
    if isinstance(truth, (list, tuple)) and all(isinstance(m, dict) for m in truth):
        return completion_text(truth)  # a conversation: its assistant text
    raise ConfigError(f"reward {name!r} (the reference's rule) needs the ground truth as tagged text, got "
                      f"{type(truth).__name__}; use 'jaccard-normalized' for lists of names")


def jaccard_reward(prompts: list[Any] | None = None, completions: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """The reference's Jaccard reward: ``|P & G| / |P | G|`` of exact label strings.

    P, G: the first ``<answer>`` block of completion and ground truth, stripped, split on
    ``;``, labels stripped, empties dropped.  0.0 if either has no block or the union is
    empty; ``None`` only for a ``None`` ground truth.

    >>> jaccard_reward(completions=["<think>t</think><answer> Sepsis; Pneumonia </answer>",
    ...                             "<answer> sepsis </answer>", "no tags", "<answer> Sepsis </answer></answer>"],
    ...                solution=["<answer> Sepsis </answer>"] * 4)
    [0.5, 0.0, 0.0, 1.0]
    >>> jaccard_reward(completions=["<answer> Sepsis </answer>"] * 3, answer=["Sepsis", "<answer></answer>", None])
    [0.0, 0.0, None]
    """
    completions = completions or []
    out: list[float | None] = []
    for completion, truth in zip(completions, _truths("jaccard", len(completions), kwargs)):
        truth = _reference_truth("jaccard", truth)
        if truth is None:
            out.append(None)
            continue
        gold, pred = reference_labels(truth), reference_labels(completion_text(completion))
        out.append(0.0 if gold is None or pred is None else _jaccard(pred, gold))
    return out


def jaccard_normalized_reward(prompts: list[Any] | None = None, completions: list[Any] | None = None,
                              **kwargs: Any) -> list[float | None]:
    """``|P & G| / |P | G|`` of normalised disease sets; 0.0 if no valid answer or empty union.

    >>> jaccard_normalized_reward(completions=["<think>t</think><answer> Sepsis; Pneumonia </answer>",
    ...                                        "<answer> sepsis </answer>", "no tags", "<answer> Sepsis; Flu </answer>"],
    ...                           solution=["<answer> Sepsis </answer>"] * 4)
    [0.5, 1.0, 0.0, 0.5]
    >>> jaccard_normalized_reward(completions=["<answer>Sepsis</answer>"] * 3,
    ...                           answer=["<answer></answer>", "Sepsis", None])
    [0.0, None, None]
    """
    return _label_reward("jaccard-normalized", completions or [], kwargs, _jaccard)


def exact_set_reward(prompts: list[Any] | None = None, completions: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """1.0 iff the predicted disease set equals the true set (DeepSeek-R1-style accuracy), else 0.0.

    Two empty sets are equal (a correct "no disease" answer scores 1.0).

    >>> exact_set_reward(completions=["<answer> Pneumonia; SEPSIS </answer>", "<answer> Sepsis </answer>",
    ...                               "<answer></answer>"],
    ...                  solution=["Sepsis; Pneumonia", "Sepsis; Pneumonia", ""])
    [1.0, 0.0, 1.0]
    """
    return _label_reward("exact_set", completions or [], kwargs, lambda p, g: float(p == g))


def _f1(p: frozenset[str], g: frozenset[str]) -> float:
    if not p and not g:
        return 1.0
    tp = len(p & g)
    return 2.0 * tp / (len(p) + len(g))


def disease_f1_reward(prompts: list[Any] | None = None, completions: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """Per-sample F1 ``2|P & G| / (|P| + |G|)`` of predicted vs true set; 1.0 if both are empty.

    >>> disease_f1_reward(completions=["<answer> Sepsis; Pneumonia; Hypertension </answer>",
    ...                                "<answer> Flu </answer>", "<answer></answer>"],
    ...                   solution=["<answer> Sepsis; Pneumonia </answer>", "<answer> Sepsis </answer>",
    ...                             "<answer></answer>"])
    [0.8, 0.0, 1.0]
    """
    return _label_reward("disease_f1", completions or [], kwargs, _f1)


#: registered name -> reward function
REWARDS: dict[str, Callable[..., list[float | None]]] = {
    "format": format_reward,
    "jaccard": jaccard_reward,
    "format-strict": format_strict_reward,
    "jaccard-normalized": jaccard_normalized_reward,
    "exact_set": exact_set_reward,
    "disease_f1": disease_f1_reward,
}


@hookimpl
def medtvt_register_rewards(register):
    for name, fn in REWARDS.items():
        register(name, fn)
