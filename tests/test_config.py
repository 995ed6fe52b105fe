"""RunConfig: presets, files, overrides and one-line errors with exit code 2."""

import subprocess
import sys

import pytest
import yaml

from medtvt_core.config import RunConfig, preset_names, resolve_config, write_config
from medtvt_core.errors import ConfigError


def test_presets_resolve():
    assert {"demo", "paper"} <= set(preset_names())
    demo = resolve_config(preset="demo")
    paper = resolve_config(preset="paper")
    assert demo.device == "cpu" and demo.llm.options["variant"] == "tiny"
    assert paper.pt.epochs == 20 and paper.sft.epochs == 20 and paper.weights_required


def test_paper_preset_is_the_reference_code():
    """Each point where the reference code decides, restated from docs/method.md ("The reference code's rules")."""
    p = resolve_config(preset="paper")
    assert p.llm.options["variant"] == "llama-3.2-1b" and p.llm.options["lora_rank"] == 8  # the paper's rank
    assert set(p.llm.options["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"}
    assert p.projector.normalize_input == ["cxr", "lab"] and p.projector.tokens_per_modality == 1  # ECG: per step
    assert p.encoders["ecg"].options.get("normalize_steps", True)
    assert (p.prompt.format, p.prompt.answer_end_token) == ("reference", "<|end_of_text|>")
    assert [r.name for r in p.rewards] == ["format", "jaccard"]
    assert p.fusion.name == "mpl" and p.fusion.options["style"] == "official"
    assert p.fusion.options["rotations"] == [["cxr", "ecg", "lab"], ["ecg", "lab", "cxr"], ["lab", "cxr", "ecg"]]
    assert p.fusion.options["f_dropout_masks"] == "per_modality"
    r = p.rft
    assert (r.batch_size * r.num_generations, r.batch_size, r.grad_accum, r.lr, r.beta) == (8, 1, 2, 1e-6, 0.04)
    assert (r.temperature, r.top_p, r.max_prompt_length, r.max_completion_length, r.max_steps) == (0.6, 0.9, 256, 600, 500)
    assert r.sampling_mode == "eval" and not r.scale_logits_by_temperature
    for s in (p.pt, p.sft):
        assert (s.batch_size, s.lr, s.min_lr, s.weight_decay, s.adam_beta1, s.adam_beta2, s.max_length) == \
            (8, 1e-4, 1e-6, 0.05, 0.9, 0.95, 600)
        assert s.train_extras
    assert p.eval.protocols[0] == "reference"
    assert p.data.modality_options.get("cxr", {}).get("train_crop", "random") == "random"


def test_overrides_have_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('preset = "demo"\nseed = 3\n[rft]\nnum_generations = 6\n')
    cfg = resolve_config(config_file=f, fusion="cmha", modalities="ecg,lab", rewards="format,jaccard",
                         sets=["rft.num_generations=4", "fusion.options.num_heads=2", "sft.lr=3e-4"])
    assert cfg.seed == 3 and cfg.rft.num_generations == 4
    assert cfg.fusion.name == "cmha" and cfg.fusion.options == {"num_heads": 2}
    assert cfg.modalities == ["ecg", "lab"] and [r.name for r in cfg.rewards] == ["format", "jaccard"]
    assert cfg.sft.lr == 3e-4
    assert cfg.encoders["ecg"].options == {"variant": "tiny"}  # from the demo preset


def test_roundtrip_written_config(tmp_path):
    cfg = resolve_config(preset="demo", sets=["rft.beta=0.0"])
    write_config(cfg, tmp_path / "config.yaml")
    again = RunConfig.model_validate(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(sets=["rft.num_generation=4"]), "--set rft.num_generation: unknown key 'num_generation'; allowed here:"),
        (dict(sets=["rft.num_generations=one"]), "rft.num_generations: Input should be a valid integer"),
        (dict(sets=["rft.num_generations=1"]), "rft.num_generations: Input should be greater than or equal to 2"),
        (dict(sets=["stages=[rft,pt]"]), "stages must be a subset of pt, sft, rft in that order"),
        (dict(modalities="ecg,ecg"), "duplicate modality"),
        (dict(sets=["nokey"]), "expected KEY=VALUE"),
        (dict(preset="nope"), "unknown preset 'nope'; available: demo, paper"),
    ],
)
def test_bad_values_are_one_line_errors(kwargs, needle):
    kwargs.setdefault("preset", "demo")
    with pytest.raises(ConfigError) as ei:
        resolve_config(**kwargs)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_broken_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        resolve_config(config_file=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(config_file=tmp_path / "missing.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        resolve_config(config_file=lst)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "medtvt_cli.main", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["config", "show", "--fusion", "mlp"], "unknown fusion plugin 'mlp'"),
        (["config", "show", "--set", "pt.lr=-1"], "pt.lr: Input should be greater than 0"),
        (["config", "show", "--set", "fusion.options.style=both"], "fusion.options (mpl): style"),
        (["config", "show", "--set", "encoders.ecg.options.bogus=1"], "encoders.ecg.options (ecgfm-ked): bogus"),
        (["config", "show", "--modalities", "ecg,eeg"], "eeg"),
        (["config", "show", "--on-bad-sample", "ignore"], "'ignore' is not one of 'skip', 'fail'"),
        (["config", "show", "--fusoin", "mpl"], "No such option '--fusoin'"),
    ],
)
def test_cli_errors_exit_2_without_traceback(args, needle):
    res = _cli(*args)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cli_config_show_applies_overrides():
    res = _cli("config", "show", "--preset", "paper", "--fusion", "cao", "--set", "rft.num_generations=4")
    assert res.returncode == 0, res.stderr
    data = yaml.safe_load(res.stdout)
    assert data["fusion"]["name"] == "cao" and data["rft"]["num_generations"] == 4


def test_reader_options_of_a_left_out_modality_are_kept_and_checked():
    """The demo preset sets CXR reader options; an ablation without the CXR must still resolve (as
    `encoders.cxr` does), and those options are still validated against the CXR reader."""
    from medtvt_core.build import validate_run

    cfg = resolve_config(preset="demo", modalities="ecg,lab")
    assert "cxr" in cfg.data.modality_options
    validate_run(cfg)
    bad = resolve_config(preset="demo", modalities="ecg,lab", sets=["data.modality_options.cxr.train_crop=diagonal"])
    with pytest.raises(ConfigError, match=r"data.modality_options.cxr.options \(cxr\).*train_crop"):
        validate_run(bad)
    typo = resolve_config(preset="demo", sets=["data.modality_options={xray: {}}"])
    with pytest.raises(Exception, match="'xray'"):
        validate_run(typo)


def test_on_bad_sample_flag_is_the_config_field_and_set_wins():
    skip = yaml.safe_load(_cli("config", "show", "--preset", "demo", "--on-bad-sample", "skip").stdout)
    assert skip["data"]["on_bad_sample"] == "skip"
    both = _cli("config", "show", "--preset", "demo", "--on-bad-sample", "skip", "--set", "data.on_bad_sample=fail")
    assert yaml.safe_load(both.stdout)["data"]["on_bad_sample"] == "fail"  # --set has the last word
