"""Inference helpers: BatchNorm folding, memory format and dtype preparation, CDFA backend choice.

``prepare_for_inference(model)`` returns an eval-mode copy that computes the same function as
``model.eval()`` with fewer kernels: every Conv2d -> BatchNorm2d pair folded into one Conv2d.
The pairs are found from the data flow of one forward pass (a BatchNorm whose only input is the
output of a convolution that runs once and feeds nothing else), not from module names, so the
folding is correct for any encoder; a pair that cannot be proven is left alone.
"""
import copy
import inspect

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode

from condseg_ops import ContrastAggregation
from condseg_ops.backends import check_name

__all__ = ["fold_batchnorm", "prepare_for_inference", "set_cdfa_backend"]


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
    return (bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None
            and bn.num_features == conv.out_channels)


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


def prepare_for_inference(model, fold_bn=True, channels_last=False, dtype=None, example_input=None):
    """An eval-mode copy of ``model`` ready for fast inference (gradients off).

    fold_bn: fold BatchNorm into the preceding convolutions (:func:`fold_batchnorm`).
    channels_last: store 4-D weights in ``torch.channels_last`` (feed channels-last inputs too).
    dtype: cast parameters and buffers (e.g. torch.float16 / torch.bfloat16 on CUDA); inputs must
        then have that dtype. Folding happens first, in the original precision.
    example_input: the input :func:`fold_batchnorm` traces (default: a guessed 1 x C x 64 x 64).
    """
    model = fold_batchnorm(model, example_input) if fold_bn else copy.deepcopy(model).eval()
    model.requires_grad_(False)
    if dtype is not None:
        model = model.to(dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
