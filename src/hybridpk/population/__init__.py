"""Population fitting (NLME): THETA/OMEGA/SIGMA by FOCE with interaction, EBEs, diagnostics."""

from .fit import fit_population
from .result import ConvergenceWarning, FitResult
from .spec import CovariateEffect, ErrorModel, PopulationModel, Theta, build_model, parse_covariate

__all__ = ["fit_population", "FitResult", "ConvergenceWarning", "PopulationModel", "Theta", "ErrorModel",
           "CovariateEffect", "build_model", "parse_covariate"]
