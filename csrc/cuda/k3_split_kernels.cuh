// The split forward for K = 3, dilation 1: the fused kernels' arithmetic spread over more threads,
// for grids too small to fill the GPU.
//
// weights_kernel (k3_kernels.cuh) gives a block a 12 x 32 tile of one head. At batch 1 a call is
// then one partial wave (8 to 176 blocks against an H200's 132 SMs), and takes about one block's
// latency whatever its size: 53 us at the 64x64 level (2026-11-28). The split forward runs the
// same operations in two kernels of many light threads instead:
//   mix_rows_kernel, one thread per (pixel, head): for every slot p, row p of M without P_fg's
//     normalisation and that row's inverse sum, into a planar fp32 scratch (B, heads, 9, 10, H, W);
//   gather_kernel, one thread per (pixel, head) and 8 channels: Wt of its pixel from the rows of
//     the window centres that reach it, then (APPLY) out = sum_d Wt[d] V[. + d], or Wt itself into
//     weights (the backward's first step).
// Every float operation is one of the fused kernels', in the same order (softmax_row, the products
// over j, the multiply-adds of rows into Wt, the apply in offset order), so the results are the same
// bits (the tests compare them with ==): which path runs never changes a result. The planar scratch
// keeps both kernels' global accesses coalesced: neighbouring threads hold neighbouring pixels.
#pragma once

#include "k3_kernels.cuh"

namespace condseg_ops {
namespace cuda {
namespace k3 {

constexpr int MIX_ROW = K2 + 1;            // a row of M and its inverse sum
constexpr int MIX_PLANES = K2 * MIX_ROW;   // 90 fp32 planes per (batch, head)
constexpr int GATHER_CHANNELS = 8;         // channels per gather_kernel thread

// Shared memory: logit_grad_smem_bytes<T, DUAL>() (the logits of NT4 pixel-heads, as staged there).
template <typename T, bool DUAL>
__global__ void __launch_bounds__(NT4)
    mix_rows_kernel(const T* __restrict__ fg, const T* __restrict__ bg, float* __restrict__ mix, int HW, int heads,
                    long long pixel_heads, float sl2) {
  extern __shared__ __align__(16) unsigned char smem[];
  const BlockLogits<T> staged = stage_block_logits<T, DUAL>(smem, fg, bg, pixel_heads);
  const int t = threadIdx.x;
  if (t >= staged.count) return;
  const long long n = (long long)blockIdx.x * NT4 + t, pixel = n / heads;
  const int head = static_cast<int>(n % heads), q = static_cast<int>(pixel % HW);
  const long long b = pixel / HW;
  float* dst = mix + (b * heads + head) * MIX_PLANES * HW + q;  // plane k at dst[k * HW]
  const T* F = staged.fg + t * K4;

  float pbg[K4];  // P_bg, normalised (as tile_weights computes it)
  if constexpr (DUAL) softmax_rows(staged.bg + t * K4, sl2, pbg);
#pragma unroll
  for (int p = 0; p < K2; ++p) {
    float ef[K2], row[K2];
    const float inv = softmax_row(F + p * K2, sl2, ef);
    if constexpr (DUAL) {
#pragma unroll
      for (int s = 0; s < K2; ++s) row[s] = 0.f;
#pragma unroll
      for (int j = 0; j < K2; ++j) {
#pragma unroll
        for (int s = 0; s < K2; ++s) row[s] = fmaf(ef[j], pbg[j * K2 + s], row[s]);
      }
    } else {
#pragma unroll
      for (int s = 0; s < K2; ++s) row[s] = ef[s];
    }
#pragma unroll
    for (int s = 0; s < K2; ++s) dst[(p * MIX_ROW + s) * HW] = row[s];
    dst[(p * MIX_ROW + K2) * HW] = inv;
  }
}

// Thread i: pixel r = i % HW, then channel group, head and batch. APPLY: channels
// [8 group, 8 group + 8) of the head; otherwise `groups` is 1 and the thread writes Wt_r.
template <typename T, bool APPLY>
__global__ void __launch_bounds__(NT)
    gather_kernel(const float* __restrict__ mix, const T* __restrict__ value, T* __restrict__ out,
                  float* __restrict__ weights, int H, int W, int heads, int C, int Cg, int groups, int threads) {
  const int i = blockIdx.x * NT + threadIdx.x;
  if (i >= threads) return;
  const int HW = H * W, r = i % HW, rest = i / HW;
  const int group = rest % groups, bh = rest / groups, g = bh % heads, b = bh / heads;
  const int y = r / W, x = r - y * W;

  // Wt_r[d] = sum over slots p of row p of M_q, q = r - off(p) inside, at s with off(s) - off(p) = d,
  // added as the fused kernels add it: fmaf(row[s], inv, Wt), the window centres of weights_kernel's
  // first pass (the first NT of r's tile and its ring) before those of its second, slots in order.
  const float* planes = mix + (long long)bh * MIX_PLANES * HW;
  const int ty = y % TH + 2, tx = x % TW + 2;  // r's place in its fused tile, plus 2
  float w[D];
#pragma unroll
  for (int d = 0; d < D; ++d) w[d] = 0.f;
#pragma unroll
  for (int pass = 0; pass < PASSES; ++pass) {
#pragma unroll
    for (int p = 0; p < K2; ++p) {
      const int py = p / 3, px = p % 3, qy = y - (py - 1), qx = x - (px - 1);
      const int centre = (ty - py) * EW + (tx - px);  // q's window centre in r's fused tile
      if (centre / NT != pass || qy < 0 || qy >= H || qx < 0 || qx >= W) continue;
      const float* row = planes + p * MIX_ROW * HW + qy * W + qx;
      const float inv = row[K2 * HW];
#pragma unroll
      for (int s = 0; s < K2; ++s) {
        const int d = (s / 3 - py + 2) * 5 + (s % 3 - px + 2);
        w[d] = fmaf(row[s * HW], inv, w[d]);
      }
    }
  }
  if (!APPLY) {
    float* wt = weights + (long long)bh * D * HW + r;
#pragma unroll
    for (int d = 0; d < D; ++d) wt[(long long)d * HW] = w[d];
    return;
  }

  // out[c, r] = sum_d Wt_r[d] V[c, r + d], offsets in order, zeros outside the image (as staged).
  const int c_end = min(Cg, (group + 1) * GATHER_CHANNELS);
#pragma unroll 1
  for (int c = group * GATHER_CHANNELS; c < c_end; ++c) {
    const long long plane = ((long long)b * C + (long long)g * Cg + c) * HW;
    const T* v = value + plane;
    float acc = 0.f;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int sy = y + d / 5 - 2, sx = x + d % 5 - 2;
      const float vd = sy >= 0 && sy < H && sx >= 0 && sx < W ? static_cast<float>(v[sy * W + sx]) : 0.f;
      acc = fmaf(w[d], vd, acc);
    }
    out[plane + r] = static_cast<T>(acc);
  }
}

}  // namespace k3
}  // namespace cuda
}  // namespace condseg_ops
