#!/usr/bin/env python
"""One call of each pass (no_grad forward, then forward+backward) per backend and dtype at the
bars' shape (B=12, C=128, 128x128, 4 heads, K=3, dual softmax): a small, fixed workload for
Nsight Compute, e.g. on the GPU machine

    CONDSEG_TRITON_AUTOTUNE=0 ncu --clock-control none --kernel-name regex:'weights_kernel|_mix' \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python benchmarks/op_calls.py --backends cuda,triton

(benchmarks/results/2026-11-27-h100-ncu-op-kernels.txt holds such a run's figures).
"""
import argparse

import torch

import condseg_ops


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="cuda", help="comma list of cuda, triton, reference")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=128, help="H = W")
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
            with condseg_ops.use_backend(backend):
                with torch.no_grad():
                    condseg_ops.contrast_aggregate(value, fg, bg, scale=scale)
                out = condseg_ops.contrast_aggregate(value, fg, bg, scale=scale)
                out.backward(torch.randn_like(out))
            if value.is_cuda:
                torch.cuda.synchronize()
            assert torch.isfinite(value.grad).all() and torch.isfinite(fg.grad).all()
            print(backend, name, "ok")


if __name__ == "__main__":
    main()
