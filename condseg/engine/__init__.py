"""Training, evaluation and prediction for ConDSeg."""
from .builders import build_model, load_model
from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .evaluate import evaluate
from .loops import CompileFailed, TrainingDiverged
from .predict import predict
from .train import TrainResult, train

__all__ = ["CheckpointError", "CompileFailed", "TrainConfig", "TrainResult", "TrainingDiverged", "build_model", "evaluate",
           "load_checkpoint", "load_model", "predict", "save_checkpoint", "train"]
