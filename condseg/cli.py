"""The ``condseg`` command: argument parsing only; the work is done by condseg.engine and condseg.data."""
import argparse
import json
import os
import sys

from .data.errors import DatasetError

EPILOG = "Run 'condseg COMMAND --help' for the options of a command."


def _train_parser(sub):
    p = sub.add_parser("train", help="train ConDSeg (stage 1, stage 2 or both)",
                       description="Train ConDSeg on DATA_ROOT (ROOT/images + ROOT/masks with train.txt/val.txt, "
                                   "or the ISIC/GlaS layouts). Stage 1 trains Net_0 with consistency "
                                   "reinforcement, stage 2 the whole network with the stage-1 encoder.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_root", metavar="DATA_ROOT")
    p.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="run folder: checkpoints, log.csv, curves.png")
    p.add_argument("--stage", choices=["both", "1", "2"], default="both")
    p.add_argument("--epochs", type=int, default=100, help="stage-2 epochs (stage-1 epochs with --stage 1)")
    p.add_argument("--stage1-epochs", type=int, default=None, help="stage-1 epochs (default: epochs/5)")
    p.add_argument("--image-size", type=int, default=256, help="training side, a multiple of 16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--encoder", default="resnet50", help="resnet18, resnet34, resnet50, vgg19, pvt_v2_b2")
    p.add_argument("--encoder-weights", metavar="PATH", help="local ImageNet weights for the encoder")
    p.add_argument("--classes", type=int, default=1, help="1: binary; >1: masks hold class indices")
    p.add_argument("--decoder-channels", type=int, default=128, help="width after the encoder (light: 16-32)")
    p.add_argument("--cdfa-variant", choices=["paper", "official"], default="paper")
    p.add_argument("--stage1-checkpoint", metavar="PATH", help="with --stage 2: stage-1 checkpoint for the encoder")
    p.add_argument("--lr", type=float, default=1e-4, help="stage-2 learning rate")
    p.add_argument("--encoder-lr", type=float, default=1e-5, help="stage-2 encoder learning rate")
    p.add_argument("--stage1-lr", type=float, default=1e-4)
    p.add_argument("--scheduler", choices=["plateau", "cosine", "none"], default="plateau")
    p.add_argument("--lr-patience", type=int, default=10, help="plateau scheduler patience (epochs)")
    p.add_argument("--early-stop", type=int, default=30,
                   help="stop after N epochs without a better val mDSC (0: never)")
    p.add_argument("--rotation", type=float, default=15.0,
                   help="largest random rotation in degrees, on top of flips and 90-degree turns (0: none)")
    p.add_argument("--amp", nargs="?", const="auto", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision: auto is bf16 (else fp16) on CUDA and float32 on CPU; bf16 also "
                        "runs on a CPU and pays where it has AMX or AVX512-BF16 units")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="train in the channels_last (NHWC) memory format: faster convolutions")
    p.add_argument("--workers", type=int, default=None, help="data-loader workers (default: 0 when the data "
                   "fits in memory, else 4)")
    p.add_argument("--val-split", default="val", help="split name or split file used for validation")
    p.add_argument("--skip-missing", action="store_true", help="leave out split ids whose files are missing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR where it stopped")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a RUN_DIR that holds a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="TensorBoard events (default: when tensorboard is installed)")
    return p


def _commands(argv):
    parser = argparse.ArgumentParser(prog="condseg", description="ConDSeg medical image segmentation.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a dataset split",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("data_root", metavar="DATA_ROOT")
    p.add_argument("--split", default="val", help="split name, or a split file (.txt)")
    p.add_argument("--out", metavar="FILE", help="summary JSON (the per-image CSV goes beside it)")
    p.add_argument("--original-size", action="store_true", help="score at each mask's own resolution")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-missing", action="store_true")

    p = sub.add_parser("predict", help="segment images of any size",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
    p.add_argument("--probabilities", action="store_true", help="also write <stem>_prob.png")
    p.add_argument("--uncertainty", action="store_true", help="also write <stem>_uncertainty.png (SID branch)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = data_sub.add_parser("check", help="report every problem of a dataset folder at once")
    q.add_argument("data_root", metavar="DATA_ROOT")
    q.add_argument("--classes", type=int, default=1)

    p = sub.add_parser("demo", help="synthetic data, a 2-minute CPU training run, evaluation, overlays",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="condseg-demo", metavar="DIR")
    p.add_argument("--epochs", type=int, default=8, help="stage-2 epochs")
    p.add_argument("--stage1-epochs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def _train(a):
    from .engine import train
    result = train(data_root=a.data_root, out=a.out, stage=a.stage, epochs=a.epochs, stage1_epochs=a.stage1_epochs,
                   image_size=a.image_size, batch_size=a.batch_size, encoder=a.encoder,
                   encoder_weights=a.encoder_weights, classes=a.classes, decoder_channels=a.decoder_channels,
                   cdfa_variant=a.cdfa_variant, stage1_checkpoint=a.stage1_checkpoint, lr=a.lr,
                   encoder_lr=a.encoder_lr, stage1_lr=a.stage1_lr, scheduler=a.scheduler, lr_patience=a.lr_patience,
                   early_stop=a.early_stop, rotation=a.rotation, amp=a.amp, device=a.device,
                   channels_last=a.channels_last, workers=a.workers, val_split=a.val_split,
                   skip_missing=a.skip_missing, seed=a.seed,
                   deterministic=a.deterministic, resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress,
                   tensorboard=a.tensorboard)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"best checkpoint: {result.best_checkpoint}")
        print(json.dumps(result.best_metrics, indent=2))


def _evaluate(a):
    from .engine import evaluate
    summary = evaluate(a.checkpoint, a.data_root, split=a.split, out=a.out, original_size=a.original_size,
                       device=a.device, batch_size=a.batch_size, skip_missing=a.skip_missing)
    summary.pop("per_image")
    print(json.dumps(summary, indent=2))
    if a.out:
        print(f"summary: {a.out}; per-image metrics: {os.path.splitext(a.out)[0]}.csv")


def _predict(a):
    from .engine import predict
    records = predict(a.checkpoint, a.inputs, a.out, overlay=a.overlay, probabilities=a.probabilities,
                      uncertainty=a.uncertainty, device=a.device, batch_size=a.batch_size, workers=a.workers,
                      threshold=a.threshold)
    print(f"{len(records)} mask(s) written to {a.out}")


def _data_check(a):
    from .data import check_dataset
    report = check_dataset(a.data_root, classes=a.classes)
    print(report)
    return 0 if report.ok else 1


def _demo(a):
    from .engine.demo import run_demo
    out = run_demo(a.out, epochs=a.epochs, stage1_epochs=a.stage1_epochs, device=a.device)
    s = out["summary"]
    print(f"\nvalidation: mDSC {s['mDSC']:.3f}, mIoU {s['mIoU']:.3f} on {s['images']} synthetic images")
    for key in ("data", "run", "checkpoint", "curves", "evaluation", "predictions"):
        print(f"{key:>12}: {out[key]}")


def main(argv=None):
    args = _commands(sys.argv[1:] if argv is None else argv)
    handler = {"train": _train, "evaluate": _evaluate, "predict": _predict, "data": _data_check,
               "demo": _demo}[args.command]
    from .engine import CheckpointError, TrainingDiverged
    try:
        return handler(args) or 0
    except (DatasetError, CheckpointError, TrainingDiverged, FileExistsError, FileNotFoundError, ValueError) as e:
        if os.environ.get("CONDSEG_DEBUG"):
            raise
        print(f"condseg {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
