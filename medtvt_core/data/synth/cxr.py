"""Chest radiograph findings, rendering, JPEG writing and the CXR report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .patients import CXR_SIZE, Patient, _toward

# --------------------------------------------------------------------------- CXR
_ZONES = {"upper": 0.33, "middle": 0.43, "lower": 0.52}  # vertical centres, above the heart shadow


def cxr_findings(p: Patient, rng: np.random.Generator, evidence: float = 1.0) -> dict[str, Any]:
    s, k = p.signs, evidence
    f: dict[str, Any] = {"ctr": float(_toward(rng.uniform(0.56, 0.64), 0.44, k) if "htn_cxr" in s else rng.uniform(0.40, 0.48))}
    if "pna_cxr" in s:
        f["opacity"] = {"side": str(rng.choice(["right", "left"])), "zone": str(rng.choice(sorted(_ZONES))),
                        "radius": float(rng.uniform(0.07, 0.10)), "intensity": float(rng.uniform(0.42, 0.55)) * k}
    else:
        f["opacity"] = None
    return f


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    from scipy.ndimage import zoom

    small = rng.standard_normal((cells, cells), dtype=np.float32)
    big = zoom(small, (shape[0] / cells, shape[1] / cells), order=1)
    return big[: shape[0], : shape[1]]


def render_cxr(f: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Grey radiograph ``[H, W]`` uint8: body, lungs, mediastinum, heart, ribs, optional opacity.

    Anatomy is drawn at half resolution and upsampled (bicubic) to ``CXR_SIZE``; pixel noise is
    added at full resolution.  Findings lie inside the central crop the preprocessing keeps.
    """
    from PIL import Image

    w, h = CXR_SIZE[0] // 2, CXR_SIZE[1] // 2
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = u / w, v / h

    def ellipse(cu: float, cv: float, a: float, b: float, edge: float = 0.02) -> np.ndarray:
        r = np.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2)
        return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / edge, -30, 30)))  # soft-edged mask

    img = 0.04 + 0.30 * ellipse(0.5, 0.58, 0.46, 0.56)
    lungs = np.maximum(ellipse(0.36, 0.48, 0.125, 0.30), ellipse(0.64, 0.48, 0.125, 0.30))
    texture = 0.035 * _smooth_noise(rng, (h, w), 28)
    ribs = 0.05 * np.maximum(0, np.sin(2 * np.pi * (v * 9.0 - 2.0 * (u - 0.5) ** 2))) ** 4
    img = img - lungs * (0.20 - texture - ribs)
    img = img + 0.18 * ellipse(0.5, 0.36, 0.06, 0.22)  # mediastinum
    img = img + 0.04 * ellipse(0.5, 0.55, 0.02, 0.5)  # spine
    a = f["ctr"] * 0.36  # thorax width is 0.72 of the image: half-width of the heart
    heart = ellipse(0.55, 0.66, a, 0.10 + 0.2 * (a - 0.16))
    img = img * (1 - heart) + 0.58 * heart
    lungs = lungs * (1 - heart)  # an opacity behind the heart shadow is hidden, as on a real film
    op = f.get("opacity")
    if op:
        cu = 0.33 if op["side"] == "right" else 0.67  # the patient's right lung is on the image's left
        cu += rng.uniform(-0.02, 0.02)
        cv = _ZONES[op["zone"]] + rng.uniform(-0.02, 0.02)
        r2 = ((u - cu) ** 2 + (v - cv) ** 2) / op["radius"] ** 2
        patch = np.exp(-0.5 * r2) * (1 + 0.25 * _smooth_noise(rng, (h, w), 40))
        img = img + op["intensity"] * np.clip(patch, 0, None) * lungs
    img = np.clip(img, 0, 1) ** rng.uniform(0.9, 1.1) + rng.uniform(-0.03, 0.03)
    big = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize(CXR_SIZE, Image.Resampling.BICUBIC))
    big = big + 0.012 * rng.standard_normal(big.shape, dtype=np.float32)
    return (np.clip(big, 0, 1) * 255).round().astype(np.uint8)


def write_cxr(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="L").save(path, format="JPEG", quality=85)


def cxr_answer(f: dict[str, Any], causes: dict[str, str] | None = None) -> str:
    """Radiograph report; ``causes``: decoy sign -> the other cause the history gives for it."""
    causes = causes or {}
    parts = ["Frontal chest radiograph."]
    if f["ctr"] > 0.5:
        parts.append(f"The cardiac silhouette is enlarged (cardiothoracic ratio about {f['ctr']:.2f}).")
        if "htn_cxr" in causes:
            parts.append(f"The history attributes the large heart shadow to {causes['htn_cxr']}.")
    else:
        parts.append(f"Heart size is normal (cardiothoracic ratio about {f['ctr']:.2f}).")
    op = f["opacity"]
    if op and "pna_cxr" in causes:
        parts.append(f"There is a focal opacity in the {op['side']} {op['zone']} zone; the history attributes it "
                     f"to {causes['pna_cxr']}.")
    elif op:
        parts.append(f"There is a focal airspace opacity in the {op['side']} {op['zone']} zone, consistent with consolidation.")
    else:
        parts.append("The lungs are clear without focal opacity.")
    parts.append("No pleural effusion or pneumothorax.")
    return " ".join(parts)
