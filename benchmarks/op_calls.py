#!/usr/bin/env python
"""One call of each pass (no_grad forward, then forward+backward) per backend and dtype at the
bars' shape (B=12, C=128, 128x128, 4 heads, K=3, dual softmax): a small, fixed workload for
Nsight Compute, e.g. on the GPU machine

    CONDSEG_TRITON_AUTOTUNE=0 ncu --clock-control none --kernel-name regex:'weights_kernel|_mix' \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python benchmarks/op_calls.py --backends cuda,triton

(benchmarks/results/2026-11-27-h100-ncu-op-kernels.txt holds such a run's figures). With
--kernels it times each kernel itself (torch.profiler, after one untimed call of each pass, so that
Triton's autotuning stays out): which kernel of a backend's forward or backward takes the time.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import condseg_ops


def kernel_times(run, device, iters):
    """{kernel name: mean milliseconds per call of run} over `iters` profiled calls, device
    kernels only on CUDA (CPU ops on a CPU), slowest first."""
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(iters):
            run()
        if device == "cuda":
            torch.cuda.synchronize()
    totals = {}
    for event in prof.events():
        if device == "cuda":
            keep = event.device_type == torch.autograd.DeviceType.CUDA
        else:
            keep = event.cpu_parent is None  # top-level ops only: children's time is inside their parents'
        if keep:
            totals[event.name] = totals.get(event.name, 0.0) + event.time_range.elapsed_us() / 1000.0 / iters
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="cuda", help="comma list of cuda, triton, reference")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=128, help="H = W")
    p.add_argument("--kernels", action="store_true", help="print each kernel's time per pass (torch.profiler)")
    p.add_argument("--iters", type=int, default=5, help="profiled calls per pass with --kernels")
    args = p.parse_args(argv)
    B, C, H, W, heads = 12, 128, args.size, args.size, 4
    scale = (C // heads) ** -0.5
    for backend in args.backends.split(","):
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            torch.manual_seed(0)
            value = torch.randn(B, C, H, W, device=args.device, dtype=dtype, requires_grad=True)
            fg, bg = (torch.randn(B, H, W, heads, 9, 9, device=args.device, dtype=dtype, requires_grad=True)
                      for _ in range(2))
            grad = torch.randn_like(value)

            def forward():
                with torch.no_grad():
                    condseg_ops.contrast_aggregate(value, fg, bg, scale=scale)

            def forward_backward():
                condseg_ops.contrast_aggregate(value, fg, bg, scale=scale).backward(grad)

            with condseg_ops.use_backend(backend):
                forward()
                forward_backward()
                if value.is_cuda:
                    torch.cuda.synchronize()
                assert torch.isfinite(value.grad).all() and torch.isfinite(fg.grad).all()
                print(backend, name, "ok")
                if args.kernels:
                    for label, run in (("forward", forward), ("forward+backward", forward_backward)):
                        times = kernel_times(run, value.device.type, args.iters)
                        print(f"  {label}: {sum(times.values()):.3f} ms in all")
                        for kernel, ms in times.items():
                            print(f"    {ms:9.3f} ms  {kernel[:110]}")


if __name__ == "__main__":
    main()
