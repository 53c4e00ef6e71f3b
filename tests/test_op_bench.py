"""benchmarks/op_bench.py on the CPU: the JSON rows the issue asks for, written as they are measured."""
import json

import pytest
import torch

from conftest import load_benchmark

REQUIRED = {"device", "date", "torch", "command", "bench", "backend", "dtype", "pass", "B", "C", "H", "W", "heads",
            "K", "ms", "ref_ms", "speedup", "gbps", "peak_mem_mb", "ref_peak_mem_mb"}
SMALL = ["--device", "cpu", "--shapes", "grid", "--batch", "1", "--backends", "reference,cpu", "--passes",
         "forward", "--iters", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def op_bench():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small shapes: one thread is fastest, above all on a busy CPU
    yield load_benchmark("op_bench")
    torch.set_num_threads(threads)


def test_rows_hold_the_required_fields(op_bench, tmp_path):
    out = tmp_path / "rows.jsonl"
    assert op_bench.main([*SMALL, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(REQUIRED <= set(row) for row in rows)
    compiled = [row for row in rows if row["backend"] == "cpu"]
    assert compiled and all(row["bench"] == "op" and row["ms"] > 0 for row in compiled)
    for row in compiled:  # the ratio is against the reference measured in the same run
        assert row["speedup"] == pytest.approx(row["ref_ms"] / row["ms"], rel=0.01, abs=0.01)


def test_an_interrupted_run_keeps_its_rows(op_bench, tmp_path, monkeypatch):
    # gpu_check.sh stops a stage at its time limit with SIGINT: the rows measured so far stay on disk.
    out, calls = tmp_path / "rows.jsonl", []
    measure = op_bench.measure

    def measure_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(op_bench, "measure", measure_then_interrupt)
    assert op_bench.main([*SMALL, "--out", str(out)]) == 130
    assert len(out.read_text().splitlines()) == 4
