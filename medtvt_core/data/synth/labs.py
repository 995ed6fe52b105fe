"""Lab values of a patient and the lab report."""

from __future__ import annotations

import math

import numpy as np

from .patients import ARF, CREAT, DM, GLUCOSE, _KEY_LABS, LAB_IDS, _lab_name, lab_reference_range, _LAB_PARAMS, LACTATE, Patient, UREA, WBC

# --------------------------------------------------------------------------- labs
def sample_labs(p: Patient, rng: np.random.Generator, evidence: float = 1.0) -> dict[str, float]:
    """Measured raw lab values (missing labs are absent); ``evidence`` scales every disease's shifts."""
    d, signs, k = set(p.diseases), p.signs, evidence
    val: dict[str, float] = {}
    for item in LAB_IDS:
        _, c, s, lognormal, _, _ = _LAB_PARAMS[item]
        val[item] = c * math.exp(rng.normal(0, s)) if lognormal else c + rng.normal(0, s)
    base = dict(val)

    if DM in d:
        # Uncontrolled diabetes: hyperglycaemia plus its chemistry (dilutional low sodium and
        # chloride, mild ketosis: anion gap up, bicarbonate down; osmotic diuresis: low Mg, low PO4).
        # Several labs together give a margin a small model finds, unlike one percentile alone.
        g = max(160.0, rng.normal(245, 50))
        val[GLUCOSE] = g
        val["50983"] -= 0.024 * (g - 100)
        val["50902"] -= 3
        val["50868"] += 4
        val["50882"] -= 4
        val["50804"] -= 4
        val["50971"] += 0.4
        val["50960"] -= 0.3
        val["50970"] -= 0.7
    if ARF in d:
        val[CREAT] = min(6.0, max(1.8, 3.0 * math.exp(rng.normal(0, 0.3))))
        val[UREA] = min(100.0, max(35.0, rng.normal(64, 15)))
        val["50971"] += 0.7
        val["50882"] -= 4
        val["50804"] -= 4
        val["50970"] += 1.3
        val["50868"] += 3
        val["51222"] -= 1.0
    if "sep_lab" in signs:
        val[LACTATE] = min(9.0, max(2.3, 4.0 * math.exp(rng.normal(0, 0.3))))
        val[WBC] = min(30.0, max(13.0, rng.normal(19, 4)))
        val["51256"] = min(95.0, rng.normal(86, 4))
        val["51244"] = max(2.0, rng.normal(7, 3))
        val["52135"] = val["52135"] * 4
        val["51265"] -= 70
        val["50820"] -= 0.07
        val["50882"] -= 3
        val["50802"] -= 5
    elif "pna_lab" in signs:
        val[WBC] = min(22.0, max(11.5, rng.normal(14.5, 2.5)))
        val["51256"] = min(92.0, rng.normal(80, 5))
        val["51244"] = max(4.0, rng.normal(12, 4))
    if "pna_lab" in signs:
        val["50821"] -= 15
    if k != 1.0:  # every shift from the patient's own normal value, scaled (log-normal labs in log space)
        for item in LAB_IDS:
            x, b = val[item], base[item]
            if x != b:
                val[item] = b * math.exp(k * math.log(x / b)) if (_LAB_PARAMS[item][3] and x > 0 and b > 0) else b + k * (x - b)
    # Absolute counts follow the white cells and the differential.
    val["52075"] = val[WBC] * val["51256"] / 100
    val["51133"] = val[WBC] * val["51244"] / 100
    out: dict[str, float] = {}
    forced = {lab for key in (*d, *signs) for lab in _KEY_LABS.get(key, ())}
    for item in LAB_IDS:
        dec, p_missing = _LAB_PARAMS[item][4:]
        if item in ("50802", "50804", "50818", "50820", "50821") and "sep_lab" in signs:
            # blood gases are drawn for septic patients
            p_missing = 0.2 if k == 1.0 else min(1.0, max(0.0, p_missing + k * (0.2 - p_missing)))
        if item in forced:
            if k < 1.0 and rng.random() < (1.0 - k) * p_missing:  # weak evidence: key labs may be missing
                continue
        elif rng.random() < p_missing:
            continue
        x = val[item]
        if item != "50802":  # base excess may be negative; concentrations stay positive
            x = max(x, 10 ** -dec)
        out[item] = round(x, dec)
    return out


def lab_answer(labs: dict[str, float], *, max_items: int = 6, causes: dict[str, str] | None = None) -> str:
    """Panel summary: counts, the most abnormal results (value, direction, reference range);
    ``causes``: decoy sign -> the other cause the history gives for it."""
    abnormal: list[tuple[float, str, float, str]] = []
    for item, x in labs.items():
        lo, hi = lab_reference_range(item)
        if x > hi or x < lo:
            _, c, s, lognormal, _, _ = _LAB_PARAMS[item]
            z = (math.log(max(x, 1e-9) / c) if lognormal else (x - c)) / s
            abnormal.append((abs(z), item, x, "high" if x > hi else "low"))
    abnormal.sort(key=lambda a: -a[0])
    shown = [(i, x, hl) for _, i, x, hl in abnormal[:max_items]]
    n_missing = len(LAB_IDS) - len(labs)
    parts = [f"Laboratory panel: {len(labs)} of {len(LAB_IDS)} tests measured, {n_missing} not measured."]
    if shown:
        items = "; ".join(f"{_lab_name(i)} {_fmt(i, x)} ({hl}, reference {_fmt_range(i)})" for i, x, hl in shown)
        parts.append(f"Abnormal: {items}.")
        more = len(abnormal) - len(shown)
        parts.append(f"{more} further result(s) are outside the reference range." if more > 0
                     else "All other measured results are within reference ranges.")
    else:
        parts.append("All measured results are within reference ranges.")
    causes = causes or {}
    if "sep_lab" in causes and _high(labs, LACTATE):
        parts.append(f"The history attributes the raised lactate to {causes['sep_lab']}.")
    if "pna_lab" in causes and _high(labs, WBC):
        parts.append(f"The history attributes the raised white cells to {causes['pna_lab']}.")
    return " ".join(parts)


def _high(labs: dict[str, float], item: str) -> bool:
    return item in labs and labs[item] > lab_reference_range(item)[1]


def _fmt(item: str, x: float) -> str:
    unit, *_, dec, _ = _LAB_PARAMS[item]
    return f"{x:.{dec}f} {unit}".strip()


def _fmt_range(item: str) -> str:
    lo, hi = lab_reference_range(item)
    dec = _LAB_PARAMS[item][4]
    return f"{lo:.{dec}f}-{hi:.{dec}f}"
