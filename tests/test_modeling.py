"""MedTVTForConditionalGeneration: stage gradients, masking, placeholder injection, KV-cached
generation, the saved-model format (complete, strict, referenced weights with hashes), AutoModel.

:class:`ModelTesterMixin` holds the tests (like transformers' ``ModelTesterMixin``); each
subclass says how to build a tiny model and its modality inputs:

* :class:`TestStubModel`: stand-in encoders defined here (independent of other plugins), the
  real ``mpl`` fusion, projector and ``llama-lora`` LLM, K = 2 tokens per modality;
* :class:`TestCatalogModel`: the installed plugins through the catalog (``ecgfm-ked``, ``vit``,
  ``symile`` tiny variants), K = 1 as in the paper.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from medtvt_core.errors import CheckpointError, ConfigError, DataError
from medtvt_core.model import MedTVTForConditionalGeneration, MedTVTProcessor
from medtvt_core.model.serialization import WEIGHTS_NAME, saved_state_keys
from medtvt_core.model.stages import configure_trainable
from medtvt_core.plugins import build_catalog, get_catalog

from helpers import (ANSWERS, CORPUS, PLACEHOLDERS, QUESTIONS, _TOKENIZERS, StubEncoderConfig,  # noqa: F401
                     _StubPlugin, make_model)


def _spread_llm_weights(model, seed: int = 0) -> None:
    """Larger random LLM weights: a 0.02-std init makes greedy decoding repeat one token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if "norm" not in n and "lora_" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)


def _perturb(model, names: list[str], seed: int = 1) -> None:
    """Simulate training: move the given parameters (LoRA B starts at zero, gates at init...)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].add_(torch.randn(params[n].shape, generator=g) * 0.05)


# --------------------------------------------------------------------------- mixin
class ModelTesterMixin:
    """Tests every model configuration must pass; subclasses define the builders below."""

    modalities = ("ecg", "cxr", "lab")
    tokens_per_modality = 1

    def catalog(self):
        raise NotImplementedError

    def encoder_refs(self) -> dict[str, dict]:
        raise NotImplementedError

    @pytest.fixture
    def built(self):
        return make_model(self.modalities, self.encoder_refs(), self.catalog(), k=self.tokens_per_modality)

    @pytest.fixture
    def model(self, built):
        return built[0]

    @pytest.fixture
    def proc(self, built):
        return built[1]

    def batch(self, model, proc, present: list[tuple[bool, ...]], *, seed: int = 0, full_rows: bool = False,
              generation: bool = False) -> dict:
        """Collator-format batch: modality tensors hold rows of present samples only (or every row)."""
        g = torch.Generator().manual_seed(seed)
        mask = torch.tensor(present, dtype=torch.bool)
        prompts = [QUESTIONS[tuple(p)] for p in present]
        answers = [ANSWERS[i % len(ANSWERS)] for i in range(len(present))]
        feats = proc.generation_features(prompts) if generation else proc.train_features(prompts, answers)
        inputs = {}
        for j, m in enumerate(model.modalities):
            n = len(present) if full_rows else int(mask[:, j].sum())
            if n:
                inputs[m] = torch.randn((n, *model.encoders[m].input_shape), generator=g)
        out = {k: v for k, v in feats.items() if k != "index"}
        return {**out, "modality_mask": mask, "modality_inputs": inputs}

    # ---------------------------------------------------------------- tests
    def test_is_a_transformers_model(self, model):
        from transformers import PreTrainedModel

        assert isinstance(model, PreTrainedModel) and model.config.model_type == "medtvt"
        assert model.get_input_embeddings() is model.llm.get_input_embeddings()

    def test_forward_shapes_and_loss(self, model, proc):
        model.eval()  # no dropout: the two forward passes below must agree
        b = self.batch(model, proc, [(True, True, True), (False, True, True)])
        out = model(**b)
        bsz, length = b["input_ids"].shape
        assert out.logits.shape == (bsz, length, len(proc.tokenizer))
        assert out.loss is not None and torch.isfinite(out.loss)
        assert out.modality_weights.shape == (bsz, 3)
        assert out.modality_weights[1, 0] == 0  # absent ECG weighs nothing
        # The loss is next-token CE on answer tokens only: mean, or sum / num_items_in_batch.
        lab = b["labels"][:, 1:]
        flat = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
        ref = F.cross_entropy(flat, lab.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(out.loss, ref)
        n = int((lab != -100).sum()) * 3
        summed = F.cross_entropy(flat, lab.reshape(-1), ignore_index=-100, reduction="sum") / n
        torch.testing.assert_close(model(**b, num_items_in_batch=torch.tensor(n)).loss, summed)

    @pytest.mark.parametrize("stage", ["pt", "sft", "rft"])
    @pytest.mark.parametrize("extras", [False, True])
    def test_gradients_reach_exactly_the_stage_parameters(self, model, proc, stage, extras):
        names = configure_trainable(model, stage, train_extras=extras)
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
        b = self.batch(model, proc, [(True, True, True), (True, True, True)])
        model(**b).loss.backward()
        got = {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
        assert got == want, f"no grad: {sorted(want - got)[:5]}; unexpected grad: {sorted(got - want)[:5]}"
        assert all(not p.requires_grad for n, p in params.items() if n not in want)
        assert model.config.uses_fusion is (stage != "pt") and model.config.stage == stage

    def test_pt_skips_fusion(self, model, proc):
        configure_trainable(model, "pt")
        model.eval()
        b = self.batch(model, proc, [(True, True, True)])
        out = model(**b)
        assert out.modality_weights is None
        with torch.no_grad():
            for p in model.fusion.parameters():
                p.add_(1.0)
        torch.testing.assert_close(model(**b).logits, out.logits, rtol=0, atol=0)

    def test_masked_modality_changes_nothing(self, model, proc):
        model.eval()
        present = [(True, True, True), (False, True, True), (True, False, True)]
        b = self.batch(model, proc, present, full_rows=True)
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

    def test_cached_features_equal_inputs(self, model, proc):
        model.eval()
        b = self.batch(model, proc, [(True, True, True), (True, False, True)])
        feats = {m: model.encoders[m].encode(x) for m, x in b["modality_inputs"].items()}
        ref = model(**b).logits
        out = model(**{**b, "modality_inputs": None, "modality_features": feats}).logits
        torch.testing.assert_close(out, ref)

    def test_rows_per_sample_share_the_modality_tokens(self, model, proc):
        """G rows of one prompt (GRPO's completions) with modality tensors for the prompt only."""
        model.eval()
        b = self.batch(model, proc, [(True, True, True), (False, True, True)])
        rep = {"input_ids": b["input_ids"].repeat_interleave(3, 0),
               "attention_mask": b["attention_mask"].repeat_interleave(3, 0)}
        full = {m: t for m, t in b["modality_inputs"].items()}
        expanded = model(**rep, modality_mask=b["modality_mask"].repeat_interleave(3, 0),
                         modality_inputs={m: t.repeat_interleave(3, 0) for m, t in full.items()}).logits
        shared = model(**rep, modality_mask=b["modality_mask"], modality_inputs=full, rows_per_sample=3).logits
        torch.testing.assert_close(shared, expanded, rtol=1e-5, atol=1e-5)
        last = model(**rep, modality_mask=b["modality_mask"], modality_inputs=full, rows_per_sample=3,
                     logits_to_keep=4).logits
        torch.testing.assert_close(last, shared[:, -4:], rtol=1e-5, atol=1e-5)

    def test_placeholder_feature_count_mismatch(self, model, proc):
        b = self.batch(model, proc, [(True, True, True), (False, True, True)])
        wrong = b["modality_mask"].clone()
        wrong[0, 0] = False  # the prompt holds <ecg> but the mask says absent
        with pytest.raises(DataError, match=r"row 0: \d+ <ecg> placeholder token\(s\) in input_ids but 0 ecg feature"):
            model(**{**b, "modality_mask": wrong})
        extra = {**b["modality_inputs"], "ecg": torch.cat([b["modality_inputs"]["ecg"]] * 3)}
        with pytest.raises(DataError, match="3 rows of inputs/features but 1 sample"):
            model(**{**b, "modality_inputs": extra})
        ids = b["input_ids"].clone()
        ids[1, 3] = model.placeholder_ids["ecg"]  # an extra placeholder in a sample without ECG
        with pytest.raises(DataError, match="row 1: 1 <ecg> placeholder"):
            model(**{**b, "input_ids": ids})

    def test_generate_kv_cache_equals_transformers_without_cache(self, model, proc):
        _spread_llm_weights(model)
        model.eval()
        b = self.batch(model, proc, [(True, True, True), (False, True, True), (True, False, True)], generation=True)
        assert (b["attention_mask"][:, 0] == 0).any(), "prompts of unequal length: left padding exercised"
        for forced in (False, True):
            kw = dict(max_new_tokens=12, min_new_tokens=12 if forced else 0, eos_token_id=proc.stop_token_ids,
                      pad_token_id=proc.pad_token_id)
            cached = model.generate(**b, **kw)
            recomputed = model.generate(**b, **kw, use_cache=False)  # transformers recomputes every step
            assert torch.equal(cached, recomputed)
            assert cached.shape[0] == 3 and (not forced or cached.shape[1] == 12)
        assert len(set(cached[0].tolist())) > 1, "degenerate model: the comparison would be vacuous"

    def test_generate_never_writes_a_placeholder(self, model, proc):
        _spread_llm_weights(model)
        model.eval()
        b = self.batch(model, proc, [(True, True, True), (False, True, True)], generation=True)
        head = model.llm.get_output_embeddings().weight
        ph = list(model.placeholder_ids.values())
        with torch.no_grad():  # make the placeholders by far the likeliest next tokens
            head[ph] = head[ph] * 0 + head.abs().max() * 20
        out = model.generate(**b, do_sample=True, num_return_sequences=3, max_new_tokens=10, min_new_tokens=10)
        assert not torch.isin(out, torch.tensor(ph)).any()

    def test_generate_g_samples_per_prompt(self, model, proc):
        _spread_llm_weights(model)
        model.eval()
        b = self.batch(model, proc, [(True, True, True), (True, True, False)], generation=True)
        torch.manual_seed(0)
        out = model.generate(**b, num_return_sequences=3, do_sample=True, temperature=0.6, top_p=0.9,
                             max_new_tokens=8, min_new_tokens=8)
        assert out.shape == (6, 8)
        greedy = model.generate(**b, num_return_sequences=2, max_new_tokens=5)
        assert greedy.shape[0] == 4 and torch.equal(greedy[0], greedy[1]) and torch.equal(greedy[2], greedy[3])
        right = {**b, "attention_mask": b["attention_mask"].flip(1)}
        with pytest.raises(DataError, match="LEFT-padded"):
            model.generate(**right, max_new_tokens=2)

    def test_save_load_round_trip(self, model, proc, tmp_path):
        from transformers import AutoModel

        names = configure_trainable(model, "sft", train_extras=True)
        _perturb(model, names + [n for n, _ in model.named_parameters() if n.startswith("projectors.")])
        model.eval()
        b = self.batch(model, proc, [(True, True, True), (True, False, True)])
        ref = model(**b).logits
        model.save_pretrained(tmp_path)
        proc.save_pretrained(tmp_path)
        assert {"config.json", WEIGHTS_NAME, "processor_config.json", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
        assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
        meta = json.loads((tmp_path / "config.json").read_text())  # plain JSON, no pickled objects
        assert meta["model_type"] == "medtvt" and meta["fusion"]["name"] == "mpl" and meta["stage"] == "sft"
        for loaded in (MedTVTForConditionalGeneration.from_pretrained(tmp_path, catalog=self.catalog()),
                       AutoModel.from_pretrained(tmp_path, catalog=self.catalog())):
            assert type(loaded) is MedTVTForConditionalGeneration
            assert loaded.config.uses_fusion and loaded.config.stage == "sft" and not loaded.training
            torch.testing.assert_close(loaded(**b).logits, ref, rtol=0, atol=0)
        p2 = MedTVTProcessor.from_pretrained(tmp_path, catalog=self.catalog())
        assert p2.train_features(["a <ecg> b"], ["x"])["input_ids"].tolist() == \
            proc.train_features(["a <ecg> b"], ["x"])["input_ids"].tolist()

    def test_checkpoint_wrong_key_or_shape_is_named(self, model, tmp_path):
        model.save_pretrained(tmp_path)
        wfile = tmp_path / WEIGHTS_NAME
        good = load_file(str(wfile))
        for key in (next(k for k in good if k.startswith("projectors.")), next(k for k in good if "lora_A" in k)):
            bad = dict(good)
            bad[key + "_renamed"] = bad.pop(key)
            save_file(bad, str(wfile))
            with pytest.raises(CheckpointError, match=rf"missing keys: {key}.*unexpected keys: {key}_renamed"):
                MedTVTForConditionalGeneration.from_pretrained(tmp_path, catalog=self.catalog())
            bad = dict(good)
            bad[key] = torch.zeros(3, 3)
            save_file(bad, str(wfile))
            with pytest.raises(CheckpointError, match=rf"shape mismatch: {key} expected .* found \(3, 3\)"):
                MedTVTForConditionalGeneration.from_pretrained(tmp_path, catalog=self.catalog())
        save_file(good, str(wfile))
        cfg = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "medtvt_format_version": 99}))
        with pytest.raises(CheckpointError, match="format version 99; this medtvt reads versions up to"):
            MedTVTForConditionalGeneration.from_pretrained(tmp_path, catalog=self.catalog())
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
        with pytest.raises(CheckpointError, match="model_type 'llama', not 'medtvt'"):
            MedTVTForConditionalGeneration.from_pretrained(tmp_path, catalog=self.catalog())
        with pytest.raises(CheckpointError, match="no config.json; not a saved medtvt model"):
            MedTVTForConditionalGeneration.from_pretrained(tmp_path / "..", catalog=self.catalog())


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

    def test_random_weights_are_saved_and_file_weights_referenced(self, model, tmp_path):
        keys = saved_state_keys(model)
        assert any(k.startswith("encoders.ecg.backbone.") for k in keys)  # random init: saved
        assert any(k.startswith("llm.") and "embed_tokens" in k for k in keys)  # LLM from a config: saved
        assert any("lora_" in k for k in keys)
        src = tmp_path / "ecg_backbone.safetensors"
        save_file({k: v.contiguous() for k, v in nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32)).state_dict().items()},
                  str(src))
        refs = {**self.encoder_refs(), "ecg": {"name": "stub-ecg", "options": {"weights": str(src)}}}
        m, _ = make_model(self.modalities, refs, self.catalog(), k=2)
        keys = saved_state_keys(m)
        assert not any(k.startswith("encoders.ecg.backbone.") for k in keys)
        assert any(k.startswith("encoders.ecg.head.") for k in keys)
        m.eval()
        x = torch.randn(2, 6)
        ref = m.get_modality_features("ecg", inputs=x)
        m.save_pretrained(tmp_path / "saved")
        meta = json.loads((tmp_path / "saved" / "config.json").read_text())
        (r,) = meta["weight_references"]
        assert r["component"] == "encoders.ecg" and r["path"] == str(src.resolve()) and len(r["sha256"]) == 64
        loaded = MedTVTForConditionalGeneration.from_pretrained(tmp_path / "saved", catalog=self.catalog())
        torch.testing.assert_close(loaded.get_modality_features("ecg", inputs=x), ref, rtol=0, atol=0)
        # A changed or missing referenced file is one error naming it.
        state = load_file(str(src))
        state["0.weight"] = state["0.weight"] + 1
        save_file(state, str(src))
        with pytest.raises(CheckpointError, match=rf"encoders.ecg weights {src.resolve()} changed since"):
            MedTVTForConditionalGeneration.from_pretrained(tmp_path / "saved", catalog=self.catalog())
        src.unlink()
        with pytest.raises(CheckpointError, match=rf"encoders.ecg weights {src.resolve()} are missing"):
            MedTVTForConditionalGeneration.from_pretrained(tmp_path / "saved", catalog=self.catalog())

    def test_pretrained_llm_is_referenced_and_extras_saved(self, built, tmp_path):
        from transformers import AutoModelForCausalLM

        from medtvt_plugins.llms.llama_lora import llama_config

        model, proc = built
        # A local HF model directory (its tokenizer without placeholders) as the LLM source.
        src = tmp_path / "llm"
        base_tok = _TOKENIZERS[next(iter(_TOKENIZERS))]
        AutoModelForCausalLM.from_config(llama_config("tiny", vocab_size=len(base_tok))).save_pretrained(src)
        base_tok.save_pretrained(src)
        llm = {"name": "llama-lora", "options": {"variant": "tiny", "model_path": str(src)}}
        m, p = make_model(self.modalities, self.encoder_refs(), self.catalog(), k=2, llm=llm)
        assert not any(k.startswith("llm.") and "lora_" not in k for k in saved_state_keys(m))  # the base: referenced
        names = configure_trainable(m, "sft", train_extras=True)
        _perturb(m, names)
        llm_keys = [k for k in saved_state_keys(m) if k.startswith("llm.") and "lora_" not in k]
        assert llm_keys and all("norm" in k or "embed_tokens" in k for k in llm_keys)
        m.eval()
        b = self.batch(m, p, [(True, True, True)])
        ref = m(**b).logits
        m.save_pretrained(tmp_path / "run")
        meta = json.loads((tmp_path / "run" / "config.json").read_text())
        assert {r["component"] for r in meta["weight_references"]} == {"llm"} and meta["extras_trained"]
        loaded = MedTVTForConditionalGeneration.from_pretrained(tmp_path / "run", catalog=self.catalog())
        torch.testing.assert_close(loaded(**b).logits, ref)

    def test_one_token_encoder_is_repeated(self, model):
        feats = model.get_modality_features("lab", inputs=torch.randn(2, 6))
        assert feats.shape == (2, 2, model.hidden_size)
        torch.testing.assert_close(feats[:, 0], feats[:, 1])

    def test_config_errors(self, stub_catalog):
        with pytest.raises(ConfigError, match=r"fusion.options \(mpl\)"):
            make_model(self.modalities, self.encoder_refs(), stub_catalog, fusion={"name": "mpl", "options": {"bogus": 1}})
        with pytest.raises(Exception, match="unknown encoders plugin 'nope'"):
            make_model(self.modalities, {**self.encoder_refs(), "ecg": {"name": "nope"}}, stub_catalog)
        with pytest.raises(ConfigError, match="reads modality 'cxr', not 'ecg'"):
            make_model(self.modalities, {**self.encoder_refs(), "ecg": {"name": "stub-cxr"}}, stub_catalog)

    def test_none_fusion(self, stub_catalog):
        m, p = make_model(self.modalities, self.encoder_refs(), stub_catalog, fusion={"name": "none"})
        b = self.batch(m, p, [(True, True, True)])
        assert m(**b).modality_weights is None

    def test_replace_fusion_equals_a_fresh_build(self, stub_catalog):
        """An ablation variant reusing another variant's PT stage gets the fusion a fresh build has."""
        a, _ = make_model(self.modalities, self.encoder_refs(), stub_catalog, fusion={"name": "cao"}, seed=3)
        b, _ = make_model(self.modalities, self.encoder_refs(), stub_catalog, seed=3)
        b.replace_fusion({"name": "cao", "options": {}}, seed=3, catalog=stub_catalog)
        sa, sb = a.fusion.state_dict(), b.fusion.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert b.config.fusion == {"name": "cao", "options": {}}


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


def test_automodel_needs_only_import_medtvt_core(tmp_path):
    """A fresh interpreter: ``import medtvt_core`` then transformers' AutoModel loads a saved model."""
    import subprocess
    import sys

    m, p = make_model(("ecg", "lab"), {"ecg": {"name": "ecgfm-ked", "options": {"variant": "tiny"}},
                                       "lab": {"name": "symile", "options": {"variant": "tiny"}}}, get_catalog())
    m.save_pretrained(tmp_path)
    code = ("import medtvt_core\nfrom transformers import AutoConfig, AutoModel\n"
            f"m = AutoModel.from_pretrained({str(tmp_path)!r})\n"
            "print(type(m).__name__, type(AutoConfig.from_pretrained(" + repr(str(tmp_path)) + ")).__name__, m.modalities)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[-2] == "MedTVTForConditionalGeneration MedTVTConfig ['ecg', 'lab']"
