"""The log form: the ODE prediction times exp(r(t; z)), for any structural model."""

from __future__ import annotations

import torch

from ..features import record_features
from ..networks import CorrectionDecoder
from .base import CorrectionForm

__all__ = ["LogForm"]


class LogForm(CorrectionForm):
    """IPRED exp(gate r(t; z)): the decoder reads each record's features (times since doses, dose, log
    IPRED, covariates) and z; zero before the first dose. Works on any structural model; since it can fit
    noise where the ODE suffices, predictions average it with ODE-only by the patient's Akaike weight."""

    name = "log"
    average = True
    structural = False

    def __init__(self, n_features: int, latent_dim: int, hidden: int):
        super().__init__(n_features, latent_dim, hidden)
        self.decoder = CorrectionDecoder(n_features, latent_dim, hidden)

    def forward(self, batch, ipred, z, scale, params=None, structural=None):
        x, gate = record_features(batch, ipred, scale)
        r = self.decoder(z, x) * gate
        return ipred * torch.exp(r), r
