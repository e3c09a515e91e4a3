"""VAE residual on top of the mechanistic baseline (hybrid model)."""

from .hybrid import HybridFit, fit_hybrid, load_hybrid, predict_hybrid
from .vae import HybridVAE, TrainConfig, train_vae

__all__ = ["HybridVAE", "TrainConfig", "train_vae", "HybridFit", "fit_hybrid", "load_hybrid", "predict_hybrid"]
