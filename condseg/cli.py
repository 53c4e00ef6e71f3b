"""The ``condseg`` command: argument parsing only; the work is done by condseg.engine and condseg.data."""
import argparse
import dataclasses
import json
import os
import re
import shlex
import sys
from pathlib import Path

from .data.errors import DatasetError

EPILOG = "Run 'condseg COMMAND --help' for the options of a command."


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, unless it is None or False (nothing worth reading)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# TrainConfig field -> its `condseg train` flag (filled by _train_parser): training errors name the
# fields, as the Python API takes them; the command line's messages name the flags instead.
TRAIN_FLAGS = {}


def _train_parser(sub):
    # Options left out are left out of the call too (argparse.SUPPRESS): TrainConfig holds the
    # defaults, and with --resume the run's own options come back from its checkpoint.
    from .engine.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    def opt(flag, help_text, field=None, **kwargs):
        field = field or flag.lstrip("-").replace("-", "_")
        TRAIN_FLAGS[field] = flag
        default = kwargs.pop("shown_default", defaults.get(field))
        if default is not None and kwargs.get("action") != "store_true":
            help_text = f"{help_text} (default: {default})"
        p.add_argument(flag, help=help_text, **kwargs)

    p = sub.add_parser("train", help="train ConDSeg (stage 1, stage 2 or both)",
                       description="Train ConDSeg on DATA_ROOT (ROOT/images + ROOT/masks with train.txt/val.txt, "
                                   "or the ISIC/GlaS layouts). Stage 1 trains Net_0 with consistency "
                                   "reinforcement, stage 2 the whole network with the stage-1 encoder. "
                                   "With --resume, the options of the run in RUN_DIR come back from its "
                                   "checkpoint; options given again override them.",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("data_root", metavar="DATA_ROOT")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder: checkpoints, log.csv, curves.png")
    opt("--stage", "stages to train", choices=["both", "1", "2"])
    opt("--epochs", "stage-2 epochs (stage-1 epochs with --stage 1)", type=int)
    opt("--stage1-epochs", "stage-1 epochs", type=int, shown_default="epochs/5 with --stage both")
    opt("--image-size", "training side, a multiple of 16 (32 for pvt_v2_b2)", type=int)
    opt("--batch-size", "training batch (validation uses twice this)", type=int)
    opt("--encoder", "resnet18, resnet34, resnet50, vgg19, pvt_v2_b2")
    opt("--encoder-weights", "local ImageNet weights for the encoder (none: from scratch)", metavar="PATH")
    opt("--classes", "1: binary; >1: masks hold class indices", type=int)
    opt("--decoder-channels", "width after the encoder (light: 16-32)", type=int)
    opt("--cdfa-variant", "CDFA form: the paper's equations or the released code's", choices=["paper", "official"])
    opt("--stage1-checkpoint", "with --stage 2: stage-1 checkpoint for the encoder", metavar="PATH")
    opt("--lr", "stage-2 learning rate", type=float)
    opt("--encoder-lr", "stage-2 encoder learning rate", type=float)
    opt("--stage1-lr", "stage-1 learning rate", type=float)
    opt("--scheduler", "learning-rate schedule (plateau: on the validation loss)",
        choices=["plateau", "cosine", "none"])
    opt("--lr-patience", "plateau scheduler patience (epochs)", type=int)
    opt("--early-stop", "stop after N epochs without a better val mDSC (0: never)", type=int)
    opt("--rotation", "largest random rotation in degrees, on top of flips and 90-degree turns (0: none)",
        type=float)
    opt("--amp", "mixed precision: auto is bf16 (else fp16) on CUDA and float32 on CPU; bf16 also runs on a CPU "
        "and pays where it has AMX or AVX512-BF16 units", nargs="?", const="auto",
        choices=["auto", "bf16", "fp16", "off"])
    opt("--device", "auto, cpu, cuda, cuda:N")
    opt("--channels-last", "train in the channels_last (NHWC) memory format: faster convolutions",
        action=argparse.BooleanOptionalAction)
    opt("--compile", "torch.compile the training step's forward and backward (the first step of each stage "
        "compiles: minutes; validation stays eager)", action=argparse.BooleanOptionalAction)
    opt("--cuda-graph", "replay each training step (forward, loss, backward, Adam) as one CUDA graph: no "
        "per-kernel launches from Python; CUDA, bf16 autocast or none", action=argparse.BooleanOptionalAction)
    opt("--workers", "data-loader workers", type=int, shown_default="0 when the data fits in memory, else 4")
    opt("--val-split", "split name or split file used for validation")
    opt("--skip-missing", "leave out split ids whose files are missing", action=argparse.BooleanOptionalAction)
    opt("--seed", "random seed (weights, augmentation, data order)", type=int)
    opt("--deterministic", "deterministic algorithms (slower)", action=argparse.BooleanOptionalAction)
    opt("--resume", "continue the run in RUN_DIR where it stopped, with its own options", action="store_true")
    opt("--overwrite", "start afresh in a RUN_DIR that holds a run", action="store_true")
    opt("--progress", "progress bar", action=argparse.BooleanOptionalAction)
    opt("--tensorboard", "TensorBoard events", action=argparse.BooleanOptionalAction,
        shown_default="when tensorboard is installed")
    return p


def _version():
    """condseg's version, torch's, and the kernels compiled into condseg_ops (cheap: no Triton import)."""
    import condseg_ops
    import torch
    from . import __version__
    info = condseg_ops.build_info()
    compiled = ", ".join(info["backends"]) if info else "none (the reference backend only)"
    return f"condseg {__version__}, torch {torch.__version__}, condseg_ops compiled kernels: {compiled}"


def _commands(argv):
    parser = argparse.ArgumentParser(prog="condseg", description="ConDSeg medical image segmentation.",
                                     epilog=EPILOG)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {"train": _train_parser(sub)}  # command -> its parser, for errors in its own usage

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a dataset split",
                       description="Metrics of CHECKPOINT on a split of DATA_ROOT: IoU, Dice, recall and "
                                   "precision per image, averaged over the images (mIoU, mDSC, ...), at the "
                                   "training size unless --original-size.",
                       formatter_class=_DefaultsHelp)
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("data_root", metavar="DATA_ROOT")
    p.add_argument("--split", default="val", help="split name, a split file (.txt), or 'all' for every pair")
    p.add_argument("--out", metavar="FILE", help="summary JSON (the per-image CSV goes beside it)")
    p.add_argument("--original-size", action="store_true", help="score at each mask's own resolution")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--skip-missing", action="store_true", help="leave out split ids whose files are missing")
    commands["evaluate"] = p

    p = sub.add_parser("predict", help="segment images of any size",
                       description="Masks (PNG: 0/255, or class indices) for image files and folders, each at its "
                                   "input's own size, named after the inputs; optionally overlays, "
                                   "probability and uncertainty maps.",
                       formatter_class=_DefaultsHelp)
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the masks (not a folder that holds inputs)")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
    p.add_argument("--probabilities", action="store_true", help="also write <stem>_prob.png")
    p.add_argument("--uncertainty", action="store_true", help="also write <stem>_uncertainty.png (SID branch)")
    p.add_argument("--threshold", type=float, default=None,
                   help="foreground probability of a binary model's masks (default 0.5; a multi-class "
                        "model's masks take each pixel's most likely class)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files of the same names already in --out (without it, they stop the run)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="image-reading workers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-winograd", action="store_true",
                   help="on a CPU, keep the model's ordinary 3x3 convolutions (by default those of maps of "
                        "64x64 and more run NNPACK's Winograd algorithm: faster, rounding slightly differently)")
    commands["predict"] = p

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = data_sub.add_parser("check", help="report every problem of a dataset folder at once")
    q.add_argument("data_root", metavar="DATA_ROOT")
    q.add_argument("--classes", type=int, default=1, help="1: binary masks; >1: masks hold class indices")
    commands["data"] = q

    p = sub.add_parser("demo", help="synthetic data, a 1-minute CPU training run, evaluation, overlays",
                       description="The package's main job in one command: makes a small synthetic dataset of "
                                   "low-contrast blobs, trains a small ConDSeg on it (about a minute on a "
                                   "CPU), evaluates it, writes overlays, and prints where everything is.",
                       formatter_class=_DefaultsHelp)
    p.add_argument("--out", default="condseg-demo", metavar="DIR",
                   help="folder for the data, the run, the evaluation and the predictions")
    p.add_argument("--epochs", type=int, default=8, help="stage-2 epochs")
    p.add_argument("--stage1-epochs", type=int, default=2, help="stage-1 epochs")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    commands["demo"] = p
    if not argv:  # a bare `condseg`: what it can do, not just the missing argument
        parser.print_help()
        raise SystemExit(2)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would blame the top-level parser and print its usage, not the command's
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _train(a):
    from .engine import train
    from .engine.runtime import resolve_device, threads_for_a_busy_cpu
    options = {k: v for k, v in vars(a).items() if k != "command"}
    # one process on a busy CPU: train on the idle cores' worth of threads (torchrun's ranks share
    # the CPU by design, and torchrun sets their OMP_NUM_THREADS)
    alone = int(os.environ.get("WORLD_SIZE", "1")) == 1
    device = getattr(a, "device", None)
    if device is None and getattr(a, "resume", False):  # the run's own device, as train() will take it
        from .engine.train import saved_options
        device = saved_options(a.out).get("device") if getattr(a, "out", None) else None
    device = resolve_device(device) if alone else "distributed"
    with threads_for_a_busy_cpu(device, lambda message: print(message, flush=True), "training"):
        result = train(**options)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"best checkpoint: {result.best_checkpoint}")
        print(json.dumps(result.best_metrics, indent=2))


def _evaluate(a):
    from .engine.evaluate import evaluate, evaluation_files
    summary = evaluate(a.checkpoint, a.data_root, split=a.split, out=a.out, original_size=a.original_size,
                       device=a.device, batch_size=a.batch_size, skip_missing=a.skip_missing)
    summary.pop("per_image")
    print(json.dumps(summary, indent=2))
    if a.out:
        summary_file, table_file = evaluation_files(a.out)
        print(f"summary: {summary_file}; per-image metrics: {table_file}")


def _predict(a):
    from .engine import predict
    records = predict(a.checkpoint, a.inputs, a.out, overlay=a.overlay, probabilities=a.probabilities,
                      uncertainty=a.uncertainty, device=a.device, batch_size=a.batch_size, workers=a.workers,
                      threshold=a.threshold, overwrite=a.overwrite, winograd=not a.no_winograd)
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
    for key in ("data", "run", "checkpoint", "curves", "evaluation", "per-image", "predictions"):
        print(f"{key:>12}: {out[key]}")


def _message(error, command):
    """What to print for ``error``. An error raised in a DataLoader worker comes back with the
    worker's whole traceback as its message: print the original error's own line instead. A
    message naming an option in both forms ("x=1 (CLI: --x)", "x='2' (CLI: --x 2)") keeps the
    flag (and its value). Training errors name the flags of the fields they name (image_size ->
    --image-size; a name without an underscore only as "lr=...", since plain words could be
    anything else), except inside paths."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]  # "package.module.ErrorClass: the original message"
        text = last.split(": ", 1)[-1]
    # "skip_missing=True (CLI: --skip-missing)" names both forms: the command line needs the flag
    text = re.sub(r"\b\w+=\S+ \(CLI: (--[\w-]+(?: [^()\s]+)?)\)", r"\1", text)
    if command == "train":
        # not inside a path or a longer name (data/image_size/val.txt stays as it is)
        edge_before, edge_after = r"(?<![\w/\\.-])", r"(?![\w/\\-]|\.\w)"
        for field, flag in TRAIN_FLAGS.items():
            if "_" in field:
                text = re.sub(rf"{edge_before}{field}{edge_after}", flag, text)
            else:  # a plain word is a field only as "name=value" (resume refusals: lr=0.001)
                text = re.sub(rf"{edge_before}{field}(?==)", flag, text)
    return text


def main(argv=None):
    args = _commands(sys.argv[1:] if argv is None else argv)
    handler = {"train": _train, "evaluate": _evaluate, "predict": _predict, "data": _data_check,
               "demo": _demo}[args.command]
    from .engine import CheckpointError, CompileFailed, TrainingDiverged
    try:
        return handler(args) or 0
    except (DatasetError, CheckpointError, TrainingDiverged, CompileFailed, FileExistsError, FileNotFoundError,
            ValueError) as e:
        if os.environ.get("CONDSEG_DEBUG"):
            raise
        print(f"condseg {args.command}: error: {_message(e, args.command)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if os.environ.get("CONDSEG_DEBUG"):
            raise
        hint = ""
        if args.command == "train" and any(Path(args.out).glob("stage*_last.pt")):  # written atomically: whole
            root, out = shlex.quote(args.data_root), shlex.quote(args.out)
            hint = f"; continue with: condseg train {root} --out {out} --resume"
        print(f"condseg {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
