"""Builds condseg_ops._C against the PyTorch already installed.

C++ (schema + CPU kernels) always; CUDA kernels too when torch is a CUDA build and a CUDA toolkit
is found (set CONDSEG_FORCE_CPU=1 to skip them). TORCH_CUDA_ARCH_LIST picks the GPU architectures.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pip's build isolation hides the user's torch: never build against another
    sys.exit(
        "\ncondseg builds its kernels against the PyTorch you already have, which this build "
        "environment cannot see.\nInstall torch first, then run:\n\n"
        "    pip install --no-build-isolation .\n"
    )

# Architectures built when no GPU is visible and the user did not choose: RTX 30/40, A100, H100.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def want_cuda():
    if os.environ.get("CONDSEG_FORCE_CPU") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = ["csrc/module.cpp", "csrc/contrast_aggregate.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # OpenMP: ATen's parallel_for is a header template that runs serially unless the extension
    # itself is compiled with OpenMP (torch's own libgomp is the runtime it links against).
    openmp = [] if sys.platform == "darwin" or os.name == "nt" else ["-fopenmp"]
    cxx_flags = ["-O3"] + openmp
    link_flags = openmp
    macros = []
    if not want_cuda():
        return cpp_extension.CppExtension(
            "condseg_ops._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
            define_macros=macros,
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
    macros += [("CONDSEG_WITH_CUDA", None), ("CONDSEG_CUDA_ARCH_LIST", f'"{archs}"')]
    return cpp_extension.CUDAExtension(
        "condseg_ops._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
        extra_link_args=link_flags,
        define_macros=macros,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
