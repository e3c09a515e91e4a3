"""VAE residual on top of the mechanistic baseline (hybrid model)."""

from .baseline import ODEBaseline
from .hybrid import HybridFit, fit_hybrid, hybrid_predict, load_hybrid, predict_hybrid
from .inference import HybridEstimate, estimate_hybrid, predict_with
from .vae import HybridVAE, TrainConfig, train_vae

__all__ = ["HybridVAE", "TrainConfig", "train_vae", "HybridFit", "fit_hybrid", "hybrid_predict", "load_hybrid",
           "predict_hybrid", "ODEBaseline", "HybridEstimate", "estimate_hybrid", "predict_with"]
