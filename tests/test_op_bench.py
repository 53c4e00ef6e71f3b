"""benchmarks/op_bench.py on the CPU: the JSON rows the issue asks for, written as they are measured."""
import datetime
import json
import math

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
    # The header every results row shares (benchmarks/_common.py): the date in UTC, ISO 8601.
    assert all(datetime.datetime.fromisoformat(row["date"]).utcoffset() == datetime.timedelta(0) for row in rows)
    compiled = [row for row in rows if row["backend"] == "cpu"]
    assert compiled and all(row["bench"] == "op" and row["ms"] > 0 for row in compiled)
    for row in compiled:  # the ratio is against the reference measured in the same run
        assert row["speedup"] == pytest.approx(row["ref_ms"] / row["ms"], rel=0.01, abs=0.01)
        assert 0 <= row["max_err"] < 1e-5 and row["note"] == ""  # checked against float64


def test_a_backend_that_disagrees_with_the_reference_is_marked_wrong(op_bench, tmp_path, monkeypatch, capsys):
    op_for = op_bench.op_for

    def off_by_a_bit(backend, K, scale):  # the compiled op, with its output 1% too large
        fn = op_for(backend, K, scale)
        return (lambda v, f, b: fn(v, f, b) * 1.01) if backend == "cpu" else fn

    monkeypatch.setattr(op_bench, "op_for", off_by_a_bit)
    out = tmp_path / "rows.jsonl"
    argv = ["--device", "cpu", "--shapes", "main", "--backends", "reference,cpu", "--iters", "1", "--warmup", "0",
            "--out", str(out)]
    assert op_bench.main(argv) == 1
    rows = {(r["backend"], r["pass"]): r for r in map(json.loads, out.read_text().splitlines())}
    for pass_name in ("forward", "forward+backward"):  # the CPU default passes; the check runs once
        assert rows[("cpu", pass_name)]["note"].startswith("WRONG")
        assert rows[("cpu", pass_name)]["max_err"] == pytest.approx(0.01, rel=0.05)
        assert rows[("reference", pass_name)]["note"] == ""
    bars = capsys.readouterr().out.split("# bars")[1]
    assert "not measured" in bars and "PASS" not in bars  # WRONG rows count toward no bar


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


def test_bars_on_cuda_judge_the_rows(op_bench, capsys):
    """The GPU check's verdicts, from hand-made rows at the main shape: issue 3's bars on the cuda
    rows, issue 4's on the triton rows (forward time against the cuda forward's)."""
    shape = dict(B=12, C=128, H=128, W=128, heads=4, dual=True)

    def row(backend, dtype, pass_, ms, speedup, pct=None, peak=None, ref_peak=None):
        return dict(shape, backend=backend, dtype=dtype, ms=ms, speedup=speedup, pct_of_copy=pct,
                    peak_mem_mb=peak, ref_peak_mem_mb=ref_peak, **{"pass": pass_})

    rows = [row("cuda", "float32", "forward", 0.5, 20.0, pct=0.4),
            row("cuda", "float32", "forward+backward", 1.7, 19.0, peak=100.0, ref_peak=1000.0),
            row("cuda", "bfloat16", "forward", 0.25, 40.0),
            row("triton", "float32", "forward", 1.1, 9.0),  # 2.2x the cuda forward's time
            row("triton", "float32", "forward+backward", 5.0, 6.5)]
    def verdicts():  # "#   NAME (50 wide) VALUE (8 wide)  VERDICT" per bar
        return {line[4:54].strip(): line[65:].strip() for line in capsys.readouterr().out.splitlines()
                if line.startswith("#   ")}

    op_bench.print_bars(rows, on_cuda=True)
    assert verdicts() == {
        "forward speedup >= 10x": "PASS",
        "forward+backward speedup >= 6x": "PASS",
        "forward >= 50% of copy bandwidth": "FAIL",
        "forward+backward peak memory <= 1/5 of reference": "PASS",
        "bf16 forward >= 1.6x faster than fp32": "PASS",
        "triton forward+backward speedup >= 4x": "PASS",
        "triton forward time <= 2x the cuda forward's": "FAIL",
    }
    op_bench.print_bars(rows[:3], on_cuda=True)  # no triton rows: said so, not failed
    judged = verdicts()
    assert [judged[name] for name in op_bench.BARS_TRITON] == ["not measured"] * 2
    assert judged["forward speedup >= 10x"] == "PASS"


def test_max_error_keeps_a_nan_wherever_it_is(op_bench):
    ok, nan = torch.ones(3), torch.tensor([1.0, float("nan"), 1.0])
    expected = [torch.ones(3), torch.full((3,), 2.0)]
    assert op_bench.max_error([ok, torch.full((3,), 2.2)], expected) == pytest.approx(0.1)
    assert math.isnan(op_bench.max_error([ok, nan], expected))
    assert math.isnan(op_bench.max_error([nan, torch.full((3,), 2.2)], expected))
    assert op_bench.max_error([torch.ones(0)], [torch.ones(0)]) == 0.0
