"""Synthetic demo data: soft-boundary, low-contrast blobs on a textured background.

Looks a little like the hard cases of medical segmentation (polyps, lesions): the object differs from
its surroundings by a small shift in colour and brightness, its edge is blurred, and the background
has texture of the same scale. Deterministic for a given seed; needs nothing but torch and Pillow.
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _smooth_noise(size, cells, generator):
    coarse = torch.rand(1, 3, cells, cells, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]


def synthetic_sample(size=64, generator=None):
    """One (image uint8 (H, W, 3), mask uint8 (H, W)) pair."""
    g = generator
    rnd = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    base = torch.tensor([0.55, 0.35, 0.3]) + 0.2 * (rnd(3) - 0.5)
    luma = _smooth_noise(size, 6, g)[:1] + 0.5 * _smooth_noise(size, 16, g)[:1]
    image = base.view(3, 1, 1) + 0.2 * (luma - 0.75) + 0.06 * (_smooth_noise(size, 8, g) - 0.5)
    inside = torch.zeros(size, size)
    for _ in range(1 + int(rnd(1) < 0.15)):
        cy, cx = (0.25 + 0.5 * rnd(2)) * size
        r0 = (0.12 + 0.16 * rnd(1)) * size
        theta = torch.atan2(yy - cy, xx - cx)
        wobble = sum(0.12 * rnd(1) * torch.cos(k * theta + 2 * math.pi * rnd(1)) for k in (2, 3, 5))
        dist = (torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r0 * (1 + wobble)) / max(size / 64, 1e-6)
        softness = 1.5 + 2.5 * float(rnd(1))
        inside = torch.maximum(inside, torch.sigmoid(-dist / softness))
    shift = (0.12 + 0.1 * rnd(1)) * torch.where(rnd(1) < 0.5, torch.tensor([1.0, 0.6, 0.8]),
                                                torch.tensor([-0.6, -1.0, -0.5]))
    image = image + shift.view(3, 1, 1) * inside + 0.15 * (_smooth_noise(size, 24, g) - 0.5) * inside
    image = image + 0.04 * torch.randn(3, size, size, generator=g)
    mask = (inside >= 0.5).to(torch.uint8)
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    return pixels.numpy(), mask.numpy()


def make_synthetic_dataset(root, train=96, val=32, test=0, size=64, seed=0):
    """Write a dataset in the folder layout (images/, masks/, train.txt, val.txt[, test.txt])."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    start = 0
    for split, count in (("train", train), ("val", val), ("test", test)):
        if not count:
            continue
        ids = [f"blob_{i:04d}" for i in range(start, start + count)]
        start += count
        for sid in ids:
            image, mask = synthetic_sample(size, g)
            Image.fromarray(image).save(root / "images" / f"{sid}.png")
            Image.fromarray(mask * np.uint8(255)).save(root / "masks" / f"{sid}.png")
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
