"""ContrastAggregation against an explicit composition of its Linears and the reference op."""
import pytest
import torch
import torch.nn.functional as F

from condseg_ops import ContrastAggregation, contrast_aggregate_reference


def _linear_nchw(linear, x):
    return torch.einsum("bchw,oc->bohw", x, linear.weight) + linear.bias.view(1, -1, 1, 1)


def _logits(linear, guide, heads, k2):
    B, _, H, W = guide.shape
    return _linear_nchw(linear, guide).permute(0, 2, 3, 1).reshape(B, H, W, heads, k2, k2)


def _expected(layer, x, f_fg, f_bg):
    k, heads = layer.kernel_size, layer.num_heads
    a_fg, a_bg = _logits(layer.attn_fg, f_fg, heads, k * k), _logits(layer.attn_bg, f_bg, heads, k * k)
    value = _linear_nchw(layer.v, x)
    agg = lambda v, fg, bg=None: contrast_aggregate_reference(v, fg, bg, k, layer.dilation, layer.scale)
    if layer.variant == "paper":
        return _linear_nchw(layer.proj, agg(value, a_fg, a_bg))
    first = _linear_nchw(layer.proj, agg(value, a_fg))
    return _linear_nchw(layer.proj, agg(first, a_bg))


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_layer_matches_its_definition(variant, backend):
    torch.manual_seed(0)
    layer = ContrastAggregation(12, num_heads=3, kernel_size=3, guide_dim=5, variant=variant,
                                backend=backend).double()
    x, f_fg, f_bg = (torch.randn(2, c, 7, 6, dtype=torch.float64) for c in (12, 5, 5))
    torch.testing.assert_close(layer(x, f_fg, f_bg), _expected(layer, x, f_fg, f_bg))


def test_official_variant_is_the_released_two_pass_code():
    # The released CDFA: unfold V, softmax(scale * attn) @ V, fold, proj, twice (fg then bg).
    torch.manual_seed(0)
    dim, heads, k = 8, 2, 3
    layer = ContrastAggregation(dim, num_heads=heads, variant="official").double()
    x, f_fg, f_bg = (torch.randn(1, dim, 5, 5, dtype=torch.float64) for _ in range(3))

    def released_pass(v_nchw, guide, attn_layer):
        B, C, H, W = v_nchw.shape
        unfolded = F.unfold(v_nchw, k, padding=1).reshape(B, heads, C // heads, k * k, H * W).permute(0, 1, 4, 3, 2)
        attn = attn_layer(guide.permute(0, 2, 3, 1)).reshape(B, H * W, heads, k * k, k * k).permute(0, 2, 1, 3, 4)
        attn = torch.softmax(attn * (C // heads) ** -0.5, dim=-1)
        weighted = (attn @ unfolded).permute(0, 1, 4, 3, 2).reshape(B, C * k * k, -1)
        folded = F.fold(weighted, output_size=(H, W), kernel_size=k, padding=1)
        return layer.proj(folded.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    v = layer.v(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    expected = released_pass(released_pass(v, f_fg, layer.attn_fg), f_bg, layer.attn_bg)
    torch.testing.assert_close(layer(x, f_fg, f_bg), expected)


def test_layer_parameters_and_gradients():
    layer = ContrastAggregation(128, num_heads=4)
    # v and proj: 128x128 + 128 each; attn_fg/attn_bg: 128 -> 4 * 81 (+ bias)
    assert sum(p.numel() for p in layer.parameters()) == 2 * (128 * 128 + 128) + 2 * (128 * 324 + 324)
    small = ContrastAggregation(8, num_heads=2)
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    small(x, torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)).square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in small.parameters())


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=10, num_heads=4), "divisible by num_heads"),
    (dict(dim=8, kernel_size=2), "kernel_size"),
    (dict(dim=8, variant="fast"), "variant"),
    (dict(dim=8, dilation=0), "dilation must be an integer >= 1"),
    (dict(dim=8, backend="gpu"), "unknown backend 'gpu'"),
    (dict(dim=8, num_heads=2.0), "num_heads must be an integer"),
    (dict(dim=8, kernel_size=3.0), "kernel_size must be an odd integer"),
])
def test_layer_rejects_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ContrastAggregation(**kwargs)


def test_layer_rejects_mismatched_guides():
    layer = ContrastAggregation(8, num_heads=2, guide_dim=4)
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="f_bg must have shape"):
        layer(x, torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 6))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(1, 6, 5, 5), torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="f_fg must be a tensor, got list"):
        layer(x, [[0.0]], torch.randn(1, 4, 5, 5))
