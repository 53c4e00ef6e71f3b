#!/usr/bin/env python
"""Train ConDSeg on a dataset split (both stages) and record the figures README.md quotes: wall
time, training images/s, and the best validation mIoU, mDSC, recall and precision, as one JSON
row with the device and the exact command.

    python benchmarks/kvasir_train.py ../shared/data/kvasir-seg --preset gpu --out runs/kvasir-gpu
    python benchmarks/kvasir_train.py ../shared/data/kvasir-seg --preset cpu --out runs/kvasir-cpu

Presets (both from scratch, learning rates 1e-3, cosine schedule, no early stop):
  gpu: the paper's network (resnet50, decoder 128, 256x256), batch 12, bf16, 4 + 24 epochs;
  cpu: the light configuration of README.md (resnet18, decoder 32, 96x96), batch 8, bf16 autocast
       (pays on CPUs with AMX or AVX512-BF16 units), 1 + 20 epochs.
Any TrainConfig field can be overridden: ``--set epochs=20 --set image_size=128``.
A run stopped by SIGINT (Ctrl-C, gpu_train.sh's time limit) still writes its row, marked
"interrupted", from the epochs it finished (its log.csv), and exits with status 130.
"""
import argparse
import csv
import dataclasses
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, append_jsonl, row_header  # noqa: E402

from condseg.engine import TrainConfig, train  # noqa: E402
from condseg.engine.runtime import amp_dtype, resolve_device  # noqa: E402
from condseg_ops.backends import select_backend  # noqa: E402

SCRATCH = dict(stage1_lr=1e-3, lr=1e-3, encoder_lr=1e-3, scheduler="cosine", early_stop=0)
PRESETS = {
    "gpu": dict(encoder="resnet50", decoder_channels=128, image_size=256, batch_size=12, amp="bf16",
                stage1_epochs=4, epochs=24, **SCRATCH),
    "cpu": dict(encoder="resnet18", decoder_channels=32, image_size=96, batch_size=8, device="cpu", amp="bf16",
                stage1_epochs=1, epochs=20, **SCRATCH),
}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def parse_override(text):
    """'name=value' -> (name, value converted to the TrainConfig field's declared type; 'none' is None)."""
    name, sep, value = text.partition("=")
    if not sep or name not in FIELDS:
        raise argparse.ArgumentTypeError(f"--set expects NAME=VALUE with NAME a TrainConfig field, got {text!r}")
    kind = FIELDS[name].type
    if value.lower() == "none":
        return name, None
    if kind is bool:
        return name, value.lower() in ("1", "true", "yes", "on")
    return name, kind(value) if kind in (int, float) else value


def parse_args(argv=None):
    first, _, rest = __doc__.partition("\n\n")  # the epilog holds what the description does not
    p = argparse.ArgumentParser(description=first, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=rest)
    p.add_argument("data_root")
    p.add_argument("--out", required=True, help="run folder (must not hold a run)")
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], type=parse_override,
                   metavar="NAME=VALUE", help="override one TrainConfig field (repeatable)")
    p.add_argument("--json", default=None,
                   help="append the row to this JSON-lines file (default: benchmarks/results/<date>-kvasir-train.jsonl)")
    return p.parse_args(argv)


METRICS = ("val_mIoU", "val_mDSC", "val_recall", "val_precision")


def figures(best_metrics, history, wall_seconds, train_images):
    """The row's figures: best validation metrics of the last stage, and training throughput per
    stage (epoch time includes that epoch's validation; none without a count of training images)."""
    row = {"wall_s": round(wall_seconds, 1)}
    row.update({k.replace("val_", ""): round(v, 4) for k, v in best_metrics.items() if k in METRICS})
    for stage in (1, 2):
        epochs = [h for h in history if h["stage"] == stage]
        if epochs:
            seconds = sum(h["seconds"] for h in epochs)
            row[f"stage{stage}_epochs"] = len(epochs)
            if train_images is not None:
                row[f"stage{stage}_images_per_s"] = round(train_images * len(epochs) / seconds, 1)
    return row


def read_run(run_dir):
    """(best metrics, history, training pairs) of a run cut short, whose TrainResult never came
    back, from what the engine wrote: log.csv (a row per finished epoch) and train.log (the pairs)."""
    run_dir, history = Path(run_dir), []
    if (run_dir / "log.csv").is_file():
        with open(run_dir / "log.csv", newline="") as f:
            history = [{"stage": int(r["stage"]), "seconds": float(r["seconds"]), **{k: float(r[k]) for k in METRICS}}
                       for r in csv.DictReader(f)]
    last = [h for h in history if h["stage"] == history[-1]["stage"]] if history else []
    best = max(last, key=lambda h: h["val_mDSC"], default={})  # the first best, as the engine keeps it
    log = run_dir / "train.log"
    pairs = re.search(r"^data: (\d+) training", log.read_text(), re.M) if log.is_file() else None
    return {k: best[k] for k in METRICS if k in best}, history, pairs and int(pairs[1])


def main(argv=None):
    args = parse_args(argv)
    options = {**PRESETS[args.preset], **dict(args.overrides)}
    config = TrainConfig(data_root=args.data_root, out=args.out, skip_missing=True, progress=False, **options)
    device = resolve_device(config.device)
    # What the engine will use, found before training: an interrupted run must write its row promptly.
    backend, dtype = select_backend(device.type), str(amp_dtype(config.amp, device) or torch.float32)
    start = time.perf_counter()
    try:
        result = train(config)
        best, history, train_images, interrupted = result.best_metrics, result.history, result.train_pairs, False
    except KeyboardInterrupt:  # gpu_train.sh's TRAIN_LIMIT_S (SIGINT): the finished epochs still count
        best, history, train_images = read_run(args.out)
        interrupted = True
        print(f"interrupted after {len(history)} epochs: the row holds the figures of {args.out}/log.csv")
    wall = time.perf_counter() - start
    row = {**row_header("kvasir_train", device, script="benchmarks/kvasir_train.py",
                        argv=sys.argv[1:] if argv is None else argv),
           "backend": backend, "dtype": dtype.removeprefix("torch."),
           "preset": args.preset, "config": {k: options[k] for k in sorted(options)}, "interrupted": interrupted,
           "train_images": train_images, **figures(best, history, wall, train_images)}
    path = args.json or RESULTS_DIR / f"{row['date'][:10]}-kvasir-train.jsonl"
    append_jsonl(path, [row])
    print(f"{args.preset}: best val mDSC {row.get('mDSC')}, mIoU {row.get('mIoU')} in {row['wall_s']:.0f} s "
          f"(stage 2: {row.get('stage2_images_per_s')} images/s) on {row['device']}; row appended to {path}")
    return row


if __name__ == "__main__":
    sys.exit(130 if main()["interrupted"] else 0)  # 130: cut short by SIGINT, as the shell reports it
