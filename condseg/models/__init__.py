"""ConDSeg models: encoders, the ConDSeg network and the stage-1 network (Net_0)."""
from .condseg import ConDSeg, ConDSegOutput
from .encoders import create_encoder, list_encoders, load_encoder_weights, register_encoder
from .stage1 import ConDSegStage1

__all__ = ["ConDSeg", "ConDSegOutput", "ConDSegStage1", "create_encoder", "list_encoders",
           "load_encoder_weights", "register_encoder"]
