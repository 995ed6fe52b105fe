"""Where each modality's input is normalised, and what ``nan_policy: zero`` does, restated from the
reference code (docs/method.md, "Encoders" and "ECG preprocessing") and computed here with torch,
scipy and wfdb directly, never through the project's own functions.

* ``forward_ecg`` (``llama/Cardio_llama.py``): ``F.normalize`` of each of the 32 per-step xresnet
  features, then the RNN and the attention pooling; the pooled vector goes to its projector as it is.
* ``forward_image`` / ``forward_lab``: the pooled CXR token and the lab feature are ``F.normalize``-d,
  then the Linear to d.
* ECG: ``rdsamp`` -> ``[12, 5000]`` -> ``scipy.signal.resample`` to 1000 -> NaN -> 0 -> float32.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import wfdb
from scipy.signal import resample

from helpers import CORPUS, PLACEHOLDERS, _TOKENIZERS
from medtvt_core.build import build_llm_plugin
from medtvt_core.config import resolve_config
from medtvt_core.data.formats import MIMIC_IV_ECG_LEADS
from medtvt_core.model import MedTVTConfig, MedTVTForConditionalGeneration
from medtvt_core.plugins import get_catalog
from medtvt_plugins.readers.ecg import EcgModality

TINY_LLM = {"name": "llama-lora", "options": {"variant": "tiny", "tokenizer_vocab_size": 400}}
MODALITIES = ("ecg", "cxr", "lab")


def preset_model(preset: str) -> MedTVTForConditionalGeneration:
    """The preset's encoders (tiny variants: the same code) and projector block on a tiny LLM."""
    cfg = resolve_config(preset=preset)
    catalog = get_catalog()
    llm_plugin = build_llm_plugin(TINY_LLM, catalog)
    key = "reference-inputs"
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = llm_plugin.load_tokenizer(lambda: CORPUS)
    tok = copy.deepcopy(_TOKENIZERS[key])
    tok.add_special_tokens({"extra_special_tokens": list(PLACEHOLDERS.values())}, replace_extra_special_tokens=False)
    encoders = {m: {"name": cfg.encoders[m].name, "options": {**cfg.encoders[m].options, "variant": "tiny"}}
                for m in MODALITIES}
    mc = MedTVTConfig(modalities=list(MODALITIES), encoders=encoders, projector=cfg.projector, llm=TINY_LLM,
                      fusion={"name": "mpl", "options": {"num_heads": 2}}, text_config=llm_plugin.text_config(tok),
                      placeholders=PLACEHOLDERS,
                      placeholder_token_ids={m: tok.convert_tokens_to_ids(p) for m, p in PLACEHOLDERS.items()})
    torch.manual_seed(0)
    return MedTVTForConditionalGeneration(mc, catalog=get_catalog(), seed=0).eval()


# --------------------------------------------------------------------------- the reference, restated
def ref_dense_block(proj, x: torch.Tensor) -> torch.Tensor:
    """Linear to d, then per block ``x + W2(silu(W1 n) * W3 n)``, ``n = RMSNorm(x)`` (MuMu-LLaMA's Dense block)."""
    x = F.linear(x, proj.proj.weight, proj.proj.bias)
    for blk in proj.blocks:
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + blk.norm.eps) * blk.norm.weight
        x = x + F.linear(F.silu(F.linear(n, blk.w1.weight)) * F.linear(n, blk.w3.weight), blk.w2.weight)
    return x


def ref_ecg_pool(head, feats: torch.Tensor, *, normalize_steps: bool) -> torch.Tensor:
    """``forward_ecg``: [F.normalize per step ->] tanh RNN (unrolled here) -> softmax attention over steps."""
    x = F.normalize(feats, dim=-1) if normalize_steps else feats
    rnn = head.rnn
    h = torch.zeros(x.shape[0], rnn.hidden_size)
    hs = []
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h @ rnn.weight_hh_l0.T + rnn.bias_hh_l0)
        hs.append(h)
    hs = torch.stack(hs, 1)  # [B, N, H]
    w = torch.softmax(hs @ head.attn.weight.T + head.attn.bias, dim=1)  # [B, N, K]
    return torch.einsum("bnk,bnh->bkh", w, hs)


def ref_cxr_pool(conv, tokens: torch.Tensor) -> torch.Tensor:
    """``forward_image``: a 1x1 Conv1d over the 197 ViT tokens (tokens as channels)."""
    return torch.einsum("kn,bnc->bkc", conv.weight[:, :, 0], tokens) + conv.bias[None, :, None]


def reference_tokens(model, feats: dict[str, torch.Tensor], pooled_normalized: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for m, f in feats.items():
        enc = model.encoders[m]
        if m == "ecg":
            pooled = ref_ecg_pool(enc.head, f, normalize_steps=True)
        elif m == "cxr":
            pooled = ref_cxr_pool(enc.head, f)
        else:
            pooled = f  # the lab MLP's output is the feature
        if m in pooled_normalized:
            pooled = F.normalize(pooled, dim=-1)
        out[m] = ref_dense_block(model.projectors[m], pooled)
    return out


def random_features(model, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Scaled and offset, so that a missing or an extra normalisation shows.
    return {m: 3.0 * torch.randn(4, *model.encoders[m].feature_shape, generator=g) + 1.5 for m in MODALITIES}


@pytest.mark.parametrize("preset, pooled_normalized", [
    ("paper", {"cxr", "lab"}),  # the reference: ECG per step, CXR and lab after pooling
    ("demo", set()),  # the demo and study keep their own choice (unchanged): per-step ECG normalisation only
    ("study", set()),
])
def test_each_modality_is_normalised_where_the_reference_does(preset, pooled_normalized):
    model = preset_model(preset)
    feats = random_features(model)
    want = reference_tokens(model, feats, pooled_normalized)
    with torch.no_grad():
        for m in MODALITIES:
            got = model.get_modality_features(m, features=feats[m])[:, : want[m].shape[1]]
            torch.testing.assert_close(got, want[m], rtol=1e-4, atol=1e-5, msg=f"{preset}: {m}")


def test_paper_ecg_token_is_not_the_normalised_pooled_vector():
    """The rule the paper preset used to follow (F.normalize of the pooled ECG vector) gives another token."""
    model = preset_model("paper")
    feats = random_features(model)
    pooled = ref_ecg_pool(model.encoders["ecg"].head, feats["ecg"], normalize_steps=True)
    wrong = ref_dense_block(model.projectors["ecg"], F.normalize(pooled, dim=-1))
    with torch.no_grad():
        got = model.get_modality_features("ecg", features=feats["ecg"])
    assert (got - wrong).abs().max() > 1e-2
    # and the ECG head's per-step normalisation is an option of the encoder, on by default
    assert model.encoders["ecg"].config.normalize_steps
    assert resolve_config(preset="paper").projector.normalize_input == ["cxr", "lab"]


def test_ecg_head_without_step_normalisation():
    model = preset_model("demo")
    enc = model.encoders["ecg"]
    plain = type(enc)(variant="tiny", num_tokens=enc.num_tokens, normalize_steps=False)
    plain.head.load_state_dict(enc.head.state_dict())
    f = random_features(model)["ecg"]
    with torch.no_grad():
        torch.testing.assert_close(plain.pool(f), ref_ecg_pool(enc.head, f, normalize_steps=False), rtol=1e-4, atol=1e-5)
        assert (plain.pool(f) - enc.pool(f)).abs().max() > 1e-3


# --------------------------------------------------------------------------- nan_policy: zero
def write_record(root, name: str, fs: float, nan_at: dict[int, slice]) -> str:
    n = int(fs * 10)
    t = np.arange(n) / fs
    sig = np.stack([0.1 * k + 0.4 * np.sin(2 * np.pi * (1 + k) * t) for k in range(12)], axis=1)
    for lead, where in nan_at.items():
        sig[where, lead] = np.nan
    wfdb.wrsamp(name, fs=fs, units=["mV"] * 12, sig_name=list(MIMIC_IV_ECG_LEADS), p_signal=sig, fmt=["16"] * 12,
                adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(root))
    return name


@pytest.mark.parametrize("fs", [500.0, 100.0])  # 100 Hz: already 1000 samples; the reference resamples all the same
def test_nan_policy_zero_resamples_first_as_the_reference(tmp_path, fs):
    ref = write_record(tmp_path, "nan", fs, {3: slice(100, 101), 7: slice(40, 45)})  # one NaN in aVR, five in V2
    sig, _ = wfdb.rdsamp(str(tmp_path / ref))  # the reference: rdsamp -> [12, N] -> resample -> NaN -> 0
    expected = np.nan_to_num(resample(sig.T, 1000, axis=1)).astype(np.float32)
    mod = EcgModality(nan_policy="zero")
    got = mod.load(ref, root=tmp_path).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert (got[3] == 0).all() and (got[7] == 0).all()  # one NaN sample: the whole lead is zero
    assert all(np.abs(got[i]).max() > 0.05 for i in range(12) if i not in (3, 7))
    assert mod.nan_filled_records == 1 and mod.nan_filled_samples == 6


def test_normalize_input_names_only_configured_modalities():
    from medtvt_core.errors import ConfigError

    cfg = resolve_config(preset="paper", sets=["modalities=[ecg,lab]"])  # an ablation keeps the list
    assert cfg.projector.normalize_input == ["cxr", "lab"]
    assert resolve_config(preset="demo", sets=["projector.normalize_input=true"]).projector.normalize_input is True
    with pytest.raises(ConfigError) as e:
        resolve_config(preset="paper", sets=["projector.normalize_input=[cxr,ekg]"])
    msg = str(e.value)
    assert "\n" not in msg and "projector.normalize_input names ekg" in msg and "a list of ecg, cxr, lab" in msg
