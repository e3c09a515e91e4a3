"""Model-informed precision dosing: priors (published specs or fits), MAP and posterior, targets, doses."""

from .posterior import MAPEstimate, map_estimate, posterior_samples, to_inference_data
from .prior import Prior, load_prior, model_specs, prior_from_fit, prior_from_values, write_spec
from .recommend import Recommendation, estimate_patient, interval_for_dose, recommend_dose, time_to_concentration
from .targets import Target, parse_target, regimen_records

__all__ = ["Prior", "load_prior", "model_specs", "prior_from_fit", "prior_from_values", "MAPEstimate", "map_estimate", "posterior_samples",
           "to_inference_data", "Recommendation", "recommend_dose", "estimate_patient", "interval_for_dose",
           "time_to_concentration", "write_spec", "Target", "parse_target",
           "regimen_records"]
