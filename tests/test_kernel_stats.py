"""tools/kernel_stats.py: its parsers, and (slow, needs nvcc) the static shape of the fused forward.

The compiler pads a cp.async that directly follows a shared load with three no-op instructions
(`@!PT LDS`). The fused float32 forward reads its copy offsets in batches so that a whole batch
shares one padding; the slow test keeps it that way (before, every copy of the logits had its own).
The 2-byte forward reads them one by one: batched, it spilled. Vector staging (heads a multiple of
4) copies 16- or 8-byte granules instead, in batches too.
"""
import shutil

import pytest

from conftest import REPO, load_tool

kernel_stats = load_tool("kernel_stats")

PTXAS = """\
ptxas info    : Compiling entry function '_Z1aPf' for 'sm_90'
ptxas info    : Function properties for _Z1aPf
    16 bytes stack frame, 12 bytes spill stores, 44 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 16 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z1bPf' for 'sm_90'
ptxas info    : Function properties for _Z1bPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers
ptxas info    : Compile time = 1.0 ms
ptxas info    : Function properties for _Z6calleev
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Function properties for _Z7callee2v
    0 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function '_Z1cPf' for 'sm_90'
ptxas info    : Function properties for _Z1cPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers
"""


def test_ptxas_resources_are_read_per_kernel():
    # _Z1bPf's called functions (listed after it) add their spills to its own
    assert kernel_stats.ptxas_resources(PTXAS) == {"_Z1aPf": (128, 12, 44, 16), "_Z1bPf": (40, 12, 8, 0),
                                                   "_Z1cPf": (32, 0, 0, 0)}


def test_short_names_without_a_demangler_keep_the_mangled_names(monkeypatch):
    monkeypatch.setattr(kernel_stats.shutil, "which", lambda name: None)
    assert kernel_stats.short_names(["_Z1aPf"]) == {"_Z1aPf": "_Z1aPf"}


NVCC = kernel_stats.find_tool("nvcc")
CUOBJDUMP = kernel_stats.find_tool("cuobjdump")


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None or CUOBJDUMP is None, reason="needs nvcc and cuobjdump (CUDA_HOME, or triton's)")
@pytest.mark.skipif(shutil.which("c++filt") is None, reason="needs c++filt (binutils) to name the kernels")
def test_fused_forward_copies_are_not_padded_one_by_one(capsys):
    """Depends on nvcc's scheduling: if a newer nvcc pads differently, look with the tool and adjust."""
    rows = kernel_stats.collect(REPO / "csrc" / "cuda" / "fused_k3.cu", "90", NVCC, CUOBJDUMP)
    assert all(0 < r["regs"] <= 255 for r in rows), rows
    # float32 only: 2-byte logits at the ends of the tensor take an element-wise path, whose
    # stores the compiler pads too.
    forward = [r for r in rows if r["name"].startswith("weights_kernel<float,")]
    assert len(forward) == 8, f"expected the 8 float32 weights_kernel variants in {[r['name'] for r in rows]}"
    for r in forward:
        assert r["ldgsts"] > 0 and r["bar"] > 0, r
        # every copy of the logits used to have three no-ops of its own (pad = 3 x ldgsts); now a
        # batch of four shares them (the value stage's copies still have some)
        assert r["pad"] <= 1.5 * r["ldgsts"], r

    # The 2-byte forward once spilled (offsets read in batches) and ran 13% slower on an H200. With
    # vector staging (the last template argument) phase 1 is a call of its own: the registers saved
    # around it (once per block) and a word or two inside it, no more; inlined, it spilled 380 bytes.
    for r in rows:
        if r["name"].startswith(("weights_kernel<BFloat16, true", "weights_kernel<Half, true")):
            if r["name"].endswith("false>"):
                assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
            else:
                assert r["spill_loads"] <= 64, r

    kernel_stats.print_table(rows, "weights_kernel<float, true, true, true>")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("weights_kernel<float, true, true, true>"), lines
