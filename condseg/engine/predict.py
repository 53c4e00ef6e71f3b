"""Prediction on image files of any size: masks at each input's own size, optional overlays,
probability maps and SID uncertainty maps. Decoding runs in data-loader workers and PNG writing
in a thread pool, so the model does not wait on I/O."""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..data.augment import normalize
from ..data.dataset import resize_image
from ..data.errors import DatasetError
from ..data.io import is_image_file, read_image
from ..inference import fold_batchnorm, nnpack_ready, use_winograd_convolutions
from .builders import load_model
from .folders import missing_folders, remove_empty
from .runtime import resolve_device

PALETTE = np.array([(0, 0, 0), (0, 255, 0), (255, 0, 0), (0, 128, 255), (255, 255, 0), (255, 0, 255),
                    (0, 255, 255), (255, 128, 0)], dtype=np.uint8)


def list_inputs(inputs):
    """Image files from files and folders (a folder's image files, sorted, not recursive)."""
    files = []
    for item in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
            if not found:
                raise DatasetError(f"no image files in {path}", path)
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DatasetError(f"input not found: {path}", path)
    return files


class _Images(Dataset):
    def __init__(self, files, size, channels):
        self.files, self.size, self.channels = files, size, channels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        arr = read_image(self.files[i], self.channels)
        return resize_image(arr, self.size), i, arr.shape[:2]


def _collate(items):
    return torch.stack([it[0] for it in items]), [it[1] for it in items], [it[2] for it in items]


def _hot(values):
    """uint8 (H, W) -> RGB 'hot' colour map (black, red, yellow, white)."""
    v = values.astype(np.float32) / 255.0
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def draw_overlay(image, labels, alpha=0.4):
    """The image (H, W, 3) with the predicted classes tinted and their outline drawn."""
    out = image.astype(np.float32)
    colours = PALETTE[np.minimum(labels, len(PALETTE) - 1)].astype(np.float32)
    fg = labels > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    pad = np.pad(labels, 1, mode="edge")
    edge = fg & ((pad[:-2, 1:-1] != labels) | (pad[2:, 1:-1] != labels)
                 | (pad[1:-1, :-2] != labels) | (pad[1:-1, 2:] != labels))
    out[edge] = (255, 255, 0)
    return out.astype(np.uint8)


def _unique_stem(path, suffixes, used):
    """The input's stem, numbered when one of its output names (stem + each suffix) is taken:
    inputs "scan.png" and "scan_overlay.png" must not both write scan_overlay.png. Names compare
    case-blind, as on Windows and macOS file systems."""
    stem, k = path.stem, 1
    while any(f"{stem}{suffix}".lower() in used for suffix in suffixes):
        stem, k = f"{path.stem}_{k}", k + 1
    used.update(f"{stem}{suffix}".lower() for suffix in suffixes)
    return stem


def _refuse_input_folders(files, out_dir):
    """Masks never go into a folder that holds inputs: they could overwrite the user's images there
    (x.jpg's mask is x.png), and a later run on that folder would read them as images."""
    folders = {path.resolve().parent for path in files}
    if out_dir.resolve() in folders:
        raise ValueError(f"predict: the output folder {out_dir} holds input images; masks written there could "
                         f"overwrite images, and a later run on it would read them as inputs. Choose another "
                         f"--out folder")


def _taken(path):
    return path.exists() or path.is_symlink()  # a dangling link too: writing would follow it


def _refuse_existing(paths, out_dir):
    """Files already in the output folder are never replaced unless asked (``overwrite``): they may be
    the user's ground-truth masks or images, which a mask of the same name would destroy."""
    existing = [path for path in paths if _taken(path)]
    if existing:
        shown = ", ".join(path.name for path in existing[:3]) + (f" and {len(existing) - 3} more"
                                                                 if len(existing) > 3 else "")
        raise ValueError(f"predict: {len(existing)} output file(s) exist already in {out_dir} ({shown}); "
                         f"pass overwrite=True (CLI: --overwrite) to replace them, or choose another output folder")


def _write(record, labels, prob, unc, classes, write_overlay):
    stem_path = record["stem_path"]
    mask = labels.astype(np.uint8) * (255 if classes == 1 else 1)
    Image.fromarray(mask).save(record["mask"])
    if prob is not None:
        Image.fromarray(prob).save(f"{stem_path}_prob.png")
    if unc is not None:
        Image.fromarray(_hot(unc)).save(f"{stem_path}_uncertainty.png")
    if write_overlay:
        image = read_image(record["input"], 3)
        Image.fromarray(draw_overlay(image, labels)).save(record["overlay"])


@torch.no_grad()
def predict(checkpoint, inputs, out_dir, overlay=False, probabilities=False, uncertainty=False,
            device="auto", batch_size=8, workers=2, threshold=None, overwrite=False, winograd=True):
    """Segment image files (any size, any of jpg/png/bmp/tif) with a trained checkpoint.

    Each input is resized to the training size, segmented, and the logits are resized back to the
    input's size. The model runs with its BatchNorms folded into the convolutions
    (:func:`condseg.inference.fold_batchnorm`). On the CPU, unless ``winograd`` is False, the 3x3
    convolutions on maps of 64x64 and more run through NNPACK's Winograd algorithm
    (:func:`condseg.inference.use_winograd_convolutions`; logits within a few 1e-5 of their scale).
    Writes to ``out_dir``: ``<stem>.png`` (binary mask 0/255, or class indices),
    and optionally ``<stem>_overlay.png``, ``<stem>_prob.png`` (foreground probability x 255) and
    ``<stem>_uncertainty.png`` (the SID uncertainty branch's map, stage-2 checkpoints only).
    A file of those names already in ``out_dir`` is an error unless ``overwrite``; ``out_dir``
    may not be a folder of the inputs. ``threshold`` (binary checkpoints only; default 0.5) is the
    foreground probability of the masks; a multi-class mask takes each pixel's most likely class.
    Returns one dict per input with the paths written.
    """
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"predict: threshold is a foreground probability in [0, 1], got {threshold}")
    device = resolve_device(device)
    model, state = load_model(checkpoint, device)
    # BatchNorm folded into the convolutions: the same function up to float rounding, fewer kernels;
    # with Winograd too, 1.23x the images/s of the model as trained on 2 cores (README)
    model = fold_batchnorm(model, inplace=True)
    if winograd and device.type == "cpu" and nnpack_ready():
        model = use_winograd_convolutions(model, inplace=True)
    mcfg = state["model_config"]
    classes = mcfg.get("classes", 1)
    if threshold is not None and classes > 1:
        raise ValueError(f"predict: threshold={threshold} (CLI: --threshold) applies to binary checkpoints; "
                         f"{checkpoint} has {classes} classes, and its masks take each pixel's most likely class")
    if uncertainty and mcfg["arch"] != "condseg":
        raise ValueError(f"uncertainty maps come from the stage-2 network; {checkpoint} is a stage-1 checkpoint")
    files = list_inputs(inputs)
    out_dir = Path(out_dir)
    suffixes = [".png", *["_overlay.png"] * overlay, *["_prob.png"] * probabilities,
                *["_uncertainty.png"] * uncertainty]
    _refuse_input_folders(files, out_dir)
    used = set()
    stems = [_unique_stem(path, suffixes, used) for path in files]
    outputs = [out_dir / f"{stem}{suffix}" for stem in stems for suffix in suffixes]
    if not overwrite:
        _refuse_existing(outputs, out_dir)
    for path in outputs:  # replaced, not written through: a link may point outside out_dir
        if path.is_symlink():
            path.unlink()
    new_files = [path for path in outputs if not path.exists()]
    created = missing_folders(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _predict_files(model, state, files, stems, out_dir, overlay, probabilities, uncertainty, device,
                              batch_size, workers, 0.5 if threshold is None else threshold)
    except BaseException:
        # a run that fails (a corrupt image halfway, Ctrl-C) takes back what it wrote, so that running it
        # again needs no --overwrite; files it replaced (overwrite=True) stay replaced
        for path in new_files:
            path.unlink(missing_ok=True)
        remove_empty(created)
        raise


def _predict_files(model, state, files, stems, out_dir, overlay, probabilities, uncertainty, device, batch_size,
                   workers, threshold):
    mcfg = state["model_config"]
    classes = mcfg.get("classes", 1)
    loader = DataLoader(_Images(files, tuple(state["image_size"]), mcfg["in_channels"]), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    records, pending = [], []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for images, indices, sizes in loader:
            x = normalize(images.to(device, non_blocking=True))
            if uncertainty:
                out = model(x, return_aux=True)
                logits, unc_logits = out.mask.float(), out.uc.float()
            else:
                logits, unc_logits = model(x).float(), None
            for j, i in enumerate(indices):
                size = tuple(sizes[j])
                up = F.interpolate(logits[j:j + 1], size=size, mode="bilinear", align_corners=False)[0]
                if classes == 1:
                    p = torch.sigmoid(up[0])
                    labels = (p >= threshold).to(torch.uint8)
                else:
                    p = 1 - torch.softmax(up, dim=0)[0]  # probability of any foreground class
                    labels = up.argmax(0).to(torch.uint8)
                prob = (p * 255).round().to(torch.uint8).cpu().numpy() if probabilities else None
                unc = None
                if unc_logits is not None:
                    u = F.interpolate(unc_logits[j:j + 1], size=size, mode="bilinear", align_corners=False)
                    unc = (torch.sigmoid(u[0, 0]) * 255).round().to(torch.uint8).cpu().numpy()
                stem_path = out_dir / stems[i]
                record = {"input": str(files[i]), "mask": f"{stem_path}.png", "stem_path": str(stem_path)}
                if overlay:
                    record["overlay"] = f"{stem_path}_overlay.png"
                if probabilities:
                    record["probability"] = f"{stem_path}_prob.png"
                if unc is not None:
                    record["uncertainty"] = f"{stem_path}_uncertainty.png"
                records.append(record)
                pending.append(pool.submit(_write, record, labels.cpu().numpy(), prob, unc, classes, overlay))
        for job in pending:
            job.result()
    for r in records:
        del r["stem_path"]
    return records
