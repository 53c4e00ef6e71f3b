"""contrast_aggregate: semantics, compiled CPU kernels against the reference, gradients, errors."""
import pytest
import torch

import condseg_ops
from condseg.engine.runtime import flushing_denormals
from condseg_ops import contrast_aggregate, contrast_aggregate_reference
from op_cases import SMALL_CASES, case_id, grads, make_inputs

CPU_BACKENDS = ["reference", "cpu"]


def test_compiled_extension_is_built():
    # CI must fail, not skip, when the C++ extension did not build.
    info = condseg_ops.build_info()
    assert info is not None, "condseg_ops._C is missing: build with `pip install --no-build-isolation .`"
    assert "cpu" in info["backends"] and info["torch_version"].split(".")[:2] == torch.__version__.split(".")[:2]
    assert "cpu" in condseg_ops.available_backends("cpu")


# --- hand-computed cases: 2x2 image, K=3, one channel, one head -------------------------------

def _two_by_two():
    value = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).view(1, 1, 2, 2)
    return value, torch.zeros(1, 2, 2, 1, 9, 9, dtype=torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_computed_uniform_weights(backend):
    # Zero logits: both softmaxes are uniform (1/9), so each window's output is (sum of its
    # in-image values) / 9 = 10/9 in every slot; each pixel of a 2x2 image is covered by the 4
    # windows centred on the 4 pixels: out = 4 * 10/9 everywhere.
    value, zeros = _two_by_two()
    out = contrast_aggregate(value, zeros, zeros.clone(), backend=backend)
    torch.testing.assert_close(out, torch.full_like(value, 40 / 9))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_computed_identity_and_centre(backend):
    value, zeros = _two_by_two()
    eye = torch.eye(9, dtype=torch.float64) * 1e4  # softmax = identity: Y_q[p] = V[q + off(p)]
    identity = zeros + eye
    # Folding V[q + off(p)] back to q + off(p): every pixel receives its own value once per
    # covering window (4 of them).
    torch.testing.assert_close(contrast_aggregate(value, identity, backend=backend), 4 * value)
    centre = zeros.clone()
    centre[..., 4] = 1e4  # every destination slot takes the window centre: Y_q[p] = V[q]
    expected = torch.full_like(value, 10.0)  # each pixel sums V over its 3x3 neighbourhood = all 4
    torch.testing.assert_close(contrast_aggregate(value, centre, backend=backend), expected)
    # Dual form: P_fg = centre picks slot 4 of P_bg @ V, and P_bg = identity keeps V[q].
    torch.testing.assert_close(contrast_aggregate(value, centre, identity, backend=backend), expected)


# --- compiled CPU against the reference ---------------------------------------------------------

# The CPU kernels specialise K = 1, 3, 5, 7 at compile time and take any other K at run time:
# K = 7 and K = 9 (dilation 2) cover both paths beyond the shared grid. The last case has 1768
# (pixel, head) pairs: a partial last group of 16 and several parallel chunks per pass.
CPU_EXTRA_CASES = [(1, 4, 9, 8, 2, 7, 1, True), (1, 2, 5, 6, 1, 9, 2, True), (1, 3, 4, 4, 1, 9, 1, False),
                   (2, 8, 17, 13, 4, 3, 1, True)]


@pytest.mark.parametrize("case", SMALL_CASES + CPU_EXTRA_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matches_reference(case, dtype):
    B, C, H, W, heads, K, dil, dual = case
    inputs = make_inputs(B, C, H, W, heads, K, dual, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(B, C, H, W, dtype=dtype, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = grads(
        lambda *x: contrast_aggregate_reference(*x, K, dil, 0.7), inputs, grad_out)
    out, got_grads = grads(lambda *x: contrast_aggregate(*x, K, dil, 0.7, backend="cpu"), inputs, grad_out)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, expected, **tol)
    for got, want in zip(got_grads, expected_grads):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, **tol)


def test_non_contiguous_inputs():
    B, C, H, W, heads, K = 2, 8, 6, 5, 2, 3
    value = torch.randn(B, H, W, C).permute(0, 3, 1, 2)  # channels-last view
    attn_fg = torch.randn(B, H, W, heads, K * K, K * K).transpose(-1, -2)
    attn_bg = torch.randn(W, H, B, heads, K * K, K * K).permute(2, 1, 0, 3, 4, 5)
    assert not (value.is_contiguous() or attn_fg.is_contiguous() or attn_bg.is_contiguous())
    inputs = [t.requires_grad_() for t in (value, attn_fg, attn_bg)]
    grad_out = torch.randn(B, C, H, W)
    expected, expected_grads = grads(
        lambda *x: contrast_aggregate_reference(*[t.contiguous() for t in x], K, 1, 0.5), inputs, grad_out)
    out, got_grads = grads(lambda *x: contrast_aggregate(*x, K, 1, 0.5, backend="cpu"), inputs,
                           grad_out.transpose(2, 3).contiguous().transpose(2, 3))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_huge_logits_give_no_nan(backend):
    inputs = make_inputs(1, 4, 5, 5, 2, 3, dual=True, logit_scale=1e4, requires_grad=True)
    out, got = grads(lambda *x: contrast_aggregate(*x, backend=backend), inputs, torch.ones(1, 4, 5, 5))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in got)
    if backend == "cpu":
        expected = contrast_aggregate_reference(*inputs)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_cpu_sharp_attention_matches_reference_and_restores_denormals():
    # Sharp logits make products of tiny probabilities denormal; the CPU kernels flush those to
    # zero on their own threads (for speed) and must give the reference's result and leave the
    # caller's floating-point mode as it was.
    inputs = make_inputs(2, 8, 6, 7, 2, 3, dual=True, logit_scale=60.0, requires_grad=True)
    grad_out = torch.randn(2, 8, 6, 7, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = grads(contrast_aggregate_reference, inputs, grad_out)
    torch.set_flush_denormal(False)  # PyTorch's default; the setting has no getter
    try:
        out, got_grads = grads(lambda *x: contrast_aggregate(*x, backend="cpu"), inputs, grad_out)
        assert not flushing_denormals(), "the op left denormals flushed on the calling thread"
    finally:
        torch.set_flush_denormal(False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_cpu_low_precision_accumulates_in_float32(dtype, tol):
    value, attn_fg, attn_bg = make_inputs(2, 8, 7, 6, 2, 3, dtype=dtype)
    out = contrast_aggregate(value, attn_fg, attn_bg, backend="cpu")
    assert out.dtype == dtype
    expected = contrast_aggregate_reference(value.float(), attn_fg.float(), attn_bg.float())
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


# --- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", SMALL_CASES, ids=case_id)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(case, backend):
    B, C, H, W, heads, K, dil, dual = case
    inputs = [t for t in make_inputs(B, C, H, W, heads, K, dual, dtype=torch.float64, requires_grad=True)
              if t is not None]

    def fn(*x):
        return contrast_aggregate(x[0], x[1], x[2] if dual else None, K, dil, 0.8, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("dual", [True, False])
def test_second_order_gradients(dual):
    # The compiled backward is not differentiable itself; create_graph=True must still give the
    # reference's higher-order gradients (it once gave silent zeros).
    inputs = [t for t in make_inputs(1, 4, 4, 5, 2, 3, dual, dtype=torch.float64, requires_grad=True)
              if t is not None]

    def fn(*x):
        return contrast_aggregate(x[0], x[1], x[2] if dual else None, 3, 1, 0.8, backend="cpu")

    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def test_first_order_backward_runs_the_compiled_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(condseg_ops._ops, "reference_vjp", lambda *a: calls.append(a))
    value, attn_fg, attn_bg = make_inputs(1, 4, 5, 5, 2, 3, requires_grad=True)
    contrast_aggregate(value, attn_fg, attn_bg, backend="cpu").sum().backward()
    assert not calls and value.grad is not None and attn_bg.grad is not None


def test_backward_is_deterministic():
    inputs = make_inputs(2, 8, 9, 9, 2, 3, requires_grad=True)
    grad_out = torch.randn(2, 8, 9, 9)
    first = grads(lambda *x: contrast_aggregate(*x, backend="cpu"), inputs, grad_out)[1]
    second = grads(lambda *x: contrast_aggregate(*x, backend="cpu"), inputs, grad_out)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    value, attn_fg, attn_bg = make_inputs(0, 4, 5, 5, 2, 3, requires_grad=True)
    out = contrast_aggregate(value, attn_fg, attn_bg, backend=backend)
    assert out.shape == (0, 4, 5, 5)
    out.sum().backward()
    for t in (value, attn_fg, attn_bg):  # every input gets its (empty) gradient
        assert t.grad is not None and t.grad.shape == t.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_channels_give_zero_logit_gradients(backend):
    """No channels: the output is empty, but the logits exist and their gradient is zero."""
    _, attn_fg, attn_bg = make_inputs(1, 4, 3, 3, 2, 3, requires_grad=True)
    value = torch.zeros(1, 0, 3, 3, requires_grad=True)
    attn_fg, attn_bg = (t.detach()[:, :, :, :1].requires_grad_() for t in (attn_fg, attn_bg))
    grads = torch.autograd.grad(contrast_aggregate(value, attn_fg, attn_bg, backend=backend).sum(),
                                (value, attn_fg, attn_bg))
    assert grads[0].shape == (1, 0, 3, 3)
    for grad, attn in zip(grads[1:], (attn_fg, attn_bg)):
        assert torch.equal(grad, torch.zeros_like(attn))


# --- bad input ---------------------------------------------------------------------------------------

def _bad_calls():
    v, fg, bg = make_inputs(1, 8, 5, 5, 2, 3)
    return [
        ("value", dict(value=v[0])),
        ("value", dict(value=[[1.0]])),
        ("heads", dict(value=torch.randn(1, 7, 5, 5))),
        ("attn_fg", dict(attn_fg=fg[..., :4])),
        ("attn_fg", dict(attn_fg=fg[0])),
        ("attn_bg", dict(attn_bg=bg[:, :4])),
        ("kernel_size", dict(kernel_size=4)),
        ("kernel_size", dict(kernel_size=0)),
        ("dilation", dict(dilation=0)),
        ("kernel_size", dict(kernel_size=True)),
        ("kernel_size", dict(kernel_size=3.0)),
        ("scale", dict(scale=None)),
        ("scale", dict(scale=torch.tensor(0.5, requires_grad=True))),
        ("attn_fg", dict(attn_fg=fg.double())),
        ("attn_bg", dict(attn_bg=bg.half())),
        ("attn_bg", dict(attn_bg=bg.to("meta"))),
        ("floating-point", dict(value=v.long(), attn_fg=fg.long(), attn_bg=bg.long())),
        ("value must be .*float32, float64, float16 or bfloat16",  # float8 is floating point, but no kernel has it
         dict(value=v.to(torch.float8_e4m3fn), attn_fg=fg.to(torch.float8_e4m3fn), attn_bg=bg.to(torch.float8_e4m3fn))),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_names_the_argument(backend, index):
    v, fg, bg = make_inputs(1, 8, 5, 5, 2, 3)
    name, overrides = _bad_calls()[index]
    kwargs = dict(value=v, attn_fg=fg, attn_bg=bg, kernel_size=3, dilation=1, scale=1.0)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=name):
        contrast_aggregate(**kwargs, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_numpy_integers_and_constant_tensors_are_accepted(backend):
    np = pytest.importorskip("numpy")
    v, fg, bg = make_inputs(1, 4, 5, 5, 2, 3)
    expected = contrast_aggregate_reference(v, fg, bg, 3, 2, 0.5)
    got = contrast_aggregate(v, fg, bg, np.int64(3), np.int32(2), torch.tensor(0.5), backend=backend)
    torch.testing.assert_close(got, expected)
    with torch.no_grad():  # a learnable temperature is fine where no gradient is wanted
        got = contrast_aggregate(v, fg, bg, 3, 2, torch.nn.Parameter(torch.tensor(0.5)), backend=backend)
    torch.testing.assert_close(got, expected)


def test_compiled_op_checks_its_inputs_too():
    # Called directly (as C++ deployments do), the op validates in C++.
    v, fg, bg = make_inputs(1, 8, 5, 5, 2, 3)
    with pytest.raises(RuntimeError, match="attn_bg must have shape"):
        torch.ops.condseg_ops.contrast_aggregate(v, fg, bg[:, :, :4], 3, 1, 1.0)
    with pytest.raises(RuntimeError, match="kernel_size must be an odd"):
        torch.ops.condseg_ops.contrast_aggregate(v, fg, bg, 2, 1, 1.0)
