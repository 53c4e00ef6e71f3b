"""condseg: ConDSeg medical image segmentation (Lei et al., AAAI 2025) on fused condseg_ops kernels."""
from .models import (ConDSeg, ConDSegOutput, ConDSegStage1, create_encoder, list_encoders,
                     load_encoder_weights, register_encoder)

__all__ = ["ConDSeg", "ConDSegOutput", "ConDSegStage1", "create_encoder", "list_encoders",
           "load_encoder_weights", "register_encoder"]
