"""One training epoch and one validation pass, for either stage."""
import math

import torch

from .. import losses
from ..data import augment
from ..metrics import MetricTracker
from ..models import ConDSegOutput
from .graphed import GraphedTrainStep
from .runlog import Progress
from .runtime import any_rank, autocast


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CompileFailed(RuntimeError):
    """torch.compile (``compile=True``) could not compile the training step: no C++ compiler or
    Triton for inductor, an unsupported torch, ...; training without it works."""


def _targets(masks, classes):
    """(binary float target for the foreground, the stage-2 mask target)."""
    if classes > 1:
        return (masks > 0).float(), masks[:, 0].long()
    return masks.float(), masks.float()


def memory_format(cfg):
    """Layout of the weights and batches: channels_last (NHWC) unless the config turns it off.
    The convolutions run faster in it: a light stage-2 step (resnet18, decoder 32, 96x96, batch 8)
    took 745 ms against 860-955 ms on a 2-core CPU; the full model's step on an H100 was 1.29x faster."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def loss_function(model, stage, cfg, device, amp, cache=True):
    """``compute(x, fg, target) -> (loss, parts)``: the network on the prepared batch ``x`` and
    the stage's objective (stage 1 on ``fg``, ``x`` holding the images and their strong
    augmentations; stage 2 on ``target``; ``cfg`` is read in stage 1 only). ``cache``: autocast's
    weight-cast cache."""
    def compute(x, fg, target):
        with autocast(device, amp, cache):
            out = model(x) if stage == 1 else model(x, return_aux=True)
        if stage == 1:
            a, b = out.float().chunk(2)
            return losses.stage1_loss(a, b, fg, cfg.consistency_threshold), {}
        return losses.stage2_loss(ConDSegOutput(*(o.float() for o in out)), target)
    return compute


def train_epoch(model, loader, optimizer, scaler, stage, cfg, device, amp, ctx, label=""):
    """Train one epoch; returns the mean loss and, in stage 2, its parts. Raises TrainingDiverged
    (on every rank) as soon as a loss is not finite, before it reaches the weights. With
    ``cfg.cuda_graph`` the steps replay one CUDA graph (:class:`GraphedTrainStep`, captured anew
    each epoch, since the scheduler may have changed the learning rates)."""
    model.train()
    totals, steps = {}, 0
    progress = Progress(len(loader), label, enabled=cfg.progress and ctx.is_main)
    compute = loss_function(model, stage, cfg, device, amp, cache=not cfg.cuda_graph)
    graphed = GraphedTrainStep(compute, optimizer) if cfg.cuda_graph else None
    try:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True).float().div_(255)
            masks = batch["mask"].to(device, non_blocking=True)
            images, masks = augment.geometric(images, masks, rotation=cfg.rotation, labels=cfg.classes > 1)
            fg, target = _targets(masks, cfg.classes)
            x = augment.normalize(torch.cat([images, augment.strong(images)]) if stage == 1 else images)
            x = x.contiguous(memory_format=memory_format(cfg))
            if graphed is not None:  # a loss that is not finite skipped its update on the device
                loss, parts = graphed(x, fg, target)
            else:
                loss, parts = compute(x, fg, target)
            value = float(loss.detach())
            if any_rank(ctx, not math.isfinite(value), device):
                raise TrainingDiverged(f"{label}: the loss became {value} at step {steps + 1}")
            if graphed is None:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            steps += 1
            totals["train_loss"] = totals.get("train_loss", 0.0) + value
            for k in ("mask", "fg", "bg", "compl"):
                if k in parts:
                    totals[f"loss_{k}"] = totals.get(f"loss_{k}", 0.0) + float(parts[k])
            progress.update(loss=totals["train_loss"] / steps)
    finally:
        progress.close()
        if graphed is not None:
            graphed.close()
    return {k: v / max(1, steps) for k, v in totals.items()}


@torch.no_grad()
def validate(model, loader, cfg, device, amp):
    """Validation loss (Lmask) and metrics (mIoU, mDSC, recall, precision: per-image means)."""
    model.eval()
    tracker, loss_sum, count = MetricTracker(), 0.0, 0
    for batch in loader:
        images = augment.normalize(batch["image"].to(device, non_blocking=True))
        images = images.contiguous(memory_format=memory_format(cfg))
        fg, target = _targets(batch["mask"].to(device, non_blocking=True), cfg.classes)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        t = fg if logits.shape[1] == 1 else target
        loss_sum += float(losses.mask_loss(logits, t)) * images.shape[0]
        count += images.shape[0]
        tracker.update(logits, t)
    metrics = tracker.compute()
    out = {"val_loss": loss_sum / max(1, count)}
    out.update({f"val_{k}": metrics[k] for k in ("mIoU", "mDSC", "recall", "precision")})
    return out
