import pytest
import torch

from condseg.metrics import MetricTracker, confusion_counts, per_image_metrics, pooled_metrics


def batch():
    """Four 2x3 images: a normal case, empty GT, empty prediction, both empty."""
    pred = torch.tensor([[[1, 1, 0], [0, 1, 0]],     # tp 2, fp 1, fn 1
                         [[1, 0, 0], [0, 0, 0]],     # empty GT: fp 1
                         [[0, 0, 0], [0, 0, 0]],     # empty prediction: fn 2
                         [[0, 0, 0], [0, 0, 0]]], dtype=torch.float32)
    target = torch.tensor([[[1, 0, 0], [1, 1, 0]],
                           [[0, 0, 0], [0, 0, 0]],
                           [[1, 1, 0], [0, 0, 0]],
                           [[0, 0, 0], [0, 0, 0]]], dtype=torch.float32)
    return pred.unsqueeze(1), target.unsqueeze(1)


def test_confusion_counts_by_hand():
    pred, target = batch()
    tp, fp, fn = confusion_counts(pred, target, from_logits=False)
    assert tp.tolist() == [2, 0, 0, 0]
    assert fp.tolist() == [1, 1, 0, 0]
    assert fn.tolist() == [1, 0, 2, 0]


def test_per_image_metrics_by_hand():
    pred, target = batch()
    m = per_image_metrics(pred, target, from_logits=False)
    torch.testing.assert_close(m["iou"], torch.tensor([2 / 4, 0, 0, 1], dtype=torch.float64))
    torch.testing.assert_close(m["dice"], torch.tensor([4 / 6, 0, 0, 1], dtype=torch.float64))
    torch.testing.assert_close(m["recall"], torch.tensor([2 / 3, 0, 0, 1], dtype=torch.float64))
    torch.testing.assert_close(m["precision"], torch.tensor([2 / 3, 0, 0, 1], dtype=torch.float64))
    assert per_image_metrics(pred, target, from_logits=False, empty_score=0.0)["iou"][3] == 0


def test_logits_threshold_and_target_layouts():
    pred, target = batch()
    logits = (pred * 2 - 1) * 3                     # sigmoid >= 0.5 exactly where pred == 1
    probs_m = per_image_metrics(pred, target, from_logits=False)
    logit_m = per_image_metrics(logits, target[:, 0] * 255 > 128)   # bool (B, H, W) target
    for name in probs_m:
        torch.testing.assert_close(logit_m[name], probs_m[name])
    high = per_image_metrics(pred * 0.6, target, threshold=0.7, from_logits=False)
    assert high["iou"].tolist() == [0, 1, 0, 1]     # nothing predicted at t = 0.7


def test_pooled_metrics_by_hand():
    pred, target = batch()
    m = pooled_metrics(pred, target, from_logits=False)     # tp 2, fp 2, fn 3
    assert m["iou"].item() == pytest.approx(2 / 7)
    assert m["dice"].item() == pytest.approx(4 / 9)
    assert m["recall"].item() == pytest.approx(2 / 5)
    assert m["precision"].item() == pytest.approx(2 / 4)


def test_multiclass_per_class_dice():
    logits = torch.zeros(1, 4, 1, 4)
    logits[0, [0, 1, 2, 2], 0, torch.arange(4)] = 5.0    # argmax: [0, 1, 2, 2]
    target = torch.tensor([[[0, 1, 1, 2]]])
    m = per_image_metrics(logits, target)
    assert m["dice"].shape == (1, 4)
    torch.testing.assert_close(m["dice"][0], torch.tensor([1, 2 / 3, 2 / 3, 1], dtype=torch.float64))
    assert m["iou"][0, 1].item() == pytest.approx(0.5)   # class 3 absent in both -> empty score


def test_metric_tracker_means_over_images():
    pred, target = batch()
    logits = (pred * 2 - 1) * 3
    tracker = MetricTracker()
    tracker.update(logits[:3], target[:3])
    tracker.update(logits[3:], target[3:])
    result = tracker.compute()
    assert result["mIoU"] == pytest.approx((0.5 + 1) / 4)
    assert result["mDSC"] == pytest.approx((4 / 6 + 1) / 4)
    assert result["recall"] == pytest.approx((2 / 3 + 1) / 4)
    assert result["precision"] == pytest.approx((2 / 3 + 1) / 4)
    assert result["pooled_dice"] == pytest.approx(4 / 9)
    tracker.reset()
    with pytest.raises(RuntimeError):
        tracker.compute()


def test_metric_tracker_multiclass():
    logits = torch.zeros(2, 3, 1, 2)
    logits[:, 1] = 1.0                                # predicts class 1 everywhere
    target = torch.tensor([[[1, 1]], [[1, 2]]])
    tracker = MetricTracker()
    tracker.update(logits, target)
    result = tracker.compute()
    # class 1 dice per image: 1, 2/3; class 2: 1 (empty/empty), 0 -> foreground mean
    assert result["dice_per_class"] == pytest.approx([1.0, (1 + 2 / 3) / 2, 0.5])
    assert result["mDSC"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
