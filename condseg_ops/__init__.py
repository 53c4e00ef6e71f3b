"""condseg_ops: fused local K x K dual-softmax contrast-driven aggregation (ConDSeg CDFA)."""
from ._ops import contrast_aggregate
from .backends import BACKENDS, available_backends, build_info, use_backend
from .layers import ContrastAggregation
from .reference import contrast_aggregate_reference

__all__ = [
    "BACKENDS",
    "ContrastAggregation",
    "available_backends",
    "build_info",
    "contrast_aggregate",
    "contrast_aggregate_reference",
    "use_backend",
]
