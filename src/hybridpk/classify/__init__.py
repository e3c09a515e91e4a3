"""Decision layer: which patients need the complex model (a classifier on the hybrid's latent space), and
which model the data support (cross-validated comparison of runs)."""

from .compare import Comparison, RunScore, compare_runs, count_parameters
from .covariates import CovariateSearch, patient_covariates, screen_covariates, stepwise_covariates
from .latent import LatentClassifier, complexity_threshold, evidence_labels, latent_features
from .runs import (CLASSIFIER_FILE, RunClassifier, classify_estimates, classify_patients, load_classifier,
                   save_classifier, train_classifier)

__all__ = ["LatentClassifier", "complexity_threshold", "evidence_labels", "latent_features", "RunClassifier",
           "train_classifier", "classify_estimates", "save_classifier", "load_classifier", "classify_patients",
           "CLASSIFIER_FILE", "Comparison", "RunScore", "compare_runs", "count_parameters",
           "CovariateSearch", "patient_covariates", "screen_covariates", "stepwise_covariates"]
