"""Population fitting (NLME): THETA/OMEGA/SIGMA by FOCE with interaction, EBEs, diagnostics."""

from .fit import fit_population
from .result import ConvergenceWarning, FitResult
from .predict import load_fit, predict_population
from .spec import CovariateEffect, ErrorModel, PopulationModel, Theta, build_model, model_from_spec, parse_covariate

__all__ = ["fit_population", "FitResult", "ConvergenceWarning", "PopulationModel", "Theta", "ErrorModel",
           "CovariateEffect", "build_model", "parse_covariate", "model_from_spec", "load_fit", "predict_population"]
