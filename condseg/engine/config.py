"""TrainConfig: every training option in one place, with its default."""
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class TrainConfig:
    """Options of :func:`condseg.engine.train.train` (and ``condseg train``).

    Stage 1 trains Net_0 with the consistency loss for ``stage1_epochs``; stage 2 trains the whole
    network for ``epochs`` with the encoder initialised from the best stage-1 checkpoint.
    ``stage1_epochs=None`` means ``epochs`` with ``stage="1"`` and a fifth of ``epochs`` (at least
    one) with ``stage="both"``.
    """

    data_root: str
    out: str
    stage: str = "both"                  # "both", "1" or "2"
    epochs: int = 100                    # stage-2 epochs
    stage1_epochs: int = None
    image_size: int = 256                # training side (multiple of 16); an int or (h, w)
    batch_size: int = 8
    encoder: str = "resnet50"
    encoder_weights: str = None          # local ImageNet weights file; None trains from scratch
    in_channels: int = 3
    classes: int = 1
    decoder_channels: int = 128
    cdfa_variant: str = "paper"
    stage1_checkpoint: str = None        # stage 2 alone: where the stage-1 encoder comes from
    lr: float = 1e-4                     # stage 2, everything but the encoder
    encoder_lr: float = 1e-5             # stage 2 encoder (when initialised from stage 1)
    stage1_lr: float = 1e-4
    weight_decay: float = 0.0
    scheduler: str = "plateau"           # "plateau" (on val loss), "cosine" or "none"
    lr_patience: int = 10
    lr_factor: float = 0.1
    early_stop: int = 30                 # epochs without a better val mDSC; 0 disables
    rotation: float = 15.0               # max small-rotation angle (plus flips and 90-degree turns)
    consistency_threshold: float = 0.5
    amp: str = "auto"                    # "auto" (CUDA: bf16, else fp16; CPU: off), "bf16", "fp16" (CUDA), "off"
    channels_last: bool = True           # NHWC weights and activations: faster convolutions, CPU and CUDA
    compile: bool = False                # torch.compile the training forward and backward (validation stays eager)
    cuda_graph: bool = False             # replay each training step as one CUDA graph (CUDA; bf16 or no autocast)
    device: str = "auto"
    workers: int = None                  # data-loader workers; None: 0 when preloaded, else 4
    preload: str = "auto"                # decode the dataset into memory: "auto", True, False
    train_split: str = "train"
    val_split: str = "val"
    val_fraction: float = 0.1            # held out of train when the dataset has no val split
    skip_missing: bool = False
    seed: int = 0
    deterministic: bool = False
    resume: bool = False
    overwrite: bool = False
    tensorboard: bool = None             # None: when installed
    progress: bool = True

    def __post_init__(self):
        self.stage = str(self.stage)
        if self.stage not in ("both", "1", "2"):
            raise ValueError(f"stage must be 'both', '1' or '2', got {self.stage!r}")
        size = self.image_size
        sides = (size, size) if isinstance(size, int) else tuple(size)
        if len(sides) != 2 or any(int(s) < 32 or int(s) % 16 for s in sides):
            raise ValueError(f"image_size must be a multiple of 16 (at least 32), got {size!r}")
        for name in ("epochs", "batch_size", "classes", "in_channels", "stage1_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("early_stop", "lr_patience", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 0:  # early_stop None: never; workers None: auto
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")
        for name in ("lr", "encoder_lr", "stage1_lr"):
            value = getattr(self, name)
            if name == "encoder_lr" and value is None:  # None: the encoder takes lr too
                continue
            if value is None or not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie between 0 and 1, got {self.val_fraction}")
        import torch  # here, not at import: the config module stays light

        from ..models import create_encoder, list_encoders
        from ..models.condseg import check_decoder_channels

        if self.encoder not in list_encoders():
            raise ValueError(f"unknown encoder {self.encoder!r}; choose one of {list_encoders()}")
        with torch.device("meta"):  # the encoder's deepest stride, without allocating its weights
            multiple = create_encoder(self.encoder, self.in_channels).reductions[-1]
        if any(int(s) % multiple for s in sides):
            raise ValueError(f"image_size must be a multiple of {multiple} for the {self.encoder} encoder, "
                             f"got {size!r}")
        check_decoder_channels(self.decoder_channels)  # now, not when stage 2 builds its network
        if self.stage1_checkpoint and self.stage != "2":
            raise ValueError(f"stage1_checkpoint is for stage='2' (CLI: --stage 2): with stage={self.stage!r} "
                             f"(CLI: --stage {self.stage}) the run trains its own stage 1 and stage 2 starts "
                             f"from that")
        if self.cuda_graph and self.compile:
            raise ValueError("cuda_graph=True (CLI: --cuda-graph) and compile=True (CLI: --compile) are two "
                             "ways to the same end: pass one of them")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other: pass one of them")

    @property
    def stage1_epoch_count(self):
        """Stage-1 epochs: ``stage1_epochs``, or derived from ``epochs`` when it is None (kept None
        in the saved config, so that a resumed run given new ``epochs`` derives it again)."""
        if self.stage1_epochs is not None:
            return self.stage1_epochs
        return self.epochs if self.stage == "1" else max(1, round(self.epochs / 5))

    @property
    def stages(self):
        return {"both": (1, 2), "1": (1,), "2": (2,)}[self.stage]

    def to_dict(self):
        """Plain values only (stored in checkpoints)."""
        out = {}
        for k, v in asdict(self).items():
            out[k] = str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
