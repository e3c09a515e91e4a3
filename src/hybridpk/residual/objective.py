"""The hybrid's objectives: the population model's residual-error likelihood at the hybrid prediction, the
penalty that keeps the correction at zero where the ODE fits, and the negative ELBO of training."""

from __future__ import annotations

import torch

__all__ = ["variance_floor", "gaussian_nll", "correction_penalty", "ode_only_objective", "neg_elbo", "free_sigma"]


def free_sigma(error_model, sd: dict, fixed=()) -> list:
    """The residual-error kinds whose SD the hybrid estimates (in training and in its ITS step): those of
    ``error_model`` not in ``fixed`` (the model's FIX SIGMA) with a positive SD; none (an empty list) for
    log-transform-both-sides and a general $ERROR, whose residual error the hybrid keeps as the population fit
    estimated it."""
    if error_model.ltbs or error_model.kind == "general":
        return []
    return [k for k in error_model.names if k not in fixed and k in sd and float(sd[k]) > 0]


def correction_penalty(r, mask, l2):
    """Per-patient L2 penalty (N,) on the correction r (N, R) (log space) at the observations in ``mask``."""
    return l2 * torch.where(mask, r * r, torch.zeros_like(r)).sum(1)


def variance_floor(error_model, sd: dict, c0: float):
    """The smallest residual variance the hybrid's likelihood uses, (PROP c0)^2 (mg/L)^2: a prediction below
    c0 (a small concentration, 5% of the median observation) has the proportional error of c0. Without it a
    correction that drives a prediction to 0 under a proportional error model gives a zero variance and a
    NaN likelihood. With an additive part larger than PROP c0 (the usual combined model) it never acts; 0
    for log-transform-both-sides and additive error, whose variance does not shrink with the prediction."""
    if error_model.ltbs or "PROP" not in sd:
        return 0.0
    return (sd["PROP"] * c0) ** 2


def gaussian_nll(batch, pred, mask, error_model, sd, floor=0.0):
    """-log-likelihood (up to a constant) of the observations in ``mask`` under the residual-error model at
    the prediction ``pred`` (N, R), per patient (N,); residual variances below ``floor`` are raised to it
    (see :func:`variance_floor`)."""
    v = torch.where(mask, torch.clamp(error_model.variance(pred, sd), min=floor), torch.ones_like(pred))
    return torch.where(mask, 0.5 * ((batch.dv - pred) ** 2 / v + torch.log(v)), torch.zeros_like(v)).sum(1)


def ode_only_objective(batch, ipred, mask, error_model, sd, baseline=None, eta=None, floor=0.0):
    """-log p(y | ODE-only) per patient (N,) at the ODE-only prediction ``ipred`` (plus -log p(ETA) when the
    ETAs are given: joint mode): the alternative the hybrid's Akaike weight compares with."""
    out = gaussian_nll(batch, ipred, mask, error_model, sd, floor)
    return out + baseline.eta_penalty(eta) if baseline is not None else out


def neg_elbo(model, batch, ipred, mask, error_model, sd, beta, l2, gen=None, baseline=None, eta=None, noise=None):
    """-ELBO per patient (N,) with its NLL and KL parts: the residual-error -log-likelihood at the hybrid
    prediction for z drawn from q(z | patient) (the reparametrisation trick with standard normal ``noise`` (N,
    latent), or drawn from ``gen``; neither: z = its mean), plus beta KL(q || N(0, I)) and the correction
    penalty. With ``baseline`` (joint mode) the ODE prediction is recomputed at the patients' current ETAs
    ``eta`` (N, K), and -log p(ETA) is added."""
    mu, logvar = model.encode(batch, ipred, mask)
    # noise drawn on the CPU generator (reproducible on every device), then moved
    if noise is None:
        noise = torch.randn(mu.shape, generator=gen, dtype=mu.dtype) if gen is not None else torch.zeros_like(mu)
    eps = noise.to(device=mu.device, dtype=mu.dtype)
    z = mu + torch.exp(0.5 * logvar) * eps
    pred, r = model.predict_at(batch, z, baseline, eta, ipred)
    eta_pen = baseline.eta_penalty(eta) if baseline is not None else 0.0
    nll = gaussian_nll(batch, pred, mask, error_model, sd, model.variance_floor(error_model, sd))
    kl = 0.5 * (mu ** 2 + torch.exp(logvar) - 1.0 - logvar).sum(1)
    pen = correction_penalty(r, mask, l2)
    out = nll + beta * kl + pen + eta_pen
    return out, nll, kl
