"""Models, optimisers and schedulers from plain-dict configurations (as stored in checkpoints)."""
import torch

from ..models import ConDSeg, ConDSegStage1
from .checkpoints import load_checkpoint


def model_config(stage, encoder="resnet50", in_channels=3, classes=1, decoder_channels=128,
                 cdfa_variant="paper"):
    """The dict that rebuilds a stage's network (stored in every checkpoint)."""
    if stage == 1:
        return {"arch": "stage1", "encoder_name": encoder, "in_channels": in_channels}
    return {"arch": "condseg", "encoder_name": encoder, "in_channels": in_channels, "classes": classes,
            "decoder_channels": decoder_channels, "cdfa_variant": cdfa_variant}


def build_model(config, encoder_weights=None):
    kwargs = {k: v for k, v in config.items() if k != "arch"}
    if config["arch"] == "stage1":
        return ConDSegStage1(encoder_weights=encoder_weights, **kwargs)
    if config["arch"] == "condseg":
        return ConDSeg(encoder_weights=encoder_weights, **kwargs)
    raise ValueError(f"unknown architecture {config['arch']!r} in model config")


def load_model(checkpoint, device="cpu"):
    """(model in eval mode on ``device``, checkpoint dict) from a condseg checkpoint file."""
    state = load_checkpoint(checkpoint)
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def make_optimizer(model, lr, encoder_lr=None, weight_decay=0.0):
    """Adam; the encoder gets ``encoder_lr`` when given (stage 2: lower than the rest). The fused
    implementation updates a whole group in one kernel, on CPU and CUDA alike (a light CPU step
    spent 50 ms in Adam's per-parameter loop, 20 ms fused, under torch.profiler)."""
    if encoder_lr is None or encoder_lr == lr:
        groups = [{"params": list(model.parameters()), "lr": lr, "name": "all"}]
    else:
        enc = set(id(p) for p in model.encoder.parameters())
        groups = [{"params": [p for p in model.parameters() if id(p) in enc], "lr": encoder_lr, "name": "encoder"},
                  {"params": [p for p in model.parameters() if id(p) not in enc], "lr": lr, "name": "rest"}]
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=fused)


def make_scheduler(optimizer, kind, epochs, patience=10, factor=0.1):
    """"plateau" (ReduceLROnPlateau on validation loss, as the released code), "cosine" (to 0 over
    ``epochs``) or "none"."""
    if kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", patience=patience, factor=factor)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    if kind == "none":
        return None
    raise ValueError(f"scheduler must be plateau, cosine or none; got {kind!r}")

