// The CUDA backend's sources (rewritten by build.py) in one CPU translation unit, with its forward
// and backward exposed to the tests. The kernels run under the fiber emulation of
// include/cuda_runtime.h.
#include <torch/extension.h>

#include "contrast_aggregate.cpp"
#include "cuda/fused_k3.cu"
#include "cuda/generic.cu"
#include "cuda/contrast_aggregate_cuda.cu"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &condseg_ops::forward_cuda, "the CUDA backend's forward, emulated");
  m.def("backward", &condseg_ops::backward_cuda, "the CUDA backend's backward, emulated");
}
