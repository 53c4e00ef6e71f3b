"""CMakeLists.txt builds the ops into a LibTorch shared library that torch.ops.load_library loads."""
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_library_loads_and_matches_reference(tmp_path):
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(REPO), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 # Debug (-O0) builds in half the time of Release: what this checks, that the project
                 # builds a library registering correct ops, does not depend on the optimiser.
                 "-DCMAKE_BUILD_TYPE=Debug", f"-DPython_EXECUTABLE={sys.executable}"]
    configured = subprocess.run(configure, capture_output=True, text=True)
    if configured.returncode != 0 and torch.version.cuda and "PyTorch: CUDA cannot be found" in configured.stderr:
        # LibTorch's own CMake config, not ours: a CUDA torch needs its CUDA toolkit to be found.
        pytest.skip(f"find_package(Torch) of this CUDA {torch.version.cuda} torch needs a matching CUDA toolkit")
    assert configured.returncode == 0, configured.stdout[-3000:] + configured.stderr[-3000:]
    built = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    library = build / "libcondseg_ops.so"
    assert library.exists()
    # A fresh interpreter: the package's own extension must not register the same ops first.
    script = textwrap.dedent(f"""
        import torch, torch.nn.functional as F
        torch.ops.load_library({str(library)!r})
        torch.manual_seed(0)
        value = torch.randn(1, 4, 5, 6, dtype=torch.float64)
        fg = torch.randn(1, 5, 6, 2, 9, 9, dtype=torch.float64)
        out = torch.ops.condseg_ops.contrast_aggregate(value, fg, None, 3, 1, 1.0)
        # single-softmax reference, written out: unfold, softmax @ windows, fold
        win = F.unfold(value, 3, padding=1).view(1, 2, 2, 9, 30).permute(0, 4, 1, 3, 2)
        y = torch.softmax(fg.reshape(1, 30, 2, 9, 9), -1) @ win
        expected = F.fold(y.permute(0, 2, 4, 3, 1).reshape(1, 36, 30), (5, 6), 3, padding=1)
        assert torch.allclose(out, expected, atol=1e-12), (out - expected).abs().max()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
