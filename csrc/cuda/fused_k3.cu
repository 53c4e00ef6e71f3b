// Launchers of the fused K = 3 kernels (k3_kernels.cuh) and of the split forward
// (k3_split_kernels.cuh).
#include "k3_split_kernels.cuh"
#include "launch.cuh"

#include <climits>
#include <cstdint>
#include <type_traits>

namespace condseg_ops {
namespace cuda {
namespace {

struct Tiles {
  long long x, y, blocks;
};

Tiles tiles_of(const Geo& g, int tile_h, int tile_w) {
  const long long tx = (g.W + tile_w - 1) / tile_w, ty = (g.H + tile_h - 1) / tile_h;
  return {tx, ty, tx * ty * g.heads * g.B};
}

long long channel_groups(const Geo& g) { return (g.Cg + k3::GATHER_CHANNELS - 1) / k3::GATHER_CHANNELS; }

template <typename Kernel>
cudaError_t allow_shared_memory(Kernel* kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace

bool fused_sizes_ok(const Geo& g) {
  // int32 offsets of a value chunk's elements from its first channel plane, too
  if (g.HW * k3::CC > INT_MAX || g.C > INT_MAX || g.heads > INT_MAX) return false;
  // byte offsets of the window centres of one weights_kernel tile from its first one (int32; 4-byte
  // elements, the widest the fused kernels take)
  if (((k3::EH + 1) * g.W + k3::EW) * g.heads * k3::K4 * 4 > INT_MAX) return false;
  const long long weights_blocks = tiles_of(g, k3::TH, k3::TW).blocks;
  const long long grad_blocks = tiles_of(g, k3::BH, k3::BW).blocks;
  const long long logit_blocks = (g.B * g.HW * g.heads + k3::NT4 - 1) / k3::NT4;
  return weights_blocks <= INT_MAX && grad_blocks <= INT_MAX && logit_blocks <= INT_MAX;
}

long long fused_forward_blocks(const Geo& g) { return tiles_of(g, k3::TH, k3::TW).blocks; }

bool split_sizes_ok(const Geo& g) {
  // gather_kernel's int32 thread index and offsets inside a plane (the planes' own offsets are int64)
  return g.B * g.heads * channel_groups(g) * g.HW <= INT_MAX && g.HW * k3::MIX_PLANES <= INT_MAX;
}

long long split_scratch_floats(const Geo& g) { return g.B * g.heads * k3::MIX_PLANES * g.HW; }

template <typename T>
int fused_shared_memory_bytes() {
  int bytes = k3::weights_smem_bytes<T, true>();
  if (k3::value_grad_smem_bytes > bytes) bytes = k3::value_grad_smem_bytes;
  if (k3::logit_grad_smem_bytes<T, true>() > bytes) bytes = k3::logit_grad_smem_bytes<T, true>();
  return bytes;
}

template <typename T>
bool fused_vector_logits_ok(const Geo& g, const T* fg, const T* bg, int shared_optin) {
  const auto misaligned = [](const T* p) {
    return (reinterpret_cast<uintptr_t>(p) % k3::granule_bytes<T>()) != 0;
  };
  return g.heads % 4 == 0 && !misaligned(fg) && (bg == nullptr || !misaligned(bg)) &&
         k3::weights_smem_bytes<T, true, true>() <= shared_optin;
}

template <typename T>
cudaError_t fused_weights(const Geo& g, const T* value, const T* fg, const T* bg, T* out, float* weights, float sl2,
                          bool vector_logits, cudaStream_t stream) {
  const Tiles tiles = tiles_of(g, k3::TH, k3::TW);
  const long long attn_numel = g.B * g.HW * g.heads * g.k4;
  auto launch = [&](auto kernel, int smem) {
    const cudaError_t status = allow_shared_memory(kernel, smem);
    if (status != cudaSuccess) return status;
    kernel<<<static_cast<unsigned int>(tiles.blocks), k3::NT, smem, stream>>>(
        value, fg, bg, out, weights, static_cast<int>(g.H), static_cast<int>(g.W), static_cast<int>(g.heads),
        static_cast<int>(g.C), static_cast<int>(g.Cg), static_cast<int>(tiles.x), static_cast<int>(tiles.y),
        attn_numel, sl2);
    return cudaGetLastError();
  };
  // Without APPLY (the backward's first step) the kernel needs no value stage: less shared memory.
  auto run = [&](auto vlog) {
    constexpr bool VLOG = decltype(vlog)::value;
    constexpr int with_apply = k3::weights_smem_bytes<T, true, VLOG>();
    constexpr int without = k3::weights_smem_bytes<T, false, VLOG>();
    const bool dual = bg != nullptr, apply = out != nullptr;
    if (dual && apply) return launch(k3::weights_kernel<T, true, true, VLOG>, with_apply);
    if (dual) return launch(k3::weights_kernel<T, true, false, VLOG>, without);
    if (apply) return launch(k3::weights_kernel<T, false, true, VLOG>, with_apply);
    return launch(k3::weights_kernel<T, false, false, VLOG>, without);
  };
  return vector_logits ? run(std::true_type{}) : run(std::false_type{});
}

template <typename T>
cudaError_t fused_value_grad(const Geo& g, const T* grad_out, const T* value, const float* weights, T* grad_value,
                             float* grad_weights, cudaStream_t stream) {
  const Tiles tiles = tiles_of(g, k3::BH, k3::BW);
  k3::value_grad_kernel<T><<<static_cast<unsigned int>(tiles.blocks), k3::NT, k3::value_grad_smem_bytes, stream>>>(
      grad_out, value, weights, grad_value, grad_weights, static_cast<int>(g.H), static_cast<int>(g.W),
      static_cast<int>(g.heads), static_cast<int>(g.C), static_cast<int>(g.Cg), static_cast<int>(tiles.x),
      static_cast<int>(tiles.y));
  return cudaGetLastError();
}

template <typename T>
cudaError_t fused_logit_grad(const Geo& g, const T* fg, const T* bg, const float* grad_weights, T* grad_fg,
                             T* grad_bg, float sl2, float scale, cudaStream_t stream) {
  const long long pixel_heads = g.B * g.HW * g.heads;
  const unsigned int blocks = static_cast<unsigned int>((pixel_heads + k3::NT4 - 1) / k3::NT4);
  auto launch = [&](auto kernel, int smem) {
    const cudaError_t status = allow_shared_memory(kernel, smem);
    if (status != cudaSuccess) return status;
    kernel<<<blocks, k3::NT4, smem, stream>>>(fg, bg, grad_weights, grad_fg, grad_bg, static_cast<int>(g.H),
                                              static_cast<int>(g.W), static_cast<int>(g.heads), pixel_heads, sl2,
                                              scale);
    return cudaGetLastError();
  };
  if (bg != nullptr) return launch(k3::logit_grad_kernel<T, true>, k3::logit_grad_smem_bytes<T, true>());
  return launch(k3::logit_grad_kernel<T, false>, k3::logit_grad_smem_bytes<T, false>());
}

template <typename T>
cudaError_t split_weights(const Geo& g, const T* value, const T* fg, const T* bg, T* out, float* weights, float* mix,
                          float sl2, cudaStream_t stream) {
  const long long pixel_heads = g.B * g.HW * g.heads;
  const unsigned int mix_blocks = static_cast<unsigned int>((pixel_heads + k3::NT4 - 1) / k3::NT4);
  auto mix_rows = [&](auto kernel, int smem) {
    const cudaError_t status = allow_shared_memory(kernel, smem);
    if (status != cudaSuccess) return status;
    kernel<<<mix_blocks, k3::NT4, smem, stream>>>(fg, bg, mix, static_cast<int>(g.HW), static_cast<int>(g.heads),
                                                  pixel_heads, sl2);
    return cudaGetLastError();
  };
  const cudaError_t status = bg != nullptr
                                 ? mix_rows(k3::mix_rows_kernel<T, true>, k3::logit_grad_smem_bytes<T, true>())
                                 : mix_rows(k3::mix_rows_kernel<T, false>, k3::logit_grad_smem_bytes<T, false>());
  if (status != cudaSuccess) return status;
  const int groups = out != nullptr ? static_cast<int>(channel_groups(g)) : 1;
  const int threads = static_cast<int>(g.B * g.heads * groups * g.HW);
  const unsigned int blocks = static_cast<unsigned int>((threads + k3::NT - 1) / k3::NT);
  auto gather = [&](auto kernel) {
    kernel<<<blocks, k3::NT, 0, stream>>>(mix, value, out, weights, static_cast<int>(g.H), static_cast<int>(g.W),
                                          static_cast<int>(g.heads), static_cast<int>(g.C), static_cast<int>(g.Cg),
                                          groups, threads);
    return cudaGetLastError();
  };
  return out != nullptr ? gather(k3::gather_kernel<T, true>) : gather(k3::gather_kernel<T, false>);
}

#define CONDSEG_FUSED_INSTANTIATE(T)                                                                              \
  template int fused_shared_memory_bytes<T>();                                                                    \
  template bool fused_vector_logits_ok<T>(const Geo&, const T*, const T*, int);                                   \
  template cudaError_t fused_weights<T>(const Geo&, const T*, const T*, const T*, T*, float*, float, bool,        \
                                        cudaStream_t);                                                            \
  template cudaError_t fused_value_grad<T>(const Geo&, const T*, const T*, const float*, T*, float*, cudaStream_t); \
  template cudaError_t fused_logit_grad<T>(const Geo&, const T*, const T*, const float*, T*, T*, float, float,     \
                                           cudaStream_t);                                                         \
  template cudaError_t split_weights<T>(const Geo&, const T*, const T*, const T*, T*, float*, float*, float,      \
                                        cudaStream_t);
CONDSEG_FUSED_INSTANTIATE(float)
CONDSEG_FUSED_INSTANTIATE(c10::Half)
CONDSEG_FUSED_INSTANTIATE(c10::BFloat16)
#undef CONDSEG_FUSED_INSTANTIATE

}  // namespace cuda
}  // namespace condseg_ops
