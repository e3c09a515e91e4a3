"""hybridpk: mechanistic population-PK models with a VAE correction (hybrid models) and precision dosing.

The public API is re-exported here and imported lazily, so that ``import hybridpk`` (and the CLI's
``--version``/``--help``) stay fast: torch and pandas load only when a name that needs them is used.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hybridpk")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

# public name -> module that defines it
_EXPORTS = {
    "read_nonmem": "hybridpk.data.dataset",
    "Dataset": "hybridpk.data.dataset",
    "EventBatch": "hybridpk.data.batch",
    "Regimen": "hybridpk.data.regimen",
    "bundled_dataset": "hybridpk.data.bundled",
    "bundled_datasets": "hybridpk.data.bundled",
    "get_model": "hybridpk.models",
    "list_models": "hybridpk.models",
    "CompartmentModel": "hybridpk.models",
    "simulate": "hybridpk.solve",
    "simulate_population": "hybridpk.solve",
    "simulate_population_chunks": "hybridpk.solve",
    "make_design": "hybridpk.solve",
    "Prediction": "hybridpk.solve",
    "build_model": "hybridpk.population",
    "fit_population": "hybridpk.population",
    "FittedPopulation": "hybridpk.population",
    "IndividualEstimates": "hybridpk.population",
    "Predictions": "hybridpk.population",
    "PopulationModel": "hybridpk.population",
    "load_model": "hybridpk.population",
    "model_specs": "hybridpk.population",
    "read_control_stream": "hybridpk.population.nonmem",
    "fit_hybrid": "hybridpk.residual",
    "HybridFit": "hybridpk.residual",
    "load_run": "hybridpk.residual",
    "LatentClassifier": "hybridpk.classify",
    "train_classifier": "hybridpk.classify",
    "recommend_dose": "hybridpk.dosing",
    "interval_for_dose": "hybridpk.dosing",
    "time_to_concentration": "hybridpk.dosing",
    "auc": "hybridpk.dosing",
    "loading_dose": "hybridpk.dosing",
    "estimate_patient": "hybridpk.dosing",
    "forecast": "hybridpk.dosing",
    "HybridPKError": "hybridpk.errors",
    "DatasetError": "hybridpk.errors",
    "DatasetWarning": "hybridpk.errors",
    "Violation": "hybridpk.errors",
    "ModelError": "hybridpk.errors",
    "SolverError": "hybridpk.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hybridpk' has no attribute {name!r}")


def __dir__():
    return __all__
