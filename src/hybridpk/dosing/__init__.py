"""Model-informed precision dosing on top of any fitted model: the patient's posterior, forecasts, targets,
doses."""

from .exposure import auc, time_above
from .forecast import Forecast, forecast, plot_forecast
from .loading import LoadingDose, loading_dose
from .many import PatientAnswer, estimate_patients, for_each_patient
from .model import dosing_model
from .recommend import (PatientPosterior, Recommendation, estimate_patient, interval_for_dose, recommend_dose,
                        time_to_concentration)
from .targets import Target, metric_coefficients, parse_target

__all__ = ["auc", "time_above", "LoadingDose", "loading_dose", "PatientAnswer", "estimate_patients", "for_each_patient",
           "dosing_model", "PatientPosterior", "Recommendation", "estimate_patient", "recommend_dose",
           "interval_for_dose", "time_to_concentration", "Forecast", "forecast", "plot_forecast", "Target",
           "parse_target", "metric_coefficients"]
