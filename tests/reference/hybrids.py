"""Hybrids with known behaviour for tests: a correction that is exactly zero makes the hybrid its ODE model."""

from __future__ import annotations

import torch

from hybridpk.residual import HybridVAE
from hybridpk.residual.features import fit_scale, record_features


def zero_correction_vae(batch, ipred, n_shift: int, hidden: int = 16):
    """A joint log-form HybridVAE whose correction is exactly 0 (decoder output 0), scaled on ``batch`` with
    the ODE-only prediction ``ipred`` (N, R): the ODE model in disguise."""
    scale = fit_scale(batch, ipred, 6)
    x, _ = record_features(batch, ipred, scale)
    vae = HybridVAE(x.shape[-1], 2, hidden, joint=True, n_shift=n_shift, form="log").double()
    vae.scale = scale
    with torch.no_grad():
        for p in vae.form.parameters():
            p.zero_()
    vae.eval()
    return vae
