"""setup.py's checks, run without building: a stand-in nvcc reports a toolkit version, torch is
made to look like a CUDA build of another version, setuptools like an older release."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the stand-in nvcc is a shell script")

# Runs setup.py (``--name`` builds nothing) as if torch were a CUDA build of version argv[1],
# setuptools release argv[2] and CUDA_HOME torch's toolkit, then prints which extension it chose.
DRIVER = """
import os, runpy, setuptools, sys, torch
from torch.utils import cpp_extension
torch.version.cuda = sys.argv[1]
setuptools.__version__ = sys.argv[2]
cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
sys.argv = ["setup.py", "--name"]
setup_globals = runpy.run_path("setup.py", run_name="__main__")
print("CUDA" if setup_globals["want_cuda"]() else "CPU")
"""


def run_setup(tmp_path, torch_cuda, toolkit_release, setuptools_version="80.9.0", **env):
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {toolkit_release}, V{toolkit_release}.1'\n")
    nvcc.chmod(0o755)
    environment = dict(os.environ, CUDA_HOME=str(nvcc.parent.parent), **env)
    return subprocess.run([sys.executable, "-c", DRIVER, torch_cuda, setuptools_version], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_toolkit_of_another_major_version_stops_with_the_way_out(tmp_path):
    result = run_setup(tmp_path, "12.4", "13.0")
    assert result.returncode != 0
    message = result.stderr
    assert "built with CUDA 12.4" in message and "is 13.0" in message
    assert "CONDSEG_FORCE_CPU=1 pip install --no-build-isolation ." in message


@pytest.mark.parametrize("torch_cuda, toolkit, env, chosen", [
    ("13.0", "13.2", {}, "CUDA"),
    ("12.4", "13.0", {"CONDSEG_FORCE_CPU": "1"}, "CPU"),
], ids=["same-major-version", "forced-cpu"])
def test_matching_toolkit_or_forced_cpu_goes_on(tmp_path, torch_cuda, toolkit, env, chosen):
    result = run_setup(tmp_path, torch_cuda, toolkit, **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["condseg", chosen]


def test_old_setuptools_stops_instead_of_installing_an_empty_package(tmp_path):
    """setuptools 58 (a Python 3.9 venv's) ignores [project] in pyproject.toml: without build
    isolation pip would install "UNKNOWN 0.0.0" and report success."""
    result = run_setup(tmp_path, "12.4", "12.4", setuptools_version="58.1.0")
    assert result.returncode != 0
    assert "needs setuptools >= 61 (this environment has 58.1.0)" in result.stderr
    assert 'pip install -U "setuptools>=61" wheel' in result.stderr
