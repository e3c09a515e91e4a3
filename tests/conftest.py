"""Shared fixtures: seeded RNG, paths of reference datasets."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def pharmpy_examples() -> Path:
    """Folder of pharmpy's bundled NONMEM examples (pheno, moxo); pharmpy-core is a test dependency."""
    import importlib.util

    spec = importlib.util.find_spec("pharmpy")
    assert spec is not None, "pharmpy-core is a test dependency: pip install -e '.[test]'"
    return Path(spec.origin).parent / "internals" / "example_models"


@pytest.fixture(scope="session")
def theoph_path() -> Path:
    return REPO / "data" / "theoph.csv"
