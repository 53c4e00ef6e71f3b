"""benchmarks/ncu_forward.sh, run against a stand-in ncu (no GPU here): what it asks Nsight Compute
for, and which files it leaves in $OUT. The real run needs the GPU machine."""
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "ncu_forward.sh"

# Records every call; a profiling call (-o REPORT) writes REPORT.ncu-rep, an --import call prints
# a line for the details page and a two-instruction CSV for the source page.
STUB = """#!/bin/sh
echo "$*" >> "{log}"
prev=""
for arg in "$@"; do
  if [ "$prev" = "-o" ]; then echo report > "$arg.ncu-rep"; fi
  if [ "$prev" = "--page" ] && [ "$arg" = details ]; then echo "Duration page details"; fi
  if [ "$prev" = "--page" ] && [ "$arg" = source ]; then
    printf '"Kernel Name","k"\\n"Address","Source","Instructions Executed"\\n'
    printf '"0x10","FFMA R1, R2, R3, R1","300"\\n"0x20","LDS R4, [R5]","100"\\n'
  fi
  prev="$arg"
done
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bash script")
def test_profiles_the_forward_per_dtype_and_keeps_the_reports(tmp_path):
    log = tmp_path / "ncu_calls.txt"
    ncu = tmp_path / "ncu"
    ncu.write_text(STUB.format(log=log))
    ncu.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, NCU=str(ncu), OUT=str(out), SKIP_BUILD="1")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    profiles = [c for c in calls if "-o" in c]
    asked = [(c[c.index("--backends") + 1], c[c.index("--kernel-name") + 1], c[c.index("--dtypes") + 1])
             for c in profiles]
    assert asked == [("cuda", "regex:weights_kernel", "float32"), ("cuda", "regex:weights_kernel", "bfloat16"),
                     ("triton", "regex:_mix_rows_kernel", "float32")]
    for c in profiles:
        assert {"--set", "full", "--import-source", "yes"} <= set(c)
        assert c[c.index("--launch-count") + 1] == "1" and "benchmarks/op_calls.py" in c
    pages = [c[c.index("--page") + 1] for c in calls if "--import" in c]
    assert pages == ["details", "source"] * 3
    names = ("forward_float32", "forward_bfloat16", "triton_mix_float32")
    for name in names:
        assert (out / f"{name}_details.txt").read_text().strip() == "Duration page details"
        assert (out / f"{name}_source.csv").read_text().splitlines()[1] == '"Address","Source","Instructions Executed"'
    # tools/ncu_mix.py sums each source page up on the console
    assert proc.stdout.count("executed warp instructions: 400") == 3 and "FFMA" in proc.stdout
    # the device tool returns 8 files: the reports travel in one tarball
    assert len(list(out.iterdir())) == 7
    with tarfile.open(out / "ncu_reports.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(f"{name}.ncu-rep" for name in names)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bash script")
@pytest.mark.skipif(Path("/usr/local/cuda/bin/ncu").exists(), reason="this machine has ncu")
def test_without_ncu_it_says_how_to_point_at_one(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "SKIP_BUILD": "1",
           "CUDA_HOME": str(tmp_path / "no_cuda")}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "ncu (Nsight Compute) not found: set NCU=" in proc.stderr
