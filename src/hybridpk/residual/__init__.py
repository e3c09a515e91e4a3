"""VAE residual on top of the mechanistic baseline (hybrid model)."""

from .vae import HybridVAE, TrainConfig, train_vae

__all__ = ["HybridVAE", "TrainConfig", "train_vae"]
