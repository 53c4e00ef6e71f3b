// The CUDA backend's sources (rewritten by build.py) in one CPU translation unit, with its forward
// and backward exposed to the tests. The kernels run under the fiber emulation of
// include/cuda_runtime.h.
#include <torch/extension.h>

#include <string>

#include "contrast_aggregate.cpp"
#include "cuda/fused_k3.cu"
#include "cuda/generic.cu"
#include "cuda/contrast_aggregate_cuda.cu"

namespace {

// Registers the bytes of a call's (contiguous) inputs as the memory cp.async may read, for the
// call's length (emu::check_readable).
struct ReadableInputs {
  explicit ReadableInputs(std::initializer_list<const at::Tensor*> tensors) {
    for (const at::Tensor* t : tensors) {
      if (!t->defined()) continue;
      const char* begin = static_cast<const char*>(t->data_ptr());
      emu::readable().emplace_back(begin, begin + t->numel() * t->element_size());
    }
  }
  ~ReadableInputs() { emu::readable().clear(); }
};

at::Tensor contiguous(const std::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); }

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The backend's entry points on contiguous inputs (theirs would copy non-contiguous ones, and
// the kernels would read the copies).
at::Tensor forward(const at::Tensor& value_in, const at::Tensor& fg_in, const std::optional<at::Tensor>& bg_in,
                   int64_t kernel_size, int64_t dilation, double scale) {
  const at::Tensor value = value_in.contiguous(), fg = fg_in.contiguous(), bg = contiguous(bg_in);
  const ReadableInputs inputs({&value, &fg, &bg});
  return condseg_ops::forward_cuda(value, fg, maybe(bg), kernel_size, dilation, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& value_in,
                                                        const at::Tensor& fg_in, const std::optional<at::Tensor>& bg_in,
                                                        int64_t kernel_size, int64_t dilation, double scale) {
  const at::Tensor grad = grad_in.contiguous(), value = value_in.contiguous(), fg = fg_in.contiguous();
  const at::Tensor bg = contiguous(bg_in);
  const ReadableInputs inputs({&grad, &value, &fg, &bg});
  return condseg_ops::backward_cuda(grad, value, fg, maybe(bg), kernel_size, dilation, scale);
}

// The backend's plan for a K = 3 call on these inputs.
condseg_ops::FusedPlan plan_for(const at::Tensor& value, const at::Tensor& fg, const std::optional<at::Tensor>& bg,
                                double scale) {
  const condseg_ops::cuda::Geo g = condseg_ops::make_geo(condseg_ops::check_inputs(value, fg, bg, 3, 1));
  condseg_ops::FusedPlan plan;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "plan_for", [&] {
    plan = condseg_ops::fused_plan<scalar_t>(g, value, fg, contiguous(bg), scale);
  });
  return plan;
}

// How the backend would stage the logits: "vectors", "words", or "generic" (no fused kernels).
std::string logit_staging(const at::Tensor& value, const at::Tensor& fg, const std::optional<at::Tensor>& bg,
                          double scale) {
  const auto plan = plan_for(value, fg, bg, scale);
  return !plan.fused ? "generic" : plan.vector_logits ? "vectors" : "words";
}

// Which kernels the forward would run: "split", "fused" or "generic".
std::string forward_kernels(const at::Tensor& value, const at::Tensor& fg, const std::optional<at::Tensor>& bg,
                            double scale) {
  const auto plan = plan_for(value, fg, bg, scale);
  return !plan.fused ? "generic" : plan.split ? "split" : "fused";
}

// One thread copies the 4 bytes at t's data + offset with cp.async, t registered as the only
// input: the tests check that copies from outside the inputs are refused.
void copy_word_at(const at::Tensor& t, int64_t offset) {
  const ReadableInputs inputs({&t});
  const char* src = static_cast<const char*>(t.data_ptr()) + offset;
  uint32_t word = 0;
  auto kernel = [](uint32_t* dst, const char* from) {
    condseg_ops::cuda::cp_async_4(dst, from);
    condseg_ops::cuda::cp_async_commit();
    condseg_ops::cuda::cp_async_wait<0>();
  };
  emu::launch(+kernel, dim3(1), dim3(1))(&word, src);
}

// One thread writes a byte at `offset` of a block's `shared_bytes` bytes of shared memory: the
// tests check that a write past the end is reported.
void write_shared_at(int64_t shared_bytes, int64_t offset) {
  auto kernel = [](int64_t at) {
    unsigned char* smem = emu::dynamic_shared_memory();
    smem[at] = 1;
  };
  emu::launch(+kernel, dim3(1), dim3(1), static_cast<int>(shared_bytes))(offset);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "the CUDA backend's forward, emulated");
  m.def("backward", &backward, "the CUDA backend's backward, emulated");
  m.def("logit_staging", &logit_staging, "how the fused kernels would stage the logits of these inputs",
        py::arg("value"), py::arg("fg"), py::arg("bg"), py::arg("scale") = 1.0);
  m.def("forward_kernels", &forward_kernels, "which kernels the forward would run on these inputs", py::arg("value"),
        py::arg("fg"), py::arg("bg"), py::arg("scale") = 1.0);
  m.def("copy_word_at", &copy_word_at, "a cp.async of 4 bytes from t's data + offset (emulation check)");
  m.def("write_shared_at", &write_shared_at, "a write of one byte of shared memory (emulation check)");
}
