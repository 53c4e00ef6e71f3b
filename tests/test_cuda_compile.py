"""CI checks of the CUDA kernels that need no GPU (both slow: minutes, marked ``slow``).

1. Every csrc/cuda/*.cu compiles with nvcc, for sm_89 and sm_90, under -std=c++17 and -std=c++20,
   against the headers of the installed torch (CPU wheels ship the c10/cuda headers the sources
   use). A CUDA syntax or template error fails here even on a CPU-only machine. The nvcc runs of one
   standard go in parallel. Skipped only when nvcc is not found. Linking needs a CUDA torch:
   tools/build_cuda_local.sh does the full build and link.
2. The kernels themselves run on the CPU: the same kernel sources, compiled by the host compiler
   with every CUDA thread of a block an OS thread and __syncthreads() a std::barrier (cp.async is
   the plain copy of its pre-sm_80 path), launched with the launchers' geometry, and compared with
   the reference, forward and backward. It checks index arithmetic, tiling, edges and block
   barriers; not timing, not the hardware's cp.async ordering. The harness is also a convenient
   place to run the kernels under ThreadSanitizer or AddressSanitizer.
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


# ---- 2. kernels emulated on the CPU ---------------------------------------------------------------

EMULATOR_SOURCE = r"""
// CPU emulation of the condseg_ops CUDA kernels (see tests/test_cuda_compile.py).
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <tuple>
#include <vector>

struct EmuDim { unsigned x = 0, y = 0, z = 0; };
thread_local EmuDim threadIdx, blockIdx;
EmuDim blockDim{1, 1, 1}, gridDim{1, 1, 1};
thread_local std::barrier<>* emu_barrier = nullptr;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
using std::max;
using std::min;
#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n)

#include "generic_kernels.cuh"
#include "k3_kernels.cuh"

namespace condseg_ops { namespace cuda { namespace k3 { alignas(16) unsigned char smem[256 * 1024]; } } }

#include <torch/extension.h>

namespace {
using condseg_ops::cuda::Geo;
namespace k3 = condseg_ops::cuda::k3;
namespace gk = condseg_ops::cuda::generic;

// One block at a time; its threads are OS threads sharing k3::smem (filled with garbage first).
template <typename F>
void launch(int64_t grid, int block, int smem_bytes, F&& body) {
  TORCH_CHECK(smem_bytes <= (int)sizeof(k3::smem), "shared memory request too large");
  gridDim.x = grid;
  blockDim.x = block;
  for (int64_t bid = 0; bid < grid; ++bid) {
    std::memset(k3::smem, 0xCD, sizeof(k3::smem));
    std::barrier<> bar(block);
    std::vector<std::thread> threads;
    for (int t = 0; t < block; ++t)
      threads.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = bid;
        emu_barrier = &bar;
        body();
        bar.arrive_and_drop();
      });
    for (auto& th : threads) th.join();
  }
}
// Grid-stride kernels: one thread does everything.
template <typename F>
void serial(F&& body) {
  gridDim.x = blockDim.x = 1;
  threadIdx.x = blockIdx.x = 0;
  body();
}

Geo make_geo(const at::Tensor& value, const at::Tensor& fg, int64_t K, int64_t dil) {
  Geo g{};
  g.B = value.size(0); g.C = value.size(1); g.H = value.size(2); g.W = value.size(3); g.heads = fg.size(3);
  g.Cg = g.C / g.heads; g.HW = g.H * g.W; g.K = K; g.k2 = K * K; g.k4 = g.k2 * g.k2; g.R = K / 2;
  g.dil = dil; g.reach = 2 * K - 1; g.D = g.reach * g.reach;
  return g;
}
template <typename T>
T* P(const at::Tensor& t) { return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr; }

// Same geometry as fused_k3.cu.
template <typename T>
at::Tensor fused_weights(const Geo& g, const at::Tensor& value, const at::Tensor& fg, const at::Tensor& bg,
                         const at::Tensor& out, double scale) {
  const int64_t tx = (g.W + k3::TW - 1) / k3::TW, ty = (g.H + k3::TH - 1) / k3::TH;
  const float sl2 = float(scale * condseg_ops::cuda::kLog2e);
  const bool apply = out.defined(), dual = bg.defined();
  at::Tensor weights = apply ? at::Tensor() : at::empty({g.B, g.heads, 25, g.H, g.W}, value.options().dtype(at::kFloat));
  launch(tx * ty * g.heads * g.B, k3::NT, k3::weights_smem_bytes<T>(), [&] {
    auto args = std::make_tuple(P<T>(value), P<T>(fg), P<T>(bg), P<T>(out), P<float>(weights), (int)g.H, (int)g.W,
                                (int)g.heads, (int)g.C, (int)g.Cg, (int)tx, (int)ty, (long long)fg.numel(),
                                (long long)value.numel(), sl2);
    if (dual && apply) std::apply(k3::weights_kernel<T, true, true>, args);
    else if (dual) std::apply(k3::weights_kernel<T, true, false>, args);
    else if (apply) std::apply(k3::weights_kernel<T, false, true>, args);
    else std::apply(k3::weights_kernel<T, false, false>, args);
  });
  return weights;
}

template <typename T>
std::vector<at::Tensor> fused_all(const Geo& g, const at::Tensor& value, const at::Tensor& fg, const at::Tensor& bg,
                                  const at::Tensor& go, double scale) {
  at::Tensor out = at::empty_like(value);
  fused_weights<T>(g, value, fg, bg, out, scale);
  at::Tensor weights = fused_weights<T>(g, value, fg, bg, at::Tensor(), scale);
  at::Tensor gv = at::empty_like(value), gfg = at::empty_like(fg);
  at::Tensor gbg = bg.defined() ? at::empty_like(bg) : at::empty({0}, value.options());
  at::Tensor gw = at::empty({g.B, g.heads, 25, g.H, g.W}, value.options().dtype(at::kFloat));
  const int64_t tx = (g.W + k3::BW - 1) / k3::BW, ty = (g.H + k3::BH - 1) / k3::BH;
  launch(tx * ty * g.heads * g.B, k3::NT, k3::value_grad_smem_bytes, [&] {
    k3::value_grad_kernel<T>(P<T>(go), P<T>(value), P<float>(weights), P<T>(gv), P<float>(gw), g.H, g.W, g.heads,
                             g.C, g.Cg, tx, ty);
  });
  const int64_t ph = g.B * g.HW * g.heads;
  const float sl2 = float(scale * condseg_ops::cuda::kLog2e);
  launch((ph + k3::NT4 - 1) / k3::NT4, k3::NT4, k3::logit_grad_smem_bytes<T, true>(), [&] {
    if (bg.defined())
      k3::logit_grad_kernel<T, true>(P<T>(fg), P<T>(bg), P<float>(gw), P<T>(gfg), P<T>(gbg), g.H, g.W, g.heads, ph,
                                     sl2, scale);
    else
      k3::logit_grad_kernel<T, false>(P<T>(fg), nullptr, P<float>(gw), P<T>(gfg), nullptr, g.H, g.W, g.heads, ph,
                                      sl2, scale);
  });
  return {out, gv, gfg, gbg, weights, gw};
}

// Same sequence as generic.cu / contrast_aggregate_cuda.cu.
template <typename T, typename acc_t>
std::vector<at::Tensor> generic_all(const Geo& g, const at::Tensor& value, const at::Tensor& fg, const at::Tensor& bg,
                                    const at::Tensor& go, double scale) {
  auto opts = value.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t sl2 = acc_t(scale * condseg_ops::cuda::kLog2e), s = acc_t(scale);
  const int64_t rows = g.B * g.HW * g.heads * g.k2;
  const bool dual = bg.defined();
  at::Tensor lf = at::empty({rows}, opts), lb = dual ? at::empty({rows}, opts) : at::Tensor();
  at::Tensor mix = at::empty({rows * g.k2}, opts), wt = at::empty({g.B, g.heads, g.D, g.H, g.W}, opts);
  serial([&] { gk::lse_kernel<T, acc_t>(P<T>(fg), P<acc_t>(lf), rows, g.k2, sl2); });
  if (dual) serial([&] { gk::lse_kernel<T, acc_t>(P<T>(bg), P<acc_t>(lb), rows, g.k2, sl2); });
  serial([&] {
    if (dual) gk::mix_kernel<T, acc_t, true>(P<T>(fg), P<T>(bg), P<acc_t>(lf), P<acc_t>(lb), P<acc_t>(mix), g, sl2);
    else gk::mix_kernel<T, acc_t, false>(P<T>(fg), nullptr, P<acc_t>(lf), nullptr, P<acc_t>(mix), g, sl2);
  });
  serial([&] { gk::gather_weights_kernel<acc_t>(P<acc_t>(mix), P<acc_t>(wt), g); });
  at::Tensor out = at::empty_like(value), gv = at::empty_like(value);
  serial([&] { gk::apply_weights_kernel<T, acc_t, false>(P<acc_t>(wt), P<T>(value), P<T>(out), g); });
  serial([&] { gk::apply_weights_kernel<T, acc_t, true>(P<acc_t>(wt), P<T>(go), P<T>(gv), g); });
  at::Tensor gw = at::empty({g.B, g.heads, g.D, g.H, g.W}, opts);
  serial([&] { gk::weight_grad_kernel<T, acc_t>(P<T>(go), P<T>(value), P<acc_t>(gw), g); });
  at::Tensor gpf = at::empty({rows * g.k2}, opts), gpb = dual ? at::empty({rows * g.k2}, opts) : at::Tensor();
  serial([&] {
    if (dual)
      gk::prob_grad_kernel<T, acc_t, true>(P<T>(fg), P<T>(bg), P<acc_t>(lf), P<acc_t>(lb), P<acc_t>(gw), P<acc_t>(gpf),
                                           P<acc_t>(gpb), g, sl2);
    else
      gk::prob_grad_kernel<T, acc_t, false>(P<T>(fg), nullptr, P<acc_t>(lf), nullptr, P<acc_t>(gw), P<acc_t>(gpf),
                                            nullptr, g, sl2);
  });
  at::Tensor gfg = at::empty_like(fg), gbg = dual ? at::empty_like(bg) : at::empty({0}, value.options());
  serial([&] { gk::softmax_backward_kernel<T, acc_t>(P<T>(fg), P<acc_t>(lf), P<acc_t>(gpf), P<T>(gfg), rows, g.k2, sl2, s); });
  if (dual)
    serial([&] { gk::softmax_backward_kernel<T, acc_t>(P<T>(bg), P<acc_t>(lb), P<acc_t>(gpb), P<T>(gbg), rows, g.k2, sl2, s); });
  return {out, gv, gfg, gbg, wt, gw};
}

// (out, grad_value, grad_fg, grad_bg, Wt, gWt) of the fused (K = 3) or generic kernels.
std::vector<at::Tensor> run(bool fused, at::Tensor value, at::Tensor fg, std::optional<at::Tensor> bg_opt,
                            at::Tensor grad_out, int64_t K, int64_t dil, double scale) {
  const at::Tensor bg = bg_opt.has_value() ? *bg_opt : at::Tensor();
  const Geo g = make_geo(value, fg, K, dil);
  switch (value.scalar_type()) {
    case at::kFloat: return fused ? fused_all<float>(g, value, fg, bg, grad_out, scale)
                                  : generic_all<float, float>(g, value, fg, bg, grad_out, scale);
    case at::kHalf: return fused ? fused_all<c10::Half>(g, value, fg, bg, grad_out, scale)
                                 : generic_all<c10::Half, float>(g, value, fg, bg, grad_out, scale);
    case at::kBFloat16: return fused ? fused_all<c10::BFloat16>(g, value, fg, bg, grad_out, scale)
                                     : generic_all<c10::BFloat16, float>(g, value, fg, bg, grad_out, scale);
    default:
      TORCH_CHECK(!fused, "the fused kernels take fp32, fp16 or bf16");
      return generic_all<double, double>(g, value, fg, bg, grad_out, scale);
  }
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run); }
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if not shutil.which("g++") and not shutil.which("c++"):
        pytest.skip("no host C++ compiler")
    workdir = tmp_path_factory.mktemp("cuda_emulator")
    (workdir / "fake" / "cuda_runtime.h").parent.mkdir()
    (workdir / "fake" / "cuda_runtime.h").write_text("// the emulator needs no CUDA runtime\n")
    source = workdir / "cuda_emulator.cpp"
    source.write_text(EMULATOR_SOURCE)
    return cpp_extension.load(
        "condseg_cuda_emulator", [str(source)], build_directory=str(workdir),
        extra_cflags=["-O1", "-std=c++20", f"-I{workdir / 'fake'}", f"-I{REPO / 'csrc' / 'cuda'}"],
        extra_ldflags=["-lpthread"], verbose=False)


EMULATED_CASES = [
    # (fused, dtype, B, C, H, W, heads, K, dilation, dual, storage offset)
    (True, torch.float32, 1, 8, 13, 37, 2, 3, 1, True, 0),     # several tiles, ragged edges
    (True, torch.float32, 2, 12, 7, 5, 3, 3, 1, False, 0),     # single softmax, image smaller than a tile
    (True, torch.bfloat16, 1, 6, 12, 33, 1, 3, 1, True, 0),
    (True, torch.float16, 1, 6, 14, 35, 2, 3, 1, True, 1),     # 2-byte tensors not 4-byte aligned
    (True, torch.float32, 1, 3, 1, 1, 3, 3, 1, True, 0),       # 1x1 image
    (False, torch.float64, 1, 4, 6, 7, 2, 5, 2, True, 0),
    (False, torch.float64, 1, 2, 4, 5, 1, 7, 1, False, 0),
    (False, torch.float32, 2, 3, 3, 4, 1, 1, 1, True, 0),
]


def _offset_view(t, offset):
    flat = torch.empty(t.numel() + offset, dtype=t.dtype)
    flat[offset:] = t.reshape(-1)
    return flat[offset:].view(t.shape)


@pytest.mark.parametrize("fused, dtype, B, C, H, W, heads, K, dilation, dual, offset", EMULATED_CASES)
def test_kernels_emulated_on_cpu_match_reference(emulator, fused, dtype, B, C, H, W, heads, K, dilation, dual,
                                                 offset):
    from condseg_ops.reference import contrast_aggregate_reference

    gen = torch.Generator().manual_seed(H * W + K)
    k2 = K * K
    value, grad_out = (torch.randn(B, C, H, W, generator=gen) for _ in range(2))
    fg = torch.randn(B, H, W, heads, k2, k2, generator=gen) * 2
    bg = torch.randn(B, H, W, heads, k2, k2, generator=gen) * 2 if dual else None
    inputs = [None if t is None else _offset_view(t.to(dtype), offset) for t in (value, fg, bg, grad_out)]
    scale = 0.7
    got = emulator.run(fused, inputs[0], inputs[1], inputs[2], inputs[3], K, dilation, scale)

    leaves = [t.double().requires_grad_() for t in inputs[:3] if t is not None]
    out = contrast_aggregate_reference(leaves[0], leaves[1], leaves[2] if dual else None, K, dilation, scale)
    expected = [out.detach()] + list(torch.autograd.grad(out, leaves, inputs[3].double()))
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    names = ("output", "grad_value", "grad_attn_fg", "grad_attn_bg")
    for name, g, e in zip(names, got[:4], expected):
        err = ((g.double() - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()  # K=1: grad_attn is 0
        assert err <= (tol if name in ("output", "grad_value") else 5 * tol), f"{name}: relative error {err:.2e}"
    if fused and dtype == torch.float32:  # the fused Wt and its gradient equal the generic kernels'
        generic = emulator.run(False, inputs[0], inputs[1], inputs[2], inputs[3], K, dilation, scale)
        for a, b in zip(got[4:], generic[4:]):
            assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
