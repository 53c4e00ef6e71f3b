"""tools/ncu_mix.py on a hand-made source page of Nsight Compute (the real ones come from the GPU
machine): instructions by opcode with predicates stripped, stall shares, hot address ranges."""
import csv

import pytest

from conftest import load_tool

ncu_mix = load_tool("ncu_mix")

COLUMNS = ["Address", "Source", "Instructions Executed", "stall_wait", "stall_barrier", "stall_wait (Not Issued)"]
ROWS = [  # address, SASS, executed, wait, barrier, wait (not issued: must not count)
    ("0x10", "FFMA.FTZ R1, R2, R3, R1", "3,000,000", 6, 0, 99),
    ("0x20", "@!P0 FFMA.FTZ R4, R2, R3, R4", "1,000,000", 2, 0, 99),
    ("0x30", "LDS R5, [R6]", "2,000,000", 0, 2, 99),
    ("0x40", "BAR.SYNC.DEFER_BLOCKING 0x0", "4,000,000", 0, 10, 99),
]


def write_page(path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "void k(float*)"])
        w.writerow(COLUMNS)
        w.writerows(ROWS)


def test_counts_by_opcode_stall_and_range(tmp_path):
    page = tmp_path / "k_source.csv"
    write_page(page)
    text = ncu_mix.report(str(page), span=2, top=5)
    lines = text.splitlines()
    assert lines[0] == "executed warp instructions: 10,000,000"
    ops = {line.split()[0]: line.split()[1:] for line in lines[1:4]}
    assert ops["FFMA.FTZ"] == ["4.00M", "40.0%"]  # the predicated one counts as FFMA.FTZ too
    assert ops["BAR.SYNC.DEFER_BLOCKING"] == ["4.00M", "40.0%"] and ops["LDS"] == ["2.00M", "20.0%"]
    stalls = dict(line.split() for line in lines if line.strip().startswith("stall_"))
    assert stalls == {"stall_barrier": "60.0%", "stall_wait": "40.0%"}  # Not Issued columns left out
    ranges = [line for line in lines if line.strip().startswith("lines")]
    assert len(ranges) == 2
    assert ranges[0].split()[1:4] == ["0-", "1", "4.00M"] and "FFMA.FTZ 4.0M" in ranges[0]
    assert ranges[1].split()[3] == "6.00M" and ranges[1].split()[4] == "60.0%"


def test_refuses_a_page_without_the_columns(tmp_path):
    page = tmp_path / "details.csv"
    page.write_text("Duration page source\n")
    with pytest.raises(SystemExit, match="not the source page"):
        ncu_mix.report(str(page))
