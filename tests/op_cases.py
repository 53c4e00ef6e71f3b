"""Shared inputs for the op tests: random problems and the small-shape grid of DESIGN.md section 6."""
import torch

# (B, C, H, W, heads, K, dilation, dual): K 1/3/5, dilation 2, H or W < K, odd sizes,
# heads 1..4, Cg not a power of two, single-softmax form.
SMALL_CASES = [
    (1, 4, 5, 6, 2, 3, 1, True),
    (2, 6, 4, 5, 2, 3, 1, False),
    (1, 3, 3, 4, 1, 1, 1, True),
    (1, 6, 5, 7, 3, 5, 1, True),
    (1, 8, 7, 6, 4, 3, 2, True),
    (2, 3, 2, 2, 1, 3, 1, True),    # image smaller than the window
    (1, 4, 1, 3, 2, 5, 1, False),   # H = 1
    (1, 9, 6, 5, 3, 3, 2, False),   # Cg = 3
]


def case_id(case):
    B, C, H, W, heads, K, dil, dual = case
    return f"B{B}C{C}H{H}W{W}h{heads}K{K}d{dil}{'dual' if dual else 'single'}"


def make_inputs(B, C, H, W, heads, K, dual=True, dtype=torch.float32, device="cpu", logit_scale=1.0,
                requires_grad=False, seed=0):
    """value (B, C, H, W) and logits (B, H, W, heads, K*K, K*K); attn_bg is None when not dual."""
    gen = torch.Generator().manual_seed(seed)
    shape = (B, H, W, heads, K * K, K * K)
    value = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    attn_fg = torch.randn(shape, generator=gen, dtype=torch.float64) * logit_scale
    attn_bg = torch.randn(shape, generator=gen, dtype=torch.float64) * logit_scale if dual else None
    tensors = [t if t is None else t.to(device=device, dtype=dtype).requires_grad_(requires_grad)
               for t in (value, attn_fg, attn_bg)]
    return tuple(tensors)


def grads(fn, inputs, grad_out):
    """Output and gradients of fn(*inputs) for the upstream gradient grad_out (None for absent inputs)."""
    out = fn(*inputs)
    present = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, present, grad_out))
    return out, [None if t is None else next(got) for t in inputs]
