"""Shared pieces of the benchmark scripts: models built through medtvt's own API, timing, memory, tables.

Every benchmark builds its model the way a run does (:func:`medtvt_core.build.new_model` on a
:class:`~medtvt_core.config.RunConfig` from a preset plus ``--set``-style overrides), so what is
measured is the project's model, not a copy of it.  The scripts import this file as a sibling
(``python benchmarks/<script>.py`` puts ``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

#: Text the benchmark tokenizer is trained on (no model directory: llama-lora trains a BPE).
CORPUS = [
    "<think> The ECG shows an irregularly irregular rhythm without P waves; the chest radiograph shows "
    "right lower lobe consolidation; lactate and white cells are raised. </think>"
    "<answer> Atrial Fibrillation; Pneumonia; Sepsis </answer>",
    "Given the ECG <ecg>, the chest x-ray <cxr> and the laboratory panel <lab>, reason step by step "
    "and list the diseases of this hospital stay.",
    "Creatinine rose over 24 hours consistent with acute renal failure; blood pressure is elevated.",
    "Sinus rhythm, normal axis, no acute ST changes. Heart size normal, lungs clear.",
] * 30

#: A disease-level question (all three placeholders), as in MedTVT-QA.
QUESTION = ("Given the ECG <ecg>, the chest x-ray <cxr> and the laboratory panel <lab>, reason step by step "
            "about the findings of each modality and list the diseases of this hospital stay.")
ANSWER = ("<think> irregular rhythm, consolidation, raised lactate </think>"
          "<answer> Atrial Fibrillation; Sepsis </answer>")

#: Overrides that turn the ``paper`` preset into its tiny counterpart (same structure, CPU-sized).
TINY_SETS = (
    "encoders.ecg.options.variant=tiny", "encoders.cxr.options.variant=tiny", "encoders.lab.options.variant=tiny",
    "llm.options.variant=tiny", "llm.options.tokenizer_vocab_size=1000",
)


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def plugin_catalog() -> Any:
    """The installed plugin catalog; when medtvt is importable but not installed (a GPU machine that
    got only the source tree), the built-in plugin modules are registered by hand instead."""
    from medtvt_core.plugins import build_catalog, get_catalog

    catalog = get_catalog()
    if "llama-lora" in catalog.llms.list():
        return catalog
    import sys

    if importlib.util.find_spec("medtvt_plugins") is None:
        # pyproject maps the package medtvt_plugins to the folder plugins/; without an install the
        # folder is importable as `plugins` (repo root on sys.path) and serves the same modules.
        sys.modules["medtvt_plugins"] = importlib.import_module("plugins")
    from medtvt_plugins import BUILTIN_PLUGINS

    return build_catalog(plugins=[importlib.import_module(m) for _, m in BUILTIN_PLUGINS], autoload=False)


def run_config(preset: str = "paper", sets: Sequence[str] = ()) -> Any:
    """A validated :class:`RunConfig` from ``preset`` plus ``key=value`` overrides (YAML values).

    Random weights are allowed (the CLI's ``--random-weights``): a benchmark measures cost, which
    does not depend on the values of the weights.  Without a model directory the tokenizer is
    trained on :data:`CORPUS` and has no LLaMA-3 ``<|end_of_text|>``, so answers end with its EOS."""
    from medtvt_core.config import resolve_config

    return resolve_config(preset=preset, sets=["weights_required=false", "prompt.answer_end_token=null", *sets])


def build_model(cfg: Any, device: str | torch.device, *, catalog: Any = None, corpus: Sequence[str] = CORPUS,
                readers: Any = None) -> tuple[Any, Any]:
    """``(MedTVTForConditionalGeneration, MedTVTProcessor)`` of ``cfg`` on ``device`` (random weights)."""
    from medtvt_core.model.factory import new_model

    torch.manual_seed(cfg.seed)
    model, processor = new_model(cfg, catalog if catalog is not None else plugin_catalog(),
                                 corpus=lambda: list(corpus), readers=readers)
    return model.to(device), processor


class ItemSet(torch.utils.data.Dataset):
    """In-memory items in :class:`QADataset`'s format (frozen features already computed), with its collator."""

    def __init__(self, items: list[dict[str, Any]], modality_names: Sequence[str]):
        self.items, self.modality_names = items, list(modality_names)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def collator(self) -> Any:
        from medtvt_core.data.dataset import Collator

        return Collator(self.modality_names)


def synchronize(device: str | torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def llm_parameters(model: Any) -> int:
    """Parameters of the LLM (LoRA included; a tied embedding counted once, as its matmul runs once)."""
    return sum(p.numel() for p in model.llm.parameters())


class _RssSampler:
    """Peak resident-set growth (bytes) over a block, sampled from /proc/self/statm in a thread:
    torch's CPU allocator has no peak counter, so this is an approximation (2 ms resolution)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.base = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(self.interval)

    def __enter__(self) -> "_RssSampler":
        self.base = self._rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss() - self.base)


@dataclass
class Measured:
    """Result of :func:`measure`: ``seconds``, ``peak_bytes`` (absolute on CUDA: everything allocated,
    weights included; None on the CPU), ``growth_bytes`` (peak minus what was allocated at the start:
    on CUDA exact, on the CPU the sampled RSS growth)."""

    seconds: float = 0.0
    peak_bytes: int | None = None
    growth_bytes: int = 0


@contextlib.contextmanager
def measure(device: str | torch.device) -> Iterator[Measured]:
    """Wall time and memory of a block; CUDA work is synchronised at both ends."""
    res = Measured()
    if is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        yield res
        torch.cuda.synchronize()
        res.seconds = time.perf_counter() - t0
        res.peak_bytes = torch.cuda.max_memory_allocated()
        res.growth_bytes = res.peak_bytes - base
        return
    with _RssSampler() as rss:
        t0 = time.perf_counter()
        yield res
        res.seconds = time.perf_counter() - t0
    res.growth_bytes = rss.peak


def process_max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are printed with ``str``."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells[1:])])


def device_name(device: str | torch.device) -> str:
    if is_cuda(device):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def versions() -> str:
    import transformers

    out = f"torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import peft

        out += f", peft {peft.__version__}"
    except ImportError:
        pass
    return out
