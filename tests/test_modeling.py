"""MedTVTModel: stage gradients, masking, placeholder injection, KV-cached generation, save/load.

:class:`ModelTesterMixin` holds the tests (like transformers' ``ModelTesterMixin``); each
subclass says how to build a tiny model and its modality inputs:

* :class:`TestStubModel`: stand-in encoders defined here (independent of other plugins), the
  real ``mpl`` fusion, projector and ``llama-lora`` LLM, K = 2 tokens per modality;
* :class:`TestCatalogModel`: the installed plugins through the catalog (``ecgfm-ked``, ``vit``,
  ``symile`` tiny variants), K = 1 as in the paper.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from medtvt_core import hookimpl
from medtvt_core.contracts import Encoder, PluginConfig
from medtvt_core.errors import CheckpointError, ConfigError, DataError
from medtvt_core.modeling import ADAPTER_DIR, WEIGHTS_NAME, MedTVTConfig, MedTVTModel
from medtvt_core.plugins import build_catalog, get_catalog

CORPUS = [
    "<think> sinus rhythm, rate 80, normal axis </think><answer> Hypertension; Sepsis </answer>",
    "The ECG <ecg> shows atrial fibrillation. The chest x-ray <cxr> shows consolidation.",
    "Labs <lab>: creatinine raised, white cells raised, lactate normal.",
    "no acute cardiopulmonary disease; heart size normal; lungs clear",
] * 20
QUESTIONS = {
    # modality subsets per sample: the prompt holds the placeholders of present modalities only
    (True, True, True): "ECG <ecg> then image <cxr> and labs <lab>. Which diseases?",
    (False, True, True): "Image <cxr> and labs <lab> (ecg not available). Which diseases?",
    (True, False, True): "Labs <lab> first, ECG <ecg> second (cxr not available).",
    (True, True, False): "ECG <ecg> and image <cxr>, lab not available; diagnose.",
}
ANSWERS = ["<think> irregular rhythm </think><answer> Atrial Fibrillation </answer>",
           "<think> consolidation </think><answer> Pneumonia; Sepsis </answer>",
           "<answer> Hypertension </answer>",
           "<think> x </think><answer> Coronary Artery Disease; Diabetes Mellitus </answer>"]


# --------------------------------------------------------------------------- stand-ins
class StubEncoderConfig(PluginConfig):
    num_tokens: int = Field(1, ge=1, description="K tokens")
    weights: str | None = Field(None, description="backbone weights file (unused: always random)")


class _StubEncoder(Encoder):
    """Frozen Linear + BatchNorm backbone [B, 6] -> [B, 4, 8]; head Linear 8->12 + adaptive pooling to K."""

    config_class = StubEncoderConfig

    def __init__(self, *, num_tokens: int = 1, weights: str | None = None):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32))
        self.head = nn.Linear(8, 12)
        self.input_shape, self.feature_shape, self.pooled_dim, self.num_tokens = (6,), (4, 8), 12, num_tokens

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).view(-1, 4, 8)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool1d(self.head(features).transpose(1, 2), self.num_tokens).transpose(1, 2)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())


class StubEcg(_StubEncoder):
    modality = "ecg"


class StubCxr(_StubEncoder):
    modality = "cxr"


class StubLab(_StubEncoder):
    """One token only, like the real lab encoder: the model repeats it K times."""

    modality = "lab"

    def __init__(self, *, num_tokens: int = 1, weights: str | None = None):
        super().__init__(num_tokens=1, weights=weights)


class _StubPlugin:
    @hookimpl
    def medtvt_register_encoders(self, register):
        register("stub-ecg", StubEcg, config=StubEncoderConfig)
        register("stub-cxr", StubCxr, config=StubEncoderConfig)
        register("stub-lab", StubLab, config=StubEncoderConfig)


def _spread_llm_weights(model: MedTVTModel, seed: int = 0) -> None:
    """Larger random LLM weights: a 0.02-std init makes greedy decoding repeat one token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if "norm" not in n and "lora_" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)


def _perturb(model: MedTVTModel, names: list[str], seed: int = 1) -> None:
    """Simulate training: move the given parameters (LoRA B starts at zero, gates at init...)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].add_(torch.randn(params[n].shape, generator=g) * 0.05)


# --------------------------------------------------------------------------- mixin
class ModelTesterMixin:
    """Tests every MedTVTModel configuration must pass; subclasses define the builders below."""

    modalities = ("ecg", "cxr", "lab")
    tokens_per_modality = 1
    fusion = "mpl"

    def catalog(self):
        raise NotImplementedError

    def encoder_refs(self) -> dict[str, dict]:
        raise NotImplementedError

    # ---------------------------------------------------------------- builders
    def config(self, **over) -> MedTVTConfig:
        data = dict(
            modalities=list(self.modalities), encoders=self.encoder_refs(),
            projector={"tokens_per_modality": self.tokens_per_modality, "blocks": 1},
            fusion={"name": self.fusion, "options": {"num_heads": 2}} if self.fusion == "mpl" else {"name": self.fusion},
            llm={"name": "llama-lora", "options": {"variant": "tiny", "tokenizer_vocab_size": 400}},
        )
        data.update(over)
        return MedTVTConfig.model_validate(data)

    @pytest.fixture
    def model(self, tmp_path_factory) -> MedTVTModel:
        # One trained tokenizer per test class (training it is the slow part of a tiny build).
        tok_dir = tmp_path_factory.getbasetemp() / f"tok-{type(self).__name__}"
        torch.manual_seed(0)
        m = MedTVTModel.from_config(self.config(), self.catalog(), corpus=lambda: CORPUS, tokenizer_dir=tok_dir)
        return m

    def batch(self, model: MedTVTModel, present: list[tuple[bool, ...]], *, seed: int = 0, full_rows: bool = False,
              generation: bool = False) -> dict:
        """Collator-format batch: modality tensors hold rows of present samples only (or every row)."""
        g = torch.Generator().manual_seed(seed)
        mask = torch.tensor(present, dtype=torch.bool)
        prompts = [QUESTIONS[tuple(p)] for p in present]
        answers = [ANSWERS[i % len(ANSWERS)] for i in range(len(present))]
        proc = model.processor
        feats = proc.generation_features(prompts) if generation else proc.train_features(prompts, answers)
        inputs = {}
        for j, m in enumerate(model.modalities):
            n = len(present) if full_rows else int(mask[:, j].sum())
            if n:
                shape = model.encoders[m].input_shape
                inputs[m] = torch.randn((n, *shape), generator=g)
        out = {k: v for k, v in feats.items() if k != "index"}
        return {**out, "modality_mask": mask, "modality_inputs": inputs}

    # ---------------------------------------------------------------- tests
    def test_forward_shapes_and_loss(self, model):
        b = self.batch(model, [(True, True, True), (False, True, True)])
        out = model(**b)
        bsz, length = b["input_ids"].shape
        assert out.logits.shape == (bsz, length, len(model.tokenizer))
        assert out.loss is not None and torch.isfinite(out.loss)
        assert out.modality_weights.shape == (bsz, 3)
        assert out.modality_weights[1, 0] == 0  # absent ECG weighs nothing
        # The loss is next-token CE on answer tokens only.
        lab = b["labels"][:, 1:]
        ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), lab.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(out.loss, ref)

    @pytest.mark.parametrize("stage", ["pt", "sft", "rft"])
    @pytest.mark.parametrize("extras", [False, True])
    def test_gradients_reach_exactly_the_stage_parameters(self, model, stage, extras):
        names = model.configure_trainable(stage, train_extras=extras)
        params = dict(model.named_parameters())
        heads = {id(p) for e in model.encoders.values() for p in e.head_parameters()}
        # Expected set, written independently of STAGES_TRAINABLE.
        want = {n for n in params if "lora_" in n}
        if stage == "pt":
            want |= {n for n, p in params.items() if n.startswith("projectors.") or id(p) in heads}
        else:
            want |= {n for n in params if n.startswith("fusion.")}
        if extras:
            want |= {n for n in params if n.startswith("llm.") and "lora_" not in n
                     and ("norm" in n or "embed_tokens" in n or n.endswith(".bias"))}
        assert set(names) == want
        _perturb(model, [n for n in names if "lora_B" in n])  # LoRA B = 0 would block A's gradient
        model.train()
        b = self.batch(model, [(True, True, True), (True, True, True)])
        model(**b).loss.backward()
        got = {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
        assert got == want, f"no grad: {sorted(want - got)[:5]}; unexpected grad: {sorted(got - want)[:5]}"
        assert all(not p.requires_grad for n, p in params.items() if n not in want)
        assert model.use_fusion is (stage != "pt")

    def test_pt_skips_fusion(self, model):
        model.configure_trainable("pt")
        model.eval()
        b = self.batch(model, [(True, True, True)])
        out = model(**b)
        assert out.modality_weights is None
        with torch.no_grad():
            for p in model.fusion.parameters():
                p.add_(1.0)
        torch.testing.assert_close(model(**b).logits, out.logits, rtol=0, atol=0)

    def test_masked_modality_changes_nothing(self, model):
        model.eval()
        present = [(True, True, True), (False, True, True), (True, False, True)]
        b = self.batch(model, present, full_rows=True)
        ref = model(**b).logits
        # Rows of absent modalities (ECG of sample 1, CXR of sample 2) take any values: same logits.
        changed = {m: t.clone() for m, t in b["modality_inputs"].items()}
        changed["ecg"][1] = torch.randn_like(changed["ecg"][1]) * 100
        changed["cxr"][2] = torch.randn_like(changed["cxr"][2]) * 100
        torch.testing.assert_close(model(**{**b, "modality_inputs": changed}).logits, ref, rtol=0, atol=0)
        # The collator's compact format (present rows only) gives the same result.
        compact = {m: t[b["modality_mask"][:, j]] for j, (m, t) in enumerate(b["modality_inputs"].items())}
        torch.testing.assert_close(model(**{**b, "modality_inputs": compact}).logits, ref, rtol=1e-5, atol=1e-5)
        # Sanity: a present modality does matter.
        changed["ecg"][0] = torch.randn_like(changed["ecg"][0]) * 100
        assert not torch.allclose(model(**{**b, "modality_inputs": changed}).logits[0], ref[0])

    def test_cached_features_equal_inputs(self, model):
        model.eval()
        b = self.batch(model, [(True, True, True), (True, False, True)])
        feats = {m: model.encoders[m].encode(x) for m, x in b["modality_inputs"].items()}
        ref = model(**b).logits
        out = model(**{**b, "modality_inputs": None, "modality_features": feats}).logits
        torch.testing.assert_close(out, ref)

    def test_placeholder_feature_count_mismatch(self, model):
        b = self.batch(model, [(True, True, True), (False, True, True)])
        wrong = b["modality_mask"].clone()
        wrong[0, 0] = False  # the prompt holds <ecg> but the mask says absent
        with pytest.raises(DataError, match=r"sample 0: \d+ <ecg> placeholder token\(s\) in input_ids but 0 ecg feature"):
            model(**{**b, "modality_mask": wrong})
        extra = {**b["modality_inputs"], "ecg": torch.cat([b["modality_inputs"]["ecg"]] * 3)}
        with pytest.raises(DataError, match="3 rows of inputs/features but 1 sample"):
            model(**{**b, "modality_inputs": extra})
        ids = b["input_ids"].clone()
        ids[1, 3] = model.placeholder_ids["ecg"]  # an extra placeholder in a sample without ECG
        with pytest.raises(DataError, match="sample 1: 1 <ecg> placeholder"):
            model(**{**b, "input_ids": ids})

    def test_generate_kv_cache_equals_recompute(self, model):
        _spread_llm_weights(model)
        model.eval()
        b = self.batch(model, [(True, True, True), (False, True, True), (True, False, True)], generation=True)
        assert (b["attention_mask"][:, 0] == 0).any(), "prompts of unequal length: left padding exercised"
        for forced in (False, True):
            kw = dict(max_new_tokens=12, min_new_tokens=12 if forced else 0)
            cached = model.generate(**b, **kw)
            recomputed = model.generate_recompute(**b, **kw)
            assert torch.equal(cached, recomputed)
            assert cached.shape[0] == 3 and (not forced or cached.shape[1] == 12)
        assert len(set(cached[0].tolist())) > 1, "degenerate model: the comparison would be vacuous"

    def test_generate_g_samples_per_prompt(self, model):
        _spread_llm_weights(model)
        model.eval()
        b = self.batch(model, [(True, True, True), (True, True, False)], generation=True)
        torch.manual_seed(0)
        out = model.generate(**b, num_return_sequences=3, do_sample=True, temperature=0.6, top_p=0.9,
                             max_new_tokens=8, min_new_tokens=8)
        assert out.shape == (6, 8)
        greedy = model.generate(**b, num_return_sequences=2, max_new_tokens=5)
        assert greedy.shape[0] == 4 and torch.equal(greedy[0], greedy[1]) and torch.equal(greedy[2], greedy[3])
        right = {**b, "attention_mask": b["attention_mask"].flip(1)}
        with pytest.raises(DataError, match="LEFT-padded"):
            model.generate(**right, max_new_tokens=2)

    def test_per_token_logps_match_generation_scores(self, model):
        _spread_llm_weights(model)
        model.eval()
        b = self.batch(model, [(True, True, True), (False, True, True)], generation=True)
        res = model.generate(**b, num_return_sequences=2, do_sample=True, max_new_tokens=6, min_new_tokens=6,
                             return_dict_in_generate=True, output_logits=True)
        comp = res.sequences
        want = torch.stack([torch.log_softmax(s.float(), -1) for s in res.logits], 1)
        want = want.gather(-1, comp.unsqueeze(-1)).squeeze(-1)
        got = model.per_token_logps(b["input_ids"], b["attention_mask"], comp, modality_mask=b["modality_mask"],
                                    modality_inputs=b["modality_inputs"])
        assert got.shape == comp.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    def test_save_load_round_trip(self, model, tmp_path):
        names = model.configure_trainable("sft", train_extras=True)
        _perturb(model, names + [n for n, _ in model.named_parameters() if n.startswith("projectors.")])
        model.eval()
        b = self.batch(model, [(True, True, True), (True, False, True)])
        ref = model(**b).logits
        model.save_pretrained(tmp_path)
        assert {p.name for p in tmp_path.iterdir()} >= {"config.json", WEIGHTS_NAME, ADAPTER_DIR, "tokenizer"}
        assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
        json.loads((tmp_path / "config.json").read_text())  # plain JSON
        loaded = MedTVTModel.from_pretrained(tmp_path, self.catalog())
        loaded.eval()
        assert loaded.use_fusion and loaded.stage == "sft"
        torch.testing.assert_close(loaded(**b).logits, ref, rtol=0, atol=0)

    def test_checkpoint_wrong_key_or_shape_is_named(self, model, tmp_path):
        model.save_pretrained(tmp_path)
        wfile = tmp_path / WEIGHTS_NAME
        good = load_file(str(wfile))
        key = next(k for k in good if k.startswith("projectors."))
        bad = dict(good)
        bad[key + "_renamed"] = bad.pop(key)
        save_file(bad, str(wfile))
        with pytest.raises(CheckpointError, match=rf"missing keys: {key}.*unexpected keys: {key}_renamed"):
            MedTVTModel.from_pretrained(tmp_path, self.catalog())
        bad = dict(good)
        bad[key] = torch.zeros(3, 3)
        save_file(bad, str(wfile))
        with pytest.raises(CheckpointError, match=rf"shape mismatch: {key} expected .* found \(3, 3\)"):
            MedTVTModel.from_pretrained(tmp_path, self.catalog())
        save_file(good, str(wfile))
        acfg = tmp_path / ADAPTER_DIR / "adapter_config.json"
        text = acfg.read_text()
        acfg.write_text(json.dumps({**json.loads(text), "lora_alpha": 3.0}))
        with pytest.raises(CheckpointError, match="lora_alpha=3.0 but the model is built with lora_alpha=16.0"):
            MedTVTModel.from_pretrained(tmp_path, self.catalog())
        acfg.write_text(text)
        afile = tmp_path / ADAPTER_DIR / "adapter_model.safetensors"
        adapter = load_file(str(afile))
        akey = next(iter(adapter))
        adapter[akey] = torch.zeros(1)
        save_file(adapter, str(afile))
        with pytest.raises(CheckpointError, match=rf"adapter_model.safetensors does not match .*{akey}"):
            MedTVTModel.from_pretrained(tmp_path, self.catalog())


# --------------------------------------------------------------------------- configurations
@pytest.fixture(scope="module")
def stub_catalog():
    import medtvt_plugins.fusion.builtin as fusion
    import medtvt_plugins.llms.llama_lora as llama_lora

    return build_catalog(plugins=[_StubPlugin(), fusion, llama_lora], autoload=False)


class TestStubModel(ModelTesterMixin):
    tokens_per_modality = 2

    @pytest.fixture(autouse=True)
    def _catalog(self, stub_catalog):
        self._cat = stub_catalog

    def catalog(self):
        return self._cat

    def encoder_refs(self):
        return {m: {"name": f"stub-{m}"} for m in self.modalities}

    def test_random_backbones_saved_pretrained_ones_not(self, model):
        keys = model.saved_state_keys()
        assert any(k.startswith("encoders.ecg.backbone.") for k in keys)  # random init: saved
        assert any(k.startswith("llm.") and "embed_tokens" in k for k in keys)  # LLM from a config: saved
        assert not any("lora_" in k for k in keys)  # the adapter goes through peft
        ecg = {"name": "stub-ecg", "options": {"weights": "w.safetensors"}}
        cfg = self.config(encoders={**self.encoder_refs(), "ecg": ecg})
        m = MedTVTModel.from_config(cfg, self.catalog(), corpus=lambda: CORPUS)
        keys = m.saved_state_keys()
        assert not any(k.startswith("encoders.ecg.backbone.") for k in keys)
        assert any(k.startswith("encoders.ecg.head.") for k in keys)

    def test_pretrained_llm_saves_only_extras(self, model, tmp_path):
        from transformers import AutoModelForCausalLM

        from medtvt_plugins.llms.llama_lora import llama_config

        # A local HF model directory (tokenizer without placeholders) as the LLM source.
        src = tmp_path / "llm"
        tok = model.tokenizer
        base = AutoModelForCausalLM.from_config(llama_config("tiny", vocab_size=len(tok)))
        base.save_pretrained(src)
        tok.save_pretrained(src)
        llm = {"name": "llama-lora", "options": {"variant": "tiny", "model_path": str(src)}}
        m = MedTVTModel.from_config(self.config(llm=llm), self.catalog())
        assert not any(k.startswith("llm.") for k in m.saved_state_keys())  # base weights: the recorded path
        names = m.configure_trainable("sft", train_extras=True)
        _perturb(m, names)
        llm_keys = [k for k in m.saved_state_keys() if k.startswith("llm.")]
        assert llm_keys and all("norm" in k or "embed_tokens" in k for k in llm_keys)
        m.eval()
        b = self.batch(m, [(True, True, True)])
        ref = m(**b).logits
        m.save_pretrained(tmp_path / "run")
        meta = json.loads((tmp_path / "run" / "config.json").read_text())
        assert meta["state"]["llm_base"] == str(src)
        # A later stage configured without extras still loads (and keeps) the trained extras.
        m2 = MedTVTModel.from_config(self.config(llm=llm), self.catalog(), tokenizer_dir=tmp_path / "run" / "tokenizer")
        m2.configure_trainable("sft")
        m2.load_weights(tmp_path / "run")
        assert m2.extras_trained and set(m2.saved_state_keys()) == set(m.saved_state_keys())
        m2.eval()
        torch.testing.assert_close(m2(**b).logits, ref)

    def test_one_token_encoder_is_repeated(self, model):
        feats = model.get_modality_features("lab", inputs=torch.randn(2, 6))
        assert feats.shape == (2, 2, model.hidden_size)
        torch.testing.assert_close(feats[:, 0], feats[:, 1])

    def test_config_errors(self, stub_catalog):
        with pytest.raises(ConfigError, match=r"fusion.options \(mpl\)"):
            MedTVTModel.from_config(self.config(fusion={"name": "mpl", "options": {"bogus": 1}}), stub_catalog,
                                    corpus=lambda: CORPUS)
        with pytest.raises(Exception, match="unknown encoders plugin 'nope'"):
            MedTVTModel.from_config(self.config(encoders={**self.encoder_refs(), "ecg": {"name": "nope"}}),
                                    stub_catalog, corpus=lambda: CORPUS)
        with pytest.raises(ConfigError, match="reads modality 'cxr', not 'ecg'"):
            MedTVTModel.from_config(self.config(encoders={**self.encoder_refs(), "ecg": {"name": "stub-cxr"}}),
                                    stub_catalog, corpus=lambda: CORPUS)

    def test_foreign_placeholder_is_an_error(self, stub_catalog, tmp_path):
        cfg = self.config(modalities=["ecg", "lab"], encoders={m: {"name": f"stub-{m}"} for m in ("ecg", "lab")},
                          placeholders={"ecg": "<ecg>", "cxr": "<cxr>", "lab": "<lab>"})
        m = MedTVTModel.from_config(cfg, stub_catalog, corpus=lambda: CORPUS)
        ids = m.processor.train_features(["a <cxr> b <ecg>"], ["x"])
        with pytest.raises(DataError, match="placeholder <cxr> of a modality the model does not use"):
            m(ids["input_ids"], ids["attention_mask"], modality_mask=torch.tensor([[True, False]]),
              modality_inputs={"ecg": torch.randn(1, 6)})

    def test_none_fusion_and_from_run_config(self, stub_catalog):
        from medtvt_core.config import RunConfig

        run = RunConfig(encoders={m: {"name": f"stub-{m}"} for m in self.modalities}, fusion={"name": "none"},
                        llm={"name": "llama-lora", "options": {"variant": "tiny", "tokenizer_vocab_size": 400}})
        m = MedTVTModel.from_config(run, stub_catalog, corpus=lambda: CORPUS)
        assert m.config.fusion.name == "none" and m.config.tokens_per_modality == 1
        b = self.batch(m, [(True, True, True)])
        assert m(**b).modality_weights is None


def _real_catalog():
    cat = get_catalog()
    need = {"encoders": ["ecgfm-ked", "vit", "symile"], "fusion": ["mpl"], "llms": ["llama-lora"]}
    missing = [f"{k}:{n}" for k, names in need.items() for n in names if n not in cat[k]]
    return cat, missing


class TestCatalogModel(ModelTesterMixin):
    """The installed plugins, tiny variants, K = 1 (the paper's setting)."""

    @pytest.fixture(autouse=True)
    def _catalog(self):
        cat, missing = _real_catalog()
        assert not missing, f"built-in plugins missing (reinstall the package): {', '.join(missing)}"
        self._cat = cat

    def catalog(self):
        return self._cat

    def encoder_refs(self):
        names = {"ecg": "ecgfm-ked", "cxr": "vit", "lab": "symile"}
        return {m: {"name": names[m], "options": {"variant": "tiny"}} for m in self.modalities}
