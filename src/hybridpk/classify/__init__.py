"""Decision layer: which patients need the complex model (a classifier on the hybrid's latent space)."""

from .latent import LatentClassifier, complexity_threshold, evidence_labels

__all__ = ["LatentClassifier", "complexity_threshold", "evidence_labels"]
