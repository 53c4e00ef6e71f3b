"""Checks the CUDA op under CUDA-graph capture against eager (diagnostic for fps.py's graph rows).

    python benchmarks/graph_check.py
"""
import os

import torch

import condseg_ops

torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for H in (16, 128):
        for backend in ("cuda", "triton"):
            B, C, heads = 1, 128, 4
            # channels-last storage, as the model's Linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) gives
            v = torch.randn(B, H, H, C, device="cuda", dtype=dtype).permute(0, 3, 1, 2)
            fg = torch.randn(B, H, H, heads, 9, 9, device="cuda", dtype=dtype)
            bg = torch.randn(B, H, H, heads, 9, 9, device="cuda", dtype=dtype)
            eager = condseg_ops.contrast_aggregate(v, fg, bg, scale=0.17, backend=backend)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    condseg_ops.contrast_aggregate(v, fg, bg, scale=0.17, backend=backend)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = condseg_ops.contrast_aggregate(v, fg, bg, scale=0.17, backend=backend)
            graph.replay()
            torch.cuda.synchronize()
            diff = (static.float() - eager.float()).abs().max().item()
            print(f"graph-vs-eager {backend:6s} {str(dtype):15s} H={H:3d} "
                  f"generic={os.environ.get('CONDSEG_CUDA_GENERIC', '0')} max_abs_diff={diff:.3e}", flush=True)
