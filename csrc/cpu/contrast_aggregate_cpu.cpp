// CPU entry points of condseg_ops::contrast_aggregate (forward and backward): checks, allocation
// and the dtype dispatch; the kernels themselves are in kernels_impl.h (see kernels.h).
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

namespace condseg_ops {
namespace {

at::Tensor forward_cpu(const at::Tensor& value_in, const at::Tensor& fg_in,
                       const std::optional<at::Tensor>& bg_in, int64_t kernel_size, int64_t dilation,
                       double scale) {
  const Geometry geo = check_inputs(value_in, fg_in, bg_in, kernel_size, dilation);
  if (geo.empty()) return at::zeros(value_in.sizes(), value_in.options());
  const at::Tensor value = value_in.contiguous(), fg = fg_in.contiguous();
  const at::Tensor bg = bg_in.has_value() ? bg_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty(value.sizes(), value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "contrast_aggregate_cpu", [&] {
    cpu::forward<scalar_t>(geo, value, fg, bg, scale, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& value_in, const at::Tensor& fg_in,
    const std::optional<at::Tensor>& bg_in, int64_t kernel_size, int64_t dilation, double scale) {
  const Geometry geo = check_inputs(value_in, fg_in, bg_in, kernel_size, dilation);
  check_grad_out(grad_in, value_in);
  const bool has_bg = bg_in.has_value();
  if (geo.empty()) return zero_gradients(value_in, fg_in, bg_in);
  const at::Tensor grad_out = grad_in.contiguous(), value = value_in.contiguous(), fg = fg_in.contiguous();
  const at::Tensor bg = has_bg ? bg_in->contiguous() : at::Tensor();
  at::Tensor grad_value = at::empty(value.sizes(), value.options());
  at::Tensor grad_fg = at::empty(fg.sizes(), fg.options());
  at::Tensor grad_bg = has_bg ? at::empty(bg.sizes(), bg.options()) : at::empty({0}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "contrast_aggregate_backward_cpu", [&] {
    cpu::backward<scalar_t>(geo, grad_out, value, fg, bg, scale, grad_value, grad_fg, grad_bg);
  });
  return {grad_value, grad_fg, grad_bg};
}

}  // namespace
}  // namespace condseg_ops

TORCH_LIBRARY_IMPL(condseg_ops, CPU, m) {
  m.impl("contrast_aggregate", &condseg_ops::forward_cpu);
  m.impl("contrast_aggregate_backward", &condseg_ops::backward_cpu);
}
