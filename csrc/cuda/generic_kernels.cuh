// Generic CUDA kernels: any odd K, any dilation, any floating dtype (fp64 included).
//
// One thread per output element, global scratch in the accumulation type. They are the fallback
// of the fused K = 3 kernels (k3_kernels.cuh) and the reference they are tested against; they
// favour plain, obviously-correct index arithmetic over speed.
//
// Layouts: attn (B, H, W, heads, K2, K2) -> pixel-head n = ((b*H + y)*W + x)*heads + g;
// lse[n*K2 + row] = log2-sum-exp2 of row `row` of scale*log2(e)*attn; mix[n*K4 + p*K2 + s] = M;
// weights (B, heads, D, H, W): Wt_r[d] at ((b*heads + g)*D + d)*HW + r.
#pragma once

#include "common.cuh"

#include <limits>

namespace condseg_ops {
namespace cuda {
namespace generic {

// Row-wise log2-sum-exp2 of `rows` rows of n logits, scaled by sl2 = scale*log2(e).
template <typename T, typename acc_t>
__global__ void lse_kernel(const T* __restrict__ logits, acc_t* __restrict__ lse, int64_t rows, int64_t n,
                           acc_t sl2) {
  for (int64_t i = global_thread(); i < rows; i += global_stride()) {
    const T* row = logits + i * n;
    acc_t top = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < n; ++j) top = max(top, sl2 * static_cast<acc_t>(row[j]));
    acc_t sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += exp2_acc(sl2 * static_cast<acc_t>(row[j]) - top);
    lse[i] = top + log2_acc(sum);
  }
}

// mix[n, p, s] = sum_j P_fg[p, j] P_bg[j, s] (or P_fg[p, s] without attn_bg).
template <typename T, typename acc_t, bool DUAL>
__global__ void mix_kernel(const T* __restrict__ fg, const T* __restrict__ bg, const acc_t* __restrict__ lse_fg,
                           const acc_t* __restrict__ lse_bg, acc_t* __restrict__ mix, Geo g, acc_t sl2) {
  const int64_t total = g.B * g.HW * g.heads * g.k4;
  for (int64_t i = global_thread(); i < total; i += global_stride()) {
    const int64_t n = i / g.k4, p = (i / g.k2) % g.k2, s = i % g.k2;
    const T* f = fg + n * g.k4 + p * g.k2;
    const acc_t lf = lse_fg[n * g.k2 + p];
    if (!DUAL) {
      mix[i] = exp2_acc(sl2 * static_cast<acc_t>(f[s]) - lf);
      continue;
    }
    const T* bcol = bg + n * g.k4 + s;
    acc_t acc = 0;
    for (int64_t j = 0; j < g.k2; ++j) {
      const acc_t pf = exp2_acc(sl2 * static_cast<acc_t>(f[j]) - lf);
      const acc_t pb = exp2_acc(sl2 * static_cast<acc_t>(bcol[j * g.k2]) - lse_bg[n * g.k2 + j]);
      acc += pf * pb;
    }
    mix[i] = acc;
  }
}

// Wt_r[d] = sum over slots p whose window centre q = r - off(p) is inside, of M_q[p, s] with
// off(s) - off(p) = d.
template <typename acc_t>
__global__ void gather_weights_kernel(const acc_t* __restrict__ mix, acc_t* __restrict__ weights, Geo g) {
  const int64_t total = g.B * g.heads * g.D * g.HW;
  for (int64_t i = global_thread(); i < total; i += global_stride()) {
    const int64_t x = i % g.W, y = (i / g.W) % g.H, d = (i / g.HW) % g.D, bh = i / (g.HW * g.D);
    const int64_t b = bh / g.heads, head = bh % g.heads;
    const int64_t dy = d / g.reach - (g.K - 1), dx = d % g.reach - (g.K - 1);
    acc_t acc = 0;
    for (int64_t p = 0; p < g.k2; ++p) {
      const int64_t py = p / g.K, px = p % g.K, sy = py + dy, sx = px + dx;
      if (sy < 0 || sy >= g.K || sx < 0 || sx >= g.K) continue;
      const int64_t qy = y - g.dil * (py - g.R), qx = x - g.dil * (px - g.R);
      if (qy < 0 || qy >= g.H || qx < 0 || qx >= g.W) continue;
      const int64_t n = ((b * g.H + qy) * g.W + qx) * g.heads + head;
      acc += mix[n * g.k4 + p * g.k2 + sy * g.K + sx];
    }
    weights[i] = acc;
  }
}

// TRANSPOSE = false: out[c, r] = sum_d Wt_r[d] src[c, r + d]               (forward)
// TRANSPOSE = true:  out[c, t] = sum_d Wt_{t-d}[d] src[c, t - d]           (gradient of value)
template <typename T, typename acc_t, bool TRANSPOSE>
__global__ void apply_weights_kernel(const acc_t* __restrict__ weights, const T* __restrict__ src,
                                     T* __restrict__ out, Geo g) {
  const int64_t total = g.B * g.C * g.HW;
  for (int64_t i = global_thread(); i < total; i += global_stride()) {
    const int64_t x = i % g.W, y = (i / g.W) % g.H, bc = i / g.HW;
    const int64_t b = bc / g.C, head = (bc % g.C) / g.Cg;
    const acc_t* wg = weights + (b * g.heads + head) * g.D * g.HW;
    const T* plane = src + bc * g.HW;
    acc_t acc = 0;
    for (int64_t d = 0; d < g.D; ++d) {
      const int64_t dy = g.dil * (d / g.reach - (g.K - 1)), dx = g.dil * (d % g.reach - (g.K - 1));
      const int64_t sy = TRANSPOSE ? y - dy : y + dy, sx = TRANSPOSE ? x - dx : x + dx;
      if (sy < 0 || sy >= g.H || sx < 0 || sx >= g.W) continue;
      const acc_t w = wg[d * g.HW + (TRANSPOSE ? sy * g.W + sx : y * g.W + x)];
      acc += w * static_cast<acc_t>(plane[sy * g.W + sx]);
    }
    out[i] = static_cast<T>(acc);
  }
}

// gWt[b, g, d, r] = sum_{c in head g} grad_out[c, r] * value[c, r + d].
template <typename T, typename acc_t>
__global__ void weight_grad_kernel(const T* __restrict__ grad_out, const T* __restrict__ value,
                                   acc_t* __restrict__ grad_weights, Geo g) {
  const int64_t total = g.B * g.heads * g.D * g.HW;
  for (int64_t i = global_thread(); i < total; i += global_stride()) {
    const int64_t x = i % g.W, y = (i / g.W) % g.H, d = (i / g.HW) % g.D, bh = i / (g.HW * g.D);
    const int64_t b = bh / g.heads, head = bh % g.heads;
    const int64_t sy = y + g.dil * (d / g.reach - (g.K - 1)), sx = x + g.dil * (d % g.reach - (g.K - 1));
    acc_t acc = 0;
    if (sy >= 0 && sy < g.H && sx >= 0 && sx < g.W) {
      const int64_t c0 = b * g.C + head * g.Cg;
      for (int64_t c = c0; c < c0 + g.Cg; ++c)
        acc += static_cast<acc_t>(grad_out[c * g.HW + y * g.W + x]) *
               static_cast<acc_t>(value[c * g.HW + sy * g.W + sx]);
    }
    grad_weights[i] = acc;
  }
}

// gM_q[p, s] = gWt_{q + off(p)}[off(s) - off(p)] (zero when q + off(p) is outside).
template <typename acc_t>
__device__ __forceinline__ acc_t grad_mix(const acc_t* __restrict__ gw_head, const Geo& g, int64_t qy, int64_t qx,
                                          int64_t p, int64_t s) {
  const int64_t py = p / g.K, px = p % g.K;
  const int64_t ry = qy + g.dil * (py - g.R), rx = qx + g.dil * (px - g.R);
  if (ry < 0 || ry >= g.H || rx < 0 || rx >= g.W) return acc_t(0);
  const int64_t d = (s / g.K - py + g.K - 1) * g.reach + (s % g.K - px + g.K - 1);
  return gw_head[d * g.HW + ry * g.W + rx];
}

// Gradients of the probabilities: gP_fg = gM @ P_bg^T and gP_bg = P_fg^T @ gM (gP_fg = gM
// without attn_bg), element (n, i, j) per thread.
template <typename T, typename acc_t, bool DUAL>
__global__ void prob_grad_kernel(const T* __restrict__ fg, const T* __restrict__ bg,
                                 const acc_t* __restrict__ lse_fg, const acc_t* __restrict__ lse_bg,
                                 const acc_t* __restrict__ grad_weights, acc_t* __restrict__ gp_fg,
                                 acc_t* __restrict__ gp_bg, Geo g, acc_t sl2) {
  const int64_t total = g.B * g.HW * g.heads * g.k4;
  for (int64_t idx = global_thread(); idx < total; idx += global_stride()) {
    const int64_t n = idx / g.k4, i = (idx / g.k2) % g.k2, j = idx % g.k2;
    const int64_t head = n % g.heads, pixel = n / g.heads, b = pixel / g.HW, q = pixel % g.HW;
    const int64_t qy = q / g.W, qx = q % g.W;
    const acc_t* gw = grad_weights + (b * g.heads + head) * g.D * g.HW;
    if (!DUAL) {
      gp_fg[idx] = grad_mix(gw, g, qy, qx, i, j);
      continue;
    }
    const T* f = fg + n * g.k4;
    const T* bb = bg + n * g.k4;
    acc_t acc = 0;  // gP_fg[i, j] = sum_s gM[i, s] P_bg[j, s]
    for (int64_t s = 0; s < g.k2; ++s)
      acc += grad_mix(gw, g, qy, qx, i, s) *
             exp2_acc(sl2 * static_cast<acc_t>(bb[j * g.k2 + s]) - lse_bg[n * g.k2 + j]);
    gp_fg[idx] = acc;
    acc = 0;  // gP_bg[i, j] = sum_p P_fg[p, i] gM[p, j]
    for (int64_t p = 0; p < g.k2; ++p)
      acc += exp2_acc(sl2 * static_cast<acc_t>(f[p * g.k2 + i]) - lse_fg[n * g.k2 + p]) *
             grad_mix(gw, g, qy, qx, p, j);
    gp_bg[idx] = acc;
  }
}

// grad_logits = scale * P * (gP - rowsum(gP * P)), one softmax row per thread.
template <typename T, typename acc_t>
__global__ void softmax_backward_kernel(const T* __restrict__ logits, const acc_t* __restrict__ lse,
                                        const acc_t* __restrict__ grad_probs, T* __restrict__ grad_logits,
                                        int64_t rows, int64_t n, acc_t sl2, acc_t scale) {
  for (int64_t i = global_thread(); i < rows; i += global_stride()) {
    const T* a = logits + i * n;
    const acc_t* gp = grad_probs + i * n;
    acc_t dot = 0;
    for (int64_t j = 0; j < n; ++j) dot += gp[j] * exp2_acc(sl2 * static_cast<acc_t>(a[j]) - lse[i]);
    for (int64_t j = 0; j < n; ++j) {
      const acc_t prob = exp2_acc(sl2 * static_cast<acc_t>(a[j]) - lse[i]);
      grad_logits[i * n + j] = static_cast<T>(scale * prob * (gp[j] - dot));
    }
  }
}

}  // namespace generic
}  // namespace cuda
}  // namespace condseg_ops
