#!/usr/bin/env python
"""Where one ConDSeg inference (or training step) spends its time: the torch.profiler table of the
slowest kernels (device time on CUDA, CPU time on CPU) for one fps.py mode and backend, at batch 1
(12 with ``--train``).

    python benchmarks/profile_model.py --device cuda --mode bf16 --top 25 --out profile.txt
    python benchmarks/profile_model.py --device cpu --size 128 --encoder resnet18
    python benchmarks/profile_model.py --device cuda --train --batch 12 --shapes

``--train`` profiles fps.py's training step instead (stage-2 forward with the auxiliary head, loss,
backward and Adam step; autocast on CUDA; channels_last unless ``--nchw``) at ``--batch`` (12).

``--shapes`` adds the layer-level ops (convolutions, upsamplings, reductions) grouped by input
shape, which names the layers that cost the most. On the H100 this showed that autocast re-cast
every weight at every call (some 400 copy kernels per inference), which is why the reduced-precision
fps.py modes now cast the model once instead.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fps  # noqa: E402  (first: it sets GOMP_SPINCOUNT before torch loads)
import torch  # noqa: E402
from _common import device_name, synchronize  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", choices=[m for m in fps.MODES if not fps.MODES[m].graph],
                   help="an fps.py mode (default bf16; CUDA-graph modes replay as one opaque launch: use their "
                        "eager form); not with --train, whose step is the trainer's")
    p.add_argument("--backend", default="auto", choices=fps.BACKENDS)
    p.add_argument("--encoder", default="resnet50")
    p.add_argument("--decoder-channels", type=int, default=128)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--train", action="store_true", help="profile fps.py's training step instead of an inference")
    p.add_argument("--batch", type=int, default=None, help="batch (default 1; 12 with --train)")
    p.add_argument("--nchw", action="store_true", help="with --train: NCHW instead of channels_last")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--shapes", action="store_true",
                   help="also list the slowest convolutions, upsamplings and ops by input shape (names the layer)")
    p.add_argument("--out", help="also write the table to this file")
    return p.parse_args(argv)


# The aten ops that stand for one layer each (their callees are nested inside them).
LAYER_OPS = ("aten::convolution", "aten::_nnpack_spatial_convolution", "aten::upsample_bilinear2d",
             "aten::linear", "aten::addmm",
             "condseg_ops::contrast_aggregate", "aten::max_pool2d", "aten::adaptive_avg_pool2d",
             "aten::adaptive_max_pool2d", "aten::mean", "aten::amax", "aten::max", "aten::cat",
             "aten::mul", "aten::add", "aten::relu", "aten::relu_", "aten::sigmoid",
             # and their backwards, for --train
             "aten::convolution_backward", "aten::upsample_bilinear2d_backward",
             "aten::cudnn_batch_norm", "aten::cudnn_batch_norm_backward",
             "aten::native_batch_norm", "aten::native_batch_norm_backward",
             "condseg_ops::contrast_aggregate_backward", "aten::threshold_backward",
             "aten::sigmoid_backward")


def shape_table(prof, device, iters, top, per="inference"):
    """Layer-level ops grouped by input shape, slowest first: which convolution costs what."""
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in LAYER_OPS]
    rows.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in rows) / iters / 1e3
    lines = [f"layer ops by input shape ({key}, ms per {per}; all listed ops: {total:.2f} ms)",
             f"{'ms':>8} {'calls':>5}  op and input shapes"]
    for e in rows[:top]:
        lines.append(f"{getattr(e, key) / iters / 1e3:8.3f} {e.count // iters:5d}  {e.key} {e.input_shapes}"[:200])
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.train and args.mode:
        raise SystemExit("--mode is for inferences: --train profiles the trainer's step (autocast on CUDA); "
                         "leave --mode out")
    args.mode = args.mode or "bf16"
    mode = fps.MODES[args.mode]
    if device.type == "cpu" and mode.dtype != "float32" and not args.train:
        raise SystemExit(f"--mode {args.mode}: reduced-precision modes are for CUDA; on CPU use eager, fold, fold-cl or fold-wino")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    base = fps.build_model(args.encoder, args.decoder_channels, device=device)
    batch = args.batch or (12 if args.train else 1)
    if args.train:
        x, y = fps.train_batch(base, batch, args.size, device, channels_last=not args.nchw)
        run = fps.make_train_step(base, args.backend, x, y, channels_last=not args.nchw)
        what = (f"training step ({fps.train_amp(device)[1]}, "
                f"{'NCHW' if args.nchw else 'channels_last'})")
    else:
        x = torch.randn(batch, 3, args.size, args.size, device=device)
        run, _ = fps.make_runner(base, mode, args.backend, x, device)
        what = f"mode {args.mode}"
    for _ in range(3):  # warm-up: cuDNN autotuning, lazy initialisation
        run()
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=args.shapes) as prof:
        for _ in range(args.iters):
            run()
        synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    table = events.table(sort_by=sort, row_limit=args.top, max_name_column_width=70)
    backend = fps.resolved_backend(args.backend, device)
    title = (f"profile: {device_name(device)} | {what} | backend {backend} | "
             f"{args.encoder} {args.size}x{args.size} batch {batch} | {args.iters} iterations (totals below)")
    text = f"{title}\n{table}"
    if device.type == "cuda":
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        gpu_us = sum(e.self_device_time_total for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA)
        text += (f"\nper {'step' if args.train else 'inference'}: {kernels / args.iters:.0f} kernels, "
                 f"{gpu_us / args.iters / 1e3:.2f} ms of GPU time\n")
    if args.shapes:
        text += "\n" + shape_table(prof, device, args.iters, args.top, "step" if args.train else "inference")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
