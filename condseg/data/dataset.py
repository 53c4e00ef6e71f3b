"""SegmentationDataset: image/mask pairs resized to the training size, as uint8 tensors."""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DatasetError
from .io import read_image, read_mask
from .layouts import format_ids, find_samples


def as_size(size):
    """(height, width) from an int or a pair."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def resize_image(arr, size):
    """uint8 (H, W, C) -> uint8 (C, h, w) tensor, bilinear with antialiasing."""
    h, w = size
    if arr.shape[:2] != (h, w):
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        arr = np.array(img.resize((w, h), Image.BILINEAR))
        arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def resize_mask(arr, size, classes=1):
    """uint8 (H, W) -> uint8 (1, h, w): binary masks resized smoothly then re-thresholded,
    label maps with nearest neighbour."""
    h, w = size
    if arr.shape != (h, w):
        if classes > 1:
            arr = np.array(Image.fromarray(arr).resize((w, h), Image.NEAREST))
        else:
            grey = Image.fromarray(arr * np.uint8(255)).resize((w, h), Image.BILINEAR)
            arr = (np.array(grey) >= 128).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr))[None]


def load_pair(sample, channels=3, classes=1, binarize="half"):
    """Full-size image (H, W, C) and mask (H, W) arrays; a size mismatch is an error naming both."""
    image = read_image(sample.image, channels)
    mask = read_mask(sample.mask, binarize, classes)
    if image.shape[:2] != mask.shape:
        raise DatasetError(f"image {sample.image} is {image.shape[1]}x{image.shape[0]} but its mask "
                           f"{sample.mask} is {mask.shape[1]}x{mask.shape[0]} (width x height)", sample.image)
    return image, mask


class SegmentationDataset(Dataset):
    """Pairs of one split, resized to ``image_size``.

    Items are dicts: ``image`` uint8 (C, h, w), ``mask`` uint8 (1, h, w) holding 0/1 (or class
    indices), ``index``; with ``keep_original`` also ``original_mask`` (uint8 (1, H, W) at the file's
    size, for metrics at the original resolution). Augmentation and normalisation happen later, on
    the training device (condseg.data.augment). ``preload=True`` decodes every pair once, in
    threads, and serves them from memory (no data-loader workers needed). ``ids`` keeps only
    those ids of the split, in that order.
    """

    def __init__(self, root, split=None, image_size=256, in_channels=3, classes=1,
                 skip_missing=False, preload=False, keep_original=False, ids=None, warn=None):
        self.root, self.split = root, split
        self.size = as_size(image_size)
        self.in_channels, self.classes, self.keep_original = in_channels, classes, keep_original
        self.samples, self.layout = find_samples(root, split, skip_missing, warn)
        if ids is not None:  # a subset, in the given order
            by_id = {s.id: s for s in self.samples}
            unknown = [i for i in ids if i not in by_id]
            if unknown:
                raise DatasetError(f"ids not in split {split!r} of {root}: {format_ids(unknown)}", root)
            self.samples = [by_id[i] for i in ids]
            if not self.samples:  # an empty list, as when too few pairs are left after a held-out share
                where = f"split {split!r} of {root}" if split else str(root)
                raise DatasetError(f"no pairs selected from {where} (an empty id list): "
                                   f"without a val split, training holds pairs out for validation and its "
                                   f"{len(by_id)} pair(s) leave none to train on; add more pairs, or a val "
                                   f"split ({Path(root) / 'val.txt'}, one id per line)", root)
        self._cache = None
        if preload:
            self.load_all()

    def load_all(self):
        """Decodes every pair once, in threads, and serves them from memory from then on (what
        ``preload=True`` does at construction)."""
        with ThreadPoolExecutor(max_workers=4) as pool:
            items = list(pool.map(self._load, range(len(self.samples))))
        self._cache = {k: torch.stack([it[k] for it in items]) for k in ("image", "mask")}

    @property
    def ids(self):
        return [s.id for s in self.samples]

    def empty_masks(self):
        """Ids of the pairs whose mask (at the dataset's size) holds no foreground, or None when the
        pairs are not preloaded (finding out would decode every mask)."""
        if self._cache is None:
            return None
        has_foreground = self._cache["mask"].flatten(1).amax(1) > 0
        return [s.id for s, fg in zip(self.samples, has_foreground.tolist()) if not fg]

    def __len__(self):
        return len(self.samples)

    def _load(self, index):
        image, mask = load_pair(self.samples[index], self.in_channels, self.classes, self.layout.binarize)
        item = {"image": resize_image(image, self.size), "mask": resize_mask(mask, self.size, self.classes),
                "index": index}
        if self.keep_original:
            item["original_mask"] = torch.from_numpy(mask)[None]
        return item

    def __getitem__(self, index):
        if self._cache is not None and not self.keep_original:
            return {"image": self._cache["image"][index], "mask": self._cache["mask"][index], "index": index}
        return self._load(index)


def collate(items):
    """Stack fixed-size fields; variable-size ones (``original_mask``) stay lists."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key == "index":
            out[key] = torch.tensor(values)
        elif key == "original_mask":
            out[key] = values
        else:
            out[key] = torch.stack(values)
    return out
