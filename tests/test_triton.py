"""Triton backend of contrast_aggregate (issue 4).

(a) On a CPU-only machine the kernels run through the Triton interpreter (conftest.py sets
    TRITON_INTERPRET=1 before they are imported); on a GPU machine the same cases run on CUDA.
(b) Every kernel is compiled ahead of time for sm_89 and sm_90 in a subprocess (no GPU needed),
    which catches code that the interpreter accepts but the compiler rejects, and register spills.
(c) GPU only: dtypes against a tolerance table, gradcheck, determinism, torch.compile, opcheck.

Run as a script (``python tests/test_triton.py aot 90 [--full]``) it is the AOT driver: it prints
one JSON record per compiled kernel, with registers, spill stack and static SASS counts from
cuobjdump.
"""
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# On a GPU each new shape compiles every kernel once per autotune config: the tests keep the first
# config (all configs are compiled ahead of time below and each runs in the interpreter sweep).
os.environ.setdefault("CONDSEG_TRITON_AUTOTUNE", "0")

import condseg_ops  # noqa: E402
import op_cases  # noqa: E402
from condseg_ops import triton_kernels as tk  # noqa: E402
from condseg_ops.reference import contrast_aggregate_reference  # noqa: E402

HERE = Path(__file__).resolve()
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# The kernels run here: compiled on a GPU, or interpreted on CPU tensors.
runnable = pytest.mark.skipif(
    not tk.TRITON_AVAILABLE or not (ON_GPU or tk.INTERPRET),
    reason="needs a CUDA device, or TRITON_INTERPRET=1 (conftest.py sets it without a GPU)",
)
interpreted = pytest.mark.skipif(not (tk.TRITON_AVAILABLE and tk.INTERPRET), reason="Triton interpreter only")
compiled_gpu = pytest.mark.skipif(
    not (ON_GPU and tk.TRITON_AVAILABLE and not tk.INTERPRET), reason="needs a CUDA device"
)

# (atol, rtol) against the float64 reference evaluated on the same (rounded) inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


# make_inputs(B, C, H, W, heads, K, dual, dtype=..., logit_scale=...) -> (value, attn_fg, attn_bg)
make_inputs = functools.partial(op_cases.make_inputs, device=DEVICE)


def inputs_for(case, **kwargs):
    """Inputs for a case (B, C, H, W, heads, K, dilation, dual)."""
    B, C, H, W, heads, K, _, dual = case
    return make_inputs(B, C, H, W, heads, K, dual, **kwargs)


def run_triton(value, fg, bg, K, dil, scale, api=True):
    """Through the public API (backend forced to triton), or the backend function directly."""
    if api:
        return condseg_ops.contrast_aggregate(value, fg, bg, kernel_size=K, dilation=dil, scale=scale,
                                              backend="triton")
    return tk.contrast_aggregate_triton(value, fg, bg, K, dil, scale)


def check_against_reference(value, fg, bg, K, dil, scale, api=True, seed=1, ref_on_device=False, tol=None):
    """Output and the gradients of value, attn_fg, attn_bg under a random upstream gradient, against
    the reference in float64 on CPU (or, for big shapes, in the input dtype on the same device)."""
    atol, rtol = tol or TOLERANCES[value.dtype]
    ref_kw = dict(device=value.device, dtype=value.dtype) if ref_on_device else dict(device="cpu",
                                                                                     dtype=torch.float64)
    inputs = [t.detach().clone().requires_grad_() for t in (value, fg, bg) if t is not None]
    ref_inputs = [t.detach().to(**ref_kw).requires_grad_() for t in inputs]
    pad = [None] * (3 - len(inputs))
    out = run_triton(*(inputs + pad), K, dil, scale, api=api)
    ref = contrast_aggregate_reference(*(ref_inputs + pad), K, dil, scale)
    assert out.shape == value.shape and out.dtype == value.dtype and out.device == value.device
    torch.testing.assert_close(out.detach().to(**ref_kw), ref.detach(), atol=atol, rtol=rtol)

    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, grad.to(out))
    want = torch.autograd.grad(ref, ref_inputs, grad.to(ref))
    for name, g, w in zip(("value", "attn_fg", "attn_bg"), got, want):
        assert g.dtype == value.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.to(**ref_kw), w, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")


# (B, C, H, W, heads, K, dilation, dual). Later tests reuse MAIN and SINGLE: on a GPU each new
# shape compiles every kernel again (ints equal to 1 or divisible by 16 are specialised).
MAIN = (1, 16, 5, 7, 2, 3, 1, True)
SINGLE = (1, 24, 6, 5, 1, 3, 1, False)
CASES = [
    pytest.param(MAIN, id="k3-dual-cg8"),
    pytest.param((1, 6, 4, 3, 2, 3, 2, True), id="k3-dil2-window-larger-than-image"),
    pytest.param((1, 3, 2, 5, 1, 5, 1, True), id="k5-h<k-cg3"),
    pytest.param((2, 4, 3, 3, 4, 1, 1, True), id="k1-heads4"),
    pytest.param(SINGLE, id="single-cg24"),
    pytest.param((1, 32, 5, 4, 1, 3, 2, False), id="single-cg32-dil2"),
    pytest.param((1, 9, 7, 1, 3, 3, 1, True), id="w1-heads3"),
    pytest.param((1, 72, 3, 4, 1, 3, 1, True), id="cg72-several-channel-blocks"),
]
SLOW_CASES = [
    pytest.param((2, 16, 13, 9, 2, 5, 2, True), id="k5-dil2-b2", marks=pytest.mark.slow),
    pytest.param((1, 4, 9, 8, 2, 7, 1, True), id="k7", marks=pytest.mark.slow),
    pytest.param((1, 4, 5, 6, 1, 7, 2, False), id="k7-dil2-single", marks=pytest.mark.slow),
    pytest.param((1, 64, 33, 7, 2, 3, 1, False), id="h33-single", marks=pytest.mark.slow),
]


@runnable
@pytest.mark.parametrize("case", CASES + SLOW_CASES)
def test_matches_reference_fp32(case):
    check_against_reference(*inputs_for(case), case[5], case[6], 0.7)


@runnable
@pytest.mark.parametrize("case", [MAIN, SINGLE], ids=["dual", "single"])
def test_tile_mix_kernel_matches_reference(case, monkeypatch):
    """K <= 3 takes the per-thread-row mix and mixed-apply kernels where Triton has tuples (>= 3.3).
    The tile kernels serve larger K and Triton 3.2, so they must stay right at K = 3 too."""
    monkeypatch.setattr(tk, "ROWS_MAX_K", 0)
    check_against_reference(*inputs_for(case), 3, 1, 0.7)


@runnable
@pytest.mark.parametrize("case, block_p, dtype", [
    ((1, 72, 3, 4, 1, 3, 1, True), None, torch.float32),
    ((1, 8, 14, 9, 2, 3, 1, True), 16, torch.float32),
    ((1, 8, 14, 9, 2, 3, 1, True), 16, torch.bfloat16),
    ((1, 6, 15, 10, 2, 3, 2, False), 16, torch.float32),
], ids=["cg72", "blocks-inside-and-on-the-border", "blocks-inside-and-on-the-border-bf16", "dil2-single"])
def test_k3_forward_applies_one_pixel_per_thread(case, block_p, dtype, monkeypatch):
    """At K = 3 the forward of every type (2-byte ones too) sums its weights and applies them in
    _mixed_apply_rows_kernel: no Wt tensor, and no tile kernel. Blocks whose source rows all lie
    in the image take the loads with column masks only; the others mask rows too."""
    if not tk.ROWS_MAX_K:
        pytest.skip(f"triton {tk.TRITON_VERSION} has no tuples: the tile kernels run")
    for name in ("_mixed_apply_kernel", "_apply_kernel", "_weight_kernel"):
        monkeypatch.setattr(tk, name, None)  # any launch of them fails
    B, C, H, W, heads, K, dil, _ = case
    if block_p:
        if not tk.INTERPRET and ON_GPU:
            pytest.skip("the block size is fixed under the interpreter only (the GPU autotunes)")
        monkeypatch.setitem(tk.FIXED_CONFIGS, "mixed_apply_rows", tk.triton.Config({"BLOCK_P": block_p}))
        lasts = [f + block_p - 1 for f in range(0, H * W, block_p)]
        inside = [last < H * W and (last - block_p + 1) // W >= dil * (K - 1) and last // W + dil * (K - 1) < H
                  for last in lasts]
        assert any(inside) and not all(inside)  # both kinds of block run
    value, fg, bg = inputs_for(case, dtype=dtype)
    out = run_triton(value, fg, bg, K, dil, 0.7, api=False)
    ref = contrast_aggregate_reference(*(t.double() if t is not None else None for t in (value, fg, bg)), K, dil,
                                       0.7)
    torch.testing.assert_close(out.double(), ref, atol=TOLERANCES[dtype][0], rtol=TOLERANCES[dtype][1])


@runnable
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=["k3", "k5-h<k", "single-dil2"])
def test_unfused_forward_matches_reference(case, monkeypatch):
    """The forward sums its weights inside the apply (_mixed_apply_kernel); the separate weight
    and apply kernels (FUSED_FORWARD off, and the backward) must give the same op."""
    monkeypatch.setattr(tk, "FUSED_FORWARD", False)
    check_against_reference(*inputs_for(case), case[5], case[6], 0.7)


@runnable
@pytest.mark.parametrize("C, heads, K, dil", [(64, 2, 3, 1), (130, 1, 5, 2)], ids=["k3", "k5-dil2-cg130"])
def test_fused_and_unfused_forward_agree(monkeypatch, C, heads, K, dil):
    """Both forwards sum the same weights in the same order, so they agree to float32 rounding
    (Cg = 130: three channel blocks, each summing the weights again)."""
    value, fg, bg = make_inputs(2, C, 9, 11, heads, K, True)
    split_calls = []
    monkeypatch.setattr(tk, "_weights", lambda *a, f=tk._weights: split_calls.append(1) or f(*a))
    monkeypatch.setattr(tk, "FUSED_FORWARD", True)
    fused = run_triton(value, fg, bg, K, dil, 0.7, api=False)
    assert not split_calls  # the fused forward computes no Wt
    monkeypatch.setattr(tk, "FUSED_FORWARD", False)
    torch.testing.assert_close(run_triton(value, fg, bg, K, dil, 0.7, api=False), fused, rtol=1e-6, atol=1e-6)
    assert split_calls


@runnable
@pytest.mark.parametrize("dual", [True, False], ids=["dual", "single"])
def test_matches_reference_fp64(dual):
    check_against_reference(*fp64_inputs(dual), 3, 2, 0.9, api=False)


def fp64_inputs(dual):
    return make_inputs(1, 6, 5, 4, 2, 3, dual, dtype=torch.float64)


@runnable
def test_second_order_gradients():
    # create_graph=True differentiates through the reference (the kernels' backward is not
    # differentiable), instead of failing or giving zeros.
    inputs = [t.requires_grad_() for t in make_inputs(1, 4, 4, 3, 2, 3, True, dtype=torch.float64)]
    assert torch.autograd.gradgradcheck(lambda v, f, b: run_triton(v, f, b, 3, 1, 0.8), inputs, eps=1e-6,
                                        atol=1e-6, fast_mode=True)


@runnable
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_matches_reference_half(dtype):
    check_against_reference(*inputs_for(MAIN, dtype=dtype), 3, 1, 0.7)


@interpreted
@pytest.mark.parametrize("K", [3, pytest.param(7, marks=pytest.mark.slow)])
def test_every_gpu_config_interpreted(K, monkeypatch):
    """The interpreter runs one config; here each GPU autotune config runs in turn (BLOCK_Q = 1
    at K = 7, narrow channel blocks, ...), so block-size logic the GPU picks from is checked too."""
    for i in range(max(len(configs) for configs in tk.GPU_CONFIGS.values())):
        for name, configs in tk.GPU_CONFIGS.items():
            monkeypatch.setitem(tk.FIXED_CONFIGS, name, configs[min(i, len(configs) - 1)])
        check_against_reference(*make_inputs(1, 20, 4, 5, 1, K, True), K, 1, 0.7, api=False)


@runnable
def test_huge_logits_give_no_nan():
    value, fg, bg = inputs_for(MAIN, logit_scale=1e4)
    inputs = [t.requires_grad_() for t in (value, fg, bg)]
    out = run_triton(*inputs, 3, 1, 1.0)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in inputs)
    ref = contrast_aggregate_reference(*(t.detach().double().cpu() for t in inputs), 3, 1, 1.0)
    torch.testing.assert_close(out.detach().double().cpu(), ref, atol=1e-3, rtol=1e-3)


@runnable
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3)], ids=["empty-batch", "empty-image"])
def test_empty_inputs(shape):
    B, C, H, W = shape
    value, fg, bg = make_inputs(B, C, H, W, 2, 3, True)
    inputs = [t.requires_grad_() for t in (value, fg, bg)]
    out = run_triton(*inputs, 3, 1, 1.0)
    assert out.shape == value.shape
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)
    assert all(g is None or (g.shape == t.shape and not g.any()) for g, t in zip(grads, inputs))


@runnable
def test_non_contiguous_inputs():
    B, C, H, W, heads, K = MAIN[:6]
    value, fg, bg = make_inputs(B, C, H, W, heads, K, True)
    value = value.to(memory_format=torch.channels_last)
    fg = make_inputs(B, C, H, W, heads * 2, K, False)[1][:, :, :, ::2]  # strided head dim
    bg = bg.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, W, ...) view of a (B, W, H, ...) tensor
    assert not value.is_contiguous() and not fg.is_contiguous() and not bg.is_contiguous()
    check_against_reference(value, fg, bg, K, 1, 0.6)


def test_import_without_triton(monkeypatch):
    """The module imports cleanly without triton and says why the backend is unavailable."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    spec = importlib.util.spec_from_file_location("condseg_ops_triton_probe", tk.__file__)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.TRITON_AVAILABLE is False and "triton is not installed" in probe.TRITON_UNAVAILABLE_REASON
    with pytest.raises(RuntimeError, match="triton backend is unavailable"):
        probe.contrast_aggregate_triton(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1, 1))


@interpreted
@pytest.mark.slow
def test_interpreted_opcheck():
    """Under the interpreter the op is a torch.library.custom_op with a fake kernel."""
    for case in (MAIN, SINGLE):
        check_opcheck(case)


def check_opcheck(case, backward=False):
    K, dil = case[5:7]
    value, fg, bg = (None if t is None else t.requires_grad_() for t in inputs_for(case))
    torch.library.opcheck(torch.ops.condseg_ops.contrast_aggregate_triton.default, (value, fg, bg, K, dil, 0.5))
    if backward:
        args = (torch.randn_like(value), value.detach(), fg.detach(), None if bg is None else bg.detach())
        torch.library.opcheck(torch.ops.condseg_ops.contrast_aggregate_triton_backward.default,
                              args + (K, dil, 0.5))


@interpreted
@pytest.mark.slow
@pytest.mark.parametrize("api", [False, True], ids=["direct", "public-api"])
def test_interpreted_torch_compile_fullgraph(api):
    check_compiled_matches_eager(api, backend="aot_eager")


def check_compiled_matches_eager(api, backend):
    value, fg, bg = inputs_for(MAIN)

    def fn(v, f, b):
        return run_triton(v * 2, f, b, 3, 1, 0.5, api=api).sin()

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    results = []
    for f in (fn, compiled):
        inputs = [t.detach().clone().requires_grad_() for t in (value, fg, bg)]
        out = f(*inputs)
        results.append([out] + list(torch.autograd.grad(out.sum(), inputs)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# (c) GPU only
# ------------------------------------------------------------------------------------------------
# float32 runs the CASES above and the benchmark shape below; half precision here and in
# test_matches_reference_half.
GPU_HALF_CASES = [
    pytest.param((2, 64, 17, 19, 4, 3, 1, True), torch.float16, id="k3-heads4-fp16"),
    pytest.param((2, 64, 17, 19, 4, 3, 1, True), torch.bfloat16, id="k3-heads4-bf16"),
    pytest.param((1, 48, 33, 31, 2, 5, 2, False), torch.bfloat16, id="k5-dil2-single-bf16"),
]


@compiled_gpu
@pytest.mark.parametrize("case,dtype", GPU_HALF_CASES)
def test_gpu_half_match_reference(case, dtype):
    check_against_reference(*inputs_for(case, dtype=dtype), case[5], case[6], 0.5)


@compiled_gpu
def test_gpu_benchmark_shape_matches_reference():
    """B=12, C=128, 128x128, 4 heads, K=3, dual softmax, float32 (the benchmark bar's shape)."""
    inputs = make_inputs(12, 128, 128, 128, 4, 3, True)
    check_against_reference(*inputs, 3, 1, 32 ** -0.5, ref_on_device=True, tol=(1e-4, 1e-4))


@compiled_gpu
@pytest.mark.parametrize("dual", [True, False], ids=["dual", "single"])
def test_gpu_gradcheck_float64(dual):
    inputs = [None if t is None else t.requires_grad_() for t in fp64_inputs(dual)]
    assert torch.autograd.gradcheck(lambda v, f, b: run_triton(v, f, b, 3, 2, 0.8), inputs, eps=1e-6, atol=1e-6,
                                    fast_mode=True)


@compiled_gpu
def test_gpu_deterministic():
    value, fg, bg = inputs_for(MAIN)
    grad = torch.randn_like(value)
    runs = []
    for _ in range(2):
        inputs = [t.detach().clone().requires_grad_() for t in (value, fg, bg)]
        out = run_triton(*inputs, 3, 1, 0.5)
        runs.append([out] + list(torch.autograd.grad(out, inputs, grad)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@compiled_gpu
@pytest.mark.parametrize("api", [False, True], ids=["direct", "public-api"])
def test_gpu_torch_compile_fullgraph(api):
    check_compiled_matches_eager(api, backend="inductor")


@compiled_gpu
@pytest.mark.parametrize("case", [MAIN, SINGLE], ids=["dual", "single"])
def test_gpu_opcheck(case):
    check_opcheck(case, backward=True)


# ------------------------------------------------------------------------------------------------
# (b) ahead-of-time compilation
# ------------------------------------------------------------------------------------------------
AOT_ARCHS = (89, 90)
# Every variant and autotune config (about 95 s of compiling per architecture, most of it the
# K = 7 weight kernel) for sm_90, the Hopper GPUs the benchmarks run on; sm_89 compiles every
# kernel in every dtype with its first config.
FULL_AOT_ARCHS = (90,)
KERNEL_CONFIGS = {"_mix_rows_kernel": "mix_rows", "_mix_kernel": "mix", "_weight_kernel": "weight",
                  "_mixed_apply_kernel": "mixed_apply", "_mixed_apply_rows_kernel": "mixed_apply_rows",
                  "_apply_kernel": "apply",
                  "_grad_weight_kernel": "grad_weight", "_softmax_bwd_kernel": "softmax_bwd"}
TL_DTYPES = {"fp32": "fp32", "fp16": "fp32", "bf16": "fp32", "fp64": "fp64"}  # input -> accumulator


def aot_specs(full=False):
    """(kernel name, runtime args {name: tl type or int}, constexprs, config) to compile.

    Ints are what a launch at the benchmark shape passes (B=12, C=128, 128x128, 4 heads, K=3); as
    at run time, a 1 becomes a constexpr and a multiple of 16 gets a divisibility hint. Default:
    every kernel in every dtype (its main variant, first autotune config). ``full``: every
    variant and autotune config, plus in float32 an odd shape (K=5, dilation 2, one head, odd
    sizes) and a K=7 one."""
    shapes = [dict(C=128, H=128, W=128, heads=4, Cg=32, dil=1, K=3),
              dict(C=9, H=7, W=5, heads=1, Cg=9, dil=2, K=5),
              dict(C=64, H=31, W=33, heads=2, Cg=32, dil=1, K=7)]
    specs = []
    for dt, acc in TL_DTYPES.items():
        for shape in shapes if full and dt == "fp32" else shapes[:1]:
            K = shape["K"]
            args = dict(C=shape["C"], H=shape["H"], W=shape["W"], HW=shape["H"] * shape["W"], heads=shape["heads"],
                        Cg=shape["Cg"], dil=shape["dil"])
            pick = lambda *names: {n: args[n] for n in names}  # noqa: E731
            k2p = 1 << (K * K - 1).bit_length()
            variants = (True, False) if full or dt == "fp32" else (True,)
            for dual in variants:
                flags = dict(K=K, K2P=max(16, k2p), DUAL=dual, FP64=acc == "fp64")
                mix_args = dict(A_fg="*" + dt, A_bg="*" + dt, Mt="*" + acc, **pick("HW", "heads"), scale="fp32")
                if K <= tk.ROWS_MAX_K:
                    rows_flags = dict(K=K, DUAL=dual, FP64=acc == "fp64")
                    specs.append(("_mix_rows_kernel", mix_args, rows_flags))
                    if dt == "fp32" and dual:  # torch.compile may pass the scale as an fp64 scalar
                        specs.append(("_mix_rows_kernel", dict(mix_args, scale="fp64"), rows_flags))
                specs.append(("_mix_kernel", mix_args, flags))
                specs.append(("_softmax_bwd_kernel",
                              dict(A_fg="*" + dt, A_bg="*" + dt, GW="*" + acc, GA_fg="*" + dt, GA_bg="*" + dt,
                                   **pick("H", "W", "HW", "heads", "dil"), scale="fp32"), flags))
            if dt in ("fp32", "fp64"):  # works on the accumulator dtype only
                specs.append(("_weight_kernel", dict(Mt="*" + acc, Wt="*" + acc, **pick("H", "W", "HW", "dil")),
                              dict(K=K)))
            for transposed in [not v for v in variants]:  # forward first
                specs.append(("_apply_kernel", dict(X="*" + dt, Wt="*" + acc, Out="*" + dt, **args),
                              dict(K=K, TRANSPOSED=transposed)))
            block_c = max(1, min(1 << (shape["Cg"] - 1).bit_length(), 64))
            if K <= tk.ROWS_MAX_K:  # the forward of every type
                specs.append(("_mixed_apply_rows_kernel", dict(X="*" + dt, Mt="*" + acc, Out="*" + dt, **args),
                              dict(K=K)))
            if dt in ("fp32", "fp64"):  # the forward of 4- and 8-byte types only
                specs.append(("_mixed_apply_kernel", dict(X="*" + dt, Mt="*" + acc, Out="*" + dt, **args),
                              dict(K=K, BLOCK_C=block_c)))
            for single in variants:
                specs.append(("_grad_weight_kernel", dict(G="*" + dt, V="*" + dt, GW="*" + acc, **args),
                              dict(K=K, BLOCK_C=block_c if single else 8, SINGLE_CB=single)))
    out = []
    for name, args, constexprs in specs:
        configs = tk.GPU_CONFIGS[KERNEL_CONFIGS[name]]
        for config in configs if full else configs[:1]:
            out.append((name, args, constexprs, config))
    return out


# The AOT driver speaks the ASTSource spellings of Triton 3.2 (torch 2.6's) to 3.9.
AOT_SUPPORTED = tk.TRITON_AVAILABLE and tk.TRITON_VERSION >= (3, 2)
needs_aot = pytest.mark.skipif(not AOT_SUPPORTED, reason=f"the AOT driver needs triton >= 3.2 "
                               f"(found {tk.TRITON_VERSION or tk.TRITON_UNAVAILABLE_REASON})")


def ast_source_triton_3_2(fn, signature, consts, attrs):
    """The same kernel source for Triton 3.2 (torch 2.6's), which keys constants by name, leaves
    constexprs out of the signature, and takes its hints as an AttrsDescriptor."""
    import triton
    from triton.backends.compiler import AttrsDescriptor

    names = list(fn.arg_names)
    hints = {i: 16 for (i,) in attrs}
    ones = [i for (i,) in consts if not fn.params[i].is_constexpr]  # int 1s: in the signature too
    hints.update({i: 1 for i in ones})
    types = {arg: ("i32" if i in ones else kind) for i, (arg, kind) in enumerate(signature.items())}
    signature = {arg: kind for arg, kind in types.items() if kind != "constexpr"}
    constants = {names[i]: value for (i,), value in consts.items()}
    return triton.compiler.ASTSource(fn=fn, signature=signature, constants=constants,
                                     attrs=AttrsDescriptor.from_hints(hints))


@functools.lru_cache(maxsize=None)
def kernel_stats():
    """tools/kernel_stats.py, loaded by path (tools/ is not a package). Not through conftest's
    load_tool: importing conftest sets TRITON_INTERPRET, which this AOT driver must not have."""
    spec = importlib.util.spec_from_file_location("kernel_stats", HERE.parents[1] / "tools" / "kernel_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def aot_compile(arch, full=False):
    """Compiles every spec for sm_<arch>; returns one record per kernel (with ptxas resource usage
    when cuobjdump is available). Robust to the ASTSource differences of triton 3.2 .. 3.9."""
    import triton
    from triton.backends.compiler import GPUTarget

    assert tk.TRITON_AVAILABLE and not tk.INTERPRET, "run without TRITON_INTERPRET"
    cuobjdump = kernel_stats().find_tool("cuobjdump")  # the toolkit's, else the copy triton ships
    target = GPUTarget("cuda", arch, 32)
    records = []
    for name, args, constexprs, config in aot_specs(full):
        fn = getattr(tk, name).fn  # the JITFunction under the autotuner
        arg_names = list(fn.arg_names)
        values = dict(args, **constexprs, **config.kwargs)
        signature, consts, attrs = {}, {}, {}
        for i, arg in enumerate(arg_names):
            value = values[arg]
            if arg in args and isinstance(value, int) and not isinstance(value, bool) and value != 1:
                signature[arg] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif arg in args and isinstance(value, str):
                signature[arg] = value
                if value.startswith("*"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:  # constexpr parameter, or an int 1 (specialised to a constexpr at run time)
                signature[arg] = "constexpr"
                consts[(i,)] = value
        if tk.TRITON_VERSION < (3, 3):
            src = ast_source_triton_3_2(fn, signature, consts, attrs)
        else:
            try:
                src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
            except TypeError:  # older spellings
                src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts)
        compiled = triton.compile(src, target=target, options={"num_warps": config.num_warps,
                                                               "num_stages": config.num_stages})
        record = dict(kernel=name, arch=arch, constexprs={k: str(v) for k, v in constexprs.items()},
                      config=str(config.kwargs), num_warps=config.num_warps, dtype=args[arg_names[0]])
        cubin = compiled.asm.get("cubin")
        if cubin and cuobjdump:
            path = Path(os.environ.get("TMPDIR", "/tmp")) / f"condseg_aot_{os.getpid()}.cubin"
            path.write_bytes(cubin)
            usage = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True).stdout
            # static SASS counts (instructions, FFMA, shuffles, ...), as tools/kernel_stats.py prints them
            (counts,) = kernel_stats().sass_counts(cuobjdump, path).values()
            record["sass"] = counts
            path.unlink()
            for field in usage.split():
                if ":" in field and field.split(":")[0] in ("REG", "STACK"):
                    record[field.split(":")[0].lower()] = int(field.split(":")[1])
        records.append(record)
    return records


def start_aot(arch, full=False):
    """The AOT driver for one architecture, in a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = Path(condseg_ops.__file__).resolve().parents[1]  # the condseg_ops under test
    env["PYTHONPATH"] = os.pathsep.join([str(package_root)] + [p for p in [env.get("PYTHONPATH")] if p])
    command = [sys.executable, str(HERE), "aot", str(arch)] + (["--full"] if full else [])
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_aot(process):
    stdout, stderr = process.communicate(timeout=3600)
    assert process.returncode == 0, stderr[-6000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", autouse=True)
def aot_processes(request):
    """The AOT compiles selected in this session start with the module's first test and run
    alongside the others (one process per architecture)."""
    processes = {}
    for item in request.session.items if AOT_SUPPORTED else []:
        if item.module is sys.modules[__name__] and item.originalname in AOT_TESTS:
            full = AOT_TESTS[item.originalname]
            for arch in FULL_AOT_ARCHS if full else AOT_ARCHS:
                if (arch, full) not in processes:
                    processes[(arch, full)] = start_aot(arch, full)
    yield lambda arch, full: processes[(arch, full)]
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


MAX_STACK_BYTES = 16


def check_records(records, arch):
    assert records and all(r["arch"] == arch for r in records)
    kernels = {r["kernel"] for r in records}
    assert kernels == {"_mix_kernel", "_weight_kernel", "_mixed_apply_kernel", "_apply_kernel",
                       "_grad_weight_kernel", "_softmax_bwd_kernel"} | (
                           {"_mix_rows_kernel", "_mixed_apply_rows_kernel"} if tk.ROWS_MAX_K else set())
    # No real register spills at K = 3 in the configurations the GPU autotuner picks from (fp64
    # excepted). A few bytes of stack frame come and go with the ptxas version (triton 3.6 on sm_89
    # gives _weight_kernel 8 bytes): only frames past MAX_STACK_BYTES count.
    spills = [r for r in records if r.get("stack", 0) > MAX_STACK_BYTES and r["constexprs"]["K"] == "3"
              and "fp64" not in r["dtype"]]
    assert not spills, json.dumps(spills, indent=1)


AOT_TESTS = {"test_aot_compile": False, "test_aot_compile_every_variant_and_config": True}


@needs_aot
@pytest.mark.parametrize("arch", AOT_ARCHS)
def test_aot_compile(arch, aot_processes):
    check_records(finish_aot(aot_processes(arch, False)), arch)


@needs_aot
@pytest.mark.slow
@pytest.mark.parametrize("arch", FULL_AOT_ARCHS)
def test_aot_compile_every_variant_and_config(arch, aot_processes):
    check_records(finish_aot(aot_processes(arch, True)), arch)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "aot":
    print(json.dumps(aot_compile(int(sys.argv[2]), "--full" in sys.argv)))
