"""Data layer: NONMEM-style records -> validated immutable Dataset -> padded EventBatch."""

from .bundled import bundled_dataset, bundled_datasets
from .dataset import Dataset, read_nonmem

__all__ = ["Dataset", "read_nonmem", "bundled_dataset", "bundled_datasets"]
