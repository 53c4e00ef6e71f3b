// Launchers of the generic kernels (generic_kernels.cuh): any K, dilation and floating dtype.
#include "generic_kernels.cuh"
#include "launch.cuh"

namespace condseg_ops {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Blocks of a grid-stride launch over `total` items.
unsigned int grid_for(int64_t total) {
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > (int64_t(1) << 20)) blocks = int64_t(1) << 20;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

}  // namespace

template <typename T>
cudaError_t generic_weights(const Geo& g, const T* fg, const T* bg, typename Acc<T>::type* lse_fg,
                            typename Acc<T>::type* lse_bg, typename Acc<T>::type* mix,
                            typename Acc<T>::type* weights, double scale, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const acc_t sl2 = static_cast<acc_t>(scale * kLog2e);
  const int64_t rows = g.B * g.HW * g.heads * g.k2;
  generic::lse_kernel<T, acc_t><<<grid_for(rows), kThreads, 0, stream>>>(fg, lse_fg, rows, g.k2, sl2);
  if (bg != nullptr) {
    generic::lse_kernel<T, acc_t><<<grid_for(rows), kThreads, 0, stream>>>(bg, lse_bg, rows, g.k2, sl2);
    generic::mix_kernel<T, acc_t, true><<<grid_for(rows * g.k2), kThreads, 0, stream>>>(fg, bg, lse_fg, lse_bg, mix,
                                                                                        g, sl2);
  } else {
    generic::mix_kernel<T, acc_t, false><<<grid_for(rows * g.k2), kThreads, 0, stream>>>(fg, nullptr, lse_fg,
                                                                                         nullptr, mix, g, sl2);
  }
  generic::gather_weights_kernel<acc_t><<<grid_for(g.B * g.heads * g.D * g.HW), kThreads, 0, stream>>>(mix, weights,
                                                                                                       g);
  return cudaGetLastError();
}

template <typename T>
cudaError_t generic_apply(const Geo& g, const typename Acc<T>::type* weights, const T* src, T* out, bool transpose,
                          cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const unsigned int grid = grid_for(g.B * g.C * g.HW);
  if (transpose)
    generic::apply_weights_kernel<T, acc_t, true><<<grid, kThreads, 0, stream>>>(weights, src, out, g);
  else
    generic::apply_weights_kernel<T, acc_t, false><<<grid, kThreads, 0, stream>>>(weights, src, out, g);
  return cudaGetLastError();
}

template <typename T>
cudaError_t generic_logit_grad(const Geo& g, const T* grad_out, const T* value, const T* fg, const T* bg,
                               const typename Acc<T>::type* lse_fg, const typename Acc<T>::type* lse_bg,
                               typename Acc<T>::type* grad_weights, typename Acc<T>::type* gp_fg,
                               typename Acc<T>::type* gp_bg, T* grad_fg, T* grad_bg, double scale,
                               cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const acc_t sl2 = static_cast<acc_t>(scale * kLog2e), s = static_cast<acc_t>(scale);
  const int64_t rows = g.B * g.HW * g.heads * g.k2;
  generic::weight_grad_kernel<T, acc_t><<<grid_for(g.B * g.heads * g.D * g.HW), kThreads, 0, stream>>>(
      grad_out, value, grad_weights, g);
  if (bg != nullptr)
    generic::prob_grad_kernel<T, acc_t, true><<<grid_for(rows * g.k2), kThreads, 0, stream>>>(
        fg, bg, lse_fg, lse_bg, grad_weights, gp_fg, gp_bg, g, sl2);
  else
    generic::prob_grad_kernel<T, acc_t, false><<<grid_for(rows * g.k2), kThreads, 0, stream>>>(
        fg, nullptr, lse_fg, nullptr, grad_weights, gp_fg, nullptr, g, sl2);
  generic::softmax_backward_kernel<T, acc_t><<<grid_for(rows), kThreads, 0, stream>>>(fg, lse_fg, gp_fg, grad_fg,
                                                                                      rows, g.k2, sl2, s);
  if (bg != nullptr)
    generic::softmax_backward_kernel<T, acc_t><<<grid_for(rows), kThreads, 0, stream>>>(bg, lse_bg, gp_bg, grad_bg,
                                                                                        rows, g.k2, sl2, s);
  return cudaGetLastError();
}

#define CONDSEG_GENERIC_INSTANTIATE(T)                                                                             \
  template cudaError_t generic_weights<T>(const Geo&, const T*, const T*, Acc<T>::type*, Acc<T>::type*,           \
                                          Acc<T>::type*, Acc<T>::type*, double, cudaStream_t);                    \
  template cudaError_t generic_apply<T>(const Geo&, const Acc<T>::type*, const T*, T*, bool, cudaStream_t);       \
  template cudaError_t generic_logit_grad<T>(const Geo&, const T*, const T*, const T*, const T*,                 \
                                             const Acc<T>::type*, const Acc<T>::type*, Acc<T>::type*,             \
                                             Acc<T>::type*, Acc<T>::type*, T*, T*, double, cudaStream_t);
CONDSEG_GENERIC_INSTANTIATE(float)
CONDSEG_GENERIC_INSTANTIATE(double)
CONDSEG_GENERIC_INSTANTIATE(c10::Half)
CONDSEG_GENERIC_INSTANTIATE(c10::BFloat16)
#undef CONDSEG_GENERIC_INSTANTIATE

}  // namespace cuda
}  // namespace condseg_ops
