"""Building blocks of ConDSeg (DESIGN.md section 4).

Every convolution is bias-free and followed by BatchNorm; all upsampling is bilinear with
align_corners=True.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from condseg_ops import ContrastAggregation


def upsample(x, scale):
    """Bilinear upsampling by an integer factor, align_corners=True (as the released code)."""
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=True)


class Upsample(nn.Module):
    """Module form of :func:`upsample`, for use inside ``nn.Sequential``."""

    def __init__(self, scale=2):
        super().__init__()
        self.scale = scale

    def extra_repr(self):
        return f"scale={self.scale}"

    def forward(self, x):
        return upsample(x, self.scale)


class CBR(nn.Sequential):
    """Conv (bias-free, 'same' padding) + BatchNorm + ReLU; ``act=False`` drops the ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size=3, dilation=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size,
                              padding=dilation * (kernel_size // 2), dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()


class ChannelAttention(nn.Module):
    """CBAM channel attention: shared bias-free MLP (C -> C/16 -> C) on avg- and max-pooled
    vectors, summed, sigmoid, scale."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x):
        return channel_attention(x, self.fc1.weight, self.fc2.weight)


def channel_attention(x, fc1_weight, fc2_weight, groups=1):
    """CBAM channel attention of ``x`` with the MLP's 1x1 weights. With ``groups`` > 1, x's
    channels are that many stacked feature maps, each with its own MLP (the weights of the
    groups concatenated along dim 0), computed in one set of kernels."""
    # Both pooled vectors go through the MLP as one batch of 2B: half the kernel launches,
    # which is what a batch-1 inference pays for here.
    pooled = torch.cat([F.adaptive_avg_pool2d(x, 1), x.amax(dim=(2, 3), keepdim=True)])
    hidden = F.relu(F.conv2d(pooled, fc1_weight, groups=groups))
    avg, top = F.conv2d(hidden, fc2_weight, groups=groups).chunk(2)
    return x * torch.sigmoid(avg + top)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: channel-mean and channel-max maps -> conv7x7 (2->1) -> sigmoid."""

    def __init__(self, kernel_size=7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x):
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(maps))


class DilatedConvEnhancement(nn.Module):
    """Feature enhancement (FEM, DESIGN 4.2): four parallel branches (CBR 1x1; CBR 3x3 with
    dilation 6, 12, 18), each with channel attention; concat -> conv3x3+BN; plus a 1x1 conv+BN
    shortcut; sum, ReLU, spatial attention."""

    def __init__(self, in_channels, out_channels, dilations=(6, 12, 18)):
        super().__init__()
        branches = [CBR(in_channels, out_channels, kernel_size=1)]
        branches += [CBR(in_channels, out_channels, dilation=d) for d in dilations]
        self.branches = nn.ModuleList(
            nn.Sequential(branch, ChannelAttention(out_channels)) for branch in branches)
        self.fuse = CBR(out_channels * len(branches), out_channels, act=False)
        self.shortcut = CBR(in_channels, out_channels, kernel_size=1, act=False)
        self.sa = SpatialAttention()

    def forward(self, x):
        # Each branch's channel attention reads only its own channels, so the four run as one
        # grouped attention on the concatenated branches: a quarter of the kernels, same result.
        convs, attentions = zip(*self.branches)
        stacked = torch.cat([conv(x) for conv in convs], dim=1)
        stacked = channel_attention(stacked, torch.cat([a.fc1.weight for a in attentions]),
                                    torch.cat([a.fc2.weight for a in attentions]), groups=len(attentions))
        return self.sa(F.relu(self.fuse(stacked) + self.shortcut(x)))


class SemanticDecoupling(nn.Module):
    """Semantic Information Decoupling (DESIGN 4.3): three independent branches (fg, bg,
    uncertainty), each CBR3x3 in->mid, CBR3x3 mid->out, CBR1x1 out->out."""

    BRANCHES = ("fg", "bg", "uc")

    def __init__(self, in_channels, mid_channels, out_channels):
        super().__init__()
        for name in self.BRANCHES:
            self.add_module(name, nn.Sequential(
                CBR(in_channels, mid_channels), CBR(mid_channels, out_channels),
                CBR(out_channels, out_channels, kernel_size=1)))

    def forward(self, x, with_uncertainty=True):
        """Returns (f_fg, f_bg, f_uc); f_uc is None when ``with_uncertainty`` is False (only the
        auxiliary head reads it)."""
        return self.fg(x), self.bg(x), self.uc(x) if with_uncertainty else None


class AuxiliaryBranch(nn.Sequential):
    """One auxiliary head branch: CBR3x3 in->widths[0], then per width [x2 up, CBR3x3], then a
    1x1 conv (with bias) to one logit map."""

    def __init__(self, in_channels, widths):
        super().__init__(CBR(in_channels, widths[0]))
        for i, (prev, width) in enumerate(zip((widths[0],) + tuple(widths), widths)):
            self.add_module(f"up{i}", Upsample(2))
            self.add_module(f"cbr{i}", CBR(prev, width))
        self.add_module("logits", nn.Conv2d(widths[-1], 1, kernel_size=1))


class GuidancePreprocess(nn.Sequential):
    """Adapts a decoupled feature to one CDFA level: CBR3x3, then log2(scale) x [x2 up, CBR3x3]."""

    def __init__(self, channels, scale):
        super().__init__(CBR(channels, channels))
        for i in range(int(math.log2(scale))):
            self.add_module(f"up{i}", Upsample(2))
            self.add_module(f"cbr{i}", CBR(channels, channels))


class CDFABlock(nn.Module):
    """Contrast-Driven Feature Aggregation block (DESIGN 4.4): 2 x CBR3x3 (in -> dim -> dim),
    :class:`condseg_ops.ContrastAggregation`, 2 x CBR3x3 (dim -> dim), no residual."""

    def __init__(self, in_channels, dim, num_heads=4, kernel_size=3, variant="paper", backend=None):
        super().__init__()
        self.input_cbr = nn.Sequential(CBR(in_channels, dim), CBR(dim, dim))
        self.aggregate = ContrastAggregation(dim, num_heads, kernel_size, variant=variant,
                                             backend=backend)
        self.output_cbr = nn.Sequential(CBR(dim, dim), CBR(dim, dim))

    def forward(self, x, f_fg, f_bg):
        return self.output_cbr(self.aggregate(self.input_cbr(x), f_fg, f_bg))


class DecoderBlock(nn.Module):
    """Size-aware decoder step (DESIGN 4.5): up2(x), concat with skip, CBR1x1 -> s1; two dense
    residual 3x3 conv+BN steps and one 1x1 step (each adds all previous outputs, then ReLU);
    channel and spatial attention."""

    def __init__(self, in_channels, skip_channels, out_channels):
        super().__init__()
        self.reduce = CBR(in_channels + skip_channels, out_channels, kernel_size=1)
        self.dense = nn.ModuleList([
            CBR(out_channels, out_channels, act=False),
            CBR(out_channels, out_channels, act=False),
            CBR(out_channels, out_channels, kernel_size=1, act=False),
        ])
        self.ca = ChannelAttention(out_channels)
        self.sa = SpatialAttention()

    def forward(self, x, skip):
        x = self.reduce(torch.cat([upsample(x, 2), skip], dim=1))
        total = x
        for step in self.dense[:-1]:
            x = F.relu(step(x) + total)
            total = total + x
        x = F.relu(self.dense[-1](x) + total)  # (the last step's sum would go unused)
        return self.sa(self.ca(x))


class OutputHead(nn.Module):
    """concat[small, up2(middle), up4(large)] -> CBR3x3 (3C->C) -> up(scale) -> CBR3x3 (C->C) ->
    CBR1x1 (C->C/2) -> conv1x1 (with bias) to ``classes`` logits."""

    def __init__(self, channels, classes, scale=2):
        super().__init__()
        self.scale = scale
        self.fuse = CBR(3 * channels, channels)
        self.refine = nn.Sequential(CBR(channels, channels),
                                    CBR(channels, channels // 2, kernel_size=1))
        self.logits = nn.Conv2d(channels // 2, classes, kernel_size=1)

    def forward(self, small, middle, large):
        x = self.fuse(torch.cat([small, upsample(middle, 2), upsample(large, 4)], dim=1))
        return self.logits(self.refine(upsample(x, self.scale)))
