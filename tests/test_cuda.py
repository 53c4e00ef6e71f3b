"""CUDA backend of condseg_ops.contrast_aggregate (issue 3). Every test needs a GPU and skips without one.

Two kernel families run on CUDA: the fused K = 3 / dilation 1 kernels (fp32, fp16, bf16) and the
generic kernels (every other case, fp64 included). CONDSEG_CUDA_GENERIC=1 forces the generic ones,
which lets the tests compare the two on the same inputs (and CONDSEG_CUDA_WORD_STAGING=1 the fused
kernels' older copies of the logits). On small grids the fused forward's weights come from the split
kernels, with the same bits; the tests run the fused ones unless they say otherwise
(CONDSEG_CUDA_SPLIT_FORWARD).
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import condseg_ops
from condseg_ops.reference import contrast_aggregate_reference
from conftest import requires_cuda

pytestmark = [requires_cuda, pytest.mark.gpu]

# Largest |got - expected| relative to max |expected|, for the output and for the gradients, against
# the float64 reference evaluated on the same (already rounded) inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (5e-3, 2e-2),
    torch.bfloat16: (3e-2, 6e-2),
}


@pytest.fixture(autouse=True)
def fused_forward(monkeypatch):
    # Every shape below is a small grid, which the automatic choice gives to the split kernels; the
    # tests are about the fused ones, except where they set CONDSEG_CUDA_SPLIT_FORWARD themselves.
    monkeypatch.setenv("CONDSEG_CUDA_SPLIT_FORWARD", "0")


def make_inputs(B, C, H, W, heads, K=3, dual=True, dtype=torch.float32, seed=0, logit_std=2.0, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    k2 = K * K
    value = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    fg = torch.randn(B, H, W, heads, k2, k2, generator=gen, dtype=torch.float64) * logit_std
    bg = torch.randn(B, H, W, heads, k2, k2, generator=gen, dtype=torch.float64) * logit_std if dual else None
    grad_out = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(value), cast(fg), cast(bg), cast(grad_out)


def run(fn, value, fg, bg, grad_out, **kwargs):
    """(output, grad_value, grad_fg, grad_bg) of fn(value, fg, bg, **kwargs) with upstream grad_out."""
    leaves = [t.detach().requires_grad_() for t in (value, fg, bg) if t is not None]  # keeps strides
    out = fn(*leaves, *(() if bg is not None else (None,)), **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return (out.detach(),) + tuple(grads) + ((None,) if bg is None else ())


def run_cuda(value, fg, bg, grad_out, kernel_size=3, dilation=1, scale=1.0):
    return run(condseg_ops.contrast_aggregate, value, fg, bg, grad_out, kernel_size=kernel_size,
               dilation=dilation, scale=scale, backend="cuda")


def run_reference(value, fg, bg, grad_out, kernel_size=3, dilation=1, scale=1.0):
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    return run(contrast_aggregate_reference, as64(value), as64(fg), as64(bg), as64(grad_out),
               kernel_size=kernel_size, dilation=dilation, scale=scale)


def rel_err(got, expected):
    """Largest error relative to the largest expected magnitude (absolute below 1: the logit
    gradients of K=1 are exactly 0 in exact arithmetic)."""
    expected = expected.double()
    return ((got.double() - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


def assert_close_all(got, expected, dtype, what=""):
    out_tol, grad_tol = TOLERANCES[dtype]
    names = ("output", "grad_value", "grad_attn_fg", "grad_attn_bg")
    for name, g, e, tol in zip(names, got, expected, (out_tol, grad_tol, grad_tol, grad_tol)):
        if e is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == e.shape, f"{what} {name}: {g.dtype} {tuple(g.shape)}"
        assert torch.isfinite(g).all(), f"{what} {name} has non-finite values"
        err = rel_err(g, e)
        assert err <= tol, f"{what} {name}: relative error {err:.3e} > {tol:.0e}"


def assert_same_bits(got, expected):
    """(output, grad_value, grad_attn_fg, grad_attn_bg) equal bit for bit (None where there is no bg)."""
    for name, a, b in zip(("output", "grad_value", "grad_attn_fg", "grad_attn_bg"), got, expected):
        assert (a is None and b is None) or torch.equal(a, b), name


def test_cuda_backend_is_built_and_available():
    assert "cuda" in condseg_ops.build_info()["backends"], condseg_ops.build_info()
    assert "cuda" in condseg_ops.available_backends("cuda")
    value, fg, bg, _ = make_inputs(1, 4, 5, 5, 2)
    assert condseg_ops.contrast_aggregate(value, fg, bg).device.type == "cuda"


@pytest.mark.parametrize("dual", [True, False])
@pytest.mark.parametrize("kernel_size, dilation", [(3, 1), (3, 2), (5, 1), (1, 1)])
def test_gradcheck_float64(kernel_size, dilation, dual):
    value, fg, bg, _ = make_inputs(1, 4, 4, 5, 2, K=kernel_size, dual=dual, dtype=torch.float64, logit_std=1.0)
    inputs = tuple(t.requires_grad_() for t in (value, fg, bg) if t is not None)

    def fn(*args):
        v, f = args[0], args[1]
        b = args[2] if dual else None
        return condseg_ops.contrast_aggregate(v, f, b, kernel_size=kernel_size, dilation=dilation, scale=0.7,
                                              backend="cuda")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("dual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_reference(dtype, dual):
    # 19 x 37 spans several tiles of the fused kernels with ragged edges; Cg = 8.
    value, fg, bg, grad_out = make_inputs(2, 24, 19, 37, 3, dual=dual, dtype=dtype)
    got = run_cuda(value, fg, bg, grad_out, scale=0.6)
    expected = run_reference(value, fg, bg, grad_out, scale=0.6)
    assert_close_all(got, expected, dtype, f"{dtype} dual={dual}")


@pytest.mark.parametrize("dual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_generic_kernels(dtype, dual, monkeypatch):
    value, fg, bg, grad_out = make_inputs(2, 20, 26, 70, 2, dual=dual, dtype=dtype, seed=3)
    fused = run_cuda(value, fg, bg, grad_out, scale=0.4)
    monkeypatch.setenv("CONDSEG_CUDA_GENERIC", "1")
    generic = run_cuda(value, fg, bg, grad_out, scale=0.4)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("output", "grad_value", "grad_attn_fg", "grad_attn_bg"), fused, generic):
        if b is not None:
            assert rel_err(a, b) <= tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dual", [True, False])
def test_vector_and_word_logit_staging_agree(dtype, dual, monkeypatch):
    # heads = 4: the fused kernels copy the logits in 16- or 8-byte granules; CONDSEG_CUDA_WORD_STAGING=1
    # makes them copy 4-byte words instead. The arithmetic is the same: equal bit for bit.
    value, fg, bg, grad_out = make_inputs(2, 32, 26, 70, 4, dual=dual, dtype=dtype, seed=9)
    vectors = run_cuda(value, fg, bg, grad_out, scale=0.4)
    monkeypatch.setenv("CONDSEG_CUDA_WORD_STAGING", "1")
    words = run_cuda(value, fg, bg, grad_out, scale=0.4)
    assert_same_bits(vectors, words)
    assert_close_all(vectors, run_reference(value, fg, bg, grad_out, scale=0.4), dtype, "vector staging")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, C, H, W, heads, dual", [
    (1, 128, 64, 64, 4, True),   # ConDSeg's 64x64 level at batch 1
    (2, 24, 19, 37, 3, True),
    (1, 72, 13, 16, 2, False),
    (1, 2, 1, 1, 1, True),
])
def test_split_forward_gives_the_fused_bits(dtype, B, C, H, W, heads, dual, monkeypatch):
    # The split kernels do the fused kernels' float operations in the same order: equal bit for bit,
    # the gradients included (the backward's weights come from them too).
    value, fg, bg, grad_out = make_inputs(B, C, H, W, heads, dual=dual, dtype=dtype, seed=H + W)
    fused = run_cuda(value, fg, bg, grad_out, scale=0.45)
    monkeypatch.setenv("CONDSEG_CUDA_SPLIT_FORWARD", "1")
    split = run_cuda(value, fg, bg, grad_out, scale=0.45)
    assert_same_bits(split, fused)
    assert_close_all(split, run_reference(value, fg, bg, grad_out, scale=0.45), dtype, "split")


def forward_kernel_names(value, fg, bg):
    """The names of the CUDA kernels one forward call runs, joined by spaces."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        condseg_ops.contrast_aggregate(value, fg, bg, backend="cuda")
        torch.cuda.synchronize()
    return " ".join(event.key for event in prof.key_averages())


def test_split_forward_runs_where_the_fused_grid_is_small(monkeypatch):
    # Automatic choice: the split kernels where the fused forward has fewer blocks than two per SM.
    monkeypatch.delenv("CONDSEG_CUDA_SPLIT_FORWARD")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    small = make_inputs(1, 128, 64, 64, 4)[:3]  # 6 x 2 tiles per head: 48 blocks
    names = forward_kernel_names(*small)
    assert "mix_rows_kernel" in names and "gather_kernel" in names and "weights_kernel" not in names, names
    bands = -(-2 * sms // 8)  # rows of 12 x 32 tiles, 8 blocks each (2 tiles, 4 heads): 2 per SM in all
    large = make_inputs(1, 128, 12 * bands, 64, 4)[:3]
    names = forward_kernel_names(*large)
    assert "weights_kernel" in names and "mix_rows_kernel" not in names, names


@pytest.mark.parametrize("scale", [-0.7, 0.0])
def test_scales_other_than_positive(scale):
    # The fused kernels take scale > 0 (their softmaxes scale the row maximum); others run the
    # generic kernels, with the same results as the reference.
    inputs = make_inputs(1, 8, 9, 12, 4, seed=14)
    got = run_cuda(*inputs, scale=scale)
    assert_close_all(got, run_reference(*inputs, scale=scale), torch.float32, f"scale={scale}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel_size, dilation", [(3, 1), (5, 2)])
def test_matches_compiled_cpu(dtype, kernel_size, dilation):
    if "cpu" not in condseg_ops.available_backends("cpu"):
        pytest.skip("compiled CPU backend not built")
    value, fg, bg, grad_out = make_inputs(1, 12, 11, 14, 3, K=kernel_size, dtype=dtype, seed=5)
    got = run_cuda(value, fg, bg, grad_out, kernel_size=kernel_size, dilation=dilation, scale=0.8)
    cpu = run(condseg_ops.contrast_aggregate, *(t.cpu() for t in (value, fg, bg, grad_out)),
              kernel_size=kernel_size, dilation=dilation, scale=0.8, backend="cpu")
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    for name, a, b in zip(("output", "grad_value", "grad_attn_fg", "grad_attn_bg"), got, cpu):
        assert rel_err(a.cpu(), b) <= tol, name


AWKWARD = [
    # (B, C, H, W, heads, K, dilation, dual)
    (1, 2, 1, 1, 1, 3, 1, True),
    (2, 6, 3, 5, 2, 3, 1, True),
    (1, 15, 7, 7, 3, 3, 1, False),     # Cg = 5
    (1, 21, 13, 13, 7, 3, 1, True),    # Cg = 3, 7 heads
    (1, 8, 33, 33, 8, 3, 1, True),     # 8 heads, Cg = 1
    (1, 10, 127, 127, 2, 3, 1, True),  # ragged tiles in both directions
    (1, 12, 13, 9, 4, 1, 1, True),
    (1, 6, 9, 11, 3, 5, 1, True),
    (1, 4, 8, 7, 1, 7, 1, False),
    (1, 9, 12, 10, 3, 3, 2, True),
    (1, 4, 2, 9, 2, 5, 2, True),       # image smaller than the window
    (3, 5, 4, 6, 5, 3, 1, False),      # Cg = 1, 5 heads
]


@pytest.mark.parametrize("B, C, H, W, heads, K, dilation, dual", AWKWARD)
def test_awkward_sizes(B, C, H, W, heads, K, dilation, dual):
    for dtype in (torch.float32, torch.float64):
        value, fg, bg, grad_out = make_inputs(B, C, H, W, heads, K=K, dual=dual, dtype=dtype, seed=H * W)
        got = run_cuda(value, fg, bg, grad_out, kernel_size=K, dilation=dilation, scale=0.9)
        expected = run_reference(value, fg, bg, grad_out, kernel_size=K, dilation=dilation, scale=0.9)
        assert_close_all(got, expected, dtype, f"{dtype} {(B, C, H, W, heads, K, dilation, dual)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(dtype):
    value, fg, bg, grad_out = make_inputs(2, 8, 9, 12, 2, dtype=dtype, seed=11)
    expected = run_cuda(value, fg, bg, grad_out)
    # channels-last value, attn built as a transposed view, a sliced (offset, strided) grad
    value_cl = value.contiguous(memory_format=torch.channels_last)
    fg_t = fg.transpose(1, 2).contiguous().transpose(1, 2)
    bg_s = torch.stack([bg, torch.zeros_like(bg)], dim=-1)[..., 0]
    grad_s = torch.cat([grad_out, grad_out], dim=1)[:, 8:]
    assert not (value_cl.is_contiguous() or fg_t.is_contiguous() or bg_s.is_contiguous())
    assert_same_bits(run_cuda(value_cl, fg_t, bg_s, grad_s), expected)


def test_odd_storage_offsets_half():
    # 2-byte tensors whose data pointer is not 4-byte aligned (staged through 4-byte words)
    value, fg, bg, grad_out = make_inputs(1, 6, 14, 35, 2, dtype=torch.float16, seed=4)

    def shifted(t):
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)

    assert_same_bits(run_cuda(*(shifted(t) for t in (value, fg, bg, grad_out))), run_cuda(value, fg, bg, grad_out))


@pytest.mark.parametrize("dtype, kernel_size", [(torch.float32, 3), (torch.bfloat16, 3), (torch.float64, 5)])
def test_backward_is_bitwise_deterministic(dtype, kernel_size):
    value, fg, bg, grad_out = make_inputs(2, 16, 23, 41, 4, K=kernel_size, dtype=dtype, seed=9)
    first = run_cuda(value, fg, bg, grad_out, kernel_size=kernel_size)
    for _ in range(2):
        assert_same_bits(run_cuda(value, fg, bg, grad_out, kernel_size=kernel_size), first)


def test_huge_logits_stay_finite():
    value, fg, bg, grad_out = make_inputs(1, 8, 10, 40, 2, logit_std=1.0)
    fg, bg = fg.sign() * 1e4, -bg.sign() * 1e4
    for dtype in (torch.float32, torch.bfloat16):
        got = run_cuda(*(t.to(dtype) for t in (value, fg, bg, grad_out)))
        for t in got:
            assert torch.isfinite(t).all()
    expected = run_reference(value, fg, bg, grad_out)
    assert rel_err(run_cuda(value, fg, bg, grad_out)[0], expected[0]) <= 1e-5


def test_empty_batch_and_channels():
    for B, C in ((0, 4), (2, 0)):
        value = torch.randn(B, C, 5, 6, device="cuda", requires_grad=True)
        fg = torch.randn(B, 5, 6, 2, 9, 9, device="cuda", requires_grad=True)
        out = condseg_ops.contrast_aggregate(value, fg, fg.detach(), backend="cuda")
        assert out.shape == value.shape
        out.sum().backward()
        assert value.grad.shape == value.shape and fg.grad.shape == fg.shape


def test_mixed_devices_are_rejected():
    value, fg, bg, _ = make_inputs(1, 4, 5, 5, 2)
    with pytest.raises((ValueError, RuntimeError), match="attn_fg"):
        condseg_ops.contrast_aggregate(value, fg.cpu(), bg, backend="cuda")


@pytest.mark.parametrize("dual", [True, False])
def test_opcheck(dual):
    value, fg, bg, _ = make_inputs(1, 6, 5, 7, 2, dual=dual)
    args = (value.requires_grad_(), fg.requires_grad_(), bg.requires_grad_() if dual else None, 3, 1, 0.5)
    torch.library.opcheck(torch.ops.condseg_ops.contrast_aggregate.default, args)
    value, fg, bg, grad_out = make_inputs(1, 6, 5, 7, 2, dual=dual)
    torch.library.opcheck(torch.ops.condseg_ops.contrast_aggregate_backward.default,
                          (grad_out, value, fg, bg, 3, 1, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_fullgraph(dtype):
    torch._dynamo.reset()
    value, fg, bg, grad_out = make_inputs(2, 8, 12, 20, 2, dtype=dtype, seed=2)

    def layer(v, f, b):
        return condseg_ops.contrast_aggregate(v * 2, f, b, scale=0.5, backend="cuda").relu()

    compiled = torch.compile(layer, fullgraph=True)
    got = run(compiled, value, fg, bg, grad_out)
    expected = run(layer, value, fg, bg, grad_out)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and rel_err(a, b) <= tol


def test_runs_on_the_current_stream():
    value, fg, bg, grad_out = make_inputs(1, 16, 40, 64, 4, seed=6)
    expected = run_cuda(value, fg, bg, grad_out)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy: a launch on another stream would race
        doubled = value * 2
        got = run_cuda(doubled, fg, bg, grad_out)
    torch.cuda.current_stream().wait_stream(side)
    # linear in value: output and grad_attn double, grad_value is unchanged
    assert torch.allclose(got[0], 2 * expected[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], expected[1])
    assert torch.allclose(got[2], 2 * expected[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_policy(autocast_dtype):
    """Under autocast the op casts value and logits to the autocast dtype and returns that dtype
    (fp32 accumulation inside); gradients reach the fp32 leaves in fp32."""
    value, fg, bg, grad_out = make_inputs(1, 8, 9, 13, 2, seed=8)
    leaves = [t.clone().requires_grad_() for t in (value, fg, bg)]
    with torch.autocast("cuda", dtype=autocast_dtype):
        out = condseg_ops.contrast_aggregate(*leaves, scale=0.5, backend="cuda")
    assert out.dtype == autocast_dtype
    out.backward(grad_out.to(autocast_dtype))
    assert all(leaf.grad is not None and leaf.grad.dtype == torch.float32 for leaf in leaves)
    expected = run_reference(*(t.to(autocast_dtype) for t in (value, fg, bg, grad_out)), scale=0.5)
    assert rel_err(out.detach(), expected[0]) <= TOLERANCES[autocast_dtype][0]
    assert rel_err(leaves[2].grad, expected[3]) <= TOLERANCES[autocast_dtype][1]


@pytest.mark.slow
def test_tensors_past_int32_elements():
    """attn with more than 2**31 elements: compare the last rows against a cropped call."""
    B, C, H, W, heads = 1, 4, 2048, 1700, 8  # attn_fg: 2048*1700*8*81 = 2.26e9 elements (fp16)
    need = 7 * B * H * W * heads * 81 * 2 + (1 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    value = torch.randn(B, C, H, W, device="cuda", dtype=torch.float16, generator=gen)
    fg = torch.randn(B, H, W, heads, 9, 9, device="cuda", dtype=torch.float16, generator=gen)
    bg = torch.randn(B, H, W, heads, 9, 9, device="cuda", dtype=torch.float16, generator=gen)
    grad_out = torch.randn(B, C, H, W, device="cuda", dtype=torch.float16, generator=gen)
    assert fg.numel() > 2**31
    full = torch.ops.condseg_ops.contrast_aggregate(value, fg, bg, 3, 1, 1.0)
    full_grads = torch.ops.condseg_ops.contrast_aggregate_backward(grad_out, value, fg, bg, 3, 1, 1.0)
    crop = slice(H - 16, H)
    part = torch.ops.condseg_ops.contrast_aggregate(value[:, :, crop], fg[:, crop], bg[:, crop], 3, 1, 1.0)
    part_grads = torch.ops.condseg_ops.contrast_aggregate_backward(grad_out[:, :, crop], value[:, :, crop],
                                                                  fg[:, crop], bg[:, crop], 3, 1, 1.0)
    keep = slice(-8, None)  # rows far enough from the crop edge to see the same neighbourhood
    assert torch.equal(full[:, :, keep], part[:, :, keep])
    assert torch.equal(full_grads[0][:, :, keep], part_grads[0][:, :, keep])
    assert torch.equal(full_grads[1][:, keep], part_grads[1][:, keep])
    assert torch.equal(full_grads[2][:, keep], part_grads[2][:, keep])
