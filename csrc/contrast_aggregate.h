// Shared declarations of the condseg_ops extension: input checks and window geometry.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

namespace condseg_ops {

// Sizes of one call, read from value (B, C, H, W) and attn_fg (B, H, W, heads, K*K, K*K).
struct Geometry {
  int64_t batch, channels, height, width, heads, kernel_size, dilation;
  int64_t slots() const { return kernel_size * kernel_size; }            // K^2
  int64_t group_channels() const { return channels / heads; }            // Cg
  int64_t reach() const { return 2 * kernel_size - 1; }                  // side of the neighbourhood
  int64_t neighbours() const { return reach() * reach(); }               // (2K-1)^2
  int64_t pixels() const { return height * width; }
  bool empty() const { return batch == 0 || channels == 0 || height == 0 || width == 0; }
};

// Validates every argument (names the bad one, says what was expected) and returns the sizes.
Geometry check_inputs(const at::Tensor& value, const at::Tensor& attn_fg,
                      const std::optional<at::Tensor>& attn_bg, int64_t kernel_size,
                      int64_t dilation);

// Extra checks of the backward: grad_out must look like value.
void check_grad_out(const at::Tensor& grad_out, const at::Tensor& value);

// Gradients of a call with no pixels or channels (Geometry::empty()): zeros shaped like the inputs,
// and an empty grad_attn_bg when attn_bg is None (as every backward returns).
std::tuple<at::Tensor, at::Tensor, at::Tensor> zero_gradients(const at::Tensor& value, const at::Tensor& attn_fg,
                                                              const std::optional<at::Tensor>& attn_bg);

}  // namespace condseg_ops
