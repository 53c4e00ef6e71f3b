"""Builds the CUDA backend's real sources (csrc/cuda) as a CPU extension that emulates the GPU.

The kernel sources are copied with two mechanical rewrites that plain C++ needs:
`kernel<<<grid, block, shared, stream>>>(args)` becomes `::emu::launch(kernel, grid, block, shared,
stream)(args)`, and `extern __shared__ ... name[];` becomes a pointer to the emulated block's shared
memory. The TORCH_LIBRARY blocks are dropped (the real extension owns the op names), and
bindings.cpp exposes the backend's forward and backward through pybind11. The first build takes
about 40 s on 2 cores; later runs reuse it.
"""
import re
import sys
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"

LAUNCH = re.compile(r"([\w:]+(?:<[^;<>()]*>)?)<<<(.*?)>>>\(", re.S)
SHARED = re.compile(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];")
LIBRARY = re.compile(r"^TORCH_LIBRARY(?:_IMPL)?\(.*", re.S | re.M)
CUDA_INCLUDES = re.compile(r'^#include <c10/cuda/.*$', re.M)

STALE_LOCK_S = 600

SOURCES = ["contrast_aggregate.h", "contrast_aggregate.cpp", "cuda/common.cuh", "cuda/launch.cuh",
           "cuda/k3_kernels.cuh", "cuda/k3_split_kernels.cuh", "cuda/generic_kernels.cuh", "cuda/fused_k3.cu",
           "cuda/generic.cu", "cuda/contrast_aggregate_cuda.cu"]


def rewrite(text):
    text, launches = LAUNCH.subn(r"::emu::launch(\1, \2)(", text)
    text = SHARED.sub(r"unsigned char* \1 = ::emu::dynamic_shared_memory();", text)
    text = CUDA_INCLUDES.sub("", text)
    return LIBRARY.sub("", text), launches


def write_if_changed(path, text):
    """An unchanged file keeps its time stamp, so the cached build stays valid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def emulated_sources(out_dir):
    """Writes the rewritten sources under out_dir; returns the number of kernel launches rewritten."""
    launches = 0
    for name in SOURCES:
        text, n = rewrite((CSRC / name).read_text())
        launches += n
        write_if_changed(Path(out_dir) / name, text)
    return launches


def load(cache_dir):
    """The emulated backend module: forward(value, fg, bg, K, dilation, scale) and backward(...),
    built under cache_dir in a folder per torch and Python version (a stale build would not load)."""
    build_dir = Path(cache_dir) / f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    # torch's build lock outlives a build killed midway, and the next load would wait on it forever;
    # a build takes about a minute, so a lock older than STALE_LOCK_S is such a leftover.
    lock = build_dir / "lock"
    if lock.is_file() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink()
    src_dir = build_dir / "src"
    launches = emulated_sources(src_dir)
    assert launches >= 10, f"only {launches} kernel launches found in csrc/cuda: update the rewrite"
    bindings = build_dir / "bindings.cpp"
    write_if_changed(bindings, (HERE / "bindings.cpp").read_text())
    return cpp_extension.load(
        name="condseg_cuda_emulated",
        sources=[str(bindings)],
        extra_include_paths=[str(HERE / "include"), str(src_dir)],
        extra_cflags=["-O1", "-w"],
        build_directory=str(build_dir),
        verbose=False,
    )
