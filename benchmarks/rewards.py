"""Per-completion cost of the built-in rewards, normal and 1 MB completions.

Run: ``python benchmarks/rewards.py``.  Prints microseconds per scored completion (best of
several repeats, one completion per call) and the ratio of each 1 MB case to the normal
case.  Then the reason for the guards in :func:`medtvt_core.answers.reference_answer` and
:func:`~medtvt_core.answers.reference_format_ok`: the bare reference regex on growing inputs
of its worst kind (time grows with the square of the size) against ours (linear).
"""

from __future__ import annotations

import re
import timeit

from medtvt_plugins.rewards.builtin import REWARDS

MB = 1 << 20
THINK = ("The ECG shows an irregularly irregular rhythm without P waves; the chest film shows a "
         "right lower lobe consolidation; lactate and white cells are raised. ") * 12  # ~300 words
NORMAL = f"<think> {THINK} </think>\n<answer> Atrial Fibrillation; Pneumonia; Sepsis </answer>"
TRUTH = "<think> ... </think><answer> Atrial Fibrillation; Sepsis; Hypertension </answer>"

CASES = {
    "normal (~2 KB)": NORMAL,
    "1 MB, no tags": "x" * MB,
    "1 MB inside <think>": f"<think> {'y' * MB} </think><answer> Sepsis </answer>",
    "1 MB inside <answer>": f"<think> t </think><answer> {'Sepsis; ' * (MB // 8)} </answer>",
    "1 MB of <answer> tags": "<answer> Sepsis </answer>" * (MB // 25),
    "1 MB, 1 tag at the end": "z" * MB + "<think> t </think><answer> Sepsis </answer>",
    "1 MB of open <answer>": "<answer>" * (MB // 8),
    "1 MB, no final </answer>": "<think>" + "</think><answer> Sepsis </answer> x" * (MB // 36),
}


def per_call_us(fn, completion: str, number: int) -> float:
    t = timeit.Timer(lambda: fn(prompts=["q"], completions=[completion], solution=[TRUTH], completion_ids=[[0]]))
    return min(t.repeat(repeat=5, number=number)) / number * 1e6


def table() -> None:
    names = list(REWARDS)
    print(f"{'case':26s}" + "".join(f"{n:>20s}" for n in names) + "   (us per completion)")
    base: dict[str, float] = {}
    for case, text in CASES.items():
        number = 2000 if len(text) < 10_000 else 5
        row = {n: per_call_us(REWARDS[n], text, number) for n in names}
        if not base:
            base = row
        cells = "".join(f"{row[n]:20.1f}" for n in names)
        ratio = "" if row is base else "   x" + "/".join(f"{row[n] / base[n]:.0f}" for n in names)
        print(f"{case:26s}{cells}{ratio}")


def best_ms(fn) -> float:
    return min(timeit.repeat(fn, number=1, repeat=3)) * 1e3


def naive_vs_guarded() -> None:
    """The bare regexes of the reference against ours on their worst inputs, 16-64 KB."""
    answer_re = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
    format_re = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
    jac, fmt = REWARDS["jaccard"], REWARDS["format"]
    print("\nworst cases, ms per completion: bare reference regex vs ours")
    for kb in (16, 32, 64):
        opens = "<answer>" * (kb * 1024 // 8)
        closes = "<think>" + "</think><answer> a </answer> x" * (kb * 1024 // 30)
        t_naive_j = best_ms(lambda o=opens: answer_re.search(o))
        t_ours_j = best_ms(lambda o=opens: jac(completions=[o], solution=[TRUTH]))
        t_naive_f = best_ms(lambda c=closes: format_re.fullmatch(c))
        t_ours_f = best_ms(lambda c=closes: fmt(completions=[c]))
        print(f"{kb:3d} KB  jaccard (open tags) {t_naive_j:9.1f} vs {t_ours_j:6.3f}   "
              f"format (no final tag) {t_naive_f:9.1f} vs {t_ours_f:6.3f}")


if __name__ == "__main__":
    table()
    naive_vs_guarded()
