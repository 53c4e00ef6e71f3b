// Schema of the condseg_ops operators and the input checks shared by every device.
#include "contrast_aggregate.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <sstream>

namespace condseg_ops {

namespace {
std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}
}  // namespace

Geometry check_inputs(const at::Tensor& value, const at::Tensor& attn_fg,
                      const std::optional<at::Tensor>& attn_bg, int64_t kernel_size,
                      int64_t dilation) {
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1,
              "contrast_aggregate: kernel_size must be an odd integer >= 1, got ", kernel_size);
  TORCH_CHECK(dilation >= 1, "contrast_aggregate: dilation must be >= 1, got ", dilation);
  TORCH_CHECK(value.dim() == 4, "contrast_aggregate: value must have shape (B, C, H, W), got ",
              shape_of(value));
  const int64_t k2 = kernel_size * kernel_size;
  TORCH_CHECK(attn_fg.dim() == 6,
              "contrast_aggregate: attn_fg must have shape (B, H, W, heads, K*K, K*K), got ",
              shape_of(attn_fg));
  Geometry g{value.size(0), value.size(1), value.size(2), value.size(3), attn_fg.size(3),
             kernel_size, dilation};
  TORCH_CHECK(g.heads >= 1, "contrast_aggregate: attn_fg has 0 heads (dim 3)");
  TORCH_CHECK(g.channels % g.heads == 0, "contrast_aggregate: value has C=", g.channels,
              " channels, not divisible by heads=", g.heads, " (attn_fg dim 3)");
  const std::vector<int64_t> expected{g.batch, g.height, g.width, g.heads, k2, k2};
  TORCH_CHECK(attn_fg.sizes() == at::IntArrayRef(expected), "contrast_aggregate: attn_fg must have shape ",
              at::IntArrayRef(expected), " (B, H, W, heads, K*K, K*K) for value ", shape_of(value),
              " and kernel_size=", kernel_size, ", got ", shape_of(attn_fg));
  TORCH_CHECK(at::isFloatingType(value.scalar_type()),
              "contrast_aggregate: value must be a floating-point tensor, got ", value.scalar_type());
  TORCH_CHECK(attn_fg.scalar_type() == value.scalar_type(), "contrast_aggregate: attn_fg has dtype ",
              attn_fg.scalar_type(), " but value has ", value.scalar_type());
  TORCH_CHECK(attn_fg.device() == value.device(), "contrast_aggregate: attn_fg is on ",
              attn_fg.device(), " but value is on ", value.device());
  if (attn_bg.has_value()) {
    const at::Tensor& bg = *attn_bg;
    TORCH_CHECK(bg.sizes() == at::IntArrayRef(expected), "contrast_aggregate: attn_bg must have shape ",
                at::IntArrayRef(expected), " like attn_fg, got ", shape_of(bg));
    TORCH_CHECK(bg.scalar_type() == value.scalar_type(), "contrast_aggregate: attn_bg has dtype ",
                bg.scalar_type(), " but value has ", value.scalar_type());
    TORCH_CHECK(bg.device() == value.device(), "contrast_aggregate: attn_bg is on ", bg.device(),
                " but value is on ", value.device());
  }
  return g;
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& value) {
  TORCH_CHECK(grad_out.sizes() == value.sizes(), "contrast_aggregate_backward: grad_out must have shape ",
              shape_of(value), " like value, got ", shape_of(grad_out));
  TORCH_CHECK(grad_out.scalar_type() == value.scalar_type() && grad_out.device() == value.device(),
              "contrast_aggregate_backward: grad_out must match value's dtype and device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> zero_gradients(const at::Tensor& value, const at::Tensor& attn_fg,
                                                              const std::optional<at::Tensor>& attn_bg) {
  return {at::zeros(value.sizes(), value.options()), at::zeros(attn_fg.sizes(), attn_fg.options()),
          attn_bg.has_value() ? at::zeros(attn_bg->sizes(), attn_bg->options()) : at::empty({0}, value.options())};
}

}  // namespace condseg_ops

TORCH_LIBRARY(condseg_ops, m) {
  m.def(
      "contrast_aggregate(Tensor value, Tensor attn_fg, Tensor? attn_bg, int kernel_size, "
      "int dilation, float scale) -> Tensor");
  // Returns (grad_value, grad_attn_fg, grad_attn_bg); grad_attn_bg is empty when attn_bg is None.
  m.def(
      "contrast_aggregate_backward(Tensor grad_out, Tensor value, Tensor attn_fg, Tensor? attn_bg, "
      "int kernel_size, int dilation, float scale) -> (Tensor, Tensor, Tensor)");
}
