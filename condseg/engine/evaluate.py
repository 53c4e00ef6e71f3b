"""Evaluation of a checkpoint on a dataset split: per-image metrics (DESIGN.md section 5)."""
import csv
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data.augment import normalize
from ..data.dataset import SegmentationDataset, collate
from ..metrics import per_image_metrics
from .builders import load_model
from .runtime import resolve_device

METRICS = ("iou", "dice", "recall", "precision")
SUMMARY = {"iou": "mIoU", "dice": "mDSC", "recall": "recall", "precision": "precision"}


def _foreground_mean(scores):
    """Per-image scores (B,) or, for K classes, the mean over classes 1..K-1."""
    return scores[:, 1:].mean(1) if scores.dim() == 2 else scores


def evaluation_files(out):
    """(summary .json, per-image .csv) written for ``out``: "val.json" or "val.csv" -> val.json +
    val.csv; any other name gets the two extensions added ("r18.val" -> r18.val.json +
    r18.val.csv), so two runs whose names differ after a dot never share a file."""
    out = Path(out)
    if out.suffix.lower() in (".json", ".csv"):
        out = out.with_suffix("")
    return out.with_name(out.name + ".json"), out.with_name(out.name + ".csv")


@torch.no_grad()
def evaluate(checkpoint, data_root, split="val", out=None, original_size=False, device="auto",
             batch_size=8, workers=0, skip_missing=False, threshold=0.5):
    """Metrics of ``checkpoint`` on a split of ``data_root``.

    Per image at ``threshold``: IoU, Dice, recall, precision, then the mean over images (mIoU, mDSC,
    recall, precision). With K > 1 classes the prediction is the argmax (no threshold), an image's
    score is the mean over the foreground classes 1..K-1, and the summary adds ``iou_per_class``
    and ``dice_per_class`` (K values, background first: means over images), and each per-image row
    its ``dice_0`` .. ``dice_{K-1}``. By default at the
    training size (as in the paper); ``original_size=True`` upsamples the logits to each mask's own
    size. With ``out``, writes the summary (JSON) and the per-image table (CSV) to the two files of
    evaluation_files(out). Returns the summary dict, whose "per_image" entry lists the per-image
    rows.
    """
    device = resolve_device(device)
    model, state = load_model(checkpoint, device)
    mcfg = state["model_config"]
    classes = mcfg.get("classes", 1)
    ds = SegmentationDataset(data_root, split, state["image_size"], mcfg["in_channels"], classes,
                             skip_missing=skip_missing, keep_original=original_size)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
    rows, per_class = [], {"iou": [], "dice": []}
    for batch in loader:
        logits = model(normalize(batch["image"].to(device))).float()
        if original_size:
            scores = {k: [] for k in METRICS}
            for i, mask in enumerate(batch["original_mask"]):
                up = F.interpolate(logits[i:i + 1], size=mask.shape[-2:], mode="bilinear", align_corners=False)
                one = per_image_metrics(up, _target(mask[None].to(device), classes), threshold)
                for k in METRICS:
                    scores[k].append(one[k])
            scores = {k: torch.cat(v) for k, v in scores.items()}
        else:
            scores = per_image_metrics(logits, _target(batch["mask"].to(device), classes), threshold)
        if classes > 1:
            for k in per_class:
                per_class[k].append(scores[k].cpu())
        scores = {k: _foreground_mean(v) for k, v in scores.items()}
        for j, index in enumerate(batch["index"].tolist()):
            row = {"id": ds.samples[index].id, **{k: float(scores[k][j]) for k in METRICS}}
            if classes > 1:  # the image's Dice of each class, background first
                row.update({f"dice_{c}": float(v) for c, v in enumerate(per_class["dice"][-1][j])})
            rows.append(row)
    n = len(rows)
    summary = {SUMMARY[k]: sum(r[k] for r in rows) / n for k in METRICS}
    summary.update({"images": n, "checkpoint": str(checkpoint), "data_root": str(data_root), "split": split,
                    "resolution": "original" if original_size else "x".join(map(str, state["image_size"]))})
    if classes > 1:
        summary.update({"classes": classes, "decision": "argmax",
                        **{f"{k}_per_class": [float(v) for v in torch.cat(per_class[k]).mean(0)] for k in per_class}})
    else:
        summary["threshold"] = threshold
    if out is not None:
        summary_file, table_file = evaluation_files(out)
        summary_file.parent.mkdir(parents=True, exist_ok=True)
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
        with open(table_file, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: v if k == "id" else f"{v:.6f}" for k, v in r.items()} for r in rows)
    summary["per_image"] = rows
    return summary


def _target(mask, classes):
    return mask[:, 0].long() if classes > 1 else mask.float()
