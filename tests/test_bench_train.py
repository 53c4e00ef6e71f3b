"""benchmarks/kvasir_train.py: one tiny two-stage run on synthetic data, its JSON row against the
run's own log and checkpoint."""
import csv
import json

import pytest
import torch

from condseg.data import make_synthetic_dataset
from condseg.engine import load_checkpoint
from conftest import load_benchmark

bench = load_benchmark("kvasir_train")


def test_row_matches_the_run(tmp_path):
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
    assert row["bench"] == "kvasir_train" and "--preset cpu" in row["command"]
    assert row["config"]["encoder"] == "resnet18" and row["config"]["epochs"] == 2  # preset + override
    best = load_checkpoint(out / "stage2_best.pt")["best_metrics"]
    assert row["mDSC"] == pytest.approx(best["val_mDSC"], abs=1e-4)
    assert row["precision"] == pytest.approx(best["val_precision"], abs=1e-4)
    log = list(csv.DictReader(open(out / "log.csv")))
    stage2 = [r for r in log if r["stage"] == "2"]
    seconds = sum(float(r["seconds"]) for r in stage2)
    assert row["train_images"] == 6 and row["stage2_epochs"] == 2 and row["stage1_epochs"] == 1
    assert row["stage2_images_per_s"] == pytest.approx(6 * 2 / seconds, rel=0.05)


def test_override_errors_name_the_field(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["root", "--out", "x", "--preset", "cpu", "--set", "no_such_field=1"])
    assert "'no_such_field=1'" in capsys.readouterr().err
    assert bench.parse_override("epochs=3") == ("epochs", 3)
    assert bench.parse_override("lr=0.5") == ("lr", 0.5)
    assert bench.parse_override("channels_last=false") == ("channels_last", False)
    assert bench.parse_override("encoder=resnet34") == ("encoder", "resnet34")
