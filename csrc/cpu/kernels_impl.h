// CPU kernels of condseg_ops::contrast_aggregate (forward and backward): the implementation.
//
// Per pixel q and head g the op applies M_q = softmax(fg) @ softmax(bg) to the K x K window of q
// and folds the result back. The source of a term, seen from its destination r, is r + d with only
// (2K-1)^2 possible offsets d, so we first collapse the K^2 matrices covering r into one weight per
// offset, Wt_r[d], and then out[c, r] = sum_d Wt_r[d] * V[c, r + d]: (2K-1)^2 multiply-adds per
// channel, no K^2 x C intermediate, gather form (deterministic), loops contiguous along W.
//
// The per-pixel K^2 x K^2 matrix arithmetic (softmaxes, products, their gradients) runs on groups
// of kLanes (pixel, head) pairs at once, transposed so that element j of every matrix in the group
// is one contiguous run of kLanes values: plain vector arithmetic, no short 9-element rows.
//
// This header holds the implementation; kernels_<dtype>.cpp each instantiate it for one dtype, so
// that these heavy translation units (every hot loop is built three times, see CONDSEG_CPU_CLONES)
// compile in parallel.
#pragma once

#include "kernels.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace condseg_ops {
namespace cpu {
namespace {

// Builds each hot loop for AVX-512, AVX2+FMA and the baseline, chosen when the library loads
// (GCC function multiversioning): a portable wheel still runs at the machine's vector width.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define CONDSEG_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CONDSEG_CPU_CLONES
#endif

// Helpers called from the clones are forced inline, so that they are compiled for each clone's target.
#if defined(__GNUC__)
#define CONDSEG_INLINE inline __attribute__((always_inline))
#else
#define CONDSEG_INLINE inline
#endif

// Flushes denormal floats to zero on the calling thread while in scope (x86 FTZ and DAZ; other
// CPUs are left as they are). A trained model's sharp attention makes products of tiny
// probabilities denormal, and x86 handles those in microcode: with logits scaled by 30-100 the
// forward ran 1.6-2.2x and the backward 1.8-3.1x slower without this. Only values below 1.2e-38
// (float) change, to zero.
#if defined(__x86_64__) || defined(_M_X64)
class FlushDenormals {
 public:
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved_); }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned int saved_;
};
#else
struct FlushDenormals {};
#endif

// at::parallel_for with denormals flushed on every thread that runs a chunk.
template <typename Fn>
void parallel_chunks(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  at::parallel_for(begin, end, grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    const FlushDenormals flush;
    fn(chunk_begin, chunk_end);
  });
}

constexpr int64_t kLanes = 16;  // (pixel, head) pairs per group: one AVX-512 register of floats

// Window slot p = (py, px) <-> offset dilation * (py - K/2, px - K/2); slot s of the window of q,
// seen from its destination r = q + off(p), is the neighbour (sy - py + K-1, sx - px + K-1) of r,
// index d <-> offset dilation * (d / reach - (K-1), d % reach - (K-1)).
struct Layout {
  explicit Layout(const Geometry& g)
      : B(g.batch), C(g.channels), H(g.height), W(g.width), heads(g.heads), K(g.kernel_size),
        k2(g.slots()), dil(g.dilation), reach(g.reach()), D(g.neighbours()), Cg(g.group_channels()) {}
  int64_t B, C, H, W, heads, K, k2, dil, reach, D, Cg;
  int64_t nb_dy(int64_t d) const { return dil * (d / reach - (K - 1)); }
  int64_t nb_dx(int64_t d) const { return dil * (d % reach - (K - 1)); }
  bool inside(int64_t y, int64_t x) const { return y >= 0 && y < H && x >= 0 && x < W; }
  // [begin, end) of x for which x + dx stays inside the row.
  int64_t x_begin(int64_t dx) const { return std::max<int64_t>(0, -dx); }
  int64_t x_end(int64_t dx) const { return std::min<int64_t>(W, W - dx); }
};

// exp for softmax arguments in [-87, 0] (the caller clamps): Cephes-style polynomial, written so
// the compiler vectorises it (std::exp is a scalar libm call, the bottleneck of the op on CPU).
// float: ~1 ulp; double keeps std::exp (gradcheck precision).
constexpr float kExpFloor = -87.0f;  // exp(-87) ~ 1.6e-38: still a normal float

CONDSEG_INLINE float exp_nonpositive(float x) {
  // Round to nearest by adding and removing 1.5 * 2^23 (floor() is a libm call without SSE4.1).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}
CONDSEG_INLINE double exp_nonpositive(double x) { return std::exp(x); }

// ---- groups of kLanes matrices: element j of matrix l lives at [j * kLanes + l] ---------------------

// Loads `count` (<= kLanes) consecutive nn-element matrices from src; missing lanes get zeros.
// NN = nn when known at compile time: a full group then transposes without per-element branches.
template <int64_t NN, typename scalar_t, typename acc_t>
CONDSEG_INLINE void load_lanes(const scalar_t* src, int64_t runtime_nn, int64_t count, acc_t* lanes) {
  const int64_t nn = NN > 0 ? NN : runtime_nn;
  if (count == kLanes) {
    for (int64_t l = 0; l < kLanes; ++l)
      for (int64_t j = 0; j < nn; ++j) lanes[j * kLanes + l] = static_cast<acc_t>(src[l * nn + j]);
    return;
  }
  for (int64_t j = 0; j < nn; ++j)
    for (int64_t l = 0; l < kLanes; ++l)
      lanes[j * kLanes + l] = l < count ? static_cast<acc_t>(src[l * nn + j]) : acc_t(0);
}

template <int64_t NN, typename scalar_t, typename acc_t>
CONDSEG_INLINE void store_lanes(const acc_t* lanes, int64_t runtime_nn, int64_t count, scalar_t* dst) {
  const int64_t nn = NN > 0 ? NN : runtime_nn;
  for (int64_t l = 0; l < count; ++l)
    for (int64_t j = 0; j < nn; ++j) dst[l * nn + j] = static_cast<scalar_t>(lanes[j * kLanes + l]);
}

// probs = row-wise softmax(scale * logits) of every n x n matrix (N = n when known at compile time).
template <int64_t N, typename acc_t>
CONDSEG_INLINE void softmax_lanes(const acc_t* logits, acc_t scale, int64_t runtime_n, acc_t* probs) {
  const int64_t n = N > 0 ? N : runtime_n;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* row = logits + i * n * kLanes;
    acc_t* out = probs + i * n * kLanes;
    acc_t top[kLanes], sum[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) {
      top[l] = -std::numeric_limits<acc_t>::infinity();
      sum[l] = 0;
    }
    for (int64_t j = 0; j < n; ++j)
      for (int64_t l = 0; l < kLanes; ++l) top[l] = std::max(top[l], scale * row[j * kLanes + l]);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t l = 0; l < kLanes; ++l) {
        const acc_t e = exp_nonpositive(std::max(scale * row[j * kLanes + l] - top[l], acc_t(kExpFloor)));
        out[j * kLanes + l] = e;
        sum[l] += e;
      }
    for (int64_t l = 0; l < kLanes; ++l) sum[l] = acc_t(1) / sum[l];
    for (int64_t j = 0; j < n; ++j)
      for (int64_t l = 0; l < kLanes; ++l) out[j * kLanes + l] *= sum[l];
  }
}

// out = a @ b, a^T @ b or a @ b^T for every n x n matrix pair.
enum class Product { kAB, kAtB, kABt };

template <Product kind, int64_t N, typename acc_t>
CONDSEG_INLINE void matmul_lanes(const acc_t* a, const acc_t* b, int64_t runtime_n, acc_t* out) {
  const int64_t n = N > 0 ? N : runtime_n;
  // out[i, j] = sum_k A[i, k] B[k, j], A = a or a^T, B = b or b^T. Each sum runs in a local
  // register-sized array: accumulating in `out` (which may alias a and b as far as the compiler
  // knows) kept the lane loop scalar and made this product most of the forward's time.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      acc_t sum[kLanes] = {};
      for (int64_t k = 0; k < n; ++k) {
        const acc_t* ak = a + (kind == Product::kAtB ? k * n + i : i * n + k) * kLanes;
        const acc_t* bk = b + (kind == Product::kABt ? j * n + k : k * n + j) * kLanes;
        for (int64_t l = 0; l < kLanes; ++l) sum[l] += ak[l] * bk[l];
      }
      for (int64_t l = 0; l < kLanes; ++l) out[(i * n + j) * kLanes + l] = sum[l];
    }
}

// grad_logits = scale * P * (grad_P - rowsum(grad_P * P)) for every n x n row-softmax P.
template <int64_t N, typename acc_t>
CONDSEG_INLINE void softmax_backward_lanes(const acc_t* probs, const acc_t* grad_probs, acc_t scale,
                                           int64_t runtime_n, acc_t* grad_logits) {
  const int64_t n = N > 0 ? N : runtime_n;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = i * n * kLanes;
    acc_t dot[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) dot[l] = 0;
    for (int64_t j = 0; j < n; ++j)
      for (int64_t l = 0; l < kLanes; ++l) dot[l] += grad_probs[row + j * kLanes + l] * probs[row + j * kLanes + l];
    for (int64_t j = 0; j < n; ++j)
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t at = row + j * kLanes + l;
        grad_logits[at] = scale * probs[at] * (grad_probs[at] - dot[l]);
      }
  }
}

// mix[b, y, x, g] = softmax(fg) @ softmax(bg) (or softmax(fg) alone) for the (pixel, head) pairs
// [begin, end), laid out like attn_fg. KS: the window side K when known at compile time, else 0.
template <int64_t KS, typename scalar_t, typename acc_t>
CONDSEG_CPU_CLONES void mixing_range(const Layout& L, const scalar_t* fg, const scalar_t* bg, acc_t scale,
                                     acc_t* out, int64_t begin, int64_t end) {
  constexpr int64_t N = KS * KS;
  const int64_t nn = L.k2 * L.k2, block = nn * kLanes;
  std::vector<acc_t> buffer(4 * block);
  acc_t *logits = buffer.data(), *p_fg = logits + block, *p_bg = p_fg + block, *mix = p_bg + block;
  for (int64_t i = begin; i < end; i += kLanes) {
    const int64_t count = std::min(kLanes, end - i);
    load_lanes<N * N>(fg + i * nn, nn, count, logits);
    softmax_lanes<N>(logits, scale, L.k2, p_fg);
    if (bg == nullptr) {
      store_lanes<N * N>(p_fg, nn, count, out + i * nn);
      continue;
    }
    load_lanes<N * N>(bg + i * nn, nn, count, logits);
    softmax_lanes<N>(logits, scale, L.k2, p_bg);
    matmul_lanes<Product::kAB, N>(p_fg, p_bg, L.k2, mix);
    store_lanes<N * N>(mix, nn, count, out + i * nn);
  }
}

template <int64_t KS, typename scalar_t, typename acc_t>
void mixing_matrices(const Layout& L, const scalar_t* fg, const scalar_t* bg, acc_t scale, acc_t* out) {
  parallel_chunks(0, L.B * L.H * L.W * L.heads, 4 * kLanes, [&](int64_t begin, int64_t end) {
    mixing_range<KS>(L, fg, bg, scale, out, begin, end);
  });
}

// weights[b, g, d, y, x] = Wt_(y,x)[d] for the image rows [begin, end) (b * H + y): the mixing
// weights of every window covering (y, x), gathered by source offset d. With K known at compile
// time the slot and neighbour index arithmetic folds to constants (it was a third of the forward).
template <int64_t KS, typename acc_t>
CONDSEG_CPU_CLONES void neighbour_weights_range(const Layout& L, const acc_t* m, acc_t* w, int64_t begin,
                                                int64_t end) {
  const int64_t K = KS > 0 ? KS : L.K, k2 = K * K, nn = k2 * k2, reach = 2 * K - 1, D = reach * reach;
  const int64_t HW = L.H * L.W;
  std::vector<acc_t> acc(D);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / L.H, y = row % L.H;
    for (int64_t x = 0; x < L.W; ++x)
      for (int64_t g = 0; g < L.heads; ++g) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t py = 0; py < K; ++py)
          for (int64_t px = 0; px < K; ++px) {
            const int64_t qy = y - L.dil * (py - K / 2), qx = x - L.dil * (px - K / 2);
            if (!L.inside(qy, qx)) continue;
            const acc_t* mrow = m + (((b * L.H + qy) * L.W + qx) * L.heads + g) * nn + (py * K + px) * k2;
            acc_t* a = acc.data() + (K - 1 - py) * reach + (K - 1 - px);
            for (int64_t sy = 0; sy < K; ++sy)
              for (int64_t sx = 0; sx < K; ++sx) a[sy * reach + sx] += mrow[sy * K + sx];
          }
        acc_t* dst = w + (b * L.heads + g) * D * HW + y * L.W + x;
        for (int64_t d = 0; d < D; ++d) dst[d * HW] = acc[d];
      }
  }
}

template <int64_t KS, typename acc_t>
at::Tensor neighbour_weights(const Layout& L, const at::Tensor& mix) {
  at::Tensor weights = at::empty({L.B, L.heads, L.D, L.H, L.W}, mix.options());
  const acc_t* m = mix.data_ptr<acc_t>();
  acc_t* w = weights.data_ptr<acc_t>();
  parallel_chunks(0, L.B * L.H, 4, [&](int64_t begin, int64_t end) {
    neighbour_weights_range<KS>(L, m, w, begin, end);
  });
  return weights;
}

// Applies the neighbour weights to every channel of src (b, c, y, x), rows [begin, end) of (b, c, y):
// with transpose=false, out[r] = sum_d Wt_r[d] src[r + d] (forward);
// with transpose=true,  out[t] = sum_d Wt_{t-d}[d] src[t - d] (gradient of value).
template <typename scalar_t, typename acc_t>
CONDSEG_CPU_CLONES void apply_weights_range(const Layout& L, const acc_t* weights, const scalar_t* src,
                                            scalar_t* out, bool transpose, int64_t begin, int64_t end) {
  const int64_t HW = L.H * L.W;
  std::vector<acc_t> acc(L.W);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t bc = row / L.H, y = row % L.H, b = bc / L.C, g = (bc % L.C) / L.Cg;
    std::fill(acc.begin(), acc.end(), acc_t(0));
    const acc_t* wg = weights + (b * L.heads + g) * L.D * HW;
    for (int64_t d = 0; d < L.D; ++d) {
      const int64_t dy = transpose ? -L.nb_dy(d) : L.nb_dy(d);
      const int64_t dx = transpose ? -L.nb_dx(d) : L.nb_dx(d);
      const int64_t sy = y + dy;
      if (sy < 0 || sy >= L.H) continue;
      const int64_t x0 = L.x_begin(dx), x1 = L.x_end(dx);
      const scalar_t* s = src + bc * HW + sy * L.W + dx;
      // Forward reads the weight at the destination; the transpose at the source.
      const acc_t* w = wg + d * HW + (transpose ? sy * L.W + dx : y * L.W);
      acc_t* __restrict__ a = acc.data();
      for (int64_t x = x0; x < x1; ++x) a[x] += w[x] * static_cast<acc_t>(s[x]);
    }
    scalar_t* o = out + bc * HW + y * L.W;
    for (int64_t x = 0; x < L.W; ++x) o[x] = static_cast<scalar_t>(acc[x]);
  }
}

template <typename scalar_t, typename acc_t>
void apply_weights(const Layout& L, const acc_t* weights, const scalar_t* src, scalar_t* out, bool transpose) {
  parallel_chunks(0, L.B * L.C * L.H, 16, [&](int64_t begin, int64_t end) {
    apply_weights_range(L, weights, src, out, transpose, begin, end);
  });
}

// grad_weights[b, y, x, g, d] = sum_{c in head g} grad_out[b, c, y, x] * value[b, c, (y, x) + d],
// rows [begin, end) of (b, g, y). Accumulated along x (vectorised) in a row buffer, then stored
// pixel-major: the logit gradients then read one contiguous block per neighbour instead of touching
// heads * D planes per pixel (TLB misses dominated that gather).
template <typename scalar_t, typename acc_t>
CONDSEG_CPU_CLONES void weight_gradients_range(const Layout& L, const scalar_t* grad_out, const scalar_t* value,
                                               acc_t* gw, int64_t begin, int64_t end) {
  const int64_t HW = L.H * L.W;
  std::vector<acc_t> rows(L.D * L.W);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t bg = row / L.H, y = row % L.H, b = bg / L.heads, g = bg % L.heads;
    const int64_t c0 = b * L.C + g * L.Cg;
    std::fill(rows.begin(), rows.end(), acc_t(0));
    for (int64_t d = 0; d < L.D; ++d) {
      acc_t* __restrict__ a = rows.data() + d * L.W;
      const int64_t dy = L.nb_dy(d), dx = L.nb_dx(d), sy = y + dy;
      if (sy < 0 || sy >= L.H) continue;
      const int64_t x0 = L.x_begin(dx), x1 = L.x_end(dx);
      for (int64_t c = c0; c < c0 + L.Cg; ++c) {
        const scalar_t* go = grad_out + c * HW + y * L.W;
        const scalar_t* v = value + c * HW + sy * L.W + dx;
        for (int64_t x = x0; x < x1; ++x) a[x] += static_cast<acc_t>(go[x]) * static_cast<acc_t>(v[x]);
      }
    }
    acc_t* out = gw + ((b * L.H + y) * L.W * L.heads + g) * L.D;
    for (int64_t x = 0; x < L.W; ++x)
      for (int64_t d = 0; d < L.D; ++d) out[x * L.heads * L.D + d] = rows[d * L.W + x];
  }
}

template <typename scalar_t, typename acc_t>
at::Tensor weight_gradients(const Layout& L, const scalar_t* grad_out, const scalar_t* value,
                            const at::TensorOptions& acc_options) {
  at::Tensor grad_w = at::empty({L.B, L.H, L.W, L.heads, L.D}, acc_options);
  acc_t* gw = grad_w.data_ptr<acc_t>();
  parallel_chunks(0, L.B * L.heads * L.H, 4, [&](int64_t begin, int64_t end) {
    weight_gradients_range(L, grad_out, value, gw, begin, end);
  });
  return grad_w;
}

// Gradients of the logits for the (pixel, head) pairs [begin, end): grad_M gathered from the
// pixel-major grad_weights (B, H, W, heads, D), then through M = P_fg @ P_bg and the two softmaxes
// (recomputed, never saved).
template <int64_t KS, typename scalar_t, typename acc_t>
CONDSEG_CPU_CLONES void logit_gradients_range(const Layout& L, const acc_t* grad_w, const scalar_t* fg,
                                              const scalar_t* bg, acc_t scale, scalar_t* grad_fg,
                                              scalar_t* grad_bg, int64_t begin, int64_t end) {
  constexpr int64_t N = KS * KS;
  const int64_t K = KS > 0 ? KS : L.K, reach = 2 * K - 1;
  const int64_t n = K * K, nn = n * n, HW = L.H * L.W, block = nn * kLanes, per_pixel = L.heads * L.D;
  std::vector<acc_t> buffer(6 * block);
  acc_t *g_mix = buffer.data(), *logits = g_mix + block, *p_fg = logits + block, *p_bg = p_fg + block;
  acc_t *g_p = p_bg + block, *g_logits = g_p + block;
  for (int64_t i0 = begin; i0 < end; i0 += kLanes) {
    const int64_t count = std::min(kLanes, end - i0);
    for (int64_t l = 0; l < kLanes; ++l) {
      if (l >= count) {
        for (int64_t j = 0; j < nn; ++j) g_mix[j * kLanes + l] = 0;
        continue;
      }
      const int64_t i = i0 + l, g = i % L.heads, pixel = i / L.heads;
      const int64_t b = pixel / HW, y = (pixel % HW) / L.W, x = pixel % L.W;
      const acc_t* gw = grad_w + b * HW * per_pixel + g * L.D;
      for (int64_t py = 0; py < K; ++py)
        for (int64_t px = 0; px < K; ++px) {
          acc_t* dst = g_mix + (py * K + px) * n * kLanes + l;
          const int64_t ry = y + L.dil * (py - K / 2), rx = x + L.dil * (px - K / 2);
          if (!L.inside(ry, rx)) {  // window slot outside the image: no output there, no gradient
            for (int64_t s = 0; s < n; ++s) dst[s * kLanes] = 0;
            continue;
          }
          const acc_t* at_r = gw + (ry * L.W + rx) * per_pixel + (K - 1 - py) * reach + (K - 1 - px);
          for (int64_t sy = 0; sy < K; ++sy)
            for (int64_t sx = 0; sx < K; ++sx) dst[(sy * K + sx) * kLanes] = at_r[sy * reach + sx];
        }
    }
    load_lanes<N * N>(fg + i0 * nn, nn, count, logits);
    softmax_lanes<N>(logits, scale, n, p_fg);
    if (bg == nullptr) {
      softmax_backward_lanes<N>(p_fg, g_mix, scale, n, g_logits);
      store_lanes<N * N>(g_logits, nn, count, grad_fg + i0 * nn);
      continue;
    }
    load_lanes<N * N>(bg + i0 * nn, nn, count, logits);
    softmax_lanes<N>(logits, scale, n, p_bg);
    matmul_lanes<Product::kABt, N>(g_mix, p_bg, n, g_p);  // grad_P_fg = grad_M @ P_bg^T
    softmax_backward_lanes<N>(p_fg, g_p, scale, n, g_logits);
    store_lanes<N * N>(g_logits, nn, count, grad_fg + i0 * nn);
    matmul_lanes<Product::kAtB, N>(p_fg, g_mix, n, g_p);  // grad_P_bg = P_fg^T @ grad_M
    softmax_backward_lanes<N>(p_bg, g_p, scale, n, g_logits);
    store_lanes<N * N>(g_logits, nn, count, grad_bg + i0 * nn);
  }
}

template <int64_t KS, typename scalar_t, typename acc_t>
void logit_gradients(const Layout& L, const acc_t* grad_w, const scalar_t* fg, const scalar_t* bg,
                     acc_t scale, scalar_t* grad_fg, scalar_t* grad_bg) {
  parallel_chunks(0, L.B * L.H * L.W * L.heads, 4 * kLanes, [&](int64_t begin, int64_t end) {
    logit_gradients_range<KS>(L, grad_w, fg, bg, scale, grad_fg, grad_bg, begin, end);
  });
}

// Calls fn(std::integral_constant<int64_t, K>) for the common window sides K (loops of known
// length vectorise, index arithmetic folds to constants) and fn(integral_constant<int64_t, 0>)
// (K known only at run time) otherwise.
template <typename Fn>
void dispatch_side(int64_t K, const Fn& fn) {
  switch (K) {
    case 1: return fn(std::integral_constant<int64_t, 1>());
    case 3: return fn(std::integral_constant<int64_t, 3>());
    case 5: return fn(std::integral_constant<int64_t, 5>());
    case 7: return fn(std::integral_constant<int64_t, 7>());
    default: return fn(std::integral_constant<int64_t, 0>());
  }
}

template <typename acc_t>
at::TensorOptions acc_options_of(const at::Tensor& t) {
  return t.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
}

// Wt (B, heads, D, H, W) of the forward, through the mixing matrices (freed on return).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
at::Tensor window_weights(const Layout& L, const at::Tensor& fg, const at::Tensor& bg, acc_t scale) {
  at::Tensor mix = at::empty(fg.sizes(), acc_options_of<acc_t>(fg));
  const scalar_t* bg_ptr = bg.defined() ? bg.data_ptr<scalar_t>() : nullptr;
  at::Tensor weights;
  dispatch_side(L.K, [&](auto side) {
    constexpr int64_t KS = decltype(side)::value;
    mixing_matrices<KS>(L, fg.data_ptr<scalar_t>(), bg_ptr, scale, mix.data_ptr<acc_t>());
    weights = neighbour_weights<KS, acc_t>(L, mix);
  });
  return weights;
}

}  // namespace

template <typename scalar_t>
void forward(const Geometry& geo, const at::Tensor& value, const at::Tensor& fg, const at::Tensor& bg, double scale,
             at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Layout L(geo);
  const at::Tensor weights = window_weights<scalar_t>(L, fg, bg, static_cast<acc_t>(scale));
  apply_weights<scalar_t, acc_t>(L, weights.data_ptr<acc_t>(), value.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                 /*transpose=*/false);
}

template <typename scalar_t>
void backward(const Geometry& geo, const at::Tensor& grad_out, const at::Tensor& value, const at::Tensor& fg,
              const at::Tensor& bg, double scale, at::Tensor& grad_value, at::Tensor& grad_fg, at::Tensor& grad_bg) {
  using acc_t = at::opmath_type<scalar_t>;
  const Layout L(geo);
  const auto options = acc_options_of<acc_t>(value);
  const acc_t s = static_cast<acc_t>(scale);
  const scalar_t* bg_ptr = bg.defined() ? bg.data_ptr<scalar_t>() : nullptr;
  {
    const at::Tensor weights = window_weights<scalar_t>(L, fg, bg, s);
    apply_weights<scalar_t, acc_t>(L, weights.data_ptr<acc_t>(), grad_out.data_ptr<scalar_t>(),
                                   grad_value.data_ptr<scalar_t>(), /*transpose=*/true);
  }
  const at::Tensor grad_w =
      weight_gradients<scalar_t, acc_t>(L, grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), options);
  dispatch_side(L.K, [&](auto side) {
    logit_gradients<decltype(side)::value>(L, grad_w.data_ptr<acc_t>(), fg.data_ptr<scalar_t>(), bg_ptr, s,
                                           grad_fg.data_ptr<scalar_t>(),
                                           bg.defined() ? grad_bg.data_ptr<scalar_t>() : nullptr);
  });
}

}  // namespace cpu
}  // namespace condseg_ops

// Explicit instantiation of both entry points for one dtype (in that dtype's translation unit).
#define CONDSEG_CPU_INSTANTIATE(T)                                                                       \
  template void condseg_ops::cpu::forward<T>(const condseg_ops::Geometry&, const at::Tensor&, const at::Tensor&, \
                                             const at::Tensor&, double, at::Tensor&);                             \
  template void condseg_ops::cpu::backward<T>(const condseg_ops::Geometry&, const at::Tensor&,                   \
                                              const at::Tensor&, const at::Tensor&, const at::Tensor&, double,    \
                                              at::Tensor&, at::Tensor&, at::Tensor&);
