"""CI check of the CUDA sources that needs no GPU (slow: minutes, marked ``slow``).

Every csrc/cuda/*.cu compiles with nvcc, for sm_89 and sm_90, under -std=c++17 and -std=c++20,
against the headers of the installed torch (CPU wheels ship the c10/cuda headers the sources use).
A CUDA syntax or template error fails here even on a CPU-only machine. The nvcc runs of one
standard go in parallel. Skipped only when nvcc is not found. Linking needs a CUDA torch:
tools/build_cuda_local.sh does the full build and link. The kernels themselves run on the CPU in
tests/test_cuda_emulated.py.
"""
import concurrent.futures
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("89", "90")
TIMEOUT_S = 1200


def find_nvcc():
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (Path(base) / "bin" / "nvcc").is_file():
            return str(Path(base) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()
pytestmark = pytest.mark.slow
requires_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def include_dirs(workdir):
    """torch's include paths, Python's, and a stand-in for the one generated header that CPU wheels
    of torch leave out (c10/cuda/impl/cuda_cmake_macros.h; a real one, when present, comes first)."""
    dirs = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for d in dirs):
        stub = Path(workdir) / "stub_include" / "c10/cuda/impl/cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(Path(workdir) / "stub_include"))
    return dirs


def nvcc_command(source, std, output):
    """The flags torch's CUDAExtension uses (setup.py), for both architectures at once."""
    cmd = [NVCC, "-c", str(source), "-o", str(output), f"-std={std}", "-O3", "--use_fast_math",
           "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-DCONDSEG_WITH_CUDA",
           '-DCONDSEG_CUDA_ARCH_LIST="8.9;9.0"', "-D__CUDA_NO_HALF_OPERATORS__",
           "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    for include in include_dirs(Path(output).parent):
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
    report = "\n\n".join(f"== {source.relative_to(REPO)} (-std={std}, sm_{'/sm_'.join(ARCHS)})\n{log[-6000:]}"
                         for source, log in failed.items())
    assert not failed, f"nvcc failed:\n{report}"

