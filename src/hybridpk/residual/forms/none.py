"""The null form: no correction at all, the ODE model itself. Form selection ("auto") keeps it when no trained
correction predicts held-out patients' levels better than the ODE alone."""

from __future__ import annotations

import torch

from .base import CorrectionForm

__all__ = ["NoCorrection"]


class NoCorrection(CorrectionForm):
    """IPRED unchanged (r = 0 at every record): the hybrid is its ODE model, with the patient's ETAs estimated
    as the ODE-only MAP (z has no effect and stays at its prior mean). Nothing to train."""

    name = "none"
    average = False
    structural = False
    conserves_mass = True

    def forward(self, batch, ipred, z, scale, params=None, structural=None):
        return ipred, torch.zeros_like(ipred)
