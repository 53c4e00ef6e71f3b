"""ConDSeg training objectives (DESIGN.md section 5). Every function takes logits.

Binary targets are float masks in [0, 1] shaped (B, 1, H, W) or (B, H, W); multi-class targets
are class indices (B, H, W) (long).
"""
import torch
import torch.nn.functional as F


def _binary_target(target, logits):
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    return target.to(logits.dtype)


def _per_image(x):
    return x.flatten(1).mean(1)


def soft_dice_loss(probs, target, smooth=1.0):
    """1 - soft Dice per image and channel, (B, C): (2 sum(p t) + s) / (sum(p) + sum(t) + s)."""
    inter = (probs * target).flatten(2).sum(-1)
    total = probs.flatten(2).sum(-1) + target.flatten(2).sum(-1)
    return 1 - (2 * inter + smooth) / (total + smooth)


def mask_loss(logits, target, smooth=1.0, reduction="mean"):
    """Lmask = BCE + Dice for one logit channel; CE + soft Dice (mean over all classes) for more.

    Both terms are per image (pixel-mean BCE/CE, Dice with ``smooth``); ``reduction="none"``
    returns the (B,) per-image losses, "mean" their mean.
    """
    if logits.shape[1] == 1:
        target = _binary_target(target, logits)
        ce = _per_image(F.binary_cross_entropy_with_logits(logits, target, reduction="none"))
        dice = soft_dice_loss(torch.sigmoid(logits), target, smooth)[:, 0]
    else:
        if target.dim() == logits.dim() and target.shape[1] == 1:
            target = target[:, 0]
        if target.shape != logits.shape[:1] + logits.shape[2:] or target.is_floating_point():
            raise ValueError(f"multi-class target must be class indices (long) shaped "
                             f"{tuple(logits.shape[:1] + logits.shape[2:])}, got {target.dtype} "
                             f"{tuple(target.shape)}")
        target = target.long()  # uint8 / int32 indices too: cross_entropy and one_hot take int64
        ce = _per_image(F.cross_entropy(logits, target, reduction="none"))
        onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
        dice = soft_dice_loss(torch.softmax(logits, dim=1), onehot, smooth).mean(1)
    loss = ce + dice
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def consistency_loss(logits_a, logits_b, threshold=0.5):
    """Lcons = (BCE(a, [p_b >= t]) + BCE(b, [p_a >= t])) / 2; the binarised targets carry no
    gradient."""
    with torch.no_grad():
        target_a = (torch.sigmoid(logits_b) >= threshold).to(logits_a.dtype)
        target_b = (torch.sigmoid(logits_a) >= threshold).to(logits_b.dtype)
    return (F.binary_cross_entropy_with_logits(logits_a, target_a)
            + F.binary_cross_entropy_with_logits(logits_b, target_b)) / 2


def stage1_loss(logits_a, logits_b, target, threshold=0.5):
    """Consistency Reinforcement objective: Lmask(a) + Lmask(b) + Lcons(a, b), with a = Net_0(x)
    and b = Net_0(Aug(x))."""
    return (mask_loss(logits_a, target) + mask_loss(logits_b, target)
            + consistency_loss(logits_a, logits_b, threshold))


def area_weight(logits, max_weight=10.0):
    """beta = 1 / tanh(mean predicted area) per image, (B,), detached.

    The area is the pixel mean of sigmoid(logits) of the map the weight multiplies (M_fg for
    beta1, M_bg for beta2). tanh(area) is clamped below at 1 / max_weight, so beta lies in
    [1 / tanh(1) = 1.31, max_weight] and never reaches inf on an empty prediction (the released
    code clamps at 10 too).
    """
    with torch.no_grad():
        area = _per_image(torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32))))
        return (1 / torch.tanh(area).clamp(min=1 / max_weight)).to(logits.dtype)


def complementary_loss(logits_fg, logits_bg, logits_uc):
    """Lcompl = mean over pixels of p_fg p_bg + p_fg p_uc + p_bg p_uc (sigmoid probabilities)."""
    fg, bg, uc = torch.sigmoid(logits_fg), torch.sigmoid(logits_bg), torch.sigmoid(logits_uc)
    return (fg * bg + fg * uc + bg * uc).mean()


def stage2_loss(output, target, bg_target=None, max_weight=10.0):
    """Stage-2 objective: mean over images of Lmask + b1 Lfg + b2 Lbg, plus Lcompl.

    ``output`` is a :class:`condseg.ConDSegOutput`. Lfg is BCE + Dice of M_fg against the
    foreground (target > 0 for multi-class targets), Lbg of M_bg against ``bg_target`` (default
    1 - foreground). b1, b2 are :func:`area_weight` of M_fg and M_bg.
    Returns (total, parts) with parts a dict of detached scalar tensors: "mask", "fg", "bg",
    "compl", "beta_fg", "beta_bg" (batch means).
    """
    if output.mask.shape[1] == 1:
        fg_target = _binary_target(target, output.fg)
    else:
        fg_target = (target.reshape(output.fg.shape[:1] + output.fg.shape[2:]) > 0)
        fg_target = fg_target.unsqueeze(1).to(output.fg.dtype)
    bg_target = 1 - fg_target if bg_target is None else _binary_target(bg_target, output.bg)

    l_mask = mask_loss(output.mask, target, reduction="none")
    l_fg = mask_loss(output.fg, fg_target, reduction="none")
    l_bg = mask_loss(output.bg, bg_target, reduction="none")
    beta_fg, beta_bg = area_weight(output.fg, max_weight), area_weight(output.bg, max_weight)
    l_compl = complementary_loss(output.fg, output.bg, output.uc)
    total = (l_mask + beta_fg * l_fg + beta_bg * l_bg).mean() + l_compl
    parts = {"mask": l_mask.mean(), "fg": l_fg.mean(), "bg": l_bg.mean(), "compl": l_compl,
             "beta_fg": beta_fg.mean(), "beta_bg": beta_bg.mean()}
    return total, {name: value.detach() for name, value in parts.items()}
