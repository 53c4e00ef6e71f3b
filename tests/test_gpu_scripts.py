"""benchmarks/gpu_common.sh's pack_out: the device tool brings back at most 8 files from $OUT, so the
GPU scripts pack their logs into one tarball and keep the figures beside it."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMON = REPO / "benchmarks" / "gpu_common.sh"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bash scripts")


def pack(out, *args):
    script = f'source "{COMMON}"; pack_out "$@"'
    return subprocess.run(["bash", "-c", script, "pack", *args], env=dict(os.environ, OUT=str(out)),
                          capture_output=True, text=True, timeout=60)


def test_pack_out_keeps_the_named_files_and_packs_the_rest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    names = ["summary.txt", "a_details.txt", "b_details.txt", "build.log", "fps.log", "x.ncu-rep", "odd name.log"]
    for name in names:
        (out / name).write_text(f"contents of {name}\n")
    (out / "sub").mkdir()  # folders are left alone

    proc = pack(out, "logs", "summary.txt", "*_details.txt")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_details.txt", "b_details.txt", "logs.tar.gz", "sub",
                                                      "summary.txt"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        packed = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    assert packed == {name: f"contents of {name}\n" for name in ("build.log", "fps.log", "x.ncu-rep", "odd name.log")}

    # Run again with nothing new to pack: the tarball stays as it was.
    proc = pack(out, "logs", "summary.txt", "*_details.txt")
    assert proc.returncode == 0 and (out / "logs.tar.gz").is_file()
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert len(tar.getmembers()) == 4
