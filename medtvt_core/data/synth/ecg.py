"""ECG findings, 12-lead rendering, WFDB writing and the ECG report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..formats import MIMIC_IV_ECG_LEADS
from .patients import AF, CAD, ECG_FS, ECG_SECONDS, Patient, _toward

# --------------------------------------------------------------------------- ECG
_FRONTAL_ANGLE = {"I": 0.0, "II": 60.0, "III": 120.0, "aVR": -150.0, "aVF": 90.0, "aVL": -30.0}
_PRECORDIAL = ("V1", "V2", "V3", "V4", "V5", "V6")
_R_PREC = np.array([0.2, 0.4, 0.7, 1.1, 1.35, 1.1])
_S_PREC = np.array([-0.9, -1.3, -0.9, -0.5, -0.25, -0.1])
_T_PREC = np.array([-0.05, 0.25, 0.35, 0.35, 0.3, 0.25])
_P_PREC = np.array([0.05, 0.08, 0.08, 0.08, 0.08, 0.07])
_TERRITORIES = {"inferolateral": ("II", "III", "aVF", "V4", "V5", "V6"),
                "lateral": ("I", "aVL", "V4", "V5", "V6"),
                "anterolateral": ("V2", "V3", "V4", "V5", "V6", "I")}


def ecg_findings(p: Patient, rng: np.random.Generator, evidence: float = 1.0) -> dict[str, Any]:
    """What the ECG will show, from the patient's diseases and signs (``evidence``: sign strength)."""
    d, s, k = set(p.diseases), p.signs, evidence
    f: dict[str, Any] = {"evidence": k}
    if AF in d:
        f["rhythm"], f["hr"] = "atrial fibrillation", _toward(rng.uniform(110, 160), 76.5, k)
    elif "sep_ecg" in s:
        f["rhythm"], f["hr"] = "sinus tachycardia", _toward(rng.uniform(106, 130), 76.5, k)
        if f["hr"] <= 100:  # a weak sign: the rate no longer meets the definition
            f["rhythm"] = "sinus rhythm"
    else:
        f["rhythm"], f["hr"] = "sinus rhythm", rng.uniform(58, 95)
    f["axis"] = float(rng.uniform(-45, 5) if ("htn_ecg" in s and rng.random() < 0.5) else rng.uniform(15, 80))
    f["voltage"] = float(_toward(rng.uniform(1.9, 2.4), 1.0, k) if "htn_ecg" in s else rng.uniform(0.85, 1.15))
    if CAD in d:
        f["territory"] = str(rng.choice(sorted(_TERRITORIES)))
        f["st_depression"] = float(rng.uniform(0.15, 0.3)) * k
        f["t_inversion"] = float(rng.uniform(0.2, 0.4)) * k
    else:
        f["territory"], f["st_depression"], f["t_inversion"] = None, 0.0, 0.0
    return f


def render_ecg(f: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Signal ``[5000, 12]`` in mV (MIMIC-IV-ECG lead order) and measured rate/RR/voltage."""
    fs, n = ECG_FS, ECG_FS * ECG_SECONDS
    leads = MIMIC_IV_ECG_LEADS
    af = f["rhythm"] == "atrial fibrillation"
    ev = f.get("evidence", 1.0)
    rr_mean = 60.0 / f["hr"]
    rr_min = 0.33 if ev <= 1.0 else min(0.33, 0.75 * rr_mean)  # stronger evidence: faster AF
    # Beat times: sinus = nearly regular (respiratory modulation); AF = irregularly irregular.
    times, t = [], float(rng.uniform(0.05, rr_mean))
    k = 0
    while t < ECG_SECONDS + 0.5:
        times.append(t)
        if af:
            rr = rr_mean * math.exp(rng.normal(0, 0.22 * ev))
            rr = min(max(rr, rr_min), 1.6)
        else:
            rr = rr_mean * (1 + 0.03 * math.sin(2 * math.pi * k * rr_mean / 4.0) + rng.normal(0, 0.012))
        t += rr
        k += 1
    times_a = np.asarray(times)
    inside = times_a[(times_a > 0.35) & (times_a < ECG_SECONDS - 0.65)]
    rr_obs = np.diff(inside) if inside.size > 2 else np.array([rr_mean])

    # Per-lead wave amplitudes (mV).
    v = f["voltage"]
    axis = math.radians(f["axis"])
    L = len(leads)
    p_amp, r_amp, s_amp, q_amp, t_amp, st = (np.zeros(L) for _ in range(6))
    ischaemic = set(_TERRITORIES.get(f["territory"] or "", ()))
    for i, lead in enumerate(leads):
        if lead in _FRONTAL_ANGLE:
            proj = math.cos(axis - math.radians(_FRONTAL_ANGLE[lead]))
            r_amp[i] = (0.15 + 1.1 * max(proj, 0.0)) * v
            s_amp[i] = -(0.1 + 1.1 * max(-proj, 0.0)) * v
            q_amp[i] = -0.06 if proj > 0.5 else 0.0
            t_amp[i] = 0.28 * math.cos(axis - math.radians(_FRONTAL_ANGLE[lead]))
            p_amp[i] = 0.12 * math.cos(math.radians(60.0 - _FRONTAL_ANGLE[lead]))
        else:
            j = _PRECORDIAL.index(lead)
            r_amp[i], s_amp[i], t_amp[i], p_amp[i] = _R_PREC[j] * v, _S_PREC[j] * v, _T_PREC[j], _P_PREC[j]
        if lead in ischaemic:
            st[i] = -f["st_depression"]
            t_amp[i] = -f["t_inversion"]
    if af:
        p_amp[:] = 0.0
    sokolow = abs(s_amp[leads.index("V1")]) + r_amp[leads.index("V5")]

    # Beat template on a local grid, added at each beat (QT shortens with the rate).
    tt = np.arange(-0.3, 0.7, 1 / fs)
    t_pos = 0.30 * math.sqrt(rr_mean)

    def g(mu: float, sd: float) -> np.ndarray:
        return np.exp(-0.5 * ((tt - mu) / sd) ** 2)

    st_shape = 0.5 * (np.tanh((tt - 0.05) / 0.01) - np.tanh((tt - (t_pos - 0.06)) / 0.02))
    template = (np.outer(p_amp, g(-0.17, 0.022)) + np.outer(q_amp, g(-0.03, 0.008)) + np.outer(r_amp, g(0.0, 0.012))
                + np.outer(s_amp, g(0.032, 0.011)) + np.outer(st, st_shape) + np.outer(t_amp, g(t_pos, 0.05)))
    pad = len(tt)
    sig = np.zeros((L, n + 3 * pad))
    off = int(round(0.3 * fs))
    for bt in times_a:
        c = int(round(bt * fs)) + pad - off
        sig[:, c:c + pad] += template * (1 + rng.normal(0, 0.03))
    sig = sig[:, pad:pad + n]
    time = np.arange(n) / fs
    if af:  # fibrillatory waves, strongest in V1 and the inferior leads
        w = np.array([0.3, 0.7, 0.7, 0.3, 0.7, 0.3, 1.0, 0.6, 0.4, 0.3, 0.3, 0.3])
        fw = sum(rng.uniform(0.05, 0.09) * np.sin(2 * np.pi * rng.uniform(5, 7) * time + rng.uniform(0, 2 * np.pi))
                 for _ in range(3))  # coarse fibrillation, up to ~0.3 mV peak in V1
        sig += np.outer(w, fw) * (1.4 * ev)
    wander = np.sin(2 * np.pi * rng.uniform(0.15, 0.35) * time + rng.uniform(0, 2 * np.pi))
    sig += np.outer(rng.uniform(0.02, 0.08, size=L), wander)
    sig += rng.normal(0, 0.012, size=sig.shape)
    measured = {"hr": float(60.0 / rr_obs.mean()), "rr_sd_ms": float(1000 * rr_obs.std()), "sokolow_mv": float(sokolow)}
    return sig.T.astype(np.float64), measured


def write_ecg(path_no_ext: Path, signal: np.ndarray) -> None:
    """WFDB record (format 16, gain 1000/mV, baseline 0): the bytes ``wfdb.wrsamp`` writes, without its
    per-field pandas lookups (about 70 ms a record, most of the cohort's time)."""
    path_no_ext.parent.mkdir(parents=True, exist_ok=True)
    d = np.round(signal * 1000.0, 0)  # wfdb's adc: p * gain + baseline, rounded half to even
    if signal.ndim != 2 or signal.shape[1] != len(MIMIC_IV_ECG_LEADS) or not np.isfinite(d).all() \
            or np.abs(d).max() > 32767:
        return _write_ecg_wfdb(path_no_ext, signal)  # NaN or out of the 16-bit range: let wfdb handle it
    d = d.astype(np.int64)
    name = path_no_ext.name
    lines = [f"{name} {d.shape[1]} {ECG_FS} {d.shape[0]}"]
    for j, lead in enumerate(MIMIC_IV_ECG_LEADS):
        lines.append(f"{name}.dat 16 1000.0(0)/mV 16 0 {int(d[0, j])} {int(d[:, j].sum() % 65536)} 0 {lead}")
    (path_no_ext.parent / f"{name}.dat").write_bytes(d.astype("<i2").tobytes())
    (path_no_ext.parent / f"{name}.hea").write_text("\n".join(lines) + "\n", encoding="ascii")


def _write_ecg_wfdb(path_no_ext: Path, signal: np.ndarray) -> None:
    import wfdb

    path_no_ext.parent.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(path_no_ext.name, fs=ECG_FS, units=["mV"] * signal.shape[1], sig_name=list(MIMIC_IV_ECG_LEADS),
                p_signal=signal, fmt=["16"] * signal.shape[1], adc_gain=[1000.0] * signal.shape[1],
                baseline=[0] * signal.shape[1], write_dir=str(path_no_ext.parent))


def ecg_answer(f: dict[str, Any], m: dict[str, Any], causes: dict[str, str] | None = None) -> str:
    """ECG report; ``causes``: decoy sign -> the other cause the history gives for it."""
    causes = causes or {}
    af = f["rhythm"] == "atrial fibrillation"
    parts = [f"Rhythm: {f['rhythm']}, heart rate about {m['hr']:.0f} bpm."]
    if "sep_ecg" in causes and m["hr"] > 100:
        parts.append(f"The history attributes the tachycardia to {causes['sep_ecg']}.")
    if af:
        parts.append(f"RR intervals are irregularly irregular (SD {m['rr_sd_ms']:.0f} ms) with no discernible P waves "
                     "and a fibrillatory baseline.")
    else:
        parts.append(f"RR intervals are regular (SD {m['rr_sd_ms']:.0f} ms) and every QRS complex is preceded by a P wave.")
    axis = f["axis"]
    kind = "left axis deviation" if axis < -30 else ("right axis deviation" if axis > 90 else "normal axis")
    parts.append(f"QRS axis about {axis:+.0f} degrees ({kind}).")
    if m["sokolow_mv"] > 3.5:
        parts.append(f"QRS voltage is increased (Sokolow-Lyon {m['sokolow_mv']:.1f} mV), meeting criteria for left ventricular hypertrophy.")
        if "htn_ecg" in causes:
            parts.append(f"The history attributes the high voltage to {causes['htn_ecg']}.")
    else:
        parts.append(f"QRS voltage is normal (Sokolow-Lyon {m['sokolow_mv']:.1f} mV).")
    if f["territory"]:
        leads = ", ".join(_TERRITORIES[f["territory"]])
        parts.append(f"There is {f['st_depression'] * 10:.1f} mm ST depression with T-wave inversion in {leads} "
                     f"({f['territory']} territory), suggesting ischaemia.")
    else:
        parts.append("No significant ST deviation; T waves are upright where expected.")
    return " ".join(parts)
