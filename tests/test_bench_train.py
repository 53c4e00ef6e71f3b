"""benchmarks/kvasir_train.py: one tiny two-stage run on synthetic data, its JSON row against the
run's own log and checkpoint; README.md's commands for the recorded runs against the presets."""
import csv
import dataclasses
import json
import re
import shlex

import pytest
import torch

from condseg import cli
from condseg.data import make_synthetic_dataset
from condseg.engine import TrainConfig, load_checkpoint, runlog
from condseg_ops.backends import select_backend
from conftest import REPO, load_benchmark

bench = load_benchmark("kvasir_train")


def run_tiny(tmp_path):
    """A 1 + 2 epoch run of the cpu preset on 6 synthetic training pairs: (row, run folder, rows file)."""
    root = make_synthetic_dataset(tmp_path / "data", train=6, val=3, size=32, seed=0)
    out, rows = tmp_path / "run", tmp_path / "rows.jsonl"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = bench.main([str(root), "--preset", "cpu", "--out", str(out), "--json", str(rows),
                          "--set", "image_size=32", "--set", "epochs=2", "--set", "decoder_channels=16",
                          "--set", "batch_size=3", "--set", "tensorboard=false"])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(rows.read_text().splitlines()[-1]) == row
    return row, out, rows


def test_row_matches_the_run(tmp_path):
    row, out, _ = run_tiny(tmp_path)
    assert row["bench"] == "kvasir_train" and "--preset cpu" in row["command"]
    assert row["interrupted"] is False
    assert row["backend"] == select_backend("cpu") and row["dtype"] == "bfloat16"  # the cpu preset's amp
    assert row["config"]["encoder"] == "resnet18" and row["config"]["epochs"] == 2  # preset + override
    best = load_checkpoint(out / "stage2_best.pt")["best_metrics"]
    assert row["mDSC"] == pytest.approx(best["val_mDSC"], abs=1e-4)
    assert row["precision"] == pytest.approx(best["val_precision"], abs=1e-4)
    log = list(csv.DictReader(open(out / "log.csv")))
    stage2 = [r for r in log if r["stage"] == "2"]
    seconds = sum(float(r["seconds"]) for r in stage2)
    assert row["train_images"] == 6 and row["stage2_epochs"] == 2 and row["stage1_epochs"] == 1
    assert row["stage2_images_per_s"] == pytest.approx(6 * 2 / seconds, rel=0.05)


def test_an_interrupted_run_still_writes_its_row(tmp_path, monkeypatch):
    # gpu_train.sh stops training with SIGINT at TRAIN_LIMIT_S: the row comes from the epochs done.
    epoch, calls = runlog.RunLog.epoch, []

    def epoch_then_interrupt(self, row, history):
        epoch(self, row, history)
        calls.append(1)
        if len(calls) == 2:  # after stage 1 and the first epoch of stage 2
            raise KeyboardInterrupt

    monkeypatch.setattr(runlog.RunLog, "epoch", epoch_then_interrupt)
    try:
        row, out, _ = run_tiny(tmp_path)
    except KeyboardInterrupt:  # a failure of this test, not the end of the pytest session
        pytest.fail("the interrupt escaped kvasir_train.main: no row was written")
    assert row["interrupted"] is True and row["wall_s"] > 0
    assert row["backend"] == select_backend("cpu") and row["dtype"] == "bfloat16"
    best = load_checkpoint(out / "stage2_best.pt")["best_metrics"]  # stage 2's, the last stage reached
    for name in ("mIoU", "mDSC", "recall", "precision"):
        assert row[name] == pytest.approx(best[f"val_{name}"], abs=1e-4)
    log = list(csv.DictReader(open(out / "log.csv")))
    assert row["train_images"] == 6 and row["stage1_epochs"] == 1 and row["stage2_epochs"] == 1
    assert row["stage2_images_per_s"] == pytest.approx(6 / float(log[1]["seconds"]), rel=0.05)


def test_override_errors_name_the_field(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["root", "--out", "x", "--preset", "cpu", "--set", "no_such_field=1"])
    assert "'no_such_field=1'" in capsys.readouterr().err
    assert bench.parse_override("epochs=3") == ("epochs", 3)
    assert bench.parse_override("lr=0.5") == ("lr", 0.5)
    assert bench.parse_override("channels_last=false") == ("channels_last", False)
    assert bench.parse_override("encoder=resnet34") == ("encoder", "resnet34")


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_readme_commands_are_the_presets(preset):
    """README.md gives each recorded Kvasir-SEG run as a `condseg train` command and says it is the
    preset's run: the command must give the preset's configuration."""
    commands = [" ".join(block.replace("\\\n", " ").split()) for block in
                re.findall(r"```bash\n(condseg train [^`]*?--out runs/kvasir-" + preset + r"\b[^`]*?)```",
                           (REPO / "README.md").read_text())]
    assert len(commands) == 1, f"expected one README command with --out runs/kvasir-{preset}"
    options = {k: v for k, v in vars(cli._commands(shlex.split(commands[0])[1:])).items() if k != "command"}
    readme = TrainConfig(**options)
    expected = TrainConfig(data_root=options["data_root"], out=options["out"], skip_missing=True,
                           **bench.PRESETS[preset])
    differs = {f.name: (getattr(readme, f.name), getattr(expected, f.name)) for f in dataclasses.fields(TrainConfig)
               if getattr(readme, f.name) != getattr(expected, f.name) and f.name != "progress"}
    assert not differs, f"README command vs --preset {preset}: {differs}"
