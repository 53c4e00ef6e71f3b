"""Datasets, augmentation, checks and synthetic demo data for ConDSeg."""
from . import augment
from .check import DatasetReport, check_dataset
from .dataset import SegmentationDataset, collate
from .errors import DatasetError, MissingFilesError
from .io import read_image, read_mask
from .layouts import available_splits, find_samples, resolve_layout
from .synthetic import make_synthetic_dataset, synthetic_sample

__all__ = ["DatasetError", "DatasetReport", "MissingFilesError", "SegmentationDataset", "augment",
           "available_splits", "check_dataset", "collate", "find_samples", "make_synthetic_dataset",
           "read_image", "read_mask", "resolve_layout", "synthetic_sample"]
