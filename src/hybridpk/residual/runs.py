"""One loader for every run folder ``hybridpk fit`` writes: a population fit (native or NONMEM import) or a
hybrid."""

from __future__ import annotations

from pathlib import Path

from ..errors import HybridPKError
from ..population import FittedPopulation
from ..population.manifest import read_manifest
from .hybrid import HybridFit

__all__ = ["load_run"]


def load_run(run_dir) -> FittedPopulation | HybridFit:
    """The fitted model saved in ``run_dir``: a :class:`HybridFit` when the run holds a trained VAE
    (manifest.json lists vae.pt), else a :class:`FittedPopulation`. The loader checks every file the
    manifest lists (sizes and SHA-256). Loading never executes code (JSON, and tensors with
    ``weights_only=True``)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise HybridPKError(f"{run} is not a run folder (written by 'hybridpk fit'); for a published model "
                            "spec use load_model")
    if (run / "manifest.json").is_file():
        files = read_manifest(run, verify=False)   # the loaders verify, after reading their own files
        if "vae.pt" in files:
            return HybridFit.load(run)
        return FittedPopulation.load(run)   # hybrid files left from an earlier save are not part of this run
    if (run / "vae.json").is_file() or (run / "vae.pt").is_file():
        return HybridFit.load(run)
    return FittedPopulation.load(run)
