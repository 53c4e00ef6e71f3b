"""check_dataset: every problem of a dataset folder, reported at once (``condseg data check``)."""
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import load_pair
from .errors import DatasetError, MissingFilesError
from .io import half_range, raw_mask
from .layouts import SPLITS, Sample, _index_layout, find_samples, format_ids, resolve_layout, shared_images


@dataclass
class Problem:
    path: str
    message: str

    def __str__(self):
        return f"{self.path}: {self.message}"


@dataclass
class DatasetReport:
    root: str
    layout: str = None
    pairs: int = 0
    splits: dict = field(default_factory=dict)   # split -> number of usable pairs
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # suspicious but usable: they do not fail the check

    @property
    def ok(self):
        return not self.problems

    def __str__(self):
        lines = [f"dataset {self.root}: layout {self.layout or 'unknown'}, {self.pairs} image/mask pairs"]
        lines += [f"  split {k}: {v} pairs" for k, v in self.splits.items()]
        if self.ok:
            lines.append("no problems found")
        else:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {p}" for p in self.problems]
        if self.warnings:
            lines.append(f"{len(self.warnings)} warning(s):")
            lines += [f"  {w}" for w in self.warnings]
        return "\n".join(lines)


def _check_pair(sample, binarize, classes):
    """(problem, warning, digest of the image file) of one pair; problem and warning are None when
    there is nothing to say."""
    digest = _content(sample.image)
    try:
        _, mask = load_pair(sample, 3, classes, binarize)
    except DatasetError as e:
        return Problem(e.path or str(sample.image), str(e)), None, digest
    if classes == 1 and binarize == "half" and not mask.any():
        values, top = raw_mask(sample.mask)
        if values.max() > 0:  # a mask stored at another scale (0/255 in 16 bits, say) reads as empty
            return None, Problem(str(sample.mask), f"binarises to all background: its largest value is "
                                                   f"{values.max()}, under the threshold {half_range(top)} (half "
                                                   f"the file's range); rescale it if it marks foreground"), digest
    return None, None, digest


def check_dataset(root, classes=1, workers=4):
    """Scan a dataset folder and return a DatasetReport listing every problem found: missing ids
    in split files, empty splits, duplicate ids, unpaired files, unreadable or corrupt files,
    images and masks of different sizes, mask values outside the classes, pairs that two splits
    share."""
    root = Path(root)
    report = DatasetReport(str(root))
    layouts, unfound = {}, None
    for split in (None,) + SPLITS:
        try:
            layouts[split] = resolve_layout(root, split)
        except DatasetError as e:
            if split is None:
                unfound = e  # no pairs at the top: split sub-folders (ROOT/train/images) may hold them
            elif (root / f"{split}.txt").is_file():
                report.problems.append(Problem(str(root / f"{split}.txt"), str(e)))
            elif (root / split / "images").is_dir():
                report.problems.append(Problem(str(root / split), str(e)))
    subfolders = any((root / split / "images").is_dir() for split in SPLITS)
    if unfound is not None and (not subfolders or not layouts):
        report.problems.append(Problem(str(root), str(unfound)))
        return report
    report.layout = next(iter(layouts.values())).name
    # every file in every folder, whichever split names it
    seen, digests = {}, {}  # digests: image file -> digest of its bytes (identical copies compare equal)
    for layout in layouts.values():
        key = (layout.image_dir, layout.mask_dir)
        if key in seen:
            continue
        duplicates = []
        images, masks = _index_layout(layout, duplicates)
        report.problems += [Problem(e.path, str(e)) for e in duplicates]
        seen[key] = [Sample(i, images[i], masks[i]) for i in sorted(images) if i in masks]
        for i in sorted(set(images) - set(masks)):
            report.problems.append(Problem(str(images[i]), f"image has no mask in {layout.mask_dir}"))
        for i in sorted(set(masks) - set(images)):
            report.problems.append(Problem(str(masks[i]), f"mask has no image in {layout.image_dir}"))
        binarize = layout.binarize
        with ThreadPoolExecutor(max_workers=workers) as pool:
            checks = pool.map(lambda s: _check_pair(s, binarize, classes), seen[key])
            for sample, (problem, warning, digest) in zip(seen[key], checks):
                report.problems += [problem] if problem else []
                report.warnings += [warning] if warning else []
                digests[sample.image] = digest
    report.pairs = sum(len(v) for v in seen.values())
    if not report.pairs and seen:
        report.problems.append(Problem(str(root), "no image/mask pairs found"))
    by_split = {}
    for split, layout in layouts.items():
        if split is None:
            continue
        try:  # duplicate ids were reported above; here the first file keeps the id
            samples, _ = find_samples(root, split, duplicates=[])
            report.splits[split] = len(samples)
            by_split[split] = samples
        except MissingFilesError as e:
            for folder, ids in e.missing.items():
                if folder == str(layout.mask_dir):
                    continue  # images without a mask: each was reported above, with its file
                report.problems.append(Problem(str(layout.split_file or folder),
                                               f"split {split!r}: {len(ids)} id(s) with no file in "
                                               f"{folder}: {', '.join(ids)}"))
            try:
                samples = find_samples(root, split, True, warn=lambda m: None, duplicates=[])[0]
                report.splits[split] = len(samples)
                by_split[split] = samples
            except DatasetError:
                report.splits[split] = 0
        except DatasetError as e:
            report.problems.append(Problem(e.path or str(layout.split_file or layout.image_dir), str(e)))
    _report_shared_pairs(report, by_split, layouts, digests)
    return report


def _content(path):
    """A digest of the file's bytes (the path itself when it cannot be read: reported elsewhere)."""
    try:
        return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
    except OSError:
        return str(path)


def _report_shared_pairs(report, by_split, layouts, digests):
    """Training images in val or test, the same file or a byte-identical copy, are a problem
    (scores on them overstate the model); val and test sharing images only a warning (a dataset
    may validate on its test set on purpose), and not even that where both are one layout (GlaS:
    testA_/testB_ serve as both)."""
    same = lambda sample: digests.get(sample.image) or _content(sample.image)  # noqa: E731
    if "train" in by_split:
        for other in ("val", "test"):
            shared = shared_images(by_split["train"], by_split.get(other, []), same)
            if shared:
                layout = layouts[other]
                report.problems.append(Problem(
                    str(layout.split_file or layout.image_dir),
                    f"splits 'train' and {other!r} share {len(shared)} image(s) (the same file or an identical "
                    f"copy): {format_ids(shared)}; scores on images the model trained on overstate it"))
    if "val" in by_split and "test" in by_split and layouts["val"] != layouts["test"]:
        shared = shared_images(by_split["val"], by_split["test"], same)
        if shared:
            layout = layouts["test"]
            report.warnings.append(Problem(
                str(layout.split_file or layout.image_dir),
                f"splits 'val' and 'test' share {len(shared)} image(s) (the same file or an identical copy): "
                f"{format_ids(shared)}; the best checkpoint, chosen on val, has seen them"))
