// CPU emulation of the small part of CUDA that condseg_ops' kernels use, so that the tests can run
// the real kernel sources (csrc/cuda) on a machine without a GPU. Not a simulator of performance:
// it checks index arithmetic, tiling, staging and barriers.
//
// Each CUDA thread of a block is a fiber (ucontext). A fiber runs until it reaches __syncthreads()
// or returns; the block scheduler resumes every live fiber in turn, so a barrier releases only once
// all live threads of the block have reached it, as on a GPU. Fibers never interleave between two
// barriers, so a barrier that only keeps concurrent read-modify-writes of one address apart is not
// checked; one that orders a write before another thread's read is. A thread that returns early
// leaves the barrier count (sm_70+ semantics); reaching different numbers of barriers in one block
// is reported as an error (undefined behaviour on a GPU). cp.async copies land only at the
// cp_async_wait that retires their group, as late as on the GPU (CONDSEG_EMU_EAGER_COPIES=1: when
// issued, as early as on the GPU). Blocks run one after another. Dynamic shared memory is filled
// with 0xFF bytes (NaN for floats) before each block, so reads of shared memory nobody wrote show
// up in the results; a write past its end is reported. The source rewrite that maps
// `kernel<<<...>>>(...)` onto emu::launch and `extern __shared__` onto emu::dynamic_shared_memory()
// is in build.py.
#pragma once

#include <ucontext.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <utility>
#include <vector>

#define CONDSEG_CUDA_EMULATION 1  // csrc/cuda/common.cuh routes cp.async through emu::

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrMultiProcessorCount };

// CUDA's device overloads of min/max for the integer and floating types the kernels mix.
template <typename A, typename B>
inline auto min(A a, B b) -> decltype(a + b) {
  return a < b ? a : b;
}
template <typename A, typename B>
inline auto max(A a, B b) -> decltype(a + b) {
  return a > b ? a : b;
}

namespace emu {

// The emulated device's opt-in shared memory per block: an H100's 227 KB, or
// CONDSEG_EMU_SHARED_OPTIN_KB (99 for an RTX 40, whose blocks the fused kernels must also fit).
inline int shared_memory_optin() {
  const char* kb = std::getenv("CONDSEG_EMU_SHARED_OPTIN_KB");
  return (kb != nullptr && kb[0] != '\0' ? std::atoi(kb) : 227) * 1024;
}

// The emulated device's SMs: CONDSEG_EMU_SMS, or an H200's 132.
inline int multiprocessors() {
  const char* sms = std::getenv("CONDSEG_EMU_SMS");
  return sms != nullptr && sms[0] != '\0' ? std::atoi(sms) : 132;
}

// One pending cp.async (or the zero-filled part of one: src == nullptr).
struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  size_t bytes;
};

struct Block {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  std::vector<unsigned char> shared;
  std::vector<ucontext_t> contexts;
  std::vector<std::vector<char>> stacks;
  std::vector<int> barriers;   // barriers reached per thread
  std::vector<bool> finished;
  // cp.async per thread: copies issued since the last commit, and committed groups (oldest first)
  std::vector<std::vector<Copy>> open_copies;
  std::vector<std::deque<std::vector<Copy>>> copy_groups;
  ucontext_t scheduler;
  std::function<void()> body;  // the kernel call, run by every thread
  int current = 0;
  bool eager_copies = false;  // CONDSEG_EMU_EAGER_COPIES: cp.async lands when issued (see add_copy)
  std::exception_ptr error;  // a failed check inside a thread, rethrown by the scheduler
};

inline Block& block() {
  static Block b;
  return b;
}

inline unsigned char* dynamic_shared_memory() { return block().shared.data(); }

// The global memory cp.async may read: the op's input tensors, which bindings.cpp registers for
// the length of each call (ReadableInputs). A copy from anywhere else (past a tensor's end, before
// its start) is an error, as it may fault or read garbage on a GPU. Plain loads are not checked.
inline std::vector<std::pair<const char*, const char*>>& readable() {
  static std::vector<std::pair<const char*, const char*>> ranges;
  return ranges;
}

inline void check_readable(const void* src, size_t bytes) {
  const char* lo = static_cast<const char*>(src);
  for (const auto& [begin, end] : readable())
    if (lo >= begin && lo + bytes <= end) return;
  TORCH_CHECK(readable().empty(), "emulated CUDA: thread ", block().current, " of block ", block().block_idx.x,
              " copies ", bytes, " bytes with cp.async from outside every input tensor");
}

// cp.async: a 4-byte copy lands in shared memory only when a cp_async_wait leaves fewer groups
// pending than its own, so a missing or too lax wait shows up as unwritten (NaN) shared memory.
// Queues a copy for the wait that retires its group, or, with CONDSEG_EMU_EAGER_COPIES=1, lands it at
// once: the earliest a GPU may land it. Then a buffer refilled before every thread has read it (a
// missing barrier after the reads) shows up as wrong results; the default catches the opposite,
// a buffer read before its copies were waited for.
inline void add_copy(const Copy& c) {
  Block& b = block();
  if (!b.eager_copies) {
    b.open_copies[b.current].push_back(c);
  } else if (c.src != nullptr) {
    std::memcpy(c.dst, c.src, c.bytes);
  } else {
    std::memset(c.dst, 0, c.bytes);
  }
}

inline void cp_async_4(void* smem, const void* gmem) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(smem) % 4 == 0 && reinterpret_cast<uintptr_t>(gmem) % 4 == 0,
              "emulated CUDA: cp.async of 4 bytes between addresses that are not 4-byte aligned");
  check_readable(gmem, 4);
  add_copy({static_cast<unsigned char*>(smem), static_cast<const unsigned char*>(gmem), 4});
}

// cp.async of `bytes` (8 or 16) that reads the first src_bytes and lands zeros for the rest, also at the wait.
inline void cp_async_zfill(void* smem, const void* gmem, int bytes, int src_bytes) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(smem) % bytes == 0 && reinterpret_cast<uintptr_t>(gmem) % bytes == 0,
              "emulated CUDA: cp.async of ", bytes, " bytes between addresses that are not ", bytes, "-byte aligned");
  TORCH_CHECK(src_bytes >= 0 && src_bytes <= bytes, "emulated CUDA: cp.async source size ", src_bytes, " of ", bytes);
  if (src_bytes > 0) check_readable(gmem, static_cast<size_t>(src_bytes));
  auto* dst = static_cast<unsigned char*>(smem);
  if (src_bytes > 0) add_copy({dst, static_cast<const unsigned char*>(gmem), static_cast<size_t>(src_bytes)});
  if (src_bytes < bytes) add_copy({dst + src_bytes, nullptr, static_cast<size_t>(bytes - src_bytes)});
}

inline void cp_async_commit() {
  Block& b = block();
  b.copy_groups[b.current].push_back(std::move(b.open_copies[b.current]));
  b.open_copies[b.current].clear();
}

inline void cp_async_wait(int pending) {
  Block& b = block();
  auto& groups = b.copy_groups[b.current];
  while (static_cast<int>(groups.size()) > pending) {
    for (const Copy& c : groups.front()) {
      if (c.src != nullptr)
        std::memcpy(c.dst, c.src, c.bytes);
      else
        std::memset(c.dst, 0, c.bytes);
    }
    groups.pop_front();
  }
}

inline void syncthreads() {
  Block& b = block();
  const int t = b.current;
  ++b.barriers[t];
  swapcontext(&b.contexts[t], &b.scheduler);
}

// An exception cannot unwind past a fiber's first frame: a failed check is caught here and
// rethrown by run_block, outside the fibers.
inline void fiber_entry() {
  Block& b = block();
  try {
    b.body();
  } catch (...) {
    b.error = std::current_exception();
  }
  b.finished[b.current] = true;
  swapcontext(&b.contexts[b.current], &b.scheduler);
}

// Runs every thread of one block until all have returned.
inline void run_block(int threads) {
  Block& b = block();
  constexpr size_t kStack = 256 * 1024;
  b.contexts.assign(threads, ucontext_t{});
  b.stacks.resize(threads);
  b.barriers.assign(threads, 0);
  b.finished.assign(threads, false);
  b.open_copies.assign(threads, {});
  b.copy_groups.assign(threads, {});
  for (int t = 0; t < threads; ++t) {
    b.stacks[t].resize(kStack);
    getcontext(&b.contexts[t]);
    b.contexts[t].uc_stack.ss_sp = b.stacks[t].data();
    b.contexts[t].uc_stack.ss_size = kStack;
    b.contexts[t].uc_link = nullptr;
    makecontext(&b.contexts[t], fiber_entry, 0);
  }
  // Odd blocks resume their threads in descending order: a missing barrier shows up whichever of
  // the two threads involved runs first.
  const bool descending = b.block_idx.x % 2 == 1;
  for (int live = threads; live > 0;) {
    live = 0;
    int barrier = -1;
    for (int i = 0; i < threads; ++i) {
      const int t = descending ? threads - 1 - i : i;
      if (b.finished[t]) continue;
      b.current = t;
      b.thread_idx = dim3(t);
      swapcontext(&b.scheduler, &b.contexts[t]);
      if (b.error) std::rethrow_exception(std::exchange(b.error, nullptr));
      if (b.finished[t]) continue;
      ++live;
      TORCH_CHECK(barrier < 0 || b.barriers[t] == barrier, "emulated CUDA: thread ", t, " of block ",
                  b.block_idx.x, " reached barrier ", b.barriers[t], " while others reached ", barrier,
                  " (__syncthreads in divergent code)");
      barrier = b.barriers[t];
    }
  }
}

constexpr size_t kSharedGuard = 1024;
constexpr unsigned char kGuardByte = 0xA5;

// kernel<<<grid, block, shared_bytes, stream>>>(args...) becomes launch(kernel, grid, block, shared_bytes, stream)(args...).
template <typename Kernel>
struct Launch {
  Kernel* kernel;
  dim3 grid, threads;
  int shared_bytes;

  template <typename... Args>
  void operator()(Args... args) const {
    TORCH_CHECK(grid.y == 1 && grid.z == 1 && threads.y == 1 && threads.z == 1, "emulated CUDA: 1-D launches only");
    TORCH_CHECK(shared_bytes <= shared_memory_optin(), "emulated CUDA: ", shared_bytes, " bytes of shared memory");
    Block& b = block();
    const char* eager = std::getenv("CONDSEG_EMU_EAGER_COPIES");
    b.eager_copies = eager != nullptr && eager[0] != '\0' && eager[0] != '0';
    b.grid_dim = grid;
    b.block_dim = threads;
    Kernel* k = kernel;
    b.body = [=] { k(args...); };
    for (unsigned int i = 0; i < grid.x; ++i) {
      b.block_idx = dim3(i);
      // A guard zone after the block's shared memory: a write past its end (plain or cp.async)
      // is reported when the block ends.
      b.shared.assign(static_cast<size_t>(shared_bytes) + kSharedGuard, 0xFF);
      std::fill(b.shared.begin() + shared_bytes, b.shared.end(), kGuardByte);
      run_block(static_cast<int>(threads.x));
      for (size_t j = shared_bytes; j < b.shared.size(); ++j)
        TORCH_CHECK(b.shared[j] == kGuardByte, "emulated CUDA: block ", i, " wrote past its ", shared_bytes,
                    " bytes of shared memory (at byte ", j, ")");
    }
    b.body = nullptr;
  }
};

template <typename Kernel>
Launch<Kernel> launch(Kernel* kernel, dim3 grid, dim3 threads, int shared_bytes = 0, cudaStream_t = nullptr) {
  return {kernel, grid, threads, shared_bytes};
}

}  // namespace emu

#define threadIdx (::emu::block().thread_idx)
#define blockIdx (::emu::block().block_idx)
#define blockDim (::emu::block().block_dim)
#define gridDim (::emu::block().grid_dim)

inline void __syncthreads() { ::emu::syncthreads(); }

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel*, cudaFuncAttribute, int bytes) {
  return bytes <= emu::shared_memory_optin() ? cudaSuccess : 1;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  *value = attribute == cudaDevAttrMultiProcessorCount ? emu::multiprocessors() : emu::shared_memory_optin();
  return cudaSuccess;
}

// The c10/cuda pieces the backend's translation unit uses.
#define C10_CUDA_CHECK(expr)                                                     \
  do {                                                                           \
    const cudaError_t status_ = (expr);                                          \
    TORCH_CHECK(status_ == cudaSuccess, "emulated CUDA call failed: " #expr);    \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
