"""The hybrid's objectives: the population model's residual-error likelihood at the hybrid prediction, the
penalty that keeps the correction at zero where the ODE fits, and the negative ELBO of training."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["variance_floor", "gaussian_nll", "correction_penalty", "ode_only_objective", "neg_elbo", "free_sigma",
           "BoundError", "hybrid_error"]


@dataclass(frozen=True)
class BoundError:
    """A general $ERROR (NONMEM's residual SD written with THETAs and data items, e.g. W = THETA(11) F 0.05,
    Y = F + W EPS(1) with $SIGMA 1 FIX) bound to the population fit's THETAs, so that the hybrid's likelihood can
    evaluate its variance sum_k SIGMA(k) H_k^2 at a batch's records with F the hybrid prediction
    (:meth:`PopulationModel.residual_variance`). Its THETAs and SIGMA stay as the population fit estimated them
    (:func:`free_sigma`). The floor: H is evaluated at max(F, ``c0``) at the observations (for a proportional W,
    the (PROP c0)^2 of :func:`variance_floor`)."""

    pm: object             # the PopulationModel
    theta: dict            # {name: 0-d tensor}, the population fit's THETAs
    c0: float
    eta: torch.Tensor | None = None     # the patients' ETAs (N, K), for an H that reads them
    kind: str = "general"

    @property
    def ltbs(self) -> bool:
        return self.pm.error.ltbs

    @property
    def names(self) -> tuple:
        return self.pm.error.names

    def variance_at(self, batch, f, sd: dict, mask):
        """Var(DV) (N, R) at the predictions ``f`` (N, R) of ``batch``'s records (``mask``: the observations)."""
        theta = {k: v.to(f.device) for k, v in self.theta.items()}
        eta = (self.eta.to(f.device) if self.eta is not None
               else torch.zeros(f.shape[0], self.pm.n_eta, dtype=f.dtype, device=f.device))
        return self.pm.residual_variance(theta, eta, batch, f.clamp(min=self.c0), sd, mask)


def hybrid_error(population, c0: float, eta=None):
    """The residual-error model a likelihood over the patients of a batch takes for the FittedPopulation
    ``population``: its ErrorModel, or for a general $ERROR a :class:`BoundError` (``c0`` the VAE's small
    concentration, mg/L; ``eta`` (N, K) the patients' ETAs, required when H reads ETAs, which the hybrid's
    training does not move with H: such a model is refused for the hybrid)."""
    from ..errors import ModelError

    pm = population.model
    if pm.error.kind != "general":
        return pm.error
    if eta is None and set(pm.error.h.reads) & set(pm.etas):
        raise ModelError("the residual error's SD reads ETAs (e.g. W*EXP(ETA(k))); the hybrid's likelihood takes "
                         "residual SDs written with THETAs and data items only")
    return BoundError(pm, population.theta.tensors("cpu"), float(c0), eta)


def _variance(error_model, batch, pred, sd, mask):
    if isinstance(error_model, BoundError):
        return error_model.variance_at(batch, pred, sd, mask)
    return error_model.variance(pred, sd)


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
    (see :func:`variance_floor`). Log-transform-both-sides: of log(DV) at the log prediction (the population
    fit's, :meth:`ErrorModel.log_scale`), as the population fit's likelihood is."""
    v = torch.where(mask, torch.clamp(_variance(error_model, batch, pred, sd, mask), min=floor), torch.ones_like(pred))
    y, f = _on_likelihood_scale(error_model, batch.dv, pred, mask)
    return torch.where(mask, 0.5 * ((y - f) ** 2 / v + torch.log(v)), torch.zeros_like(v)).sum(1)


def _on_likelihood_scale(error_model, dv, pred, mask):
    """(DV, prediction) on the scale of the residual error: logs for log-transform-both-sides."""
    error = error_model.pm.error if isinstance(error_model, BoundError) else error_model
    if not error.ltbs:
        return dv, pred
    return torch.log(torch.where(mask, dv, torch.ones_like(dv))), error.log_scale(pred)


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
