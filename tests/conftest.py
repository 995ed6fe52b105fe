import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

# Tests never touch a hub: fail fast instead of hanging on a missing network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _few_threads():
    import torch

    n = torch.get_num_threads()
    # Under pytest-xdist (two workers on CI's two cores) one thread each: OpenMP threads spinning on
    # shared cores made runs several times slower.
    torch.set_num_threads(min(n, 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2))
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: for tiny models and small tensor ops a second thread spins in OpenMP
    barriers far more than it computes (measured: an epoch of 3 samples 6 s with 2 threads, 0.1 s with 1)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- shared run fixtures
@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """A 24-patient synthetic cohort shared by every test that runs the pipeline."""
    from medtvt_core.data.synth import synthesize

    root = tmp_path_factory.mktemp("cohort") / "data"
    synthesize(root, n_patients=24, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory, cohort) -> Path:
    """The tiny configuration as a YAML file (the demo preset + test_orchestrator.TINY_SETS)."""
    from medtvt_core.config import dump_config, resolve_config
    from test_orchestrator import TINY_SETS

    d = tmp_path_factory.mktemp("config")
    cfg = resolve_config(preset="demo", sets=[*TINY_SETS, f"data.root={cohort}", f"data.cache_dir={d / 'cache'}",
                                              f"output_dir={d / 'unused'}"])
    assert cfg.data.root == cohort and cfg.rft.num_generations == 2 and cfg.llm.options["pretrain_steps"] == 5
    assert cfg.llm.options["variant"] == "tiny"  # --set llm.options.X keeps the preset's other options
    path = d / "tiny.yaml"
    path.write_text(dump_config(cfg))
    return path


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory) -> Path:
    """A LLaMA-3 model directory (real tokenizer, tiny random LlamaForCausalLM, 128,256 rows); see llama3_fixture."""
    from llama3_fixture import make_llama3_model_dir

    return make_llama3_model_dir(tmp_path_factory.mktemp("llama3") / "Llama-3-tiny")


# Longest files first: with two xdist workers and --dist loadfile, the files that run whole pipelines
# would otherwise start last and leave one worker idle at the end (CI time, not behaviour).
_LONGEST_FIRST = ("test_journey.py", "test_presets_e2e.py", "test_orchestrator.py", "test_distributed.py",
                  "test_notes_plugin.py", "test_plugin_authors.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
