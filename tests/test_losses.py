import math

import pytest
import torch

from condseg import ConDSegOutput
from condseg.losses import (area_weight, complementary_loss, consistency_loss, mask_loss,
                            stage1_loss, stage2_loss)

LN3 = math.log(3)


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_mask_loss_binary_by_hand():
    logits = t([[[[0.0, LN3]]]])            # p = 0.5, 0.75
    target = t([[[[1.0, 0.0]]]])
    bce = (math.log(2) + math.log(4)) / 2
    dice = 1 - (2 * 0.5 + 1) / (1.25 + 1 + 1)
    assert mask_loss(logits, target).item() == pytest.approx(bce + dice, abs=1e-12)
    # (B, H, W) targets and per-image reduction
    assert mask_loss(logits, target[:, 0], reduction="none").shape == (1,)


def test_mask_loss_multiclass_by_hand():
    logits = t([[[[0.0]], [[LN3]]]])        # softmax = 0.25, 0.75
    target = torch.tensor([[[0]]])
    ce = math.log(4)
    dice = ((1 - 1.5 / 2.25) + (1 - 1 / 1.75)) / 2
    assert mask_loss(logits, target).item() == pytest.approx(ce + dice, abs=1e-12)
    for dtype in (torch.uint8, torch.int32):  # class indices of any integer type
        assert mask_loss(logits, target.to(dtype)).item() == pytest.approx(ce + dice, abs=1e-12)
    with pytest.raises(ValueError, match="class indices"):
        mask_loss(logits, target.double())


def test_consistency_loss_by_hand_and_detached_targets():
    a = t([[[[0.0, LN3]]]]).requires_grad_()        # p = 0.5, 0.75 -> binarised [1, 1]
    b = t([[[[-LN3, 2.0]]]]).requires_grad_()       # p = 0.25, 0.88 -> binarised [0, 1]
    loss = consistency_loss(a, b)
    bce_a = (math.log(2) + math.log(4 / 3)) / 2                 # a against [0, 1]
    bce_b = (math.log(4) + math.log(1 + math.exp(-2))) / 2      # b against [1, 1]
    assert loss.item() == pytest.approx((bce_a + bce_b) / 2, abs=1e-12)
    loss.backward()
    # Only the direct BCE term reaches a: 0.5 * (p_a - target_a) / N
    torch.testing.assert_close(a.grad, 0.5 * (torch.sigmoid(a) - t([[[[0.0, 1.0]]]])).detach() / 2)


def test_stage1_loss_is_the_sum():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    target = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()
    expected = mask_loss(a, target) + mask_loss(b, target) + consistency_loss(a, b, 0.3)
    torch.testing.assert_close(stage1_loss(a, b, target, threshold=0.3), expected)


def test_area_weight_by_hand():
    logits = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), -30.0), torch.full((1, 2, 2), 30.0)])
    logits.requires_grad_()
    beta = area_weight(logits)
    torch.testing.assert_close(beta, torch.tensor([1 / math.tanh(0.5), 10.0, 1 / math.tanh(1.0)]))
    assert not beta.requires_grad
    assert area_weight(logits, max_weight=5.0)[1].item() == pytest.approx(5.0)
    double = area_weight(logits.detach().double())  # float64 stays float64 (it once went through float32)
    assert double.dtype == torch.float64
    assert double[0].item() == pytest.approx(1 / math.tanh(0.5), rel=1e-14)


def test_complementary_loss_by_hand():
    fg, bg, uc = t([[[[0.0]]]]), t([[[[LN3]]]]), t([[[[-LN3]]]])    # 0.5, 0.75, 0.25
    expected = 0.5 * 0.75 + 0.5 * 0.25 + 0.75 * 0.25
    assert complementary_loss(fg, bg, uc).item() == pytest.approx(expected, abs=1e-12)


def test_stage2_loss_composition():
    g = torch.Generator().manual_seed(1)
    out = ConDSegOutput(*(torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(4)))
    out.fg[1] -= 3.0         # a different predicted area per image -> a different beta per image
    target = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).double()
    total, parts = stage2_loss(out, target)
    b1, b2 = area_weight(out.fg), area_weight(out.bg)
    assert b1[0] != b1[1]
    expected = (mask_loss(out.mask, target, reduction="none")
                + b1 * mask_loss(out.fg, target, reduction="none")
                + b2 * mask_loss(out.bg, 1 - target, reduction="none")).mean()
    expected = expected + complementary_loss(out.fg, out.bg, out.uc)
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"mask", "fg", "bg", "compl", "beta_fg", "beta_bg"}
    assert not any(v.requires_grad for v in parts.values())
    torch.testing.assert_close(parts["beta_fg"], b1.mean())
    # an explicit background target (e.g. augmented separately) replaces 1 - target
    torch.testing.assert_close(stage2_loss(out, target, bg_target=1 - target)[0], total)
    assert stage2_loss(out, target, bg_target=target)[0] != total


def test_stage2_loss_multiclass_and_gradients():
    g = torch.Generator().manual_seed(2)
    aux = [torch.randn(2, 1, 4, 4, generator=g, requires_grad=True) for _ in range(3)]
    mask = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    total, parts = stage2_loss(ConDSegOutput(mask, *aux), target)
    expected_fg = mask_loss(aux[0], (target > 0).float())
    torch.testing.assert_close(parts["fg"], expected_fg.detach())
    total.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in [mask, *aux])
