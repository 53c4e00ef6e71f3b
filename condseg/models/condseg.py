"""The ConDSeg network (Lei et al., AAAI 2025; DESIGN.md section 4)."""
from typing import NamedTuple

import torch
from torch import nn

from condseg_ops._ops import as_int

from .blocks import (AuxiliaryBranch, CDFABlock, DecoderBlock, DilatedConvEnhancement,
                     GuidancePreprocess, OutputHead, SemanticDecoupling, upsample)
from .encoders import create_encoder, load_encoder_state


class ConDSegOutput(NamedTuple):
    """Logits of ``ConDSeg(x, return_aux=True)``: mask (B, classes, H, W); fg, bg, uc
    (B, 1, H, W) from the auxiliary head."""
    mask: torch.Tensor
    fg: torch.Tensor
    bg: torch.Tensor
    uc: torch.Tensor


def check_input_size(x, multiple, channels, name):
    """Raises ValueError unless x is (B, channels, H, W) with H, W multiples of ``multiple`` (saying
    how to pad)."""
    if x.dim() != 4:
        raise ValueError(f"{name} expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} was built for in_channels={channels}, got an input of {x.shape[1]} channels "
                         f"(shape {tuple(x.shape)})")
    H, W = x.shape[-2:]
    if H % multiple or W % multiple:
        ph, pw = -(-H // multiple) * multiple, -(-W // multiple) * multiple
        raise ValueError(
            f"{name} needs H and W to be multiples of {multiple}, got {H}x{W}: pad to {ph}x{pw} "
            f"(e.g. torch.nn.functional.pad(x, (0, {pw - W}, 0, {ph - H}))) or resize")


def check_decoder_channels(value):
    """A ValueError naming decoder_channels unless ``value`` is a positive multiple of 8."""
    if as_int("ConDSeg", "decoder_channels", value, minimum=8) % 8:
        raise ValueError(f"ConDSeg: decoder_channels must be a positive multiple of 8, got {value!r}")


class ConDSeg(nn.Module):
    """ConDSeg: encoder, dilated-conv enhancement, semantic information decoupling with an
    auxiliary head, four contrast-driven feature aggregation (CDFA) blocks and size-aware
    decoders.

    Args:
        encoder_name: one of :func:`condseg.list_encoders` ("resnet50" in the paper).
        encoder_weights: local path of an ImageNet state_dict for the encoder, or None.
        in_channels: input image channels.
        classes: output channels; 1 = binary (sigmoid), > 1 = multi-class (softmax).
        cdfa_variant: "paper" (one dual-softmax pass, Eq. 11-14) or "official" (the released
            code's two single-softmax passes).
        decoder_channels: width of every block after the encoder (128 in the paper).
        cdfa_backend: forces a condseg_ops backend for the CDFA op (None = automatic).

    ``model(x)`` returns mask logits (B, classes, H, W) and skips the auxiliary head;
    ``model(x, return_aux=True)`` returns :class:`ConDSegOutput` for training. H and W must be
    multiples of the encoder's deepest stride (16; 32 for pvt_v2_b2).

    Not copied from the released code: its dropout (0.1) inside CDFA, which the fused op has no
    place for, and its sigmoid on the outputs (this model returns logits).
    """

    def __init__(self, encoder_name="resnet50", encoder_weights=None, in_channels=3, classes=1,
                 cdfa_variant="paper", decoder_channels=128, cdfa_backend=None):
        super().__init__()
        check_decoder_channels(decoder_channels)
        as_int("ConDSeg", "classes", classes)
        self.encoder = create_encoder(encoder_name, in_channels, encoder_weights)
        self.in_channels = in_channels
        self.encoder_name, self.classes = encoder_name, classes
        c, enc = decoder_channels, self.encoder.out_channels
        steps = len(self.encoder.reductions) - 1

        self.enhance = nn.ModuleList(DilatedConvEnhancement(ch, c) for ch in enc)
        self.decouple = SemanticDecoupling(enc[-1], 4 * c, c)
        # One x2 upsampling per halving of the deepest level: widths 2C, C, C/2, C/2 for 1/16.
        ups = self.encoder.reductions[-1].bit_length() - 1
        aux_widths = (2 * c, c) + (c // 2,) * (ups - 2)
        self.aux_head = nn.ModuleDict({name: AuxiliaryBranch(c, aux_widths)
                                       for name in SemanticDecoupling.BRANCHES})
        # Guidance for level i (0 = finest) from the deepest level: up 2^(steps - i).
        self.guide_fg = nn.ModuleList(GuidancePreprocess(c, 2 ** (steps - i)) for i in range(steps + 1))
        self.guide_bg = nn.ModuleList(GuidancePreprocess(c, 2 ** (steps - i)) for i in range(steps + 1))
        self.cdfa = nn.ModuleList(
            CDFABlock(c if i == steps else 2 * c, c, variant=cdfa_variant, backend=cdfa_backend)
            for i in range(steps + 1))
        self.decoder_small = DecoderBlock(c, c, c)
        self.decoder_middle = DecoderBlock(c, c, c)
        self.decoder_large = DecoderBlock(c, c, c)
        self.head = OutputHead(c, classes, scale=self.encoder.reductions[0])
        # Set by condseg.inference.stack_guidance (an inference copy): the fg and bg branches of
        # decouple and the guide_* modules as one module computing them side by side.
        self.stacked_guidance = None

    def forward(self, x, return_aux=False):
        check_input_size(x, self.encoder.reductions[-1], self.in_channels, type(self).__name__)
        feats = self.encoder(x)
        enhanced = [enhance(f) for enhance, f in zip(self.enhance, feats)]
        if self.stacked_guidance is not None:
            f_both, guides = self.stacked_guidance(feats[-1])
            f_fg, f_bg = f_both.chunk(2, dim=1)
            f_uc = self.decouple.uc(feats[-1]) if return_aux else None
        else:
            f_fg, f_bg, f_uc = self.decouple(feats[-1], with_uncertainty=return_aux)
            guides = [(fg(f_fg), bg(f_bg)) for fg, bg in zip(self.guide_fg, self.guide_bg)]

        fused, f = [], None
        for i in reversed(range(len(feats))):
            inp = enhanced[i] if f is None else torch.cat([enhanced[i], upsample(f, 2)], dim=1)
            f = self.cdfa[i](inp, *guides[i])
            fused.insert(0, f)
        small = self.decoder_small(fused[1], fused[0])
        middle = self.decoder_middle(fused[2], fused[1])
        large = self.decoder_large(fused[3], fused[2])
        mask = self.head(small, middle, large)
        if not return_aux:
            return mask
        aux = [self.aux_head[name](f) for name, f in zip(SemanticDecoupling.BRANCHES, (f_fg, f_bg, f_uc))]
        return ConDSegOutput(mask, *aux)

    def load_stage1_encoder(self, stage1):
        """Copies the encoder of a trained :class:`ConDSegStage1` (the module, or its state_dict)
        into this model: parameters and BatchNorm statistics. Raises ValueError naming the keys
        and shapes that do not match (e.g. a different encoder_name)."""
        if isinstance(stage1, nn.Module):
            state = stage1.encoder.state_dict()
        else:
            state = {k[len("encoder."):]: v for k, v in stage1.items() if k.startswith("encoder.")}
            if not state:
                raise ValueError("load_stage1_encoder: the state_dict has no 'encoder.*' keys; pass a "
                                 "ConDSegStage1 model or its state_dict()")
        load_encoder_state(self.encoder, state, source="the stage-1 encoder")
