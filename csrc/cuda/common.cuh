// Device helpers shared by the CUDA kernels of condseg_ops (generic and K = 3 paths).
#pragma once

#include <cuda_runtime.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace condseg_ops {
namespace cuda {

// Softmaxes run in base 2: softmax(scale * a) = exp2(a * scale * log2(e) - lse2).
constexpr double kLog2e = 1.4426950408889634;

__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }  // ex2.approx (fast math)
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }
__device__ __forceinline__ float log2_acc(float x) { return log2f(x); }
__device__ __forceinline__ double log2_acc(double x) { return log2(x); }

// Sizes of one call, in the kernels' terms (all int64 so that index arithmetic never overflows).
struct Geo {
  int64_t B, C, H, W, heads, Cg, HW;
  int64_t K, k2, k4, R, dil, reach, D;  // reach = 2K-1, D = reach^2 source offsets
};

// 16 bytes read at once (one 128-bit shared-memory access when 16-byte aligned).
struct alignas(16) Vec16 {
  uint32_t w[4];
};
struct alignas(8) Vec8 {
  uint32_t w[2];
};

__device__ __forceinline__ float float_of_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// a * b rounded to float, never contracted into a multiply-add with what follows.
__device__ __forceinline__ float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// A device function compiled on its own, with its own register allocation (CUDA only).
#if defined(__CUDACC__)
#define CONDSEG_NOINLINE __noinline__
#else
#define CONDSEG_NOINLINE
#endif

// The pointer itself, as a value the compiler cannot recompute: under register pressure it would
// otherwise rebuild an address from the kernel's arguments at every use (six instructions a copy in
// the fused forward's logit copies) instead of keeping it in two registers.
template <typename P>
__device__ __forceinline__ P* keep_in_register(P* p) {
#if defined(__CUDA_ARCH__)
  uint64_t bits = reinterpret_cast<uintptr_t>(p);
  asm volatile("mov.b64 %0, %0;" : "+l"(bits));
  return reinterpret_cast<P*>(bits);
#else
  return p;
#endif
}

// Asynchronous global -> shared copies (sm_80+); plain copies on older architectures.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem) : "memory");
#elif defined(CONDSEG_CUDA_EMULATION)
  ::emu::cp_async_4(smem, gmem);  // lands at cp_async_wait, as on the GPU (tests/cuda_emulation)
#else
  *static_cast<uint32_t*>(smem) = *static_cast<const uint32_t*>(gmem);
#endif
}

// Asynchronous copy of N = 8 or 16 bytes (both addresses N-byte aligned) that reads only the first
// `src_bytes` of them and writes zeros for the rest (cp.async's source size: with 0 nothing is read,
// so gmem only has to be a valid address).
template <int N>
__device__ __forceinline__ void cp_async_zfill(void* smem, const void* gmem, int src_bytes) {
  static_assert(N == 8 || N == 16, "cp_async_zfill copies 8 or 16 bytes (cp_async_4 copies 4)");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (N == 16)  // .cg: through L2 only
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
  else  // .cg takes 16 bytes only
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
#elif defined(CONDSEG_CUDA_EMULATION)
  ::emu::cp_async_zfill(smem, gmem, N, src_bytes);
#else
  if (src_bytes == N) {  // whole words (a plain copy on GPUs before sm_80)
    for (int w = 0; w < N / 4; ++w) static_cast<uint32_t*>(smem)[w] = static_cast<const uint32_t*>(gmem)[w];
  } else {
    auto* d = static_cast<unsigned char*>(smem);
    const auto* s = static_cast<const unsigned char*>(gmem);
    for (int i = 0; i < N; ++i) d[i] = i < src_bytes ? s[i] : 0;
  }
#endif
}

// 16-byte asynchronous copy that writes zeros instead when `fill` is false.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool fill) {
  cp_async_zfill<16>(smem, gmem, fill ? 16 : 0);
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(CONDSEG_CUDA_EMULATION)
  ::emu::cp_async_commit();
#endif
}

// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(CONDSEG_CUDA_EMULATION)
  ::emu::cp_async_wait(N);
#endif
}

// Copies the 4-byte word at `word` (4-byte aligned) into shared memory, but only the bytes that
// lie in [lo, hi): a word that straddles the end of a 2-byte tensor is copied one element at a time.
template <typename T>
__device__ __forceinline__ void copy_word(uint32_t* dst, const char* word, const char* lo, const char* hi) {
  if (sizeof(T) >= 4 || (word >= lo && word + 4 <= hi)) {
    cp_async_4(dst, word);
  } else {
    auto* d = reinterpret_cast<unsigned short*>(dst);
    for (int h = 0; h < 2; ++h) {
      const char* a = word + 2 * h;
      if (a >= lo && a + 2 <= hi) d[h] = *reinterpret_cast<const unsigned short*>(a);
    }
  }
}

// Grid-stride loop bounds for a 1-D launch over `total` items.
__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t global_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

}  // namespace cuda
}  // namespace condseg_ops
