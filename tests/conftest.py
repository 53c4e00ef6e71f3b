import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run through its interpreter on CPU tensors. The variable must be
# set before any module decorated with @triton.jit is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def kvasir_root():
    """Kvasir-SEG beside the repository (../shared/data/kvasir-seg), or at $CONDSEG_KVASIR."""
    root = Path(os.environ.get("CONDSEG_KVASIR", SHARED_DATA / "kvasir-seg"))
    if not (root / "images").is_dir():
        pytest.skip(f"real Kvasir-SEG data not found at {root} (set CONDSEG_KVASIR to its folder)")
    return root


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_nnpack = pytest.mark.skipif(not torch.backends.nnpack.is_available(),
                                     reason="this torch build has no NNPACK")


@pytest.fixture
def nnpack_calls(monkeypatch):
    """The input shapes of the NNPACK convolutions (condseg.inference.WinogradConv2d) that ran,
    recorded once they returned."""
    calls = []
    real = torch._nnpack_spatial_convolution

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(tuple(args[0].shape))
        return out

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", counted)
    return calls


def _load_script(path, module_name):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark(name):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    return _load_script(REPO / "benchmarks" / f"{name}.py", f"{name}_bench")


def load_tool(name):
    """A script of tools/ as a module (the folder is not a package)."""
    return _load_script(REPO / "tools" / f"{name}.py", name)
