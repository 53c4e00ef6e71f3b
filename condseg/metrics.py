"""Segmentation metrics (DESIGN.md section 5), vectorised on tensors.

Binary (one channel): the prediction is sigmoid(logits) >= threshold (or probs >= threshold),
the target a mask (> 0.5 is foreground) shaped (B, 1, H, W) or (B, H, W). Multi-class (K > 1
channels): the prediction is the argmax, the target class indices (B, H, W); scores are per class.

Conventions: a ratio whose numerator and denominator are both 0 scores ``empty_score`` (default 1)
when prediction and ground truth are both empty, else 0 (e.g. precision of an empty prediction
on a non-empty ground truth, recall of a non-empty prediction on an empty ground truth).
"""
import torch
import torch.nn.functional as F

METRICS = ("iou", "dice", "recall", "precision")


def confusion_counts(logits_or_probs, target, threshold=0.5, from_logits=True):
    """(tp, fp, fn) per image: (B,) for one channel, (B, K) per class for K > 1 channels."""
    x = logits_or_probs.detach()
    if x.dim() != 4:
        raise ValueError(f"predictions must be (B, C, H, W), got shape {tuple(x.shape)}")
    target = target.detach()
    if x.shape[1] == 1:
        if target.dim() == 3:
            target = target.unsqueeze(1)
        pred = (torch.sigmoid(x) if from_logits else x) >= threshold
        truth = target > 0.5 if target.is_floating_point() else target > 0
    else:
        if target.dim() == 4:
            target = target[:, 0]
        classes = x.shape[1]
        pred = F.one_hot(x.argmax(1), classes).movedim(-1, 1).bool()
        truth = F.one_hot(target.long(), classes).movedim(-1, 1).bool()
    if pred.shape != truth.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match predictions {tuple(x.shape)}")
    tp = (pred & truth).flatten(2).sum(-1)
    fp = (pred & ~truth).flatten(2).sum(-1)
    fn = (~pred & truth).flatten(2).sum(-1)
    if x.shape[1] == 1:
        tp, fp, fn = tp[:, 0], fp[:, 0], fn[:, 0]
    return tp, fp, fn


def scores_from_counts(tp, fp, fn, empty_score=1.0):
    """IoU, Dice, recall and precision from confusion counts (any shape), with the empty rules
    of this module."""
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    both_empty = (tp + fp + fn) == 0
    fill = torch.where(both_empty, torch.full_like(tp, empty_score), torch.zeros_like(tp))

    def ratio(num, den):
        return torch.where(den > 0, num / den.clamp(min=1), fill)

    return {"iou": ratio(tp, tp + fp + fn), "dice": ratio(2 * tp, 2 * tp + fp + fn),
            "recall": ratio(tp, tp + fn), "precision": ratio(tp, tp + fp)}


def per_image_metrics(logits_or_probs, target, threshold=0.5, from_logits=True, empty_score=1.0):
    """Dict of "iou", "dice", "recall", "precision": (B,) tensors, or (B, K) for K classes."""
    counts = confusion_counts(logits_or_probs, target, threshold, from_logits)
    return scores_from_counts(*counts, empty_score=empty_score)


def pooled_metrics(logits_or_probs, target, threshold=0.5, from_logits=True, empty_score=1.0):
    """Dataset-level scores from the confusion counts summed over all images: scalars, or (K,)."""
    tp, fp, fn = (c.sum(0) for c in confusion_counts(logits_or_probs, target, threshold, from_logits))
    return scores_from_counts(tp, fp, fn, empty_score=empty_score)


class MetricTracker:
    """Accumulates metrics over batches.

    ``compute()`` returns floats: "mIoU", "mDSC", "recall", "precision" (means over images, the
    paper's numbers) and "pooled_iou", "pooled_dice" (from counts summed over the dataset). With
    K > 1 classes the per-image scores are also averaged over the foreground classes 1..K-1, and
    "dice_per_class" lists the mean Dice of every class.
    """

    def __init__(self, threshold=0.5, from_logits=True, empty_score=1.0):
        self.threshold, self.from_logits, self.empty_score = threshold, from_logits, empty_score
        self.reset()

    def reset(self):
        self.images = 0
        self._sums = None     # per-metric sums over images (scalar or (K,))
        self._counts = None   # (tp, fp, fn) summed over images

    def update(self, logits, target):
        counts = confusion_counts(logits, target, self.threshold, self.from_logits)
        scores = scores_from_counts(*counts, empty_score=self.empty_score)
        sums = {name: value.sum(0) for name, value in scores.items()}
        totals = [c.sum(0) for c in counts]
        if self._sums is None:
            self._sums, self._counts = sums, totals
        else:
            self._sums = {name: self._sums[name] + sums[name] for name in sums}
            self._counts = [a + b for a, b in zip(self._counts, totals)]
        self.images += logits.shape[0]

    def compute(self):
        if not self.images:
            raise RuntimeError("MetricTracker.compute() called before any update()")
        means = {name: value / self.images for name, value in self._sums.items()}
        pooled = scores_from_counts(*self._counts, empty_score=self.empty_score)
        multiclass = means["dice"].dim() == 1

        def summary(value):
            return float(value[1:].mean() if multiclass else value)

        result = {"mIoU": summary(means["iou"]), "mDSC": summary(means["dice"]),
                  "recall": summary(means["recall"]), "precision": summary(means["precision"]),
                  "pooled_iou": summary(pooled["iou"]), "pooled_dice": summary(pooled["dice"])}
        if multiclass:
            result["dice_per_class"] = [float(v) for v in means["dice"]]
        return result
