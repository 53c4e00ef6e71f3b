"""Finding image/mask pairs on disk: the folder, ISIC and GlaS layouts and split files.

Folder layout (the default):   ROOT/images/<id>.<ext>, ROOT/masks/<id>[_mask|_segmentation].<ext>,
                               optional ROOT/train.txt, val.txt, test.txt (one id per line), or
                               split sub-folders ROOT/<split>/images and ROOT/<split>/masks.
ISIC challenge layout:          ROOT/*Training_Data/ (2018: *Training_Input/) <id>.jpg and
                               ROOT/*Training*GroundTruth/<id>_Segmentation.png (Validation /
                               Test likewise);
                               ``*_superpixels`` files are ignored, and so are other ground-truth
                               folders of the split (ISIC 2017 Part 2, ISIC 2018 Task 2) when one
                               holds ``<id>_segmentation`` masks.
GlaS layout:                    ROOT/<id>.bmp and ROOT/<id>_anno.bmp in one folder (instance masks,
                               binarised as label > 0); splits from the id prefix: train_, testA_,
                               testB_ ("test" and "val" mean testA + testB).
"""
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError, MissingFilesError
from .io import is_image_file

SPLITS = ("train", "val", "test")
ALL = "all"  # the split name for every pair (unless the dataset has an all.txt)
MASK_SUFFIXES = ("_segmentation", "_mask", "_anno")
_ISIC_WORDS = {"train": "training", "val": "validation", "test": "test"}
_GLAS_PREFIXES = {"train": ("train_",), "val": ("testA_", "testB_"), "test": ("testA_", "testB_"),
                  "testA": ("testA_",), "testB": ("testB_",)}


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    mask: Path


@dataclass
class Layout:
    """Where one split's files are: the folders, the ids (None: every image) and how to binarise."""

    name: str
    image_dir: Path
    mask_dir: Path
    ids: list = None
    split_file: Path = None
    binarize: str = "half"
    prefixes: tuple = None


def _mask_id(stem):
    low = stem.lower()
    for suffix in MASK_SUFFIXES:
        if low.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _index(folder, kind, key=lambda stem: stem, exclude=lambda stem: False, duplicates=None):
    """Map id -> file for the image files in a folder. Two files with one id are an error, or, with
    a ``duplicates`` list, are appended to it (the first file keeps the id)."""
    found = {}
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or not is_image_file(path) or path.name.startswith("."):
            continue
        if exclude(path.stem):
            continue
        key_ = key(path.stem)
        if key_ in found:
            error = DatasetError(f"two {kind} files share the id {key_!r}: {found[key_]} and {path}", path)
            if duplicates is None:
                raise error
            duplicates.append(error)
            continue
        found[key_] = path
    return found


def read_split_file(path):
    """Ids of a split file: one per line, blank lines and surrounding spaces ignored, a UTF-8 byte
    order mark (Windows editors) dropped, and so is an image extension (``<id>.jpg`` is ``<id>``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read split file {path}: {e}", path) from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    ids = [i[: -len(Path(i).suffix)] if is_image_file(i) else i for i in ids]
    if not ids:
        raise DatasetError(f"split file {path} is empty: it lists no ids", path)
    return ids


def _isic_dirs(root):
    dirs = [d for d in root.iterdir() if d.is_dir()]
    data = [d for d in dirs if d.name.lower().endswith(("_data", "_input"))]  # ISIC 2016/2017, 2018
    truth = [d for d in dirs if "groundtruth" in d.name.lower()]
    return data, truth


def _holds_segmentations(folder):
    """Whether a folder holds ISIC segmentation masks (``<id>_segmentation.png``)."""
    return any(p.stem.lower().endswith("_segmentation") and is_image_file(p) for p in folder.iterdir())


def _glas_root(root):
    for folder in [root] + sorted(d for d in root.iterdir() if d.is_dir()):
        if any(p.name.lower().endswith("_anno.bmp") for p in folder.iterdir()):
            return folder
    return None


def resolve_layout(root, split=None):
    """The Layout of ``split`` under ``root``: None or "all" (every pair), a split name, or the path
    of a split file (``*.txt``) naming ids of root's pairs. Errors say what was expected."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}", root)
    every = split == ALL and not (root / f"{ALL}.txt").is_file()
    if every:
        split = None
    if split and str(split).endswith(".txt"):  # a split file given by path (else inside root)
        split_file = Path(split)
        if not split_file.is_file() and (root / split_file).is_file():
            split_file = root / split_file
        layout = resolve_layout(root)
        layout.split_file, layout.ids, layout.prefixes = split_file, read_split_file(split_file), None
        return layout
    if (root / "images").is_dir() and (root / "masks").is_dir():
        split_file = root / f"{split}.txt" if split else None
        if split and not split_file.is_file():
            if (root / split / "images").is_dir():
                return resolve_layout(root / split)
            raise DatasetError(f"no split file {split_file} (nor folder {root / split / 'images'}); "
                               f"write one id per line, or take every pair with the split {ALL!r}")
        ids = read_split_file(split_file) if split else None
        return Layout("folder", root / "images", root / "masks", ids, split_file)
    if every and _glas_root(root) is None:  # ISIC and split sub-folders keep each split apart
        raise DatasetError(f"the split {ALL!r} (every pair) needs {root / 'images'} and {root / 'masks'} (or the "
                           f"GlaS layout); {root} keeps its splits in separate folders: name one of them", root)
    if split and (root / split / "images").is_dir():
        return resolve_layout(root / split)
    data, truth = _isic_dirs(root)
    if data and truth:
        word = _ISIC_WORDS.get(split or "train", split or "train").lower()
        image_dirs = [d for d in data if word in d.name.lower()]
        found = [d for d in truth if word in d.name.lower()]
        # ISIC 2017 Part 2 and 2018 Task 2 ground truth (superpixel features, attribute masks) come
        # beside the Part 1 / Task 1 segmentation masks: keep the folder of segmentation masks
        mask_dirs = [d for d in found if _holds_segmentations(d)] if len(found) > 1 else found
        if len(image_dirs) != 1 or len(mask_dirs) != 1:
            raise DatasetError(f"ISIC layout in {root}: expected one '*{word}*_Data' (or _Input) and one "
                               f"'*{word}*GroundTruth' folder with <id>_segmentation masks for split "
                               f"{split!r}, found {[d.name for d in image_dirs]} and {[d.name for d in found]}")
        return Layout("isic", image_dirs[0], mask_dirs[0])
    glas = _glas_root(root)
    if glas is not None:
        split_file = root / f"{split}.txt" if split else None
        if split_file is not None and split_file.is_file():
            return Layout("glas", glas, glas, read_split_file(split_file), split_file, "nonzero")
        if split and split not in _GLAS_PREFIXES:
            raise DatasetError(f"GlaS layout in {glas}: unknown split {split!r}; use one of "
                               f"{sorted(_GLAS_PREFIXES)} or write {split_file}")
        prefixes = _GLAS_PREFIXES[split] if split else None
        return Layout("glas", glas, glas, binarize="nonzero", prefixes=prefixes)
    raise DatasetError(f"no dataset found in {root}: expected {root / 'images'} and {root / 'masks'} "
                       f"(or the ISIC or GlaS layout)")


def _index_layout(layout, duplicates=None):
    """(id -> image file, id -> mask file) of a layout's folders; see _index for ``duplicates``."""
    same = layout.image_dir == layout.mask_dir
    images = _index(layout.image_dir, "image", exclude=lambda s: s.lower().endswith("_superpixels")
                    or (same and s.lower().endswith("_anno")), duplicates=duplicates)
    if same:
        masks = _index(layout.mask_dir, "mask", key=lambda s: s[:-5],
                       exclude=lambda s: not s.lower().endswith("_anno"), duplicates=duplicates)
    else:
        masks = _index(layout.mask_dir, "mask", key=_mask_id, duplicates=duplicates)
    return images, masks


def format_ids(ids, limit=20):
    """Up to ``limit`` ids, comma-separated, and how many more there are."""
    shown = ", ".join(ids[:limit])
    return shown + (f" (and {len(ids) - limit} more)" if len(ids) > limit else "")


def shared_images(samples_a, samples_b, key=None):
    """Ids of the samples of ``samples_b`` whose image is one of ``samples_a``'s (sorted): pairs that
    two splits share, so that validating on them measures what was trained on. Images are the same
    when ``key(sample)`` is (default: the resolved image path; data check also compares contents)."""
    key = key or (lambda sample: Path(sample.image).resolve())
    seen = {key(s) for s in samples_a}
    return sorted(s.id for s in samples_b if key(s) in seen)


def find_samples(root, split=None, skip_missing=False, warn=None, duplicates=None):
    """The (id, image, mask) samples of a split, in split-file order (else sorted by id).

    Ids without an image or a mask raise MissingFilesError listing them and the folder, unless
    ``skip_missing`` is set; the skipped ids are then reported through ``warn`` (default: print).
    Two files with one id raise DatasetError, or are appended to a ``duplicates`` list (see _index).
    Returns (samples, layout).
    """
    layout = resolve_layout(root, split)
    images, masks = _index_layout(layout, duplicates)
    if layout.ids is not None:
        ids = list(dict.fromkeys(layout.ids))
    else:
        ids = sorted(images)
        if layout.prefixes is not None:
            ids = [i for i in ids if i.startswith(layout.prefixes)]
    source = layout.split_file or layout.image_dir
    if not ids:
        raise DatasetError(f"split {split!r} of {root} is empty: no images in {source}")
    missing = {}
    no_image = [i for i in ids if i not in images]
    no_mask = [i for i in ids if i in images and i not in masks]
    if no_image:
        missing[str(layout.image_dir)] = no_image
    if no_mask:
        missing[str(layout.mask_dir)] = no_mask
    if missing:
        what = "; ".join(f"{len(v)} id(s) with no file in {k}: {format_ids(v)}" for k, v in missing.items())
        where = f"{layout.split_file} lists" if layout.split_file else "found"
        if not skip_missing:
            raise MissingFilesError(f"{where} {what}. Pass skip_missing=True (CLI: --skip-missing) "
                                    f"to leave them out.", missing)
        (warn or print)(f"warning: skipping missing pairs: {where} {what}")
    samples = [Sample(i, images[i], masks[i]) for i in ids if i in images and i in masks]
    if not samples:
        raise DatasetError(f"split {split!r} of {root} is empty: none of its ids has both files")
    return samples, layout


def available_splits(root):
    """The named splits that exist under root (split files, sub-folders, ISIC folders, GlaS). A split
    file that is there but unusable (empty, say) raises its DatasetError: passing over it would
    quietly put its pairs to another use."""
    out = []
    for split in SPLITS:
        try:
            resolve_layout(root, split)
            out.append(split)
        except DatasetError as e:
            if e.path is not None and Path(e.path) == Path(root) / f"{split}.txt":
                raise
    return out
