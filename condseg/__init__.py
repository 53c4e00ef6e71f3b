"""condseg: ConDSeg medical image segmentation (Lei et al., AAAI 2025) on fused condseg_ops kernels."""
import importlib.metadata

from .models import (ConDSeg, ConDSegOutput, ConDSegStage1, create_encoder, list_encoders,
                     load_encoder_weights, register_encoder)
from .data import SegmentationDataset, check_dataset, make_synthetic_dataset
from .engine import TrainConfig, evaluate, load_model, predict, train

__all__ = ["ConDSeg", "ConDSegOutput", "ConDSegStage1", "SegmentationDataset", "TrainConfig",
           "check_dataset", "create_encoder", "evaluate", "list_encoders", "load_encoder_weights",
           "load_model", "make_synthetic_dataset", "predict", "register_encoder", "train"]

try:
    __version__ = importlib.metadata.version("condseg")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"
