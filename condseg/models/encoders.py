"""Encoders behind one registry.

Every encoder returns four feature maps at strides ``reductions`` (1/2 .. 1/16 for the CNNs,
1/4 .. 1/32 for PVT-v2) with ``out_channels`` channels. Parameter names follow torchvision (and the
official PVT-v2 code), so standard ImageNet files (``resnet50-*.pth``, ``vgg19-*.pth``,
``pvt_v2_b2.pth``) load from a local path; nothing is ever downloaded. The parts of those files an
encoder does not use (ResNet layer4 and fc, VGG classifier, PVT head) are skipped; any other
difference is an error that names the keys and shapes.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from condseg_ops._ops import as_int

_REGISTRY = {}


def register_encoder(name):
    """Decorator: registers ``factory(in_channels) -> Encoder`` under ``name``."""
    def decorator(factory):
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory
    return decorator


def list_encoders():
    """Names accepted by :func:`create_encoder` (and ``encoder_name=`` of the models)."""
    return sorted(_REGISTRY)


def create_encoder(name, in_channels=3, weights=None):
    """Builds encoder ``name``; ``weights`` is a local file path (a state_dict saved by torch)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown encoder {name!r}; choose one of {list_encoders()}")
    as_int(f"encoder {name!r}", "in_channels", in_channels)
    encoder = _REGISTRY[name](in_channels)
    if weights is not None:
        load_encoder_weights(encoder, weights)
    return encoder


class Encoder(nn.Module):
    """Base class: ``forward(x)`` returns a list of four feature maps."""

    out_channels = ()
    reductions = (2, 4, 8, 16)
    first_conv = ""          # state_dict key of the input convolution (adapted to in_channels)
    unused_prefixes = ()     # state_dict prefixes of a full ImageNet file that this encoder drops

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------- ResNet

def _conv_bn(in_channels, out_channels, kernel_size, stride=1):
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
    return conv, nn.BatchNorm2d(out_channels)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, planes, 3, stride)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, planes, 1)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, stride)   # torchvision "v1.5"
        self.conv3, self.bn3 = _conv_bn(planes, planes * 4, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNetEncoder(Encoder):
    """torchvision ResNet up to layer3: stem (1/2), maxpool+layer1 (1/4), layer2, layer3 (1/16)."""

    first_conv = "conv1.weight"
    unused_prefixes = ("layer4.", "fc.")

    def __init__(self, block, layers, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._channels = 64
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.out_channels = (64, 64 * block.expansion, 128 * block.expansion, 256 * block.expansion)
        self._init_weights()

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self._channels != planes * block.expansion:
            downsample = nn.Sequential(*_conv_bn(self._channels, planes * block.expansion, 1, stride))
        layers = [block(self._channels, planes, stride, downsample)]
        self._channels = planes * block.expansion
        layers += [block(self._channels, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x1 = self.relu(self.bn1(self.conv1(x)))
        x2 = self.layer1(self.maxpool(x1))
        x3 = self.layer2(x2)
        return [x1, x2, x3, self.layer3(x3)]


@register_encoder("resnet18")
def resnet18(in_channels=3):
    return ResNetEncoder(BasicBlock, (2, 2, 2), in_channels)


@register_encoder("resnet34")
def resnet34(in_channels=3):
    return ResNetEncoder(BasicBlock, (3, 4, 6), in_channels)


@register_encoder("resnet50")
def resnet50(in_channels=3):
    return ResNetEncoder(Bottleneck, (3, 4, 6), in_channels)


# -------------------------------------------------------------------------------------------- VGG

class VGGEncoder(Encoder):
    """torchvision VGG (no BN) ``features`` without its last max-pool: outputs after blocks 2..5
    (1/2 .. 1/16)."""

    first_conv = "features.0.weight"
    unused_prefixes = ("classifier.",)

    def __init__(self, config, in_channels=3):
        super().__init__()
        layers, taps, channels = [], [], in_channels
        for stage, widths in enumerate(config):
            if stage > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width
            taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self._taps = frozenset(taps[1:])
        self.out_channels = tuple(widths[-1] for widths in config[1:])
        self._init_weights()

    def forward(self, x):
        features = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._taps:
                features.append(x)
        return features


@register_encoder("vgg19")
def vgg19(in_channels=3):
    return VGGEncoder(((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4), in_channels)


# ------------------------------------------------------------------------------------- PVT-v2

class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_channels, dim, patch_size, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride, patch_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2)), x.shape[-2:]


class SpatialReductionAttention(nn.Module):
    def __init__(self, dim, num_heads, sr_ratio):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, size):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        if hasattr(self, "sr"):
            x = self.norm(self.sr(x.transpose(1, 2).reshape(B, C, *size)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).view(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class DWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, size):
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(B, C, *size)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, size):
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), size)))


class PVTBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x, size):
        x = x + self.attn(self.norm1(x), size)
        return x + self.mlp(self.norm2(x), size)


class PVTv2Encoder(Encoder):
    """PVT-v2 (Wang et al. 2022) with the official parameter names (pvt_v2_b2.pth loads):
    four stages at 1/4 .. 1/32, no drop-path."""

    reductions = (4, 8, 16, 32)
    first_conv = "patch_embed1.proj.weight"
    unused_prefixes = ("head.",)

    def __init__(self, dims, heads, mlp_ratios, depths, sr_ratios, in_channels=3):
        super().__init__()
        self.out_channels = tuple(dims)
        for i, dim in enumerate(dims):
            prev = in_channels if i == 0 else dims[i - 1]
            embed = OverlapPatchEmbed(prev, dim, 7 if i == 0 else 3, 4 if i == 0 else 2)
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", nn.ModuleList(
                PVTBlock(dim, heads[i], mlp_ratios[i], sr_ratios[i]) for _ in range(depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dim, eps=1e-6))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        features = []
        for i in range(1, len(self.out_channels) + 1):
            x, size = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, size)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, *size)
            features.append(x)
        return features


@register_encoder("pvt_v2_b2")
def pvt_v2_b2(in_channels=3):
    return PVTv2Encoder((64, 128, 320, 512), (1, 2, 5, 8), (8, 8, 4, 4), (3, 4, 6, 3), (8, 4, 2, 1),
                        in_channels)


# ------------------------------------------------------------------------------------ weight files

def _describe(names, limit=10):
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_encoder_state(encoder, state_dict, source="state_dict"):
    """Strictly loads ``state_dict`` (parameters and BatchNorm buffers) into ``encoder``.

    Raises ValueError naming the missing and unexpected keys and the mismatched shapes, with
    ``source`` (a file name, a model) in the message. BatchNorm ``num_batches_tracked`` counters
    absent from old files are filled with zeros.
    """
    expected = encoder.state_dict()
    state = dict(state_dict)
    for key, tensor in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(tensor)
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    mismatched = [f"{key}: got {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}"
                  for key in sorted(expected.keys() & state.keys())
                  if tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_describe(unexpected)}")
        if mismatched:
            problems.append("mismatched shapes: " + "; ".join(mismatched[:10])
                            + (f" ... (+{len(mismatched) - 10} more)" if len(mismatched) > 10 else ""))
        raise ValueError(f"cannot load {source} into {type(encoder).__name__}: " + "; ".join(problems))
    encoder.load_state_dict(state)


def _adapt_first_conv(weight, in_channels):
    """ImageNet RGB filters for another input width: summed for 1 channel, else cycled and
    rescaled by 3 / in_channels (segmentation_models_pytorch does the same)."""
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    index = torch.arange(in_channels) % weight.shape[1]
    return weight[:, index] * (weight.shape[1] / in_channels)


def read_weights_file(path):
    """The state_dict of a local weight file (a plain one, or one under a "state_dict"/"model"
    key; a "module." prefix is stripped). Raises FileNotFoundError for a missing file and
    ValueError for one that is not a PyTorch state_dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path} (encoder_weights takes a "
                                "local file path; nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or a pickle that weights_only refuses
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"cannot load encoder weights {path}: not a PyTorch weights file, or a damaged "
                         f"one ({type(e).__name__}: {first_line})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    return {key[7:] if key.startswith("module.") else key: value for key, value in state.items()}


def load_encoder_weights(encoder, path):
    """Loads a local weight file (see read_weights_file) into ``encoder``; ValueError names the
    keys, shapes and the file when it does not match."""
    state = read_weights_file(path)
    state = {key: value for key, value in state.items() if not key.startswith(encoder.unused_prefixes)}
    conv = encoder.first_conv
    if conv in state and state[conv].dim() == 4:
        state[conv] = _adapt_first_conv(state[conv], encoder.state_dict()[conv].shape[1])
    load_encoder_state(encoder, state, source=f"encoder weights file {path}")
