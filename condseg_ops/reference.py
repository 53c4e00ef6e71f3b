"""Pure-PyTorch reference of the contrast-driven aggregation (DESIGN.md section 2).

This is the executable spec and the baseline of every benchmark: it does what the released
ConDSeg code does (unfold, two small matmuls per pixel, fold) and leaves the gradients to autograd.
"""
import torch
import torch.nn.functional as F


def contrast_aggregate_reference(value, attn_fg, attn_bg=None, kernel_size=3, dilation=1, scale=1.0):
    """Unfold/matmul/fold form of ``condseg_ops.contrast_aggregate`` (inputs assumed valid)."""
    B, C, H, W = value.shape
    heads = attn_fg.shape[3]
    k2 = kernel_size * kernel_size
    if B == 0 or C == 0 or H == 0 or W == 0:
        # Empty output, but tied to every input, so that autograd gives each its (empty or zero)
        # gradient as the compiled backends do.
        tie = attn_fg.sum() + (attn_bg.sum() if attn_bg is not None else 0)
        return value.clone() + 0 * tie
    padding = dilation * (kernel_size // 2)

    # (B, C*K2, H*W) with channel-major, slot-minor rows -> (B, H*W, heads, K2, Cg)
    windows = F.unfold(value, kernel_size, dilation=dilation, padding=padding)
    windows = windows.view(B, heads, C // heads, k2, H * W).permute(0, 4, 1, 3, 2)

    p_fg = torch.softmax(scale * attn_fg.reshape(B, H * W, heads, k2, k2), dim=-1)
    if attn_bg is not None:
        p_bg = torch.softmax(scale * attn_bg.reshape(B, H * W, heads, k2, k2), dim=-1)
        windows = p_bg @ windows
    windows = p_fg @ windows

    windows = windows.permute(0, 2, 4, 3, 1).reshape(B, C * k2, H * W)
    return F.fold(windows, (H, W), kernel_size, dilation=dilation, padding=padding)


def reference_vjp(grad_out, value, attn_fg, attn_bg=None, kernel_size=3, dilation=1, scale=1.0):
    """(grad_value, grad_attn_fg, grad_attn_bg) of the reference for the upstream ``grad_out``,
    themselves differentiable: the compiled and Triton backwards are not, so a backward with
    create_graph=True (gradient penalties, higher-order gradients) runs through this instead.
    grad_attn_bg is None without attn_bg."""
    with torch.enable_grad():
        # autograd.grad needs every input in the graph; a detached copy stands in for an input that
        # does not require grad (its gradient is then a plain tensor, as the backward expects).
        inputs = [t if t is None or t.requires_grad else t.detach().requires_grad_() for t in (value, attn_fg, attn_bg)]
        out = contrast_aggregate_reference(*inputs, kernel_size, dilation, scale)
        present = [t for t in inputs if t is not None]
        grads = torch.autograd.grad(out, present, grad_out, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(present, grads)]
    return grads[0], grads[1], grads[2] if attn_bg is not None else None
