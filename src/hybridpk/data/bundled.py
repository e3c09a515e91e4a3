"""Find the example datasets shipped with hybridpk (the repository's ``data/`` folder)."""

from __future__ import annotations

from pathlib import Path

from ..errors import HybridPKError

__all__ = ["bundled_dataset", "bundled_datasets"]


def _data_dir() -> Path:
    here = Path(__file__).resolve()
    installed = here.parents[1] / "_bundled"          # wheel: hybridpk/_bundled
    if installed.is_dir():
        return installed
    return here.parents[3] / "data"                     # source checkout / editable install: <repo>/data


def bundled_datasets() -> list[str]:
    """Names of the bundled datasets (CSV files in ``data/``, without extension)."""
    d = _data_dir()
    return sorted(p.stem for p in d.glob("*.csv")) if d.is_dir() else []


def bundled_dataset(name: str) -> Path:
    """Path of bundled dataset ``name`` (e.g. ``"theoph"``); its column sidecar lies beside it.

    Examples
    --------
    >>> bundled_dataset("theoph").name
    'theoph.csv'
    """
    path = _data_dir() / f"{name.removesuffix('.csv')}.csv"
    if not path.is_file():
        raise HybridPKError(f"no bundled dataset named {name!r}; available: {', '.join(bundled_datasets())}")
    return path
