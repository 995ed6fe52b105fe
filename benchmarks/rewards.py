"""Per-completion cost of the built-in rewards, normal and 1 MB completions.

Run: ``python benchmarks/rewards.py``.  Prints microseconds per scored completion (best of
several repeats, one completion per call) and the ratio of each 1 MB case to the normal case.
"""

from __future__ import annotations

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
}


def per_call_us(fn, completion: str, number: int) -> float:
    t = timeit.Timer(lambda: fn(prompts=["q"], completions=[completion], solution=[TRUTH], completion_ids=[[0]]))
    return min(t.repeat(repeat=5, number=number)) / number * 1e6


def main() -> None:
    names = list(REWARDS)
    print(f"{'case':26s}" + "".join(f"{n:>14s}" for n in names) + "   (us per completion)")
    base: dict[str, float] = {}
    for case, text in CASES.items():
        number = 2000 if len(text) < 10_000 else 20
        row = {n: per_call_us(REWARDS[n], text, number) for n in names}
        if not base:
            base = row
        cells = "".join(f"{row[n]:14.1f}" for n in names)
        ratio = "" if row is base else "   x" + "/".join(f"{row[n] / base[n]:.1f}" for n in names)
        print(f"{case:26s}{cells}{ratio}")


if __name__ == "__main__":
    main()
