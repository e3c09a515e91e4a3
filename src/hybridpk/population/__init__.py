"""Population layer: the statistical model, FOCE-I estimation, NONMEM import, and the fitted model
(:class:`FittedPopulation`: THETA/OMEGA/SIGMA tables with predict, estimate, simulate, save) with the
individual estimates (MAP/EBE, posterior draws) every higher layer uses."""

from .estimates import IndividualEstimates, map_estimate, posterior_draws
from .estimation import ConvergenceWarning, Estimation
from .fit import fit_population
from .fitted import FittedPopulation
from .predictions import Predictions
from .spec import (CovariateEffect, ErrorModel, PopulationModel, Theta, build_model, model_from_recipe,
                   parse_covariate)
from .specfile import load_model, model_specs, write_spec
from .tables import OmegaEntry, OmegaTable, SigmaEstimate, SigmaTable, ThetaEstimate, ThetaTable

__all__ = ["fit_population", "FittedPopulation", "Estimation", "ConvergenceWarning", "IndividualEstimates",
           "map_estimate", "posterior_draws", "Predictions", "PopulationModel", "Theta", "ErrorModel",
           "CovariateEffect", "build_model", "parse_covariate", "model_from_recipe", "load_model", "model_specs",
           "write_spec", "ThetaEstimate", "ThetaTable", "OmegaEntry", "OmegaTable", "SigmaEstimate", "SigmaTable"]
