"""Builds condseg_ops._C against the PyTorch already installed.

C++ (schema + CPU kernels) always; CUDA kernels too when torch is a CUDA build and a CUDA toolkit
is found (set CONDSEG_FORCE_CPU=1 to skip them). TORCH_CUDA_ARCH_LIST picks the GPU architectures.
"""
import glob
import os
import re
import subprocess
import sys

import setuptools
from setuptools import setup

# setuptools before 61 ignores pyproject.toml's [project] table: without build isolation pip would then
# "successfully" install an empty package named UNKNOWN (Python 3.9 venvs come with setuptools 58).
if int(setuptools.__version__.split(".")[0]) < 61:
    sys.exit(
        f"\ncondseg needs setuptools >= 61 (this environment has {setuptools.__version__}). Upgrade it, then "
        "install again:\n\n    pip install -U \"setuptools>=61\" wheel\n    pip install --no-build-isolation .\n"
    )

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


def toolkit_version(cuda_home):
    """(major, minor) of the nvcc in cuda_home, or None when it cannot be run."""
    try:
        banner = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", banner)
    return (int(found[1]), int(found[2])) if found else None


def want_cuda():
    if os.environ.get("CONDSEG_FORCE_CPU") == "1":
        return False
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    # torch refuses a toolkit of another major version only once compiling starts, without a way out.
    toolkit, torch_major = toolkit_version(cpp_extension.CUDA_HOME), int(torch.version.cuda.split(".")[0])
    if toolkit is not None and toolkit[0] != torch_major:
        sys.exit(
            f"\ncondseg: torch {torch.__version__} was built with CUDA {torch.version.cuda}, but the CUDA "
            f"toolkit at {cpp_extension.CUDA_HOME} is {toolkit[0]}.{toolkit[1]}, so the CUDA kernels cannot be "
            f"built.\nPoint CUDA_HOME at a CUDA {torch_major}.x toolkit, or build without the CUDA kernels (CUDA "
            "tensors then run on the Triton backend when triton is installed, else on the reference):\n\n"
            "    CONDSEG_FORCE_CPU=1 pip install --no-build-isolation .\n"
        )
    return True


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
