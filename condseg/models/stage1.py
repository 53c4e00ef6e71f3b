"""Net_0, the stage-1 network of ConDSeg's Consistency Reinforcement (DESIGN.md section 4.6)."""
import torch
import torch.nn.functional as F
from torch import nn

from .blocks import CBR, upsample
from .condseg import check_input_size
from .encoders import create_encoder


class ConDSegStage1(nn.Module):
    """Encoder + a light head: every encoder level goes through CBR1x1 -> 64 and is upsampled to
    full resolution; the four maps are concatenated (256) and a bias-free conv1x1 gives one logit
    map (B, 1, H, W).

    The released code upsamples before the 1x1 conv; here conv + BN run at the level's own
    resolution and the ReLU after upsampling. Conv, BN (eval) and bilinear upsampling are all
    linear per channel, so the result is the same in eval mode at a fraction of the cost (in
    training, BN batch statistics are taken at native resolution).

    After stage 1, ``ConDSeg.load_stage1_encoder(stage1)`` transfers the encoder.
    """

    def __init__(self, encoder_name="resnet50", encoder_weights=None, in_channels=3, head_channels=64):
        super().__init__()
        self.encoder = create_encoder(encoder_name, in_channels, encoder_weights)
        self.in_channels = in_channels
        self.encoder_name = encoder_name
        self.adjust = nn.ModuleList(CBR(ch, head_channels, kernel_size=1, act=False)
                                    for ch in self.encoder.out_channels)
        self.fuse = nn.Conv2d(head_channels * len(self.adjust), 1, kernel_size=1, bias=False)

    def forward(self, x):
        check_input_size(x, self.encoder.reductions[-1], self.in_channels, type(self).__name__)
        feats = self.encoder(x)
        maps = [F.relu(upsample(adjust(f), r))
                for adjust, f, r in zip(self.adjust, feats, self.encoder.reductions)]
        return self.fuse(torch.cat(maps, dim=1))
