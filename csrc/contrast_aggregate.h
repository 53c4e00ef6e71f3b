// Shared declarations of the condseg_ops extension: input checks and window geometry.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

namespace condseg_ops {

// Sizes of one call, read from value (B, C, H, W) and attn_fg (B, H, W, heads, K*K, K*K).
struct Geometry {
  int64_t batch, channels, height, width, heads, kernel_size, dilation;
  int64_t slots() const { return kernel_size * kernel_size; }            // K^2
  int64_t group_channels() const { return channels / heads; }            // Cg
  int64_t reach() const { return 2 * kernel_size - 1; }                  // side of the neighbourhood
  int64_t neighbours() const { return reach() * reach(); }               // (2K-1)^2
  int64_t pixels() const { return height * width; }
};

// Validates every argument (names the bad one, says what was expected) and returns the sizes.
Geometry check_inputs(const at::Tensor& value, const at::Tensor& attn_fg,
                      const std::optional<at::Tensor>& attn_bg, int64_t kernel_size,
                      int64_t dilation);

// Extra checks of the backward: grad_out must look like value.
void check_grad_out(const at::Tensor& grad_out, const at::Tensor& value);

}  // namespace condseg_ops
