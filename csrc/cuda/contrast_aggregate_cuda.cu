// CUDA backend of condseg_ops::contrast_aggregate (forward and backward): tensors, scratch,
// dispatch and the TORCH_LIBRARY_IMPL registration. The kernels are in k3_kernels.cuh (fused,
// launched from fused_k3.cu) and generic_kernels.cuh (launched from generic.cu).
//
// K = 3, dilation 1 in fp32/fp16/bf16 (ConDSeg's setting) runs the fused kernels: the forward is
// one kernel (logits and value in, output out); the backward is three kernels with two fp32 scratch
// tensors, Wt and its gradient (25 floats per pixel and head each). Every other case (K != 3,
// dilation != 1, fp64, a scale <= 0, sizes past int32 tiles, or a device without the shared memory
// the fused kernels need) runs the generic kernels. Both are gathers: deterministic, no atomics;
// accumulation in fp32 (fp64 for fp64 inputs). CONDSEG_CUDA_GENERIC=1 forces the generic kernels
// (the tests compare both). With heads a multiple of 4, the fused kernels copy the logits in 16- or
// 8-byte granules (CONDSEG_CUDA_WORD_STAGING=1: in 4-byte words, as on other head counts). Where the
// fused forward's grid is less than one full wave (two blocks per SM; batch 1 at ConDSeg's sizes),
// the split kernels run in its place (and give the backward its Wt), with the same bits
// (CONDSEG_CUDA_SPLIT_FORWARD=1 or 0 forces either way).
//
// Inputs may be non-contiguous (copied once); outputs are contiguous. Everything is queued on the
// current CUDA stream of the inputs' device, under a device guard.
#include "../contrast_aggregate.h"
#include "launch.cuh"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

namespace condseg_ops {
namespace {

using cuda::Geo;

Geo make_geo(const Geometry& geo) {
  Geo g{};
  g.B = geo.batch;
  g.C = geo.channels;
  g.H = geo.height;
  g.W = geo.width;
  g.heads = geo.heads;
  g.Cg = geo.group_channels();
  g.HW = geo.pixels();
  g.K = geo.kernel_size;
  g.k2 = geo.slots();
  g.k4 = g.k2 * g.k2;
  g.R = geo.kernel_size / 2;
  g.dil = geo.dilation;
  g.reach = geo.reach();
  g.D = geo.neighbours();
  return g;
}

bool env_flag(const char* name) {
  const char* flag = std::getenv(name);
  return flag != nullptr && flag[0] != '\0' && std::strcmp(flag, "0") != 0;
}

float log2_scale(double scale) {
  return static_cast<float>(scale * cuda::kLog2e);
}

// How a call runs: on the fused K = 3 kernels or the generic ones, whether the split kernels take
// the place of weights_kernel, and whether the fused kernels copy the logits in granules ("vector
// staging") or 4-byte words. The fused softmaxes take the maximum before scaling, which needs a
// finite scale * log2(e) > 0 in float (k3_kernels.cuh, softmax_row). CONDSEG_CUDA_WORD_STAGING=1
// keeps words (the tests compare both, bit for bit).
struct FusedPlan {
  bool fused = false, vector_logits = false, split = false;
};

// Whether the split kernels should take the place of weights_kernel: when the fused forward's
// grid would not fill the device once at two blocks per SM, a call takes about one block's latency
// (53 us at batch 1, 64x64, H200), which the split kernels' many light threads cut.
bool split_wanted(const Geo& g, int device) {
  if (!cuda::split_sizes_ok(g)) return false;
  if (const char* flag = std::getenv("CONDSEG_CUDA_SPLIT_FORWARD"); flag != nullptr && flag[0] != '\0')
    return std::strcmp(flag, "0") != 0;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return cuda::fused_forward_blocks(g) < 2LL * sms;
}

template <typename T>
FusedPlan fused_plan(const Geo& g, const at::Tensor& value, const at::Tensor& fg, const at::Tensor& bg,
                     double scale) {
  FusedPlan plan;
  if constexpr (!std::is_same_v<T, double>) {
    const float sl2 = log2_scale(scale);
    if (g.K != 3 || g.dil != 1 || !(sl2 > 0 && std::isfinite(sl2)) || env_flag("CONDSEG_CUDA_GENERIC") ||
        !cuda::fused_sizes_ok(g))
      return plan;
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, value.get_device()));
    plan.fused = cuda::fused_shared_memory_bytes<T>() <= optin;
    plan.split = plan.fused && split_wanted(g, value.get_device());
    plan.vector_logits = plan.fused && !plan.split && !env_flag("CONDSEG_CUDA_WORD_STAGING") &&
                         cuda::fused_vector_logits_ok<T>(g, fg.data_ptr<T>(), bg.defined() ? bg.data_ptr<T>() : nullptr,
                                                         optin);
  }
  return plan;
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
using acc_t = typename cuda::Acc<T>::type;

template <typename T>
at::TensorOptions acc_options(const at::Tensor& t) {
  return t.options().dtype(c10::CppTypeToScalarType<acc_t<T>>::value);
}

// The fused K = 3 forward (out) or Wt (weights), from weights_kernel or from the split kernels.
template <typename T>
void fused_or_split_weights(const FusedPlan& plan, const Geo& g, const at::Tensor& value, const at::Tensor& fg,
                            const at::Tensor& bg, T* out, float* weights, double scale, cudaStream_t stream) {
  if (!plan.split) {
    C10_CUDA_CHECK(cuda::fused_weights<T>(g, ptr<T>(value), ptr<T>(fg), ptr<T>(bg), out, weights, log2_scale(scale),
                                          plan.vector_logits, stream));
    return;
  }
  at::Tensor mix = at::empty({cuda::split_scratch_floats(g)}, value.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::split_weights<T>(g, ptr<T>(value), ptr<T>(fg), ptr<T>(bg), out, weights, ptr<float>(mix),
                                        log2_scale(scale), stream));
}

template <typename T>
void forward_impl(const Geo& g, const at::Tensor& value, const at::Tensor& fg, const at::Tensor& bg,
                  const at::Tensor& out, double scale, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, double>) {
    if (const FusedPlan plan = fused_plan<T>(g, value, fg, bg, scale); plan.fused) {
      fused_or_split_weights<T>(plan, g, value, fg, bg, ptr<T>(out), nullptr, scale, stream);
      return;
    }
  }
  const auto opts = acc_options<T>(value);
  const int64_t rows = g.B * g.HW * g.heads * g.k2;
  at::Tensor weights = at::empty({g.B, g.heads, g.D, g.H, g.W}, opts);
  {
    at::Tensor lse_fg = at::empty({rows}, opts), mix = at::empty({rows * g.k2}, opts);
    at::Tensor lse_bg = bg.defined() ? at::empty({rows}, opts) : at::Tensor();
    C10_CUDA_CHECK(cuda::generic_weights<T>(g, ptr<T>(fg), ptr<T>(bg), ptr<acc_t<T>>(lse_fg), ptr<acc_t<T>>(lse_bg),
                                            ptr<acc_t<T>>(mix), ptr<acc_t<T>>(weights), scale, stream));
  }
  C10_CUDA_CHECK(cuda::generic_apply<T>(g, ptr<acc_t<T>>(weights), ptr<T>(value), ptr<T>(out), false, stream));
}

// Fills grad_value; returns (grad_fg, grad_bg), allocated once Wt is released (peak memory).
template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_impl(const Geo& g, const at::Tensor& grad_out, const at::Tensor& value,
                                                 const at::Tensor& fg, const at::Tensor& bg,
                                                 const at::Tensor& grad_value, double scale, cudaStream_t stream) {
  auto logit_grads = [&] {
    return std::make_tuple(at::empty(fg.sizes(), fg.options()),
                           bg.defined() ? at::empty(bg.sizes(), bg.options()) : at::Tensor());
  };
  if constexpr (!std::is_same_v<T, double>) {
    if (const FusedPlan plan = fused_plan<T>(g, value, fg, bg, scale); plan.fused) {
      const auto f32 = value.options().dtype(at::kFloat);
      at::Tensor grad_weights = at::empty({g.B, g.heads, 25, g.H, g.W}, f32);
      {
        at::Tensor weights = at::empty({g.B, g.heads, 25, g.H, g.W}, f32);
        fused_or_split_weights<T>(plan, g, value, fg, bg, nullptr, ptr<float>(weights), scale, stream);
        C10_CUDA_CHECK(cuda::fused_value_grad<T>(g, ptr<T>(grad_out), ptr<T>(value), ptr<float>(weights),
                                                 ptr<T>(grad_value), ptr<float>(grad_weights), stream));
      }  // Wt goes back to the caching allocator (stream-ordered) before the logit gradients
      auto [grad_fg, grad_bg] = logit_grads();
      C10_CUDA_CHECK(cuda::fused_logit_grad<T>(g, ptr<T>(fg), ptr<T>(bg), ptr<float>(grad_weights), ptr<T>(grad_fg),
                                               ptr<T>(grad_bg), log2_scale(scale), static_cast<float>(scale),
                                               stream));
      return {grad_fg, grad_bg};
    }
  }
  const auto opts = acc_options<T>(value);
  const int64_t rows = g.B * g.HW * g.heads * g.k2;
  at::Tensor lse_fg = at::empty({rows}, opts);
  at::Tensor lse_bg = bg.defined() ? at::empty({rows}, opts) : at::Tensor();
  {
    at::Tensor weights = at::empty({g.B, g.heads, g.D, g.H, g.W}, opts);
    {
      at::Tensor mix = at::empty({rows * g.k2}, opts);
      C10_CUDA_CHECK(cuda::generic_weights<T>(g, ptr<T>(fg), ptr<T>(bg), ptr<acc_t<T>>(lse_fg),
                                              ptr<acc_t<T>>(lse_bg), ptr<acc_t<T>>(mix), ptr<acc_t<T>>(weights), scale,
                                              stream));
    }
    C10_CUDA_CHECK(
        cuda::generic_apply<T>(g, ptr<acc_t<T>>(weights), ptr<T>(grad_out), ptr<T>(grad_value), true, stream));
  }
  at::Tensor grad_weights = at::empty({g.B, g.heads, g.D, g.H, g.W}, opts);
  at::Tensor gp_fg = at::empty({rows * g.k2}, opts);
  at::Tensor gp_bg = bg.defined() ? at::empty({rows * g.k2}, opts) : at::Tensor();
  auto [grad_fg, grad_bg] = logit_grads();
  C10_CUDA_CHECK(cuda::generic_logit_grad<T>(g, ptr<T>(grad_out), ptr<T>(value), ptr<T>(fg), ptr<T>(bg),
                                             ptr<acc_t<T>>(lse_fg), ptr<acc_t<T>>(lse_bg),
                                             ptr<acc_t<T>>(grad_weights), ptr<acc_t<T>>(gp_fg), ptr<acc_t<T>>(gp_bg),
                                             ptr<T>(grad_fg), ptr<T>(grad_bg), scale, stream));
  return {grad_fg, grad_bg};
}

at::Tensor forward_cuda(const at::Tensor& value_in, const at::Tensor& fg_in, const std::optional<at::Tensor>& bg_in,
                        int64_t kernel_size, int64_t dilation, double scale) {
  const Geometry geo = check_inputs(value_in, fg_in, bg_in, kernel_size, dilation);
  const c10::cuda::CUDAGuard guard(value_in.device());
  if (geo.empty()) return at::zeros(value_in.sizes(), value_in.options());
  const at::Tensor value = value_in.contiguous(), fg = fg_in.contiguous();
  const at::Tensor bg = bg_in.has_value() ? bg_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty(value.sizes(), value.options());
  const Geo g = make_geo(geo);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(value.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "contrast_aggregate_cuda", [&] {
    forward_impl<scalar_t>(g, value, fg, bg, out, scale, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_in, const at::Tensor& value_in,
                                                             const at::Tensor& fg_in,
                                                             const std::optional<at::Tensor>& bg_in,
                                                             int64_t kernel_size, int64_t dilation, double scale) {
  const Geometry geo = check_inputs(value_in, fg_in, bg_in, kernel_size, dilation);
  check_grad_out(grad_in, value_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const bool has_bg = bg_in.has_value();
  if (geo.empty()) return zero_gradients(value_in, fg_in, bg_in);
  const at::Tensor grad_out = grad_in.contiguous(), value = value_in.contiguous(), fg = fg_in.contiguous();
  const at::Tensor bg = has_bg ? bg_in->contiguous() : at::Tensor();
  at::Tensor grad_value = at::empty(value.sizes(), value.options());
  at::Tensor grad_fg, grad_bg;
  const Geo g = make_geo(geo);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(value.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "contrast_aggregate_backward_cuda",
                                  [&] {
                                    std::tie(grad_fg, grad_bg) =
                                        backward_impl<scalar_t>(g, grad_out, value, fg, bg, grad_value, scale, stream);
                                  });
  return {grad_value, grad_fg, has_bg ? grad_bg : at::empty({0}, value.options())};
}

}  // namespace
}  // namespace condseg_ops

TORCH_LIBRARY_IMPL(condseg_ops, CUDA, m) {
  m.impl("contrast_aggregate", &condseg_ops::forward_cuda);
  m.impl("contrast_aggregate_backward", &condseg_ops::backward_cuda);
}
