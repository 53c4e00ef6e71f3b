"""CI check of the CUDA sources that needs no GPU (slow: minutes, marked ``slow``).

Every csrc/cuda/*.cu compiles with nvcc for sm_89 and sm_90 under -std=c++17, and for sm_90 under
-std=c++20 (what the language standard changes does not depend on the architecture, and one
architecture less saves a quarter of the test's minute), against the headers of the installed
torch (CPU wheels ship the c10/cuda headers the sources use).
A CUDA syntax or template error fails here even on a CPU-only machine. The nvcc runs of one
standard go in parallel. Skipped only when nvcc is not found. Linking needs a CUDA torch:
tools/build_cuda_local.sh does the full build and link. The kernels themselves run on the CPU in
tests/test_cuda_emulated.py.
"""
import concurrent.futures
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
ARCHS = {"c++17": ("89", "90"), "c++20": ("90",)}
TIMEOUT_S = 1200
kernel_stats = load_tool("kernel_stats")  # the nvcc flags, include folders and nvcc lookup, shared
NVCC = kernel_stats.find_tool("nvcc")
pytestmark = pytest.mark.slow
requires_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def nvcc_command(source, std, output):
    """The flags torch's CUDAExtension uses (setup.py), for the standard's architectures at once."""
    cmd = [NVCC, "-c", str(source), "-o", str(output), f"-std={std}", *kernel_stats.NVCC_FLAGS, "-Xcompiler",
           "-fPIC", '-DCONDSEG_CUDA_ARCH_LIST="8.9;9.0"', "-DTORCH_API_INCLUDE_EXTENSION_H",
           "-DTORCH_EXTENSION_NAME=_C"]
    for arch in ARCHS[std]:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    for include in kernel_stats.include_dirs(Path(output).parent):
        cmd += ["-I", include]
    return cmd


def compile_source(source, std, workdir):
    output = Path(workdir) / f"{source.stem}.{std}.o"
    proc = subprocess.run(nvcc_command(source, std, output), capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc.returncode, proc.stdout + proc.stderr


def torch_headers_compile(std, workdir):
    """Whether torch's own headers compile under `std` (torch >= 2.14 requires C++20)."""
    probe = Path(workdir) / "torch_headers_probe.cu"
    probe.write_text("#include <ATen/core/Tensor.h>\n#include <torch/library.h>\n")
    return compile_source(probe, std, workdir)[0] == 0


@requires_nvcc
@pytest.mark.parametrize("std", ["c++17", "c++20"])
def test_cuda_sources_compile(std):
    assert SOURCES, "no .cu sources under csrc/cuda"
    with tempfile.TemporaryDirectory() as workdir:
        workers = max(1, min(len(SOURCES), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = dict(zip(SOURCES, pool.map(lambda s: compile_source(s, std, workdir), SOURCES)))
        failed = {source: log for source, (rc, log) in results.items() if rc != 0}
        if failed and not torch_headers_compile(std, workdir):
            pytest.skip(f"the headers of the installed torch {torch.__version__} do not compile under -std={std}")
    report = "\n\n".join(f"== {source.relative_to(REPO)} (-std={std}, sm_{'/sm_'.join(ARCHS[std])})\n{log[-6000:]}"
                         for source, log in failed.items())
    assert not failed, f"nvcc failed:\n{report}"

