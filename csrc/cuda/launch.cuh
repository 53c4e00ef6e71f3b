// Kernel launchers of the CUDA backend, callable from plain C++ (raw pointers, no ATen).
//
// They live in their own translation units (fused_k3.cu, generic.cu), which include no torch
// header beyond c10's Half/BFloat16: they compile fast and in parallel. contrast_aggregate_cuda.cu
// owns tensors, scratch allocation, dispatch and the operator registration. Each launcher queues
// its kernels on `stream` and returns the launch status (cudaGetLastError).
#pragma once

#include "common.cuh"

namespace condseg_ops {
namespace cuda {

// Accumulation type: fp32, fp64 for fp64 inputs.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// ---- fused K = 3, dilation 1 path (fused_k3.cu); T in {float, c10::Half, c10::BFloat16} -------

// Whether the sizes fit the fused kernels' int32 arithmetic and 1-D grids.
bool fused_sizes_ok(const Geo& g);

// Largest dynamic shared memory (bytes) one block of the fused kernels asks for.
template <typename T>
int fused_shared_memory_bytes();

// Whether fused_weights can stage the logits in vectors (k3_kernels.cuh, issue_round_vectors): heads
// a multiple of 4, logits aligned to 4 elements, and the shared memory (shared_optin bytes per block).
template <typename T>
bool fused_vector_logits_ok(const Geo& g, const T* fg, const T* bg, int shared_optin);

// With out != nullptr: the whole forward. Otherwise Wt (fp32, (B, heads, 25, H, W)) into weights.
// bg == nullptr means the single-softmax form. sl2 = scale * log2(e). vector_logits: stage the
// logits in vectors (only where fused_vector_logits_ok), else in 4-byte words.
template <typename T>
cudaError_t fused_weights(const Geo& g, const T* value, const T* fg, const T* bg, T* out, float* weights, float sl2,
                          bool vector_logits, cudaStream_t stream);

// The split forward (k3_split_kernels.cuh): the fused kernels' results, bit for bit, from two kernels
// of many light threads, for grids the fused forward cannot fill (batch 1). Blocks of the fused
// forward; whether the sizes fit the split kernels' int32 arithmetic; floats of its scratch `mix`.
long long fused_forward_blocks(const Geo& g);
bool split_sizes_ok(const Geo& g);
long long split_scratch_floats(const Geo& g);

// With out != nullptr the whole forward, otherwise Wt into weights, as fused_weights; mix holds
// split_scratch_floats(g) floats.
template <typename T>
cudaError_t split_weights(const Geo& g, const T* value, const T* fg, const T* bg, T* out, float* weights, float* mix,
                          float sl2, cudaStream_t stream);

// grad_value and gWt (fp32, (B, heads, 25, H, W)) from grad_out, value and Wt.
template <typename T>
cudaError_t fused_value_grad(const Geo& g, const T* grad_out, const T* value, const float* weights, T* grad_value,
                             float* grad_weights, cudaStream_t stream);

// grad_attn_fg (and grad_attn_bg when bg != nullptr) from gWt and the logits.
template <typename T>
cudaError_t fused_logit_grad(const Geo& g, const T* fg, const T* bg, const float* grad_weights, T* grad_fg,
                             T* grad_bg, float sl2, float scale, cudaStream_t stream);

// ---- generic path (generic.cu); T in {float, double, c10::Half, c10::BFloat16} ---------------
// Scratch in Acc<T>::type: lse (B*H*W*heads*K2 each), mix (B*H*W*heads*K4), weights and
// grad_weights (B, heads, D, H, W), gp_fg / gp_bg (B*H*W*heads*K4 each).

template <typename T>
cudaError_t generic_weights(const Geo& g, const T* fg, const T* bg, typename Acc<T>::type* lse_fg,
                            typename Acc<T>::type* lse_bg, typename Acc<T>::type* mix,
                            typename Acc<T>::type* weights, double scale, cudaStream_t stream);

// transpose = false: out = sum_d Wt[d] src[. + d] (forward); true: the gradient of value.
template <typename T>
cudaError_t generic_apply(const Geo& g, const typename Acc<T>::type* weights, const T* src, T* out, bool transpose,
                          cudaStream_t stream);

template <typename T>
cudaError_t generic_logit_grad(const Geo& g, const T* grad_out, const T* value, const T* fg, const T* bg,
                               const typename Acc<T>::type* lse_fg, const typename Acc<T>::type* lse_bg,
                               typename Acc<T>::type* grad_weights, typename Acc<T>::type* gp_fg,
                               typename Acc<T>::type* gp_bg, T* grad_fg, T* grad_bg, double scale,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace condseg_ops
