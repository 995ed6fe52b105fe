"""docs/plugins.md: every Python block runs (each worked example ends by passing the contract kit), the
commands it shows exist, and the README links it."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
_BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_guide_has_a_worked_example_per_kind():
    text = GUIDE.read_text()
    for hook in ("medtvt_register_modalities", "medtvt_register_encoders", "medtvt_register_fusion",
                 "medtvt_register_rewards", "medtvt_register_llms"):
        assert any(hook in b and "check_plugin(" in b for b in _BLOCKS), hook
    assert "docs/plugins.md" in (ROOT / "README.md").read_text()
    for cmd in ("medtvt plugins new", "medtvt plugins check", "--medtvt-plugin"):
        assert cmd in text


@pytest.mark.parametrize("index", range(len(_BLOCKS)))
def test_guide_code_runs(index, tmp_path, one_torch_thread):
    path = tmp_path / f"block_{index}.py"
    path.write_text(_BLOCKS[index])
    # As a script: the examples' `if __name__ == "__main__"` part runs the kit on the block's own hooks.
    runpy.run_path(str(path), run_name="__main__")
