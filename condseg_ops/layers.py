"""ContrastAggregation: the drop-in CDFA layer (DESIGN.md section 2, paper Eq. 11-14)."""
import torch
from torch import nn

from ._ops import as_int, contrast_aggregate
from .backends import check_name

VARIANTS = ("paper", "official")


class ContrastAggregation(nn.Module):
    """Contrast-driven local aggregation of ``x`` guided by foreground/background features.

    ``forward(x, f_fg, f_bg)`` takes ``x`` of shape (B, dim, H, W) and guides of shape
    (B, guide_dim, H, W) and returns (B, dim, H, W).

    variant="paper":    out = proj(agg(V(x), A_fg, A_bg))      (one dual-softmax pass)
    variant="official": out = proj(agg(proj(agg(V(x), A_fg)), A_bg))  (the released code: two
                        single-softmax passes sharing ``proj``)
    Parameter names (v, attn_fg, attn_bg, proj) match the released code.
    """

    def __init__(self, dim, num_heads=4, kernel_size=3, guide_dim=None, variant="paper",
                 dilation=1, backend=None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"ContrastAggregation: variant must be one of {VARIANTS}, got {variant!r}")
        where = "ContrastAggregation"
        check_name(where, backend)
        dim, num_heads = as_int(where, "dim", dim), as_int(where, "num_heads", num_heads)
        kernel_size = as_int(where, "kernel_size", kernel_size, odd=True)
        dilation = as_int(where, "dilation", dilation)
        guide_dim = dim if guide_dim is None else as_int(where, "guide_dim", guide_dim)
        if dim % num_heads != 0:
            raise ValueError(f"ContrastAggregation: dim={dim} must be divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.kernel_size = dim, num_heads, kernel_size
        self.dilation, self.variant, self.backend = dilation, variant, backend
        self.scale = (dim // num_heads) ** -0.5
        logits = num_heads * kernel_size ** 4
        self.v = nn.Linear(dim, dim)
        self.attn_fg = nn.Linear(guide_dim, logits)
        self.attn_bg = nn.Linear(guide_dim, logits)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self):
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, variant={self.variant!r}")

    def _logits(self, linear, guide):
        # A per-pixel Linear on channels-last features gives (B, H, W, heads*K^4): reshaping it to
        # (B, H, W, heads, K^2, K^2) is free.
        B, _, H, W = guide.shape
        k2 = self.kernel_size ** 2
        return linear(guide.permute(0, 2, 3, 1)).view(B, H, W, self.num_heads, k2, k2)

    def _aggregate(self, value, attn_fg, attn_bg=None):
        return contrast_aggregate(value, attn_fg, attn_bg, self.kernel_size, self.dilation,
                                  self.scale, backend=self.backend)

    def _project(self, x):
        return self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x, f_fg, f_bg):
        for name, tensor in (("x", x), ("f_fg", f_fg), ("f_bg", f_bg)):
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"ContrastAggregation: {name} must be a tensor, got {type(tensor).__name__}")
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"ContrastAggregation: x must have shape (B, {self.dim}, H, W), "
                             f"got {tuple(x.shape)}")
        for name, guide in (("f_fg", f_fg), ("f_bg", f_bg)):
            if guide.dim() != 4 or guide.shape[0] != x.shape[0] or guide.shape[2:] != x.shape[2:] \
                    or guide.shape[1] != self.attn_fg.in_features:
                raise ValueError(
                    f"ContrastAggregation: {name} must have shape ({x.shape[0]}, "
                    f"{self.attn_fg.in_features}, {x.shape[2]}, {x.shape[3]}), got {tuple(guide.shape)}")
        value = self.v(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn_fg = self._logits(self.attn_fg, f_fg)
        attn_bg = self._logits(self.attn_bg, f_bg)
        if self.variant == "paper":
            return self._project(self._aggregate(value, attn_fg, attn_bg))
        first = self._project(self._aggregate(value, attn_fg))
        return self._project(self._aggregate(first, attn_bg))
