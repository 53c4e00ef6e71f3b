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


RESULTS = README.parent / "benchmarks" / "results"
RECORDED = r"\d{4}-\d{2}-\d{2}-[\w.-]+\.(?:jsonl|txt|csv|log|png)"


def test_every_recorded_result_is_indexed_with_its_device_and_command():
    """benchmarks/results/README.md gives each recorded file a row: name | device | date | command."""
    rows = {}
    for line in (RESULTS / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(f"`{RECORDED}`", cells[0]):
            rows[cells[0].strip("`")] = cells
    recorded = sorted(f.name for f in RESULTS.iterdir() if f.name != "README.md")
    assert recorded, "no recorded results"
    missing = [name for name in recorded if name not in rows]
    assert not missing, f"not indexed in benchmarks/results/README.md: {missing}"
    blank = [name for name, cells in rows.items() if not (cells[1] and cells[2] and cells[3])]
    assert not blank, f"rows without a device, date or command: {blank}"


def test_the_readmes_name_only_recorded_files_that_exist():
    named = set()
    for text in (README.read_text(), (RESULTS / "README.md").read_text()):
        named |= set(re.findall(RECORDED, text))
    assert named, "the READMEs name no recorded results"
    absent = sorted(name for name in named if not (RESULTS / name).exists())
    assert not absent, f"named in a README but not in benchmarks/results/: {absent}"
