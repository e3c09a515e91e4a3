"""The hybrid's network: encoder q(z | patient) over a patient's irregular samples, and a correction form
(:mod:`hybridpk.residual.forms`) that turns the ODE prediction into the hybrid one given z."""

from __future__ import annotations

import torch
from torch import nn

from .features import record_features
from .forms import get_form
from .networks import SetEncoder
from .objective import variance_floor

__all__ = ["HybridVAE", "scale_to_tensors", "scale_from_tensors"]


class HybridVAE(nn.Module):
    """Encoder q(z | patient) plus a correction form (``form``: "input", "reservoir" or "log").

    ``joint``: trained with each patient's ETAs re-estimated together with z (the ODE baseline is then
    recomputed from those ETAs at prediction), with log-scale shifts ``log_shift`` (``n_shift``) of the
    baseline's typical values. Set by training and saved with the model: ``scale`` (normalising constants
    of the inputs), ``l2`` (the weight of the correction penalty) and ``prior_weight`` (the weight beta of
    the latent prior), which the per-patient estimates reuse so that they maximise the training objective.
    """

    def __init__(self, n_features: int, latent_dim: int, hidden: int = 64, joint: bool = False, n_shift: int = 0,
                 form: str = "log"):
        super().__init__()
        form_cls = get_form(form)
        if form_cls.structural and not joint:
            raise ValueError(f"the {form} form needs joint training (it is carried with the patient's ETAs)")
        self.latent_dim, self.joint = latent_dim, bool(joint)
        self.log_shift = nn.Parameter(torch.zeros(n_shift if joint else 0))
        self.encoder = SetEncoder(n_features, latent_dim, hidden)
        self.form = form_cls(n_features, latent_dim, hidden)
        self.scale = {}
        self.l2 = 0.0
        self.prior_weight = 1.0
        self.best_val = float("nan")

    @property
    def form_name(self) -> str:
        return self.form.name

    @property
    def average(self) -> bool:
        """Predictions average hybrid and ODE-only with the Akaike weight (the log form) or are the hybrid
        alone (structural forms: a patient the ODE describes gets a near-zero correction under the prior)."""
        return self.form.average

    @property
    def mix_logit(self) -> float:
        """Log prior odds of "needs the correction" against "ODE-only" for a patient: -latent_dim, the
        Akaike penalty of the latents."""
        return -float(self.latent_dim)

    def variance_floor(self, error_model, sd: dict):
        """The residual-variance floor of the hybrid's likelihood ((PROP c0)^2, see
        :func:`hybridpk.residual.objective.variance_floor`)."""
        return variance_floor(error_model, sd, self.scale["c0"])

    def encode(self, batch, ipred, mask):
        """(mu, log sigma^2) of z (N, K) from the observations in ``mask``, read against the ODE-only
        individual prediction ``ipred``."""
        x, _ = record_features(batch, ipred, self.scale)
        c0 = self.scale["c0"]
        resid = torch.where(mask, torch.log(batch.dv.clamp(min=0) + c0) - torch.log(ipred.clamp(min=0) + c0),
                            torch.zeros_like(ipred))
        return self.encoder(x, resid, mask)

    def predict(self, batch, ipred, z, params=None, structural=None):
        """Hybrid concentration (N, R) mg/L and the correction r (N, R) in log space, from the ODE
        prediction ``ipred`` (and, for structural forms, the individual ``params`` and the model)."""
        return self.form(batch, ipred, z, self.scale, params, structural)

    def predict_at(self, batch, z, baseline=None, eta=None, ipred=None):
        """``predict`` for a joint model at the patients' ETAs ``eta`` (the baseline's IPRED and individual
        parameters recomputed from them), else on the given ODE prediction ``ipred``."""
        if baseline is not None and self.joint:
            ipred, params = baseline.ipred_and_params(batch, eta, self.log_shift)
            return self.predict(batch, ipred, z, params, baseline.structural)
        return self.predict(batch, ipred, z)


def scale_to_tensors(scale: dict) -> dict:
    """The normalising constants as tensors only (so files load with ``torch.load(weights_only=True)``)."""
    return {k: (v if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64)) for k, v in scale.items()}


def scale_from_tensors(scale: dict) -> dict:
    return {k: (v if v.dim() else float(v)) for k, v in scale.items()}
