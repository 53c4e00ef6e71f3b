// Typed CPU kernels of condseg_ops::contrast_aggregate, one translation unit per dtype
// (kernels_float.cpp, kernels_double.cpp, kernels_half.cpp, kernels_bfloat16.cpp; the
// implementation is in kernels_impl.h).
// Inputs are contiguous and checked; bg is an undefined tensor for the single-softmax form.
// Explicitly instantiated for float, double, c10::Half and c10::BFloat16 only.
#pragma once

#include "../contrast_aggregate.h"

namespace condseg_ops {
namespace cpu {

template <typename scalar_t>
void forward(const Geometry& geo, const at::Tensor& value, const at::Tensor& fg, const at::Tensor& bg, double scale,
             at::Tensor& out);

template <typename scalar_t>
void backward(const Geometry& geo, const at::Tensor& grad_out, const at::Tensor& value, const at::Tensor& fg,
              const at::Tensor& bg, double scale, at::Tensor& grad_value, at::Tensor& grad_fg, at::Tensor& grad_bg);

}  // namespace cpu
}  // namespace condseg_ops
