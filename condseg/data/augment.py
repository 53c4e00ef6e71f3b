"""Batched augmentation on the training device, parameters sampled per image (DESIGN.md 5).

Written in plain torch (no kornia/torchvision): a few tensor ops, no extra dependency, runs on any
device and dtype, and every random number comes from one torch generator, so resuming restores it.

- ``geometric``: random flips, 90-degree turns and a small rotation, applied to the image and the
  mask together (the background target 1 - mask is derived afterwards, so it follows too).
- ``strong``: the stage-1 perturbation Aug(x): colour jitter (brightness, contrast, saturation 0.3,
  hue 0.1), random grayscale, Gaussian blur.
Images are float in [0, 1], shape (B, C, H, W); masks (B, 1, H, W).
"""
import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(n, low, high, device, generator):
    return torch.rand(n, generator=generator).to(device) * (high - low) + low


def _bernoulli(n, p, device, generator):
    return (torch.rand(n, generator=generator) < p).to(device)


def _bernoulli_cpu(n, p, generator):
    return torch.rand(n, generator=generator) < p


def normalize(images):
    """uint8 or [0, 1] images -> normalised float (ImageNet statistics; 0.5/0.5 for one channel)."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    c = images.shape[1]
    mean = torch.tensor(IMAGENET_MEAN if c == 3 else (0.5,) * c, device=images.device, dtype=images.dtype)
    std = torch.tensor(IMAGENET_STD if c == 3 else (0.5,) * c, device=images.device, dtype=images.dtype)
    return (images - mean.view(1, c, 1, 1)) / std.view(1, c, 1, 1)


def geometric(images, masks, rotation=15.0, rot90=True, hflip=0.5, vflip=0.5, labels=False,
              generator=None):
    """The same random flips/rotation for each image and its mask (binary masks are re-thresholded
    after bilinear resampling; class-label masks, ``labels=True``, use nearest). Areas rotated in
    from outside are 0 (image) and background (mask)."""
    b, _, h, w = images.shape
    dev = images.device
    angle = _uniform(b, -rotation, rotation, dev, generator) if rotation else torch.zeros(b, device=dev)
    turns = torch.randint(0, 4, (b,), generator=generator).to(dev) if rot90 and h == w else None
    if turns is not None:
        angle = angle + 90.0 * turns
    sx = torch.where(_bernoulli(b, hflip, dev, generator), -1.0, 1.0)
    sy = torch.where(_bernoulli(b, vflip, dev, generator), -1.0, 1.0)
    rad = angle * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # output (x, y) in normalised coordinates samples the input at R^-1 applied with aspect ratio
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = cos * sx
    theta[:, 0, 1] = -sin * (h / w) * sy
    theta[:, 1, 0] = sin * (w / h) * sx
    theta[:, 1, 1] = cos * sy
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out_images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    binary = not labels
    m = masks.to(images.dtype)
    out_masks = F.grid_sample(m, grid, mode="bilinear" if binary else "nearest", padding_mode="zeros",
                              align_corners=False)
    out_masks = (out_masks >= 0.5).to(masks.dtype) if binary else out_masks.round().to(masks.dtype)
    return out_images, out_masks


def _gray(images):
    r, g, b = images[:, 0:1], images[:, 1:2], images[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _rgb_to_hsv(x):
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    s = delta / maxc.clamp_min(1e-8)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def _hsv_to_rgb(x):
    h, s, v = x[:, 0], x[:, 1], x[:, 2]
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = [torch.zeros_like(v) for _ in range(3)]
    for k, (rr, gg, bb) in enumerate(choices):
        sel = i == k
        out[0] = torch.where(sel, rr, out[0])
        out[1] = torch.where(sel, gg, out[1])
        out[2] = torch.where(sel, bb, out[2])
    return torch.stack(out, dim=1)


def _blur(images, sigma):
    """Per-image separable Gaussian blur (sigma: (B,)), reflect padding."""
    b, c, h, w = images.shape
    radius = max(1, min(int(math.ceil(3 * float(sigma.max()))), (min(h, w) - 1) // 2))
    xs = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    k = torch.exp(-(xs[None] ** 2) / (2 * sigma[:, None].to(images.dtype) ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, 2r+1)
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def strong(images, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1, grayscale=0.2, blur=0.5,
           sigma=(0.1, 2.0), reference_size=256, generator=None):
    """Stage-1 Aug(x) with independent parameters per image. Blur sigmas are given for
    ``reference_size`` pixels (the paper's 256) and scaled to the actual image size."""
    b, c, h, w = images.shape
    dev = images.device
    view = (b, 1, 1, 1)
    x = images.clamp(0, 1)
    f = _uniform(b, 1 - brightness, 1 + brightness, dev, generator).view(view)
    x = (x * f).clamp(0, 1)
    f = _uniform(b, 1 - contrast, 1 + contrast, dev, generator).view(view)
    mean = (_gray(x) if c == 3 else x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * f + mean).clamp(0, 1)
    if c == 3:
        f = _uniform(b, 1 - saturation, 1 + saturation, dev, generator).view(view)
        g = _gray(x)
        x = ((x - g) * f + g).clamp(0, 1)
        shift = _uniform(b, -hue, hue, dev, generator).view(b, 1, 1)
        hsv = _rgb_to_hsv(x)
        hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
        x = _hsv_to_rgb(hsv).clamp(0, 1)
        to_gray = _bernoulli(b, grayscale, dev, generator).view(view)
        x = torch.where(to_gray, _gray(x).expand_as(x), x)
    scale = min(h, w) / reference_size
    s = _uniform(b, sigma[0] * scale, sigma[1] * scale, dev, generator).clamp_min(1e-3)
    do_blur = _bernoulli_cpu(b, blur, generator)
    if bool(do_blur.any()):
        x = torch.where(do_blur.to(dev).view(view), _blur(x, s), x)
    return x
