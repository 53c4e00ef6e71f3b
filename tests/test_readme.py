"""The README's Python snippets run as written (a user pastes them into a fresh script)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# Every ```python block, except the Python API one: it trains on a dataset folder ("ROOT").
SNIPPETS = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if '"ROOT"' not in block]


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) >= 3  # the operator, the drop-in layer, the model


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs_as_written(index):
    exec(compile(SNIPPETS[index], f"README.md python block {index}", "exec"), {})
