"""Built-in GRPO rewards: ``format``, ``jaccard`` (MedTVT-R1) and ``exact_set``, ``disease_f1``.

Each is a plain function with TRL's reward contract
``reward(prompts, completions, **kwargs) -> list[float | None]``, so it can be passed to
``trl.GRPOTrainer(reward_funcs=[...])`` as is, and TRL rewards can be registered here.

* ``completions``: plain strings or conversational message lists (TRL's two formats).
* Ground truth (label rewards only): the dataset column ``solution`` (TRL's name) or, if
  absent, ``answer`` (the medtvt dataset's assistant text).  An entry may be the tagged
  assistant text, a bare ``"A; B"`` list or a list of names; ``None`` or an invalid tagged
  text gives the reward ``None`` (TRL turns it into NaN: it adds nothing to the weighted
  sum and is left out of logged means).
* A completion without a single valid ``<answer>`` block scores 0.  Unknown disease names
  stay in the predicted set and count as wrong predictions.
* Extra kwargs TRL passes (``completion_ids``, ``trainer_state``, ``log_extra``,
  ``log_metric``, other dataset columns) are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Callable

from medtvt_core import hookimpl
from medtvt_core.answers import answer_set, completion_text, is_well_formatted
from medtvt_core.errors import ConfigError

__all__ = ["format_reward", "jaccard_reward", "exact_set_reward", "disease_f1_reward", "REWARDS"]

LABEL_COLUMNS = ("solution", "answer")


def _truths(name: str, n: int, kwargs: dict[str, Any]) -> list[Any]:
    for col in LABEL_COLUMNS:
        if kwargs.get(col) is not None:
            truths = list(kwargs[col])
            if len(truths) != n:
                raise ConfigError(
                    f"reward {name!r}: column {col!r} has {len(truths)} entries for {n} completions; "
                    "pass one ground truth per completion"
                )
            return truths
    cols = sorted(k for k in kwargs if k not in ("completion_ids", "trainer_state", "log_extra", "log_metric"))
    raise ConfigError(
        f"reward {name!r} needs a ground-truth column named 'solution' or 'answer'; got columns {cols}"
    )


def _label_reward(name: str, completions: list[Any], kwargs: dict[str, Any],
                  score: Callable[[frozenset[str], frozenset[str]], float]) -> list[float | None]:
    truths = _truths(name, len(completions), kwargs)
    out: list[float | None] = []
    for completion, truth in zip(completions, truths):
        gold = answer_set(truth, bare_ok=True)
        if gold is None:
            out.append(None)
            continue
        pred = answer_set(completion_text(completion))
        out.append(0.0 if pred is None else score(pred, gold))
    return out


def format_reward(prompts: list[Any] | None = None, completions: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """1.0 iff the completion is ``<think>...</think>`` then ``<answer>...</answer>``, else 0.0.

    Whitespace may surround and separate the two blocks; each tag must occur exactly once.

    >>> format_reward(completions=["<think> ST elevation </think>\\n<answer> Coronary Artery Disease </answer>",
    ...                            "<answer> Sepsis </answer>",
    ...                            "<think> a </think> text <answer> Sepsis </answer>",
    ...                            [{"role": "assistant", "content": "<think>a</think><answer>b</answer>"}]])
    [1.0, 0.0, 0.0, 1.0]
    """
    return [1.0 if is_well_formatted(completion_text(c)) else 0.0 for c in completions or []]


def _jaccard(p: frozenset[str], g: frozenset[str]) -> float:
    union = len(p | g)
    return len(p & g) / union if union else 0.0


def jaccard_reward(prompts: list[Any] | None = None, completions: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """``|P & G| / |P | G|`` of predicted and true disease sets; 0.0 if no answer or empty union.

    >>> jaccard_reward(completions=["<think>t</think><answer> Sepsis; Pneumonia </answer>",
    ...                             "<answer> sepsis </answer>", "no tags", "<answer> Sepsis; Flu </answer>"],
    ...                solution=["<answer> Sepsis </answer>"] * 4)
    [0.5, 1.0, 0.0, 0.5]
    >>> jaccard_reward(completions=["<answer></answer>", "<answer>Sepsis</answer>"], answer=["<answer></answer>", None])
    [0.0, None]
    """
    return _label_reward("jaccard", completions or [], kwargs, _jaccard)


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
    "exact_set": exact_set_reward,
    "disease_f1": disease_f1_reward,
}


@hookimpl
def medtvt_register_rewards(register):
    for name, fn in REWARDS.items():
        register(name, fn)
