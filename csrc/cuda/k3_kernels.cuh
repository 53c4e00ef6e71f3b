// Fused CUDA kernels for the common case K = 3, dilation 1 (ConDSeg's setting), fp32/fp16/bf16.
//
// Notation (DESIGN.md section 2): slot p <-> offset off(p) = (p / 3 - 1, p % 3 - 1); for pixel q and
// head g, M_q = softmax(fg) @ softmax(bg) (9 x 9, row-stochastic). Seen from its destination r, a
// term of the fold reads value at r + d with d = off(s) - off(p) in [-2, 2]^2 (25 offsets), so
//   Wt_r[d] = sum_{p: r - off(p) inside} sum_{s: off(s) - off(p) = d} M_{r - off(p)}[p, s]
//   out[c, r] = sum_d Wt_r[d] V[c, r + d]                  (25 FMAs per channel, gather form)
//
// weights_kernel<APPLY=true> is the whole forward in one pass over the inputs: a block owns a
// 12 x 32 output tile of one (batch, head). Phase 1 computes M for the tile plus a one-pixel ring
// (14 x 34 = 476 window centres, two passes of 256 threads, one centre per thread), the logits
// staged through shared memory with cp.async in rounds of 3 matrix rows (double-buffered; in 4-byte
// words, or with heads a multiple of 4 in granules of 4 elements: issue_round_vectors), and
// scatters the rows of M into Wt of the tile in shared memory (one slot p at a time, so the writes
// of a round never collide: deterministic, no atomics). Phase 2 stages value with a 2-pixel ring, 8
// channels at a time (cp.async; while one chunk is applied, two more are in flight for fp32, one
// for 2-byte types), and each thread applies Wt to a column of 3 output pixels (value loads shared
// by the 3 rows) for half of the channels. Only the logits, value and the output cross global
// memory. weights_kernel<APPLY=false> writes Wt (fp32, layout (B, heads, 25, H, W)) instead: the
// first step of the backward. On grids too small to fill the GPU, k3_split_kernels.cuh computes
// the same, bit for bit, with many lighter threads.
//
// Backward: value_grad_kernel computes grad_value[c, t] = sum_d Wt_{t-d}[d] G[c, t-d] and
// gWt_r[d] = sum_{c in head} G[c, r] V[c, r + d] (both gathers); logit_grad_kernel turns gWt into
// gM_q[p, s] = gWt_{q+off(p)}[off(s) - off(p)], then gP_fg = gM P_bg^T, gP_bg = P_fg^T gM and the
// softmax backward, one (pixel, head) per thread with its logits staged through shared memory.
#pragma once

#include "common.cuh"

namespace condseg_ops {
namespace cuda {
namespace k3 {

constexpr int K2 = 9, K4 = 81, D = 25;
constexpr int NT = 256, NWARPS = NT / 32;

// weights_kernel geometry.
constexpr int TW = 32, TH = 12;                    // output tile
constexpr int EW = TW + 2, EH = TH + 2, EP = EW * EH;  // window centres that reach the tile: 476
constexpr int PASSES = (EP + NT - 1) / NT;         // 2
constexpr int TP = TH * TW;                        // 384 output pixels
constexpr int RPR = 3;                             // matrix rows per copy round
constexpr int VH = TH + 4;                         // value rows with the 2-pixel ring
constexpr int CC = 8;                              // channels per value chunk
constexpr int QR = 3;                              // output rows per thread in phase 2
constexpr int NQ = (TH + QR - 1) / QR;             // row groups: 4
constexpr int CSPLIT = NT / (NQ * TW);             // channel groups: 2
static_assert(NQ * CSPLIT * TW == NT, "phase 2 must use every thread");
static_assert(CC % CSPLIT == 0, "channel stage must split evenly");
static_assert(PASSES * NT >= EP, "passes must cover the window centres");

// 4-byte words holding one slot's rows of a round (the chunk may start mid-word for 2-byte
// types); odd, so that threads reading their own slot hit distinct banks.
template <typename T>
constexpr int slot_words() {
  return sizeof(T) == 4 ? RPR * K2 : (RPR * K2 * 2 + 2 + 3) / 4 + 1;  // 27 (fp32) or 15
}

// Phase-2 value stage: CC channels x VH rows x stage_row<T>() elements, x from ox0 - VEC (VEC = the
// elements of 16 bytes), so that every stage row is whole 16-byte vectors: when W is a multiple of
// VEC and value is 16-byte aligned, rows are copied with 16-byte cp.async (zeros outside the image
// come from the copy itself), else element by element.
template <typename T>
constexpr int vec_elems() {
  return 16 / static_cast<int>(sizeof(T));  // 4 or 8
}
template <typename T>
constexpr int stage_row() {
  return TW + 2 * vec_elems<T>();  // 40 or 48
}

// Value chunk buffers of phase 2. fp32 chunks are applied where they land: three buffers (two
// chunks in flight while one is applied). 2-byte chunks keep two, and are converted into one fp32
// tile of the TW + 4 columns that the apply reads. The forward's blocks take 97.5 KB (fp32) and
// 79.5 KB (2-byte): two per SM on Hopper (228 KB); on an A100 (164 KB) two of the 2-byte ones and
// one fp32; one on an RTX 30/40 (100 KB).
template <typename T>
constexpr int value_stages() {
  return sizeof(T) == 4 ? 3 : 2;
}

// Bytes of one staged value chunk, and of the fp32 tile that 2-byte chunks are converted into.
template <typename T>
constexpr int value_chunk_bytes() {
  return CC * VH * stage_row<T>() * static_cast<int>(sizeof(T));
}
template <typename T>
constexpr int converted_bytes() {
  return sizeof(T) == 4 ? 0 : CC * VH * (TW + 4) * 4;
}

// Vector staging of the logits (phase 1, heads a multiple of 4; see issue_round_vectors): a slot
// holds GRANULES granules of 4 elements (16 bytes in fp32, 8 in 2-byte types) per round, at a stride
// that lets each group of threads that shared memory serves together (8 reading 16 bytes, 16
// reading 8) hit distinct banks. (Where a row uses only part of a granule the compiler may load
// less of it: such a load conflicts, but costs no more cycles than the whole granule's.)
constexpr int GRANULES = 8;  // a round's 27 elements and a phase of up to 3
template <typename T>
constexpr int granule_bytes() {
  return 4 * static_cast<int>(sizeof(T));
}
template <typename T>
constexpr int vector_slot_bytes() {
  return sizeof(T) == 4 ? 144 : 72;
}
// Granules that hold a round's elements when its first one sits `phase` elements into a granule.
constexpr int round_granules(int phase) {
  return (RPR * K2 + phase + 3) / 4;
}
static_assert(round_granules(3) <= GRANULES && GRANULES * 16 <= 144 && GRANULES * 8 <= 72, "a round must fit its slot");

// Shared memory of weights_kernel: Wt of the tile, then the centre table and the phase-1 copy
// buffers (4-byte words, or granules with VLOG), whose place phase 2 (APPLY only) reuses for value.
template <typename T, bool APPLY, bool VLOG = false>
constexpr int weights_smem_bytes() {
  constexpr int wt = D * TP * 4;
  constexpr int slot_bytes = VLOG ? vector_slot_bytes<T>() : slot_words<T>() * 4;
  constexpr int phase1 = PASSES * NT * 4 + 2 * NT * slot_bytes;
  constexpr int values = value_stages<T>() * value_chunk_bytes<T>() + converted_bytes<T>();
  return wt + (APPLY && values > phase1 ? values : phase1);
}
// The RTX 30 and 40 series (sm_86, sm_89) allow 99 KB per block: above it they would run the
// generic kernels instead of these. (Vector staging takes 111.5 KB in fp32: the host keeps such
// devices on word staging.)
static_assert(weights_smem_bytes<float, true>() <= 99 * 1024 && weights_smem_bytes<uint16_t, true>() <= 99 * 1024,
              "the fused forward must fit in 99 KB of shared memory");
static_assert(weights_smem_bytes<uint16_t, true, true>() <= 99 * 1024, "2-byte vector staging must fit in 99 KB");

// Element offset of a chunk inside its first word (0 for 4-byte types, 0 or 1 for 2-byte ones).
template <typename T>
__device__ __forceinline__ int word_phase(const T* p) {
  return sizeof(T) == 4 ? 0 : static_cast<int>((reinterpret_cast<uintptr_t>(p) >> 1) & 1);
}

// Copies rows [row0, row0 + RPR) of every valid slot's matrix into buf (NT slots x slot_words):
// lanes of a warp take consecutive words of one slot (two slots for 2-byte types), so the global
// reads are coalesced. offsets[slot] is the byte offset of the slot's matrix from `base` (the
// block's first window centre), or -1. `checked`: a word of this block may stick out of the tensor
// [lo, hi) (2-byte types, first and last matrix of the tensor only).
template <typename T>
__device__ __forceinline__ void issue_round(uint32_t* buf, const T* base, const int* offsets, int row0,
                                            bool checked, const char* lo, const char* hi) {
  constexpr int WPS = slot_words<T>();
  constexpr int SPI = 32 / WPS;  // slots per warp iteration
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / WPS, w = lane - sub * WPS;
  if (sub >= SPI) return;
  // Byte offsets make a copy's address one 64-bit add (element offsets cost two more, the scaling).
  // 4-byte types read their offsets in batches before the copies: the compiler puts three no-op
  // instructions before a cp.async that directly follows a shared-memory access
  // (tools/kernel_stats.py). 2-byte types read one per copy: in batches their forward spilled 16
  // bytes, and the bf16 forward measured 13% slower on an H200 than before batching (0.509 ms
  // against 0.449; 2026-11-28). Without the batches it does not spill; not yet timed on a GPU.
  constexpr int BATCH = 4, STEP = NWARPS * SPI;
  static_assert(NT % (BATCH * STEP) == 0, "batches must cover the slots exactly");
  if constexpr (sizeof(T) == 4) {
    const char* lane_src = reinterpret_cast<const char*>(base + row0 * K2 + w);
    uint32_t* lane_dst = buf + w;
#pragma unroll 1
    for (int slot0 = warp; slot0 < NT; slot0 += BATCH * STEP) {
      int off[BATCH];
#pragma unroll
      for (int u = 0; u < BATCH; ++u) off[u] = offsets[slot0 + u * STEP];
#pragma unroll
      for (int u = 0; u < BATCH; ++u)
        if (off[u] >= 0) cp_async_4(lane_dst + (slot0 + u * STEP) * WPS, lane_src + static_cast<unsigned>(off[u]));
    }
  } else {
    constexpr int CHUNK_WORDS = (2 + RPR * K2 * 2 + 3) / 4;  // 14 whatever the chunk's phase
    if (w >= CHUNK_WORDS) return;
    const char* lane_src = reinterpret_cast<const char*>(base + row0 * K2);
    uint32_t* lane_dst = buf + w;
    if (!checked) {
#pragma unroll 4
      for (int slot = warp * SPI + sub; slot < NT; slot += STEP) {
        const int off = offsets[slot];
        if (off < 0) continue;
        const uintptr_t chunk = reinterpret_cast<uintptr_t>(lane_src + static_cast<unsigned>(off));
        cp_async_4(lane_dst + slot * WPS, reinterpret_cast<const char*>(chunk & ~uintptr_t(3)) + 4 * w);
      }
    } else {
      for (int slot = warp * SPI + sub; slot < NT; slot += STEP) {
        const int off = offsets[slot];
        if (off < 0) continue;
        const uintptr_t chunk = reinterpret_cast<uintptr_t>(lane_src + static_cast<unsigned>(off));
        copy_word<T>(lane_dst + slot * WPS, reinterpret_cast<const char*>(chunk & ~uintptr_t(3)) + 4 * w, lo, hi);
      }
    }
  }
}

// Vector staging: with heads a multiple of 4, matrix n = pixel * heads + g starts at element 81 n,
// and 81 n = g (mod 4), so every slot of a block finds its round's first element (row0 of the
// matrix) at the same place inside a granule of 4 elements: phase = (g + 9 row0) mod 4. Each lane
// copies one granule of a slot (8 lanes per slot, 4 slots per warp iteration): 7 or 8 copies per
// slot and round, against 27 (fp32) or 14 (2-byte) of 4-byte words, and the rows are read back with
// three vector loads each (granule_row). Every granule copied holds an element of the round, and the
// tensor (81 * pixels * heads elements, from an aligned address) starts and ends on granule
// boundaries: no copy reaches outside it.
template <typename T>
__device__ __forceinline__ void issue_round_vectors(unsigned char* buf, const T* base, const int* offsets, int row0,
                                                    int phase) {
  constexpr int GB = granule_bytes<T>(), SB = vector_slot_bytes<T>();
  constexpr int SPI = 32 / GRANULES, STEP = NWARPS * SPI, BATCH = 4;
  static_assert(NT % (BATCH * STEP) == 0, "batches must cover the slots exactly");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / GRANULES, c = lane - sub * GRANULES;
  if (c >= round_granules(phase)) return;
  // The round's first granule starts `phase` elements before row0 (a byte offset, as base may lie
  // before the tensor: the block's first window centre can be outside the image).
  const char* lane_src = keep_in_register(reinterpret_cast<const char*>(base) +
                                          (row0 * K2 - phase) * static_cast<int>(sizeof(T)) + c * GB);
  unsigned char* lane_dst = buf + c * GB;
#pragma unroll 1
  for (int slot0 = warp * SPI + sub; slot0 < NT; slot0 += BATCH * STEP) {
    int off[BATCH];
#pragma unroll
    for (int u = 0; u < BATCH; ++u) off[u] = offsets[slot0 + u * STEP];
#pragma unroll
    for (int u = 0; u < BATCH; ++u)
      if (off[u] >= 0) cp_async_zfill<GB>(lane_dst + (slot0 + u * STEP) * SB, lane_src + static_cast<unsigned>(off[u]), GB);
  }
}

// The 4 elements of a staged granule as floats (one 16-byte or 8-byte shared-memory load).
template <typename T>
__device__ __forceinline__ void load_granule(const unsigned char* p, float* x) {
  if constexpr (sizeof(T) == 4) {
    const Vec16 v = *reinterpret_cast<const Vec16*>(p);
#pragma unroll
    for (int k = 0; k < 4; ++k) x[k] = float_of_bits(v.w[k]);
  } else {
    const Vec8 v = *reinterpret_cast<const Vec8*>(p);
#pragma unroll
    for (int k = 0; k < 4; ++k)
      x[k] = static_cast<float>(T(static_cast<uint16_t>(v.w[k / 2] >> (16 * (k % 2))), T::from_bits()));
  }
}

// Row elements [first, first + 9) of a slot's staged granules; `first` must fold to a constant
// (the phase and the row are compile-time), or x would live in local memory.
template <typename T>
__device__ __forceinline__ void granule_row(const unsigned char* slot, int first, float (&x)[K2]) {
  float raw[12];
#pragma unroll
  for (int k = 0; k < 3; ++k) load_granule<T>(slot + ((first >> 2) + k) * granule_bytes<T>(), raw + 4 * k);
#pragma unroll
  for (int j = 0; j < K2; ++j) x[j] = raw[(first & 3) + j];
}

// Row elements [0, 9) at a (word-staged) row in shared memory, as floats.
template <typename T>
__device__ __forceinline__ void word_row(const T* a, float (&x)[K2]) {
#pragma unroll
  for (int j = 0; j < K2; ++j) x[j] = static_cast<float>(a[j]);
}

// Maximum and sum of 9 values as trees, four dependent steps instead of a chain of eight: the
// softmaxes of the fused kernels are bound by instruction latency, not by throughput.
__device__ __forceinline__ float max9(const float (&v)[K2]) {
  return fmaxf(fmaxf(fmaxf(v[0], v[1]), fmaxf(v[2], v[3])), fmaxf(fmaxf(v[4], v[5]), fmaxf(fmaxf(v[6], v[7]), v[8])));
}
__device__ __forceinline__ float sum9(const float (&v)[K2]) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + ((v[6] + v[7]) + v[8]));
}

// Unnormalised softmax of one row of 9 logits in base 2: e[j] = exp2(sl2 * x[j] - max); returns 1/sum.
// sl2 > 0 (the host runs other scales on the generic kernels), so the maximum of the scaled logits
// is the scaled maximum, bit for bit (rounding is monotonic): one multiply instead of nine.
__device__ __forceinline__ float softmax_row(const float (&x)[K2], float sl2, float (&e)[K2]) {
  const float top = mul_rn(sl2, max9(x));
#pragma unroll
  for (int j = 0; j < K2; ++j) e[j] = exp2f(fmaf(x[j], sl2, -top));
  return 1.f / sum9(e);
}
template <typename T>
__device__ __forceinline__ float softmax_row(const T* a, float sl2, float (&e)[K2]) {
  float x[K2];
  word_row(a, x);
  return softmax_row(x, sl2, e);
}

// The (batch, head, tile) of this block: heads vary fastest, so the blocks reading the same
// pixels' logits (interleaved by head in memory) run together; then tiles along x, then y.
struct BlockTile {
  int b, g, oy0, ox0;
};
__device__ __forceinline__ BlockTile block_tile(int heads, int tiles_x, int tiles_y, int tile_h, int tile_w) {
  int bid = blockIdx.x;
  BlockTile t;
  t.g = bid % heads;
  bid /= heads;
  t.ox0 = (bid % tiles_x) * tile_w;
  bid /= tiles_x;
  t.oy0 = (bid % tiles_y) * tile_h;
  t.b = bid / tiles_y;
  return t;
}

// log2-sum-exp2 of one row of 9 logits scaled by sl2 (> 0).
template <typename T>
__device__ __forceinline__ float row_lse(const T* a, float sl2) {
  float x[K2], e[K2];
  word_row(a, x);
  const float top = mul_rn(sl2, max9(x));  // rounded on its own, never fused with the addition below
#pragma unroll
  for (int j = 0; j < K2; ++j) e[j] = exp2f(fmaf(x[j], sl2, -top));
  return top + log2f(sum9(e));
}

// Phase 1 of weights_kernel: Wt of the tile into wt_s (zeroed), from the logits of the window
// centres in `table`. G4 = g mod 4 with vector staging (a compile-time phase for every round), -1
// with word staging.
template <typename T, bool DUAL, int G4>
__device__ CONDSEG_NOINLINE void tile_weights(float* wt_s, const int* table, unsigned char* rounds, const T* fg_base,
                                             const T* bg_base, const T* fg, const T* bg, long long attn_numel,
                                             bool checked, float sl2) {
  constexpr bool VEC = G4 >= 0;
  constexpr int NRP = DUAL ? 6 : 3;  // copy rounds per pass (bg rows first)
  constexpr int SLOT = VEC ? vector_slot_bytes<T>() : slot_words<T>() * 4;  // bytes per slot and round
  const int tid = threadIdx.x;
  // Where a round's rows start inside their first granule (vector staging).
  auto phase_of = [](int row0) { return (G4 + row0 * K2) & 3; };
  auto issue = [&](int pass, int r) {
    const bool is_bg = DUAL && r < 3;
    const T* lo = is_bg ? bg : fg;
    const T* base = is_bg ? bg_base : fg_base;
    unsigned char* buf = rounds + ((pass * NRP + r) & 1) * NT * SLOT;
    const int row0 = (r % 3) * RPR;
    if constexpr (VEC)
      issue_round_vectors<T>(buf, base, table + pass * NT, row0, phase_of(row0));
    else
      issue_round<T>(reinterpret_cast<uint32_t*>(buf), base, table + pass * NT, row0, checked,
                     reinterpret_cast<const char*>(lo), reinterpret_cast<const char*>(lo + attn_numel));
    cp_async_commit();
  };

  issue(0, 0);
  for (int pass = 0; pass < PASSES; ++pass) {
    const int e = pass * NT + tid;
    const int my_off = table[e];
    const bool valid = my_off >= 0;
    const int ey = e / EW, ex = e - ey * EW;
    float pbg[DUAL ? K4 : 1];  // P_bg of this centre, normalised
#pragma unroll
    for (int r = 0; r < NRP; ++r) {
      if (r + 1 < NRP) {
        issue(pass, r + 1);
        cp_async_wait<1>();
      } else if (pass + 1 < PASSES) {
        issue(pass + 1, 0);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const bool is_bg = DUAL && r < 3;
      const int row0 = (r % 3) * RPR;
      const unsigned char* slot = rounds + ((pass * NRP + r) & 1) * NT * SLOT + tid * SLOT;
      // Row rr of this round, as floats.
      auto load_row = [&](int rr, float (&x)[K2]) {
        if constexpr (VEC) {
          granule_row<T>(slot, phase_of(row0) + rr * K2, x);
        } else {
          const T* src = reinterpret_cast<const T*>(reinterpret_cast<const char*>(is_bg ? bg_base : fg_base) +
                                                    (valid ? my_off : 0)) + row0 * K2;
          word_row(reinterpret_cast<const T*>(slot) + word_phase(src) + rr * K2, x);
        }
      };
      if (is_bg) {
        if (valid) {
#pragma unroll
          for (int rr = 0; rr < RPR; ++rr) {
            float x[K2], e9[K2];
            load_row(rr, x);
            const float inv = softmax_row(x, sl2, e9);
#pragma unroll
            for (int s = 0; s < K2; ++s) pbg[DUAL ? (row0 + rr) * K2 + s : 0] = e9[s] * inv;
          }
        }
        __syncthreads();
        continue;
      }
#pragma unroll
      for (int rr = 0; rr < RPR; ++rr) {
        const int p = row0 + rr, py = p / 3, px = p % 3;
        const int ry = ey + py - 2, rx = ex + px - 2;  // destination r = q + off(p), tile coordinates
        if (valid && ry >= 0 && ry < TH && rx >= 0 && rx < TW) {
          float x[K2], ef[K2], row[K2];
          load_row(rr, x);
          // Row p of M (of P_fg when single) without P_fg's 1 / row sum, which the scatter's
          // multiply-add applies (P_bg's rows were normalised when computed): no multiply per product.
          const float inv = softmax_row(x, sl2, ef);
          if (DUAL) {
#pragma unroll
            for (int s = 0; s < K2; ++s) row[s] = 0.f;
#pragma unroll
            for (int j = 0; j < K2; ++j) {
#pragma unroll
              for (int s = 0; s < K2; ++s) row[s] = fmaf(ef[j], pbg[DUAL ? j * K2 + s : 0], row[s]);
            }
          } else {
#pragma unroll
            for (int s = 0; s < K2; ++s) row[s] = ef[s];
          }
          float* dst = wt_s + ry * TW + rx;
#pragma unroll
          for (int s = 0; s < K2; ++s) {
            const int d = (s / 3 - py + 2) * 5 + (s % 3 - px + 2);
            dst[d * TP] = fmaf(row[s], inv, dst[d * TP]);
          }
        }
        __syncthreads();  // the next slot's rows land on other pixels' Wt: keep slots apart
      }
    }
  }
}

// VLOG: vector staging of the logits in phase 1 (heads a multiple of 4, logits aligned to a
// granule, and weights_smem_bytes<T, APPLY, true>() of shared memory; the host decides).
template <typename T, bool DUAL, bool APPLY, bool VLOG>
__global__ void __launch_bounds__(NT, 2)
    weights_kernel(const T* __restrict__ value, const T* __restrict__ fg, const T* __restrict__ bg,
                   T* __restrict__ out, float* __restrict__ weights, int H, int W, int heads, int C, int Cg,
                   int tiles_x, int tiles_y, long long attn_numel, float sl2) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* wt_s = reinterpret_cast<float*>(smem);                     // [D][TP]
  int* table = reinterpret_cast<int*>(smem + D * TP * 4);           // [PASSES][NT]
  unsigned char* rounds = smem + D * TP * 4 + PASSES * NT * 4;      // [2][NT][slot]

  const int tid = threadIdx.x;
  const BlockTile tile = block_tile(heads, tiles_x, tiles_y, TH, TW);
  const int b = tile.b, g = tile.g, oy0 = tile.oy0, ox0 = tile.ox0;

  for (int i = tid; i < D * TP; i += NT) wt_s[i] = 0.f;
  // Window centre e of the block is pixel (oy0 - 1 + e / EW, ox0 - 1 + e % EW); its matrix is at
  // byte base + table[e] of the logits (int32: the host checks that the tile's span fits).
  for (int e = tid; e < PASSES * NT; e += NT) {
    const int ey = e / EW, ex = e - ey * EW, qy = oy0 - 1 + ey, qx = ox0 - 1 + ex;
    const bool inside = e < EP && qy >= 0 && qy < H && qx >= 0 && qx < W;
    table[e] = inside ? (ey * W + ex) * heads * K4 * static_cast<int>(sizeof(T)) : -1;
  }
  const long long base_off = ((((long long)b * H + (oy0 - 1)) * W + (ox0 - 1)) * heads + g) * K4;
  const T* fg_base = reinterpret_cast<const T*>(reinterpret_cast<uintptr_t>(fg) + base_off * (long long)sizeof(T));
  const T* bg_base =
      DUAL ? reinterpret_cast<const T*>(reinterpret_cast<uintptr_t>(bg) + base_off * (long long)sizeof(T)) : nullptr;
  // 2-byte logits staged in 4-byte words may reach one element past a chunk: only the blocks
  // holding the tensor's first or last matrix need bounds checks.
  const int fy = max(oy0 - 1, 0), fx = max(ox0 - 1, 0), ly = min(oy0 + TH, H - 1), lx = min(ox0 + TW, W - 1);
  const long long first_el = ((((long long)b * H + fy) * W + fx) * heads + g) * K4;
  const long long end_el = ((((long long)b * H + ly) * W + lx) * heads + g + 1) * K4;
  const bool checked = !VLOG && sizeof(T) < 4 && (first_el == 0 || end_el == attn_numel);
  __syncthreads();

  // ---- phase 1: Wt of the tile --------------------------------------------------------------
  if constexpr (VLOG) {
    switch (g & 3) {  // uniform per block
      case 0: tile_weights<T, DUAL, 0>(wt_s, table, rounds, fg_base, bg_base, fg, bg, attn_numel, checked, sl2); break;
      case 1: tile_weights<T, DUAL, 1>(wt_s, table, rounds, fg_base, bg_base, fg, bg, attn_numel, checked, sl2); break;
      case 2: tile_weights<T, DUAL, 2>(wt_s, table, rounds, fg_base, bg_base, fg, bg, attn_numel, checked, sl2); break;
      default: tile_weights<T, DUAL, 3>(wt_s, table, rounds, fg_base, bg_base, fg, bg, attn_numel, checked, sl2);
    }
  } else {
    tile_weights<T, DUAL, -1>(wt_s, table, rounds, fg_base, bg_base, fg, bg, attn_numel, checked, sl2);
  }

  const int HW = H * W;
  if (!APPLY) {
    for (int i = tid; i < D * TP; i += NT) {
      const int d = i / TP, pix = i - d * TP, y = oy0 + pix / TW, x = ox0 + pix % TW;
      if (y < H && x < W) weights[(((long long)b * heads + g) * D + d) * HW + (long long)y * W + x] = wt_s[i];
    }
    return;
  }

  // ---- phase 2: out = sum_d Wt[d] V[. + d] ----------------------------------------------------
  // Value is staged CC channels at a time by cp.async into VSTAGES rotating buffers, VSTAGES - 1
  // chunks in flight while one is applied, so that more bytes are in flight to cover DRAM latency.
  // fp32 chunks are applied where they land; 2-byte chunks are converted into an fp32 tile of the
  // TW + 4 columns the apply reads first.
  constexpr bool DIRECT = sizeof(T) == 4;
  constexpr int VSTAGES = value_stages<T>(), VEC = vec_elems<T>(), VX = stage_row<T>(), NV = VX / VEC;
  constexpr int CHUNK = value_chunk_bytes<T>();
  // The tile the apply reads: its row length, and the column of x = ox0 - 2.
  constexpr int AX = DIRECT ? VX : TW + 4, A0 = DIRECT ? VEC - 2 : 0, ATILE = VH * AX;
  unsigned char* raw = smem + D * TP * 4;  // [VSTAGES][CC][VH][VX] of T, over the table and the rounds
  float* converted = reinterpret_cast<float*>(raw + VSTAGES * CHUNK);  // [CC][VH][AX], 2-byte T
  const T* vplane = value + ((long long)b * C + (long long)g * Cg) * HW;    // channel 0 of the head
  const bool vectors = W % VEC == 0 && (reinterpret_cast<uintptr_t>(value) & 15) == 0;
  // With vectors, a thread stages the same VITEMS vectors of every chunk (only the chunk's first
  // channel moves), so their places are decoded once: decoding one took about 70 instructions.
  constexpr int VITEMS = CC * VH * NV / NT;
  static_assert(CC * VH * NV % NT == 0 && CHUNK < (1 << 16), "vector items must split evenly and fit 16 bits");
  int item_src[VITEMS];  // element offset from the chunk's first channel plane; -1: outside the image
  int item_dst[VITEMS];  // byte offset in the chunk's buffer | channel in the chunk << 16
#pragma unroll
  for (int u = 0; u < VITEMS; ++u) {
    const int i = tid + u * NT, row = i / NV, j = (i - row * NV) * VEC;
    const int cl = row / VH, vy = row - cl * VH, y = oy0 - 2 + vy, x = ox0 - VEC + j;
    const bool inside = y >= 0 && y < H && x >= 0 && x < W;
    item_src[u] = inside ? cl * HW + y * W + x : -1;  // int32: the host checks CC * H * W
    item_dst[u] = (row * VX + j) * static_cast<int>(sizeof(T)) | cl << 16;
  }
  // Queues chunk k into buffer k % VSTAGES and commits one group, empty past the last chunk, so
  // that the waits below can count groups. Item i of a chunk is (channel, row, x) in stage order.
  auto issue_values = [&](int k) {
    const int c0 = k * CC;
    unsigned char* buf = raw + (k % VSTAGES) * CHUNK;
    if (c0 < Cg && vectors) {
      const T* chunk_plane = vplane + (long long)c0 * HW;
#pragma unroll
      for (int u = 0; u < VITEMS; ++u) {
        const bool fill = item_src[u] >= 0 && c0 + (item_dst[u] >> 16) < Cg;  // zeros outside
        cp_async_16(buf + (item_dst[u] & 0xffff), fill ? chunk_plane + item_src[u] : value, fill);
      }
    } else if (c0 < Cg) {  // element by element (rare: W not a multiple of VEC, or value unaligned)
#pragma unroll 1
      for (int i = tid; i < CC * VH * VX; i += NT) {
        const int row = i / VX, x = ox0 - VEC + i - row * VX;
        const int cl = row / VH, vy = row - cl * VH, y = oy0 - 2 + vy;
        const bool inside = c0 + cl < Cg && y >= 0 && y < H && x >= 0 && x < W;
        const T* src = inside ? vplane + (long long)(c0 + cl) * HW + (long long)y * W + x : value;
        T* dst = reinterpret_cast<T*>(buf) + i;
        if (DIRECT && inside)
          cp_async_4(dst, src);
        else
          *dst = inside ? *src : T(0.f);  // 2-byte elements: plain loads
      }
    }
    cp_async_commit();
  };
  // 2-byte chunk k -> the fp32 tile, one 16-byte vector (8 elements, from x = ox0 - 8 + 8 v) per
  // item; the elements outside the tile's columns [ox0 - 2, ox0 + TW + 2) are dropped.
  auto convert_values = [&](int k) {
    if constexpr (!DIRECT) {
      const unsigned char* buf = raw + (k % VSTAGES) * CHUNK;
#pragma unroll 1
      for (int i = tid; i < CC * VH * NV; i += NT) {
        const int row = i / NV, c0 = (i - row * NV) * VEC - (VEC - 2);  // tile column of element 0
        const Vec16 packed = *reinterpret_cast<const Vec16*>(buf + i * 16);
        float* dst = converted + row * AX;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const uint16_t bits = static_cast<uint16_t>(packed.w[j / 2] >> (16 * (j % 2)));
          if (c0 + j >= 0 && c0 + j < AX) dst[c0 + j] = static_cast<float>(T(bits, T::from_bits()));
        }
      }
    }
  };

  // Phase 1 is over (its last barrier is above): the table and the copy rounds are free.
#pragma unroll
  for (int k = 0; k < VSTAGES - 1; ++k) issue_values(k);

  const int col = tid & 31, warp = tid >> 5;
  const int r0 = (warp % NQ) * QR, cgroup = warp / NQ;
  const int nrows = min(QR, TH - r0);  // uniform per warp
  float w[QR][D];
#pragma unroll
  for (int i = 0; i < QR; ++i)
#pragma unroll
    for (int d = 0; d < D; ++d) w[i][d] = i < nrows ? wt_s[d * TP + (r0 + i) * TW + col] : 0.f;

  const int chunks = (Cg + CC - 1) / CC;
#pragma unroll 1
  for (int k = 0; k < chunks; ++k) {
    const int c0 = k * CC;
    cp_async_wait<VSTAGES - 2>();  // this thread's copies of chunk k landed
    __syncthreads();               // everyone's did, and everyone is done with chunk k - 1
    issue_values(k + VSTAGES - 1);  // into chunk k - 1's buffer
    const float* tile = reinterpret_cast<const float*>(raw + (k % VSTAGES) * CHUNK);
    if (!DIRECT) {
      convert_values(k);
      __syncthreads();  // converted tile ready
      tile = converted;
    }
#pragma unroll 1
    for (int kk = 0; kk < CC / CSPLIT; ++kk) {
      const int cl = cgroup + kk * CSPLIT, c = c0 + cl;
      if (c >= Cg) break;
      float acc[QR];
#pragma unroll
      for (int i = 0; i < QR; ++i) acc[i] = 0.f;
      const float* plane = tile + cl * ATILE + r0 * AX + col + A0;  // x = ox0 + col - 2
#pragma unroll
      for (int vr = 0; vr < QR + 4; ++vr) {
        if (vr >= nrows + 4) break;
        float v[5];
#pragma unroll
        for (int dx = 0; dx < 5; ++dx) v[dx] = plane[vr * AX + dx];
#pragma unroll
        for (int i = 0; i < QR; ++i) {
          const int dy = vr - i;  // 0..4 <-> offset -2..2
          if (dy < 0 || dy > 4 || i >= nrows) continue;
#pragma unroll
          for (int dx = 0; dx < 5; ++dx) acc[i] = fmaf(w[i][dy * 5 + dx], v[dx], acc[i]);
        }
      }
      const int x = ox0 + col;
      T* dst = out + ((long long)b * C + (long long)g * Cg + c) * HW;
#pragma unroll
      for (int i = 0; i < QR; ++i) {
        const int y = oy0 + r0 + i;
        if (i < nrows && y < H && x < W) dst[(long long)y * W + x] = static_cast<T>(acc[i]);
      }
    }
  }
}

// ---- backward: grad_value and gWt -----------------------------------------------------------
constexpr int BH = 8, BW = 32;          // tile (one pixel per thread)
constexpr int GH = BH + 4, GW = BW + 4;  // grad_out / value tile with its 2-pixel ring
constexpr int CC3 = 4;
constexpr int value_grad_smem_bytes = 2 * CC3 * GH * GW * 4;

template <typename T>
__global__ void __launch_bounds__(NT, 2)
    value_grad_kernel(const T* __restrict__ grad_out, const T* __restrict__ value, const float* __restrict__ weights,
                      T* __restrict__ grad_value, float* __restrict__ grad_weights, int H, int W, int heads, int C,
                      int Cg, int tiles_x, int tiles_y) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* gs = reinterpret_cast<float*>(smem);  // [CC3][GH][GW]
  float* vs = gs + CC3 * GH * GW;               // [CC3][GH][GW]
  const int tid = threadIdx.x;
  const BlockTile tile = block_tile(heads, tiles_x, tiles_y, BH, BW);
  const int b = tile.b, g = tile.g, oy0 = tile.oy0, ox0 = tile.ox0;
  const int col = tid & 31, row = tid >> 5, y = oy0 + row, x = ox0 + col;
  const bool inside = y < H && x < W;
  const int HW = H * W;

  // w[d] = Wt_{t-d}[d]: the weight with which the output at t - d read value at t.
  const float* wg = weights + ((long long)b * heads + g) * D * HW;
  float w[D], gacc[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    const int sy = y - (d / 5 - 2), sx = x - (d % 5 - 2);
    w[d] = (inside && sy >= 0 && sy < H && sx >= 0 && sx < W) ? wg[(long long)d * HW + sy * W + sx] : 0.f;
    gacc[d] = 0.f;
  }

  constexpr int TILE = GH * GW, LOADS = (2 * CC3 * TILE + NT - 1) / NT;
  const long long plane0 = ((long long)b * C + (long long)g * Cg) * HW;
  float reg[LOADS];
  auto load_chunk = [&](int c0) {
#pragma unroll
    for (int k = 0; k < LOADS; ++k) {
      const int i = tid + k * NT;
      const int which = i / (CC3 * TILE), j = i - which * CC3 * TILE;  // 0: grad_out, 1: value
      const int cl = j / TILE, rem = j - cl * TILE, ty = rem / GW, tx = rem - ty * GW;
      const int yy = oy0 - 2 + ty, xx = ox0 - 2 + tx, c = c0 + cl;
      const T* src = which == 0 ? grad_out : value;
      reg[k] = (which < 2 && c < Cg && yy >= 0 && yy < H && xx >= 0 && xx < W)
                   ? static_cast<float>(src[plane0 + (long long)c * HW + (long long)yy * W + xx])
                   : 0.f;
    }
  };

  load_chunk(0);
  for (int c0 = 0; c0 < Cg; c0 += CC3) {
    if (c0 > 0) __syncthreads();
#pragma unroll
    for (int k = 0; k < LOADS; ++k) {
      const int i = tid + k * NT;
      if (i < 2 * CC3 * TILE) gs[i] = reg[k];  // gs and vs are contiguous
    }
    __syncthreads();
    if (c0 + CC3 < Cg) load_chunk(c0 + CC3);
#pragma unroll 1
    for (int cl = 0; cl < CC3 && c0 + cl < Cg; ++cl) {
      const float* gp = gs + cl * TILE + (row + 2) * GW + col + 2;  // centred on t
      const float* vp = vs + cl * TILE + (row + 2) * GW + col + 2;
      const float centre = gp[0];
      float gv = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        const int dy = d / 5 - 2, dx = d % 5 - 2;
        gv = fmaf(w[d], gp[-dy * GW - dx], gv);
        gacc[d] = fmaf(centre, vp[dy * GW + dx], gacc[d]);
      }
      if (inside) grad_value[plane0 + (long long)(c0 + cl) * HW + (long long)y * W + x] = static_cast<T>(gv);
    }
  }
  if (inside) {
    float* gw = grad_weights + ((long long)b * heads + g) * D * HW + (long long)y * W + x;
#pragma unroll
    for (int d = 0; d < D; ++d) gw[(long long)d * HW] = gacc[d];
  }
}

// ---- backward: gradients of the logits ------------------------------------------------------
constexpr int NT4 = 128;  // (pixel, head) pairs per block

template <typename T>
constexpr int logit_stage_words() {
  return (NT4 * K4 * static_cast<int>(sizeof(T)) + 3) / 4 + 1;
}

template <typename T, bool DUAL>
constexpr int logit_grad_smem_bytes() {
  return (DUAL ? 2 : 1) * logit_stage_words<T>() * 4;
}

// Stages elements [first, first + count) of a tensor (bounds lo, hi) into buf; returns the element
// offset of `first` inside buf.
template <typename T>
__device__ __forceinline__ int stage_contiguous(uint32_t* buf, const T* first, long long count, const char* lo,
                                                const char* hi) {
  const int phase = word_phase(first);
  const char* word0 = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(first) & ~uintptr_t(3));
  const int words = static_cast<int>((phase * sizeof(T) + count * sizeof(T) + 3) / 4);
  for (int i = threadIdx.x; i < words; i += blockDim.x) copy_word<T>(buf + i, word0 + 4 * i, lo, hi);
  return phase;
}

// The logits of block blockIdx.x's NT4 (pixel, head) pairs (contiguous matrices), staged into shared
// memory (logit_grad_smem_bytes) with coalesced 4-byte copies, ready for every thread to read.
template <typename T>
struct BlockLogits {
  T* fg;      // matrix t of the block at fg + t * K4
  T* bg;      // (DUAL only)
  int count;  // pairs in this block (NT4 but in the last one)
};

template <typename T, bool DUAL>
__device__ __forceinline__ BlockLogits<T> stage_block_logits(unsigned char* smem, const T* fg, const T* bg,
                                                             long long pixel_heads) {
  uint32_t* fg_words = reinterpret_cast<uint32_t*>(smem);
  uint32_t* bg_words = fg_words + logit_stage_words<T>();
  const long long n0 = (long long)blockIdx.x * NT4, left = pixel_heads - n0;
  const int count = left < NT4 ? static_cast<int>(left) : NT4;
  auto stage = [&](uint32_t* words, const T* logits) {
    return stage_contiguous<T>(words, logits + n0 * K4, (long long)count * K4, reinterpret_cast<const char*>(logits),
                               reinterpret_cast<const char*>(logits + pixel_heads * K4));
  };
  const int fg_phase = stage(fg_words, fg);
  const int bg_phase = DUAL ? stage(bg_words, bg) : 0;
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  return {reinterpret_cast<T*>(fg_words) + fg_phase, reinterpret_cast<T*>(bg_words) + bg_phase, count};
}

// The 9 rows of a staged matrix through softmax_row, normalised (as tile_weights computes P_bg).
template <typename T>
__device__ __forceinline__ void softmax_rows(const T* a, float sl2, float (&p)[K4]) {
#pragma unroll
  for (int j = 0; j < K2; ++j) {
    float e[K2];
    const float inv = softmax_row(a + j * K2, sl2, e);
#pragma unroll
    for (int s = 0; s < K2; ++s) p[j * K2 + s] = e[s] * inv;
  }
}

template <typename T, bool DUAL>
__global__ void __launch_bounds__(NT4)
    logit_grad_kernel(const T* __restrict__ fg, const T* __restrict__ bg, const float* __restrict__ grad_weights,
                      T* __restrict__ grad_fg, T* __restrict__ grad_bg, int H, int W, int heads,
                      long long pixel_heads, float sl2, float scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  const BlockLogits<T> staged = stage_block_logits<T, DUAL>(smem, fg, bg, pixel_heads);
  const long long n0 = (long long)blockIdx.x * NT4;
  const int count = staged.count;
  T* fg_s = staged.fg;
  T* bg_s = staged.bg;
  const int t = threadIdx.x;
  if (t < count) {
    const long long n = n0 + t;
    const int head = static_cast<int>(n % heads);
    const long long pixel = n / heads;
    const int HW = H * W;
    const long long b = pixel / HW;
    const int q = static_cast<int>(pixel % HW), qy = q / W, qx = q % W;
    const float* gw = grad_weights + (b * heads + head) * D * HW;
    T* F = fg_s + t * K4;
    T* Bm = bg_s + t * K4;

    float gm[K4];  // gM[p, s] = gWt_{q + off(p)}[off(s) - off(p)]
#pragma unroll
    for (int p = 0; p < K2; ++p) {
      const int py = p / 3, px = p % 3, ry = qy + py - 1, rx = qx + px - 1;
      const bool in = ry >= 0 && ry < H && rx >= 0 && rx < W;
#pragma unroll
      for (int s = 0; s < K2; ++s) {
        const int d = (s / 3 - py + 2) * 5 + (s % 3 - px + 2);
        gm[p * K2 + s] = in ? gw[(long long)d * HW + ry * W + rx] : 0.f;
      }
    }
    float lse_fg[K2];  // log2-sum-exp2 of the fg rows: P_fg[p, j] = exp2(sl2 * a - lse_fg[p])
#pragma unroll
    for (int p = 0; p < K2; ++p) lse_fg[p] = row_lse(F + p * K2, sl2);
    if (DUAL) {
      float pb[K4];
      softmax_rows(Bm, sl2, pb);
      // grad of P_bg: gP_bg[j, s] = sum_p P_fg[p, j] gM[p, s]; written over the bg logits.
#pragma unroll
      for (int j = 0; j < K2; ++j) {
        float gp[K2];
#pragma unroll
        for (int s = 0; s < K2; ++s) gp[s] = 0.f;
#pragma unroll
        for (int p = 0; p < K2; ++p) {
          const float pf = exp2f(fmaf(static_cast<float>(F[p * K2 + j]), sl2, -lse_fg[p]));
#pragma unroll
          for (int s = 0; s < K2; ++s) gp[s] = fmaf(pf, gm[p * K2 + s], gp[s]);
        }
        float dot = 0.f;
#pragma unroll
        for (int s = 0; s < K2; ++s) dot = fmaf(gp[s], pb[j * K2 + s], dot);
#pragma unroll
        for (int s = 0; s < K2; ++s) Bm[j * K2 + s] = static_cast<T>(scale * pb[j * K2 + s] * (gp[s] - dot));
      }
      // grad of P_fg: gP_fg[p, j] = sum_s gM[p, s] P_bg[j, s]; written over the fg logits.
#pragma unroll
      for (int p = 0; p < K2; ++p) {
        float pf[K2], gp[K2];
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < K2; ++j) {
          pf[j] = exp2f(fmaf(static_cast<float>(F[p * K2 + j]), sl2, -lse_fg[p]));
          float acc = 0.f;
#pragma unroll
          for (int s = 0; s < K2; ++s) acc = fmaf(gm[p * K2 + s], pb[j * K2 + s], acc);
          gp[j] = acc;
          dot = fmaf(acc, pf[j], dot);
        }
#pragma unroll
        for (int j = 0; j < K2; ++j) F[p * K2 + j] = static_cast<T>(scale * pf[j] * (gp[j] - dot));
      }
    } else {
#pragma unroll
      for (int p = 0; p < K2; ++p) {
        float pf[K2];
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < K2; ++j) {
          pf[j] = exp2f(fmaf(static_cast<float>(F[p * K2 + j]), sl2, -lse_fg[p]));
          dot = fmaf(gm[p * K2 + j], pf[j], dot);
        }
#pragma unroll
        for (int j = 0; j < K2; ++j) F[p * K2 + j] = static_cast<T>(scale * pf[j] * (gm[p * K2 + j] - dot));
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < count * K4; i += NT4) {
    grad_fg[n0 * K4 + i] = fg_s[i];
    if (DUAL) grad_bg[n0 * K4 + i] = bg_s[i];
  }
}

}  // namespace k3
}  // namespace cuda
}  // namespace condseg_ops
