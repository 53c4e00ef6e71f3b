"""Inference helpers: BatchNorm folding, memory format and dtype preparation, Winograd
convolutions on the CPU, CDFA backend choice.

``prepare_for_inference(model)`` returns an eval-mode copy that computes the same function as
``model.eval()`` with fewer kernels: every Conv2d -> BatchNorm2d pair folded into one Conv2d.
The pairs are found from the data flow of one forward pass (a BatchNorm whose only input is the
output of a convolution that runs once and feeds nothing else), not from module names, so the
folding is correct for any encoder; a pair that cannot be proven is left alone.
"""
import copy
import functools
import inspect
import warnings

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode

from condseg_ops import ContrastAggregation
from condseg_ops.backends import check_name

from .models.blocks import Upsample

__all__ = ["StackedGuidance", "WinogradConv2d", "fold_batchnorm", "prepare_for_inference", "set_cdfa_backend",
           "stack_branches", "stack_guidance", "use_winograd_convolutions"]


class _CountUses(TorchFunctionMode):
    """Counts, for each tracked tensor (by id), how many torch calls outside BatchNorm forwards
    take it as an input."""

    def __init__(self, tracked):
        super().__init__()
        self.tracked, self.uses, self.paused = tracked, {}, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            for arg in _flatten((args, kwargs)):
                if isinstance(arg, torch.Tensor) and id(arg) in self.tracked:
                    self.uses[id(arg)] = self.uses.get(id(arg), 0) + 1
        return func(*args, **kwargs)


def _flatten(obj):
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _flatten(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _flatten(item)
    else:
        yield obj


def _example_input(model):
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None
    param = conv.weight
    # 64 is a multiple of every encoder's deepest stride (16 or 32).
    return torch.randn(1, conv.in_channels, 64, 64, device=param.device, dtype=param.dtype)


def _conv_bn_pairs(model, example):
    """(conv, bn) pairs where bn's input is the output of conv, conv runs once, bn runs once, and
    nothing else reads conv's output."""
    calls, outputs, bn_inputs, tracked, handles = {}, {}, {}, {}, []
    keep = []  # keeps traced outputs alive so that their ids stay unique
    mode = _CountUses(tracked)

    def conv_hook(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        outputs[module] = output
        tracked[id(output)] = module
        keep.append(output)

    def bn_pre_hook(module, args):
        calls[module] = calls.get(module, 0) + 1
        bn_inputs[module] = args[0] if args else None
        mode.paused += 1

    def bn_hook(module, args, output):
        mode.paused -= 1

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(bn_pre_hook))
            handles.append(module.register_forward_hook(bn_hook))
    # Trace every branch: models with an auxiliary head (ConDSeg) run it only on request.
    try:
        kwargs = {"return_aux": True} if "return_aux" in inspect.signature(model.forward).parameters else {}
    except (TypeError, ValueError):
        kwargs = {}
    try:
        with torch.no_grad(), mode:
            model(example, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    readers = {}
    for inp in bn_inputs.values():
        readers[id(inp)] = readers.get(id(inp), 0) + 1
    pairs = []
    for bn, inp in bn_inputs.items():
        conv = tracked.get(id(inp))
        if conv is None or outputs.get(conv) is not inp:
            continue
        if calls[conv] != 1 or calls[bn] != 1 or readers[id(inp)] != 1 or mode.uses.get(id(inp), 0):
            continue
        pairs.append((conv, bn))
    return pairs


def _foldable(conv, bn):
    return _has_statistics(bn) and bn.num_features == conv.out_channels


def fold_batchnorm(model, example_input=None, inplace=False):
    """Folds every Conv2d -> BatchNorm2d pair of ``model`` (in eval mode) into the convolution.

    Returns an eval-mode copy (``inplace=True`` changes ``model`` itself) whose convolutions carry
    the BatchNorm's scale and shift (a bias is added where the conv had none) and whose folded
    BatchNorms are ``nn.Identity``. The pairs are found by running ``example_input`` (default: a
    1 x C x 64 x 64 random image on the model's device) through the model once and following the
    data flow, so only pairs where the BatchNorm reads the conv's output and nothing else does
    are folded. The result computes the same function as ``model.eval()`` up to float rounding.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    example = _example_input(model) if example_input is None else example_input
    if example is None:
        return model
    try:
        pairs = [(conv, bn) for conv, bn in _conv_bn_pairs(model, example) if _foldable(conv, bn)]
    except Exception as error:
        if example_input is not None:
            raise
        # The guess takes its channels from the first registered Conv2d, which need not be the
        # one that reads the input.
        raise ValueError(f"fold_batchnorm: the model does not accept the example input it guessed "
                         f"({tuple(example.shape)}, from its first Conv2d): {error}. Pass example_input, "
                         f"an input the model accepts") from error
    folded = {}
    for conv, bn in pairs:
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                            bn.eps, bn.weight, bn.bias)
        conv.weight, conv.bias = weight, bias
        folded[bn] = True
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child in folded:
                setattr(parent, name, nn.Identity())
    return model


@functools.lru_cache(maxsize=None)
def nnpack_ready():
    """Whether this torch has NNPACK; the first call also initialises it (its convolution fails
    until ``torch.backends.nnpack.is_available()`` has run once in the process)."""
    return torch.backends.nnpack.is_available()


class WinogradConv2d(nn.Conv2d):
    """A Conv2d that runs its 3x3, stride-1 float32 CPU convolutions on large maps through
    NNPACK's Winograd algorithm (F(6x6, 3x3): about 5x fewer multiplications than the direct
    convolution; 1.7-2x as fast as oneDNN's on a 2-core AMD EPYC at 64x64 and above), and
    everything else through :class:`torch.nn.Conv2d`. Inference only: it falls back whenever a
    gradient is wanted, under autocast, inside torch.compile, and when NNPACK is switched off
    (``torch.backends.nnpack.set_flags(False)``). The Winograd transforms round differently:
    about 1e-5 of the output's scale in float32, against 1e-6 for the direct convolution. Not for
    TorchScript.

    NNPACK keeps its own thread pool, sized by ``torch.get_num_threads()`` at its first use in
    the process: set the thread count before the first inference.
    """

    MIN_PIXELS = 64 * 64  # below this output size NNPACK is no faster (slower at 16x16)

    def suits_nnpack(self):
        """Whether this convolution's shape has a Winograd path (NNPACK: padding < kernel)."""
        return (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.dilation == (1, 1)
                and self.groups == 1 and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and max(self.padding) < 3)

    @classmethod
    def from_conv(cls, conv):
        """Turns ``conv``, a plain :class:`torch.nn.Conv2d`, into a WinogradConv2d in place (its
        parameters, hooks and attributes stay) when its shape suits NNPACK; returns it."""
        if type(conv) is nn.Conv2d and cls.suits_nnpack(conv):
            conv.__class__ = cls
        return conv

    def _takes_nnpack(self, x):
        wants_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, self.weight, self.bias))
        return (x.device.type == "cpu" and x.dim() == 4 and x.shape[0] > 0 and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and not wants_grad and self.suits_nnpack()
                and (x.shape[2] + 2 * self.padding[0] - 2) * (x.shape[3] + 2 * self.padding[1] - 2) >= self.MIN_PIXELS
                and not getattr(self, "_nnpack_refused", False)
                and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
                and nnpack_ready() and torch._C._get_nnpack_enabled())

    def forward(self, x):
        if not self._takes_nnpack(x):
            return super().forward(x)
        # NNPACK reads NCHW: a channels-last input (a CDFA layer's output is one) is copied once,
        # and the NCHW output keeps the layers after it in NCHW. A batch goes one image at a time:
        # for batches NNPACK takes another algorithm, slower than oneDNN (8 x 128 x 128^2 on 2
        # threads: 303 ms against 260; one image at a time, 146).
        weight, padding = self.weight.contiguous(), list(self.padding)
        try:
            outputs = [torch._nnpack_spatial_convolution(image, weight, self.bias, padding)
                       for image in x.contiguous().split(1)]
        except RuntimeError as error:  # NNPACK's refusals give no reason: the direct path from now on
            self._nnpack_refused = True
            warnings.warn(f"WinogradConv2d: NNPACK refused a {tuple(x.shape)} input ({error}); this layer "
                          "runs the ordinary convolution from now on", stacklevel=2)
            return super().forward(x)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def use_winograd_convolutions(model, inplace=False):
    """Returns a copy of ``model`` (``inplace=True`` changes ``model``) whose 3x3 stride-1
    convolutions are :class:`WinogradConv2d`: faster float32 inference on the CPU (NCHW: a
    channels-last input is copied to NCHW first). Parameters and state_dict keys stay the same.
    Warns and changes nothing when this torch build lacks NNPACK."""
    if not inplace:
        model = copy.deepcopy(model)
    if not nnpack_ready():
        warnings.warn("use_winograd_convolutions: this torch build has no NNPACK "
                      "(torch.backends.nnpack.is_available() is False); the convolutions stay as they are",
                      stacklevel=2)
        return model
    for module in model.modules():
        WinogradConv2d.from_conv(module)  # plain Conv2d of a suitable shape only
    return model


# Layers that act on each channel alone, so that one copy serves stacked branches.
_PER_CHANNEL = (nn.ReLU, nn.Identity, nn.Upsample, Upsample)


def _leaves(module):
    """The layers of nested nn.Sequentials, in order."""
    if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
        return [module]
    return [leaf for child in module for leaf in _leaves(child)]


def _stacked_conv(convs, shared_input):
    first = convs[0]
    shape = lambda c: (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,  # noqa: E731
                       c.dilation, c.groups, c.padding_mode)
    if any(type(c) is not nn.Conv2d or shape(c) != shape(first) for c in convs):
        return None
    if shared_input and first.groups != 1:
        return None
    n, like = len(convs), first.weight
    conv = nn.Conv2d(first.in_channels * (1 if shared_input else n), first.out_channels * n, first.kernel_size,
                     first.stride, first.padding, first.dilation, first.groups * (1 if shared_input else n),
                     bias=any(c.bias is not None for c in convs), padding_mode=first.padding_mode,
                     device=like.device, dtype=like.dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([c.weight for c in convs]))
        if conv.bias is not None:
            conv.bias.copy_(torch.cat([c.bias if c.bias is not None else torch.zeros_like(c.weight[:, 0, 0, 0])
                                       for c in convs]))
    return conv


def _stacked_batchnorm(bns):
    first = bns[0]
    if any(type(b) is not nn.BatchNorm2d or b.training or not _has_statistics(b) or b.eps != first.eps
           or b.affine != first.affine or b.num_features != first.num_features for b in bns):
        return None
    like = first.running_mean
    bn = nn.BatchNorm2d(first.num_features * len(bns), first.eps, affine=first.affine, device=like.device,
                        dtype=like.dtype).eval()
    with torch.no_grad():
        for name in ("running_mean", "running_var") + (("weight", "bias") if first.affine else ()):
            getattr(bn, name).copy_(torch.cat([getattr(b, name) for b in bns]))
    return bn


def _has_statistics(bn):
    return bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None


def stack_branches(branches, shared_input=False):
    """One nn.Sequential that computes ``branches`` side by side, for inference.

    ``branches``: eval-mode nn.Sequentials (nesting allowed) of one structure, made of Conv2d,
    BatchNorm2d (with running statistics), ReLU, Identity and upsampling layers. The result reads
    their inputs stacked along channels (``torch.cat(inputs, dim=1)``; with ``shared_input``, the
    one input all branches read) and returns their outputs stacked the same way: each convolution
    becomes one grouped convolution with the branches' weights concatenated, so one kernel runs
    where ``len(branches)`` did. The parameters are copies: the result does not follow later
    changes to the branches. Returns None when the branches differ in structure or hold another
    kind of layer.
    """
    columns = list(zip(*(_leaves(branch) for branch in branches)))
    if len({len(_leaves(branch)) for branch in branches}) != 1 or not columns:
        return None
    if shared_input and not isinstance(columns[0][0], nn.Conv2d):
        return None
    layers = []
    for i, column in enumerate(columns):
        first = column[0]
        if isinstance(first, nn.Conv2d):
            layer = _stacked_conv(column, shared_input and i == 0)
        elif isinstance(first, nn.BatchNorm2d):
            layer = _stacked_batchnorm(column)
        elif type(first) in _PER_CHANNEL and all(type(m) is type(first) and repr(m) == repr(first) for m in column):
            layer = copy.deepcopy(first)
        else:
            layer = None
        if layer is None:
            return None
        layers.append(layer)
    return nn.Sequential(*layers).eval()


class StackedGuidance(nn.Module):
    """ConDSeg's foreground and background guidance computed side by side (see
    :func:`stack_guidance`): the decoupling's fg and bg branches and each CDFA level's pair of
    preprocessing modules, each as one stacked module. ``forward(deepest)`` returns the decoupled
    features (fg and bg stacked along channels) and, per level, the (fg, bg) guidance, channel
    halves of one tensor."""

    def __init__(self, decouple, levels):
        super().__init__()
        self.decouple, self.levels = decouple, nn.ModuleList(levels)

    def forward(self, deepest):
        both = self.decouple(deepest)
        return both, [level(both).chunk(2, dim=1) for level in self.levels]


def stack_guidance(model):
    """Turns ``model``, a ConDSeg in eval mode (changed in place and returned), into one whose
    foreground and background branches run side by side: the decoupling's fg and bg branches and
    the four levels' guidance pairs become a :class:`StackedGuidance` of grouped convolutions
    (groups=2), 13 convolutions instead of 26. The stacked modules replace the separate ones
    (``decouple.fg``, ``decouple.bg``, ``guide_fg`` and ``guide_bg`` become None; the parameter
    count stays the same), so the model is for inference only and its state_dict keys change.
    The same function up to float rounding, ``return_aux=True`` included. Warns and leaves the
    model alone when a branch holds a layer that cannot be stacked."""
    if model.stacked_guidance is not None:
        return model
    decouple = stack_branches([model.decouple.fg, model.decouple.bg], shared_input=True)
    levels = [stack_branches([fg, bg]) for fg, bg in zip(model.guide_fg, model.guide_bg)]
    if decouple is None or None in levels:
        warnings.warn("stack_guidance: a guidance branch holds a layer that cannot be stacked (or a BatchNorm "
                      "in training mode); the branches stay separate", stacklevel=2)
        return model
    model.stacked_guidance = StackedGuidance(decouple, levels)
    model.decouple.fg = model.decouple.bg = model.guide_fg = model.guide_bg = None
    return model


def set_cdfa_backend(model, backend):
    """Forces the condseg_ops backend (``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``, or
    None for automatic) of every ContrastAggregation layer in ``model``; returns ``model``.

    Unlike the ``condseg_ops.use_backend`` context, this is a module attribute, so it holds inside
    ``torch.compile`` graphs and CUDA graphs captured from the model."""
    check_name("set_cdfa_backend", backend)
    for module in model.modules():
        if isinstance(module, ContrastAggregation):
            module.backend = backend
    return model


def prepare_for_inference(model, fold_bn=True, channels_last=False, dtype=None, example_input=None,
                          winograd=False, stack=False):
    """An eval-mode copy of ``model`` ready for fast inference (gradients off).

    fold_bn: fold BatchNorm into the preceding convolutions (:func:`fold_batchnorm`).
    channels_last: store 4-D weights in ``torch.channels_last`` (feed channels-last inputs too).
    dtype: cast parameters and buffers (e.g. torch.float16 / torch.bfloat16 on CUDA); inputs must
        then have that dtype. Folding happens first, in the original precision.
    example_input: the input :func:`fold_batchnorm` traces (default: a guessed 1 x C x 64 x 64).
    winograd: on the CPU, float32 only: run 3x3 convolutions through NNPACK's Winograd algorithm
        (:func:`use_winograd_convolutions`). NNPACK reads NCHW, so not with ``channels_last``.
    stack: a ConDSeg only: compute its fg and bg guidance branches side by side, as grouped
        convolutions (:func:`stack_guidance`): half the guidance kernels, the state_dict keys of
        those modules change. Not timed on a GPU yet, so off by default (grouped cuDNN
        convolutions can be slower than two plain ones).
    """
    if stack and not hasattr(model, "stacked_guidance"):
        raise ValueError(f"prepare_for_inference: stack=True needs a ConDSeg model, got {type(model).__name__}")
    if winograd and (channels_last or dtype not in (None, torch.float32)):
        raise ValueError("prepare_for_inference: winograd=True runs float32 NCHW convolutions; pass "
                         "channels_last=False and no reduced dtype")
    model = fold_batchnorm(model, example_input) if fold_bn else copy.deepcopy(model).eval()
    if stack:
        stack_guidance(model)
    if winograd:
        model = use_winograd_convolutions(model, inplace=True)
    model.requires_grad_(False)
    if dtype is not None:
        model = model.to(dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
