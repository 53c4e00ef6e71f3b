"""Reading images and masks from disk (Pillow), with errors that name the file."""
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_LOSSY = (".jpg", ".jpeg")
_ORIENTATION = 0x0112  # the EXIF tag
_READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def _open(path, kind):
    try:
        img = Image.open(path)
        img.load()  # decode now, so truncated files fail here and not later
        if img.getexif().get(_ORIENTATION, 1) != 1:  # camera photos: the pixels as viewers show them
            img = ImageOps.exif_transpose(img)
        return img
    except FileNotFoundError:
        raise DatasetError(f"{kind} file not found: {path}", path) from None
    except _READ_ERRORS as e:
        raise DatasetError(f"cannot read {kind} {path}: {e}", path) from None


_INTEGER_16 = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_AS_STORED = ("L", "LA", "RGB", "RGBA")  # 8-bit modes whose channels are grey or R, G, B (and alpha)


def _to_array(img, indices=False):
    """Pixel array of any Pillow mode, and the maximum value of its range. 8-bit modes come back as
    L, LA, RGB or RGBA: palette, CMYK, YCbCr, LAB and HSV files are converted first (their raw
    channels are not colours), except that with ``indices`` a palette file gives its raw indices."""
    if img.mode == "1":
        return np.array(img, dtype=np.uint8), 1
    if img.mode in _INTEGER_16:
        return np.array(img).astype(np.int64), 65535
    if img.mode == "F":
        return np.array(img, dtype=np.float32), 1.0
    if indices and img.mode in ("P", "PA"):  # a label map (VOC style): each index is a class
        arr = np.array(img)
        return (arr[:, :, 0] if arr.ndim == 3 else arr), 255
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode not in _AS_STORED:
        img = img.convert("RGBA" if img.mode.endswith(("A", "a")) else "RGB")
    return np.array(img), 255


def read_image(path, channels=3):
    """Image as a uint8 array (H, W, channels); grayscale, RGB, RGBA, palette and 16-bit inputs work."""
    img = _open(path, "image")
    arr, top = _to_array(img)
    if top != 255:
        arr = np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
    arr = arr.astype(np.uint8, copy=False)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = arr[:, :, :3] if arr.shape[2] >= 3 else arr[:, :, :1]  # drop alpha
    if channels == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif channels == 1 and arr.shape[2] == 3:
        arr = np.array(Image.fromarray(arr).convert("L"))[:, :, None]
    elif channels not in (1, 3):
        raise ValueError(f"read_image: channels must be 1 or 3, got {channels}")
    return np.ascontiguousarray(arr)


def read_mask(path, binarize="half", classes=1):
    """Mask as a uint8 array (H, W).

    Binary (``classes == 1``): foreground where the value is at least half the range of the file's
    pixel type (128 for 8-bit, 32768 for 16-bit), or any non-zero value with ``binarize="nonzero"``
    (instance-label masks such as GlaS). A lossless mask (not JPEG) whose largest value is 1 is a
    0/1 mask: 1 marks the foreground. Colour masks are reduced by their channel maximum (alpha ignored).
    Multi-class (``classes > 1``): the stored values are class indices and must be < classes; a
    palette file's indices are its values (not the palette's colours).
    """
    arr, top = raw_mask(path, indices=classes > 1)
    if classes > 1:
        if arr.size and (arr.min() < 0 or arr.max() >= classes):
            raise DatasetError(f"mask {path} has values {sorted(np.unique(arr).tolist())[:10]} "
                               f"outside the {classes} class indices 0..{classes - 1}", path)
        return arr.astype(np.uint8)
    if binarize == "nonzero":
        return (arr > 0).astype(np.uint8)
    if binarize != "half":
        raise ValueError(f"read_mask: binarize must be 'half' or 'nonzero', got {binarize!r}")
    if top > 1 and arr.size and arr.max() == 1 and Path(path).suffix.lower() not in _LOSSY:
        return (arr == 1).astype(np.uint8)  # an integer 0/1 mask (JPEG noise of 1 is not one)
    return (arr >= half_range(top)).astype(np.uint8)


def half_range(top):
    """The smallest foreground value of a binary mask whose values reach ``top``: 128 for 8-bit,
    32768 for 16-bit, 0.5 for float masks."""
    return math.ceil(top / 2) if isinstance(top, int) else top / 2


def raw_mask(path, indices=False):
    """The stored values of a mask (H, W), colour channels reduced by their maximum, and the top of
    the file's value range (255 for 8-bit, 65535 for 16-bit). ``indices``: see _to_array."""
    arr, top = _to_array(_open(path, "mask"), indices)
    if arr.ndim == 3:
        arr = (arr[:, :, :1] if arr.shape[2] == 2 else arr[:, :, :3]).max(axis=2)  # LA: grey; RGB(A)
    return arr, top


def is_image_file(path):
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS
