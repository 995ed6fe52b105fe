"""Counterfactual modality attributions: how much naming a disease depends on each modality.

For a modality ``m`` the model is run again with ``m`` masked, exactly as an absent modality is
presented to it (its tokens left out of the fusion, its placeholder replaced by
``"(<m> not available)"``), and the reports are generated again: a change in whether a disease is
named goes through the whole report, reasoning included, unlike a teacher-forced score of a
fixed answer.  Unless it trained with modality dropout (docs/partial_patients.md), the model never
saw masked inputs, so this is an occlusion test of the trained model, not a property of the data.

* :func:`dataset_attribution` (``report.md``): per disease, among test records whose reference
  holds it, the share whose greedy report names it with every modality, and without each one.
* :func:`patient_attribution` (``medtvt diagnose``): per disease, the probability of naming it,
  estimated from ``samples`` sampled reports per condition (seeded), with all and without each
  given modality.

The CAO gates are reported next to these numbers; a gate is a per-sample scale of a modality's
tokens, which the LLM can undo, so it is no measure of use by itself.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from ..answers import answer_set
from ..data.dataset import absent_text
from ..data.labels import DISEASES
from ..model.generation import generate_reports

__all__ = ["mask_modality", "dataset_attribution", "patient_attribution", "gate_check", "GATE_CRITERION"]

#: When the CAO gates count as informative (report.md says so in words when they are not).
GATE_CRITERION = ("the gates are informative when (1) fewer than half of the (disease, modality) gate means "
                  "are saturated (above 0.95 or below 0.05), (2) they vary between diseases (mean over "
                  "modalities of the range of a modality's gate across diseases >= 0.05), and (3) they rank the "
                  "(disease, modality) pairs like the counterfactual drop does: Spearman rho > 0 with one-sided "
                  "p < 0.05")


def mask_modality(batch: Mapping[str, Any], modalities: Sequence[str], placeholders: Mapping[str, str],
                  m: str) -> dict[str, Any]:
    """A copy of a collated batch with modality ``m`` absent in every sample."""
    j = list(modalities).index(m)
    mask = batch["modality_mask"].clone()
    mask[:, j] = False
    drop = lambda d: {k: v for k, v in (d or {}).items() if k != m}  # noqa: E731
    prompts = [p.replace(placeholders[m], absent_text(m)) for p in batch["prompts"]]
    return {**batch, "prompts": prompts, "modality_mask": mask, "modality_inputs": drop(batch.get("modality_inputs")),
            "modality_features": drop(batch.get("modality_features"))}


@torch.no_grad()
def _named(model: Any, processor: Any, batch: Mapping[str, Any], *, max_new_tokens: int, samples: int = 0,
           temperature: float = 1.0, constrain: bool = False) -> list[list[frozenset[str]]]:
    """Per sample, the disease sets named by its reports (greedy: one; ``samples`` > 0: that many)."""
    g = max(samples, 1)
    made = generate_reports(model, processor, batch, do_sample=samples > 0, temperature=temperature,
                            num_return_sequences=g, max_new_tokens=max_new_tokens, constrain=constrain)
    sets = [s or frozenset() for s in made.answer_sets()]
    return [sets[i * g:(i + 1) * g] for i in range(len(batch["prompts"]))]


def dataset_attribution(model: Any, processor: Any, dataset: Any, *, batch_size: int, max_new_tokens: int,
                        limit: int | None = None, diseases: Sequence[str] = DISEASES,
                        constrain: bool = False) -> dict[str, Any]:
    """``{"method", "per_disease": {d: {"n", "named": rate with all, "named_without": {m: rate},
    "delta": {m: named - named_without[m]}}}}`` over records whose reference holds ``d``."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size,
                                         shuffle=False, collate_fn=dataset.collator())
    was = model.training
    model.eval()
    counts = {d: {"n": 0, "all": 0, **{m: 0 for m in model.modalities}} for d in diseases}
    for batch in loader:
        if not batch["ids"]:
            continue
        full = _named(model, processor, batch, max_new_tokens=max_new_tokens, constrain=constrain)
        without = {m: _named(model, processor, mask_modality(batch, model.modalities, processor.placeholders, m),
                             max_new_tokens=max_new_tokens, constrain=constrain)
                   for j, m in enumerate(model.modalities) if bool(batch["modality_mask"][:, j].any())}
        for i, ref in enumerate(batch["answers"]):
            truth = answer_set(ref) or frozenset()
            for d in truth & set(diseases):
                c = counts[d]
                c["n"] += 1
                c["all"] += d in full[i][0]
                for m, w in without.items():
                    c[m] += d in w[i][0]
    model.train(was)
    per: dict[str, Any] = {}
    for d, c in counts.items():
        if not c["n"]:
            continue
        named = c["all"] / c["n"]
        wo = {m: c[m] / c["n"] for m in model.modalities}
        per[d] = {"n": c["n"], "named": named, "named_without": wo, "delta": {m: named - v for m, v in wo.items()}}
    return {"method": "greedy re-generation with each modality masked; records whose reference holds the disease",
            "per_disease": per}


def patient_attribution(model: Any, processor: Any, batch: Mapping[str, Any], report: str | None = None, *,
                        samples: int = 8, seed: int = 0, temperature: float = 1.0,
                        max_new_tokens: int | None = None, diseases: Sequence[str] = DISEASES,
                        progress: Callable[[int, str], None] | None = None, constrain: bool = False) -> dict[str, Any]:
    """``{"method", "samples", "p_named": {d: p}, "p_named_without": {m: {d: p}}, "delta": {d: {m: dp}},
    "other_names": n}`` for one patient (``batch`` of one sample); ``d`` runs over the ``diseases`` named
    in any report; ``other_names`` counts the sampled reports that name something outside them.
    ``progress(k, what)`` is called after the k-th condition (1: every modality) is sampled. ``constrain``:
    sample under the report grammar (:func:`~medtvt_core.model.generation.report_constraint`)."""
    mnt = max_new_tokens or processor.max_new_tokens
    given = [m for j, m in enumerate(model.modalities) if bool(batch["modality_mask"][0, j])]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        full = _named(model, processor, batch, max_new_tokens=mnt, samples=samples, temperature=temperature,
                      constrain=constrain)[0]
        wo = {}
        for k, m in enumerate(given if len(given) > 1 else []):
            if progress:
                progress(1 + k, f"sampling reports without {m}")
            wo[m] = _named(model, processor, mask_modality(batch, model.modalities, processor.placeholders, m),
                           max_new_tokens=mnt, samples=samples, temperature=temperature, constrain=constrain)[0]
    reports = [*full, *(s for v in wo.values() for s in v)]
    # Sampled reports may name things outside the vocabulary ("disease", a misspelling): they are no
    # disease to attribute, so they are counted, not listed (the metrics count them as wrong names).
    named = set().union(*reports, answer_set(report or "") or ()) & set(diseases)
    rate = lambda sets, d: sum(d in s for s in sets) / len(sets)  # noqa: E731
    p = {d: rate(full, d) for d in sorted(named)}
    pw = {m: {d: rate(s, d) for d in sorted(named)} for m, s in wo.items()}
    return {"method": f"{samples} sampled reports (temperature {temperature:g}, seed {seed}) per condition",
            "samples": samples, "p_named": p, "p_named_without": pw,
            "delta": {d: {m: p[d] - pw[m][d] for m in pw} for d in p},
            "other_names": sum(bool(s - set(diseases)) for s in reports)}


def gate_check(weights: Mapping[str, Mapping[str, float]], attribution: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Whether the mean CAO gates per (disease, modality) say what the counterfactual drops say
    (:data:`GATE_CRITERION`): ``{"pairs", "saturated_share", "spread", "spearman_rho", "spearman_p",
    "informative", "criterion"}``; None without gates or attributions to compare."""
    from scipy.stats import spearmanr

    per = (attribution or {}).get("per_disease", {})
    pairs = [(float(w[m]), float(per[d]["delta"][m])) for d, w in weights.items() if d in per
             for m in w if m in per[d].get("delta", {})]
    if len(pairs) < 3:
        return None
    gates = [g for g, _ in pairs]
    drops = [x for _, x in pairs]
    sat = sum(g > 0.95 or g < 0.05 for g in gates) / len(gates)
    mods = sorted({m for w in weights.values() for m in w})
    ranges = [max(v) - min(v) for m in mods if len(v := [w[m] for w in weights.values() if m in w]) > 1]
    spread = sum(ranges) / len(ranges) if ranges else 0.0
    rho = p = None
    if len(set(gates)) > 1 and len(set(drops)) > 1:
        r = spearmanr(gates, drops, alternative="greater")
        rho, p = float(r.statistic), float(r.pvalue)
    ok = sat < 0.5 and spread >= 0.05 and rho is not None and rho > 0 and p is not None and p < 0.05
    return {"pairs": len(pairs), "saturated_share": sat, "spread": spread, "spearman_rho": rho, "spearman_p": p,
            "informative": ok, "criterion": GATE_CRITERION}


def gate_sentence(check: Mapping[str, Any]) -> str:
    """One sentence for report.md: whether the gates are informative, with the numbers."""
    rho = "undefined (constant gates or drops)" if check["spearman_rho"] is None else \
        f"{check['spearman_rho']:+.2f} (one-sided p = {check['spearman_p']:.3f})"
    nums = (f"{check['saturated_share']:.0%} of the {check['pairs']} (disease, modality) gate means saturated, "
            f"spread across diseases {check['spread']:.3f}, Spearman rho between gate and drop when masked {rho}")
    if check["informative"]:
        return f"The CAO gates are informative by the criterion below: {nums}. Criterion: {check['criterion']}."
    return (f"The CAO gates are not informative: they do not say which modality a diagnosis used ({nums}); read "
            f"the masking columns instead. Criterion: {check['criterion']}.")
