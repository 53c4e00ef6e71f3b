// condseg_ops._C: loading it registers the operators (static initialisers of this library);
// the pybind11 part only reports how the library was built.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#ifndef CONDSEG_CUDA_ARCH_LIST
#define CONDSEG_CUDA_ARCH_LIST ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "condseg_ops compiled kernels (operators live in torch.ops.condseg_ops)";
  py::dict info;
  py::list backends;
  backends.append("cpu");
#ifdef CONDSEG_WITH_CUDA
  backends.append("cuda");
#endif
  info["backends"] = backends;
  info["cuda_arch_list"] = CONDSEG_CUDA_ARCH_LIST;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                          std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  info["compiler"] = "msvc " + std::to_string(_MSC_VER);
#endif
  info["cplusplus"] = static_cast<long>(__cplusplus);
  m.attr("build_info") = info;
}
