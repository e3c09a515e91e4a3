"""Goodness-of-fit diagnostics of any fitted model (ODE-only or hybrid): functions that take results and
return matplotlib figures (never shown)."""

from .gof import (axis_units, classifier_figure, covariate_relations_figure, cwres_qq, eta_covariate_figure,
                  eta_figure, gof_figure, individual_fits)
from .npde import npde, plot_npde
from .training import training_figure
from .vpc import VPCResult, plot_vpc, prediction_correct, vpc

__all__ = ["axis_units", "covariate_relations_figure", "eta_covariate_figure", "training_figure", "classifier_figure",
           "gof_figure", "cwres_qq", "eta_figure", "individual_fits", "VPCResult", "vpc",
           "plot_vpc", "prediction_correct", "npde", "plot_npde"]
