"""The public op: input checks, autocast policy, backend dispatch, fake and autograd registration.

The compiled kernels are real custom ops (``torch.ops.condseg_ops.contrast_aggregate`` and its
``_backward``, schema in csrc/contrast_aggregate.cpp); this module registers their fake (meta)
implementations and autograd formula so torch.compile and opcheck see them as ordinary ops.
"""
import numbers
import operator

import torch

from . import backends
from .reference import contrast_aggregate_reference, reference_vjp


def _shape(t):
    return tuple(t.shape)


def as_int(where, name, number, minimum=1, odd=False):
    """``number`` as a Python int (NumPy and other integer types too, bool not), or a ValueError
    naming ``name`` when it is not an integer >= minimum (and odd, with ``odd``)."""
    try:
        checked = None if isinstance(number, bool) else operator.index(number)
    except TypeError:
        checked = None
    if checked is None or checked < minimum or (odd and checked % 2 == 0):
        kind = "an odd integer" if odd else "an integer"
        raise ValueError(f"{where}: {name} must be {kind} >= {minimum}, got {number!r}")
    return checked


def as_scale(scale):
    """``scale`` as a float; a tensor that needs its gradient is refused (it would get none)."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or (scale.requires_grad and torch.is_grad_enabled()):
            raise ValueError("contrast_aggregate: scale must be a constant number (a learnable temperature "
                             f"gets no gradient here: multiply the logits by it instead), got {scale!r}")
        return float(scale)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"contrast_aggregate: scale must be a real number, got {scale!r}")
    return float(scale)


DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_inputs(value, attn_fg, attn_bg, kernel_size, dilation):
    """Raises ValueError (naming the argument and the expected shape) for any invalid input;
    returns kernel_size and dilation as Python ints."""
    kernel_size = as_int("contrast_aggregate", "kernel_size", kernel_size, odd=True)
    dilation = as_int("contrast_aggregate", "dilation", dilation)
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        got = _shape(value) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"contrast_aggregate: value must have shape (B, C, H, W), got {got}")
    if value.dtype not in DTYPES:
        raise ValueError("contrast_aggregate: value must be a floating-point tensor of dtype float32, float64, "
                         f"float16 or bfloat16, got {value.dtype}")
    B, C, H, W = value.shape
    k2 = kernel_size * kernel_size
    if not isinstance(attn_fg, torch.Tensor) or attn_fg.dim() != 6:
        got = _shape(attn_fg) if isinstance(attn_fg, torch.Tensor) else type(attn_fg).__name__
        raise ValueError(f"contrast_aggregate: attn_fg must have shape (B, H, W, heads, K*K, K*K) = "
                         f"({B}, {H}, {W}, heads, {k2}, {k2}), got {got}")
    heads = attn_fg.shape[3]
    if heads < 1 or C % heads != 0:
        raise ValueError(f"contrast_aggregate: value has C={C} channels, not divisible by heads={heads} "
                         "(read from attn_fg dim 3)")
    expected = (B, H, W, heads, k2, k2)
    for name, attn in (("attn_fg", attn_fg), ("attn_bg", attn_bg)):
        if attn is None:
            continue
        if not isinstance(attn, torch.Tensor) or _shape(attn) != expected:
            got = _shape(attn) if isinstance(attn, torch.Tensor) else type(attn).__name__
            raise ValueError(f"contrast_aggregate: {name} must have shape {expected} (B, H, W, heads, K*K, "
                             f"K*K) for value {_shape(value)} and kernel_size={kernel_size}, got {got}")
        if attn.dtype != value.dtype:
            raise ValueError(f"contrast_aggregate: {name} has dtype {attn.dtype} but value has {value.dtype}")
        if attn.device != value.device:
            raise ValueError(f"contrast_aggregate: {name} is on {attn.device} but value is on {value.device}")
    return kernel_size, dilation


def _autocast(value, attn_fg, attn_bg):
    """Autocast policy: the op counts as a low-precision op (like matmul). Under autocast its
    floating-point inputs other than float64 are cast to the autocast dtype (float64 stays, as
    autocast leaves it for matmul); kernels still accumulate in float32."""
    if not isinstance(value, torch.Tensor):  # check_inputs names the bad argument
        return value, attn_fg, attn_bg
    device_type = value.device.type
    if device_type not in ("cpu", "cuda", "xpu") or not torch.is_autocast_enabled(device_type):
        return value, attn_fg, attn_bg
    dtype = torch.get_autocast_dtype(device_type)
    cast = [t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(dtype)
            for t in (value, attn_fg, attn_bg)]
    return tuple(cast)


def contrast_aggregate(value, attn_fg, attn_bg=None, kernel_size=3, dilation=1, scale=1.0, backend=None):
    """Local K x K dual-softmax contrast-driven aggregation (ConDSeg Eq. 11-14).

    value (B, C, H, W); attn_fg, attn_bg (B, H, W, heads, K*K, K*K) logits. For every pixel q and
    head g: Y_q = softmax(scale*attn_fg) @ softmax(scale*attn_bg) @ V_q over the K x K window of q
    (zero padded), then Y_q is folded back: out[q + offset(p)] += Y_q[p]. ``attn_bg=None`` is the
    single-softmax (outlook) form. ``backend`` forces "reference", "cpu", "cuda" or "triton".
    Returns a tensor shaped like value, in its dtype, on its device.
    """
    value, attn_fg, attn_bg = _autocast(value, attn_fg, attn_bg)
    kernel_size, dilation = check_inputs(value, attn_fg, attn_bg, kernel_size, dilation)
    scale = as_scale(scale)
    name = backends.select_backend(value.device.type, backend)
    if name == "reference":
        return contrast_aggregate_reference(value, attn_fg, attn_bg, kernel_size, dilation, scale)
    if name == "triton":
        # The op itself (registered when _select imported the Triton module), not a Python
        # wrapper: torch.compile traces it without a graph break.
        return torch.ops.condseg_ops.contrast_aggregate_triton(value, attn_fg, attn_bg, kernel_size, dilation, scale)
    return torch.ops.condseg_ops.contrast_aggregate(value, attn_fg, attn_bg, kernel_size, dilation, scale)


def _register_compiled_op():
    """Fake implementations and autograd of the C++ ops (only when the extension is built)."""

    @torch.library.register_fake("condseg_ops::contrast_aggregate")
    def _(value, attn_fg, attn_bg, kernel_size, dilation, scale):
        check_inputs(value, attn_fg, attn_bg, kernel_size, dilation)
        return value.new_empty(value.shape)

    @torch.library.register_fake("condseg_ops::contrast_aggregate_backward")
    def _(grad_out, value, attn_fg, attn_bg, kernel_size, dilation, scale):
        grad_bg = attn_bg.new_empty(attn_bg.shape) if attn_bg is not None else value.new_empty(0)
        return value.new_empty(value.shape), attn_fg.new_empty(attn_fg.shape), grad_bg

    def setup_context(ctx, inputs, output):
        value, attn_fg, attn_bg, kernel_size, dilation, scale = inputs
        ctx.save_for_backward(value, attn_fg, attn_bg)
        ctx.params = (kernel_size, dilation, scale)
        ctx.has_bg = attn_bg is not None

    def backward(ctx, grad_out):
        value, attn_fg, attn_bg = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the kernels' backward is not differentiable
            grad_value, grad_fg, grad_bg = reference_vjp(grad_out, value, attn_fg, attn_bg, *ctx.params)
            return grad_value, grad_fg, grad_bg, None, None, None
        grad_value, grad_fg, grad_bg = torch.ops.condseg_ops.contrast_aggregate_backward(
            grad_out, value, attn_fg, attn_bg, *ctx.params)
        return grad_value, grad_fg, grad_bg if ctx.has_bg else None, None, None, None

    torch.library.register_autograd("condseg_ops::contrast_aggregate", backward, setup_context=setup_context)


if backends.COMPILED is not None:
    _register_compiled_op()
