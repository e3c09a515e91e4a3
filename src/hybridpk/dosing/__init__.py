"""Model-informed precision dosing: priors (published specs or fits), MAP and posterior, targets, doses."""

from .posterior import MAPEstimate, map_estimate, posterior_samples, to_inference_data
from .prior import Prior, load_prior, model_specs, prior_from_fit, prior_from_values
from .recommend import Recommendation, estimate_patient, recommend_dose
from .targets import Target, parse_target, regimen_records

__all__ = ["Prior", "load_prior", "model_specs", "prior_from_fit", "prior_from_values", "MAPEstimate", "map_estimate", "posterior_samples",
           "to_inference_data", "Recommendation", "recommend_dose", "estimate_patient", "Target", "parse_target",
           "regimen_records"]
