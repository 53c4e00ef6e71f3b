#!/usr/bin/env python
"""Train ConDSeg on a dataset split (both stages) and record the figures of issue 6's bars: wall
time, training images/s, and the best validation mIoU, mDSC, recall and precision, as one JSON
row with the device and the exact command.

    python benchmarks/kvasir_train.py ../shared/data/kvasir-seg --preset gpu --out runs/kvasir-gpu
    python benchmarks/kvasir_train.py ../shared/data/kvasir-seg --preset cpu --out runs/kvasir-cpu

Presets (both from scratch, learning rates 1e-3, cosine schedule, no early stop):
  gpu: the paper's network (resnet50, decoder 128, 256x256), batch 12, bf16, 4 + 24 epochs;
  cpu: the light configuration of README.md (resnet18, decoder 32, 96x96), batch 8, bf16 autocast
       (pays on CPUs with AMX or AVX512-BF16 units), 1 + 20 epochs.
Any TrainConfig field can be overridden: ``--set epochs=20 --set image_size=128``.
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, append_jsonl, row_header  # noqa: E402

from condseg.engine import TrainConfig, train  # noqa: E402
from condseg.engine.runtime import resolve_device  # noqa: E402

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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("data_root")
    p.add_argument("--out", required=True, help="run folder (must not hold a run)")
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], type=parse_override,
                   metavar="NAME=VALUE", help="override one TrainConfig field (repeatable)")
    p.add_argument("--json", default=None,
                   help="append the row to this JSON-lines file (default: benchmarks/results/<date>-kvasir-train.jsonl)")
    return p.parse_args(argv)


def figures(result, wall_seconds, train_images):
    """The row's figures from a TrainResult: best validation metrics of the last stage, and
    training throughput per stage (epoch time includes that epoch's validation)."""
    row = {"wall_s": round(wall_seconds, 1)}
    row.update({k.replace("val_", ""): round(v, 4) for k, v in result.best_metrics.items()
                if k in ("val_mIoU", "val_mDSC", "val_recall", "val_precision")})
    for stage in (1, 2):
        epochs = [h for h in result.history if h["stage"] == stage]
        if epochs:
            seconds = sum(h["seconds"] for h in epochs)
            row[f"stage{stage}_epochs"] = len(epochs)
            row[f"stage{stage}_images_per_s"] = round(train_images * len(epochs) / seconds, 1)
    return row


def main(argv=None):
    args = parse_args(argv)
    options = {**PRESETS[args.preset], **dict(args.overrides)}
    config = TrainConfig(data_root=args.data_root, out=args.out, skip_missing=True, progress=False, **options)
    device = resolve_device(config.device)
    start = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - start
    train_images = result.train_pairs
    row = {**row_header("kvasir_train", device, script="benchmarks/kvasir_train.py",
                        argv=sys.argv[1:] if argv is None else argv),
           "preset": args.preset, "config": {k: options[k] for k in sorted(options)},
           "train_images": train_images, **figures(result, wall, train_images)}
    path = args.json or RESULTS_DIR / f"{row['date'][:10]}-kvasir-train.jsonl"
    append_jsonl(path, [row])
    print(f"{args.preset}: best val mDSC {row.get('mDSC')}, mIoU {row.get('mIoU')} in {row['wall_s']:.0f} s "
          f"(stage 2: {row.get('stage2_images_per_s')} images/s) on {row['device']}; row appended to {path}")
    return row


if __name__ == "__main__":
    main()
