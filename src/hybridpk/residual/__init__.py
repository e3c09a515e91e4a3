"""Hybrid layer: the population ODE model plus a VAE whose latent z conditions a correction form (what the
ODE misses), with the population model's interface (estimate, predict, simulate, save); ``load_run``."""

from .baseline import ODEBaseline
from .forms import FORMS, CorrectionForm, InputForm, LogForm, ReservoirForm
from .hybrid import HybridFit, fit_hybrid
from .inference import HybridEstimate, estimate_hybrid
from .runs import load_run
from .training import TrainConfig, train_vae
from .vae import HybridVAE

__all__ = ["HybridVAE", "TrainConfig", "train_vae", "HybridFit", "fit_hybrid", "load_run", "ODEBaseline",
           "HybridEstimate", "estimate_hybrid", "CorrectionForm", "InputForm", "ReservoirForm", "LogForm", "FORMS"]
