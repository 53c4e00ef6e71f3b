"""Static figures of the CUDA kernels, for work on them without a GPU.

Compiles one csrc/cuda source for one architecture (the flags of setup.py), then prints per kernel:
registers, spill bytes and stack (ptxas -v), and counts in its SASS: all instructions, the no-ops
the compiler pads cp.async copies with (`@!PT LDS`), cp.async copies (LDGSTS), barriers, shared
loads, FFMA and warp shuffles. Counts are static (each instruction once, loops not multiplied out):
compare two versions of a kernel, not two kernels. The Triton kernels get the same counts from
`python tests/test_triton.py aot 90 [--full]` (one JSON record per compiled kernel).

    python tools/kernel_stats.py                      # csrc/cuda/fused_k3.cu, sm_90
    python tools/kernel_stats.py --filter weights_kernel --arch 89 csrc/cuda/fused_k3.cu

Needs nvcc (CUDA_HOME or /usr/local/cuda) and cuobjdump (the toolkit's, or the copy the triton
wheel ships). The torch headers come from the installed torch. tests/test_cuda_compile.py uses the
same flags, include folders and tool lookup.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# The nvcc flags of setup.py's CUDAExtension that change the code (torch adds the -D ones).
NVCC_FLAGS = ("-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-DCONDSEG_WITH_CUDA",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__")


def find_tool(name):
    """A CUDA toolkit program (nvcc, cuobjdump): CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH, then the
    copy the triton wheel ships; None when there is none."""
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (Path(base) / "bin" / name).is_file():
            return str(Path(base) / "bin" / name)
    if shutil.which(name):
        return shutil.which(name)
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.is_file() else None


def include_dirs(workdir):
    """torch's include paths, Python's, and a stand-in for the one generated header that CPU wheels
    of torch leave out (c10/cuda/impl/cuda_cmake_macros.h; a real one, when present, comes first)."""
    from torch.utils import cpp_extension

    dirs = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for d in dirs):
        stub = Path(workdir) / "stub_include" / "c10/cuda/impl/cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(Path(workdir) / "stub_include"))
    return dirs


def cxx_standard():
    """C++17, or C++20 for torch >= 2.14, whose headers require it."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return "c++20" if (major, minor) >= (2, 14) else "c++17"


def compile_cubin(nvcc, source, arch, workdir):
    """(cubin path, ptxas -v text)."""
    cubin = Path(workdir) / "kernels.cubin"
    cmd = [nvcc, "-cubin", "-o", str(cubin), str(source), f"-std={cxx_standard()}", *NVCC_FLAGS,
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
           *(f"-I{d}" for d in include_dirs(workdir))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"nvcc failed on {source}:\n{proc.stderr[-4000:]}")
    return cubin, proc.stderr


def ptxas_resources(text):
    """{mangled kernel name: (registers, spill store bytes, spill load bytes, stack bytes)}. The
    spills of the functions a kernel calls (ptxas lists them after the kernel) count as its own."""
    out, current, last, spills = {}, None, None, (0, 0, 0)
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current, last = m.group(1), None
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = (int(m.group(2)), int(m.group(3)), int(m.group(1)))
            if last is not None:  # a called function's, after its kernel's "Used" line
                regs, stores, loads, stack = out[last]
                out[last] = (regs, stores + spills[0], loads + spills[1], stack)
        elif (m := re.search(r"Used (\d+) registers", line)) and current:
            out[current] = (int(m.group(1)),) + spills
            current, last, spills = None, current, (0, 0, 0)
    return out


def sass_counts(cuobjdump, cubin):
    """{mangled kernel name: {counter: static count}}."""
    text = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    counts, name = {}, None
    for line in text.splitlines():
        if m := re.search(r"Function : (\w+)", line):
            name = m.group(1)
            counts[name] = dict.fromkeys(("instr", "pad", "ldgsts", "bar", "lds", "ffma", "shfl"), 0)
            continue
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(.*?);", line)
        if not m or name is None or " NOP" in f" {m.group(1)}":
            continue
        ins = m.group(1)
        c = counts[name]
        c["instr"] += 1
        c["pad"] += ins.startswith("@!PT LDS")
        c["ldgsts"] += "LDGSTS" in ins
        c["bar"] += "BAR.SYNC" in ins
        c["lds"] += bool(re.search(r"\bLDS(\.|\s)", ins)) and not ins.startswith("@!PT")
        c["ffma"] += bool(re.search(r"\bFFMA\b", ins))
        c["shfl"] += bool(re.search(r"\bSHFL\b", ins))
    return counts


def short_names(mangled):
    """{mangled: 'weights_kernel<float, true, true>'}, through c++filt when there is one."""
    if not mangled or shutil.which("c++filt") is None:
        return {name: name for name in mangled}
    text = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True).stdout
    return {name: re.sub(r"^void |\(.*$|condseg_ops::cuda::(k3::)?|c10::", "", plain)
            for name, plain in zip(mangled, text.splitlines())}


def collect(source, arch, nvcc, cuobjdump):
    """One row per kernel: name, regs, spill_stores, spill_loads, and the SASS counters."""
    with tempfile.TemporaryDirectory() as workdir:
        cubin, ptxas = compile_cubin(nvcc, Path(source), arch, workdir)
        resources, counts = ptxas_resources(ptxas), sass_counts(cuobjdump, cubin)
    names = short_names(list(counts))
    rows = []
    for mangled, c in counts.items():
        regs, stores, loads, _ = resources.get(mangled, (0, 0, 0, 0))
        rows.append({"name": names[mangled], "regs": regs, "spill_stores": stores, "spill_loads": loads, **c})
    return sorted(rows, key=lambda row: row["name"])


def print_table(rows, name_filter=""):
    print(f"{'kernel':44} {'regs':>4} {'spill st/ld':>11} {'instr':>6} {'pad':>4} {'cp.async':>8} "
          f"{'bar':>4} {'lds':>5} {'ffma':>5} {'shfl':>5}")
    for r in rows:
        if name_filter in r["name"]:
            spills = f"{r['spill_stores']}/{r['spill_loads']}"
            print(f"{r['name']:44} {r['regs']:4d} {spills:>11} {r['instr']:6d} {r['pad']:4d} {r['ldgsts']:8d} "
                  f"{r['bar']:4d} {r['lds']:5d} {r['ffma']:5d} {r['shfl']:5d}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", default=str(REPO / "csrc/cuda/fused_k3.cu"))
    parser.add_argument("--arch", default="90", help="SM architecture, like 90 or 89 (default 90)")
    parser.add_argument("--filter", default="", help="only kernels whose name contains this text")
    args = parser.parse_args(argv)
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        sys.exit("needs nvcc and cuobjdump (set CUDA_HOME, or pip install triton for its cuobjdump)")
    print_table(collect(args.source, args.arch, nvcc, cuobjdump), args.filter)
    return 0


if __name__ == "__main__":
    sys.exit(main())
