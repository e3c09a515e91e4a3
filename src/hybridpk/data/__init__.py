"""Data layer: NONMEM-style records -> validated immutable Dataset -> padded EventBatch; regimens as dose
records."""

from .bundled import bundled_dataset, bundled_datasets
from .dataset import Dataset, read_nonmem
from .regimen import Regimen

__all__ = ["Dataset", "read_nonmem", "bundled_dataset", "bundled_datasets", "Regimen"]
