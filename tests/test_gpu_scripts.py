"""benchmarks/gpu_common.sh's pack_out: the device tool brings back at most 8 files from $OUT, so the
GPU scripts pack their logs into one tarball and keep the figures beside it."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMON = REPO / "benchmarks" / "gpu_common.sh"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bash scripts")


def pack(out, *args):
    script = f'source "{COMMON}"; pack_out "$@"'
    return subprocess.run(["bash", "-c", script, "pack", *args], env=dict(os.environ, OUT=str(out)),
                          capture_output=True, text=True, timeout=60)


def test_pack_out_keeps_the_named_files_and_packs_the_rest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    names = ["summary.txt", "a_details.txt", "b_details.txt", "build.log", "fps.log", "x.ncu-rep", "odd name.log"]
    for name in names:
        (out / name).write_text(f"contents of {name}\n")
    (out / "sub").mkdir()  # folders are left alone

    proc = pack(out, "logs", "summary.txt", "*_details.txt")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_details.txt", "b_details.txt", "logs.tar.gz", "sub",
                                                      "summary.txt"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        packed = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    assert packed == {name: f"contents of {name}\n" for name in ("build.log", "fps.log", "x.ncu-rep", "odd name.log")}

    # Run again with nothing new to pack: the tarball stays as it was.
    proc = pack(out, "logs", "summary.txt", "*_details.txt")
    assert proc.returncode == 0 and (out / "logs.tar.gz").is_file()
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert len(tar.getmembers()) == 4


# Stands in for python3 on PATH: records each call's arguments, succeeds, prints nothing.
PYTHON_STUB = """#!/bin/sh
echo "$*" >> "{log}"
exit 0
"""


def run_gpu_check(tmp_path, stub_text=PYTHON_STUB, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    stub = bin_dir / "python3"
    stub.write_text(stub_text.format(log=log))
    stub.chmod(0o755)
    environ = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path / "out"), SKIP_BUILD="1",
                   **env)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=environ, capture_output=True,
                          text=True, timeout=120)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_gpu_check_runs_the_chosen_tests_and_stages(tmp_path):
    proc, calls = run_gpu_check(tmp_path, GPU_CHECK_TESTS="cuda", FPS_LIMIT_S="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tests = [c for c in calls if "-m pytest" in c]
    assert len(tests) == 1 and tests[0].endswith("tests/test_cuda.py")  # not the Triton tests
    assert any("benchmarks/op_bench.py" in c for c in calls)
    assert not any("fps.py" in c or "profile_model.py" in c for c in calls)  # FPS_LIMIT_S=0: no fps stage
    # the CUDA kernels timed with both stagings of the logits; the Triton forward's stage comes with its tests
    assert [c for c in calls if "op_calls.py" in c] == [
        "-P benchmarks/op_calls.py --backends cuda --dtypes float32,bfloat16 --iters 10 --kernels"] * 2
    assert "--- CONDSEG_CUDA_WORD_STAGING=1" in proc.stdout.split("=== CUDA kernels, logits staged")[1]
    assert "cuda-staging   ok" in proc.stdout
    # the forward at batch 1 and 12, with the one fused kernel and with the split kernels
    batch1 = [c for c in calls if "op_bench.py" in c and "--batch 1,12 " in c]
    assert len(batch1) == 2 and all("--backends cuda --passes forward" in c for c in batch1)
    assert "--- CONDSEG_CUDA_SPLIT_FORWARD=1" in proc.stdout.split("=== CUDA forward at batch 1")[1]
    assert "cuda-batch1    ok" in proc.stdout
    assert "op-bench       ok" in proc.stdout and "fps" not in proc.stdout.split("=== gpu_check stages")[1]


def test_a_failed_variant_fails_its_stage_and_the_next_variant_still_runs(tmp_path):
    failing_granules = PYTHON_STUB.replace(
        "exit 0", 'case "$*" in *op_calls.py*) [ "$CONDSEG_CUDA_WORD_STAGING" = 0 ] && exit 1;; esac\nexit 0')
    proc, calls = run_gpu_check(tmp_path, failing_granules, GPU_CHECK_TESTS="cuda", FPS_LIMIT_S="0")
    assert proc.returncode != 0
    assert len([c for c in calls if "op_calls.py" in c]) == 2
    assert "cuda-staging   FAILED (rc=1)" in proc.stdout and "op-bench       ok" in proc.stdout


def test_gpu_check_runs_the_fps_cuda_tests_on_request(tmp_path):
    proc, calls = run_gpu_check(tmp_path, GPU_CHECK_TESTS="cuda fps", FPS_LIMIT_S="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tests = [c for c in calls if "-m pytest" in c]
    assert [t.split("not slow ")[1] for t in tests] == ["tests/test_cuda.py", "tests/test_fps.py tests/test_graphed.py -k cuda"]
    assert "fps-tests      ok" in proc.stdout


def test_gpu_check_runs_both_test_files_by_default(tmp_path):
    proc, calls = run_gpu_check(tmp_path, FPS_LIMIT_S="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c.split()[-1] for c in calls if "-m pytest" in c] == ["tests/test_cuda.py", "tests/test_triton.py"]
    # the Triton forward timed twice (fused, then split), and its stage in the table
    assert len([c for c in calls if "op_calls.py --backends triton --dtypes float32,bfloat16 --kernels" in c]) == 2
    assert "triton-forward ok" in proc.stdout
    assert "--- CONDSEG_TRITON_FUSED_FORWARD=0" in proc.stdout.split("=== Triton forward")[1]


def test_gpu_check_profiles_the_chosen_mode(tmp_path):
    proc, calls = run_gpu_check(tmp_path, GPU_CHECK_TESTS="cuda", PROFILE_MODE="bf16-compile")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    profiles = [c for c in calls if "profile_model.py" in c and "--train" not in c]
    assert len(profiles) == 1 and "--mode bf16-compile --shapes" in profiles[0]
    assert profiles[0].split("--out ")[1].endswith("/profile_bf16-compile.txt")
