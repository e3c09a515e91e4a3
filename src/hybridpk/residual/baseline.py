"""The population ODE model as the hybrid's baseline: individual predictions as a differentiable function of
the ETAs, so that the hybrid can re-estimate each patient's ETAs together with the latent z."""

from __future__ import annotations

import torch

__all__ = ["ODEBaseline"]


class ODEBaseline:
    """Individual predictions (mg/L) of a FittedPopulation (fixed THETA, OMEGA, SIGMA)."""

    def __init__(self, population):
        self.population = population
        omega = population.omega.tensor()
        self.omega_inv = torch.linalg.inv(omega)
        self._to_eta, self._to_u = _whitening(omega)
        pm = population.model
        #: structural parameters whose typical value is an estimated THETA (those joint training may shift)
        self.names = [n for n in pm.structural.parameter_names if n in pm.theta_names]
        self._shift_index = {n: i for i, n in enumerate(self.names)}
        self._theta = {}  # THETA per (device, dtype): training may run on a GPU, the model lives on the CPU

    @property
    def n_eta(self) -> int:
        return self.population.model.n_eta

    @property
    def structural(self):
        return self.population.model.structural

    def ipred(self, batch, eta, log_shift=None):
        """IPRED (N, R) at every record of ``batch`` (covariates taken at baseline) for ETAs ``eta`` (N, K).
        ``log_shift`` (P,): log-scale shifts of the structural parameters (``names`` order), learnt by joint
        training (the hybrid's typical values are the population fit's times exp(shift))."""
        return self.ipred_and_params(batch, eta, log_shift)[0]

    def ipred_and_params(self, batch, eta, log_shift=None):
        """(IPRED (N, R), individual parameters {name: (N,)}) as in ``ipred``."""
        from ..solve import simulate

        p = self.parameters(batch, eta, log_shift)
        return simulate(self.population.model.structural, p, batch, throw=False).ipred, p

    def parameters(self, batch, eta, log_shift=None) -> dict:
        """Individual parameters {name: (N,)} (covariates at baseline) for ETAs ``eta`` (N, K) and the
        typical-value shifts ``log_shift`` (see ``ipred``)."""
        cov = batch.baseline_covariates()
        pm = self.population.model
        if pm.record_items:
            pm.require_per_subject(batch, "the hybrid (VAE) model")
        key = (eta.device, eta.dtype)
        if key not in self._theta:
            self._theta[key] = {k: v.to(eta.device, eta.dtype) for k, v in self.population.theta.tensors().items()}
        p = pm.individual(self._theta[key], eta, cov)
        if log_shift is not None and log_shift.numel():
            shift = log_shift.to(eta.device, eta.dtype)
            p = {k: (v * torch.exp(shift[self._shift_index[k]]) if k in self._shift_index else v)
                 for k, v in p.items()}
        return p

    def whiten(self, eta):
        """The ETAs (N, K) on the scale of the prior: u = eta V L^-1/2 with OMEGA = V L V' (u ~ N(0, I)), the
        coordinates the hybrid's per-patient searches move in. An ETA whose variance is 1e-15 (an OMEGA at
        its boundary, e.g. from a fit to six subjects) then takes steps of its own size: Adam's steps of
        about its learning rate in ETA itself gave that ETA a prior penalty of 1e9 and wrecked training."""
        return eta @ self._to_u.to(eta.device, eta.dtype)

    def unwhiten(self, u):
        """The ETAs (N, K) of whitened coordinates ``u`` (N, K): eta = u (V L^1/2)', so that eta ~ N(0, OMEGA)
        when u ~ N(0, I) (the inverse of :meth:`whiten`)."""
        return u @ self._to_eta.to(u.device, u.dtype).T

    def eta_penalty(self, eta):
        """-log p(eta) up to a constant: 0.5 eta' OMEGA^-1 eta per patient (N,)."""
        oinv = self.omega_inv.to(eta.device, eta.dtype)
        return 0.5 * torch.einsum("ni,ij,nj->n", eta, oinv, eta)


def _whitening(omega):
    """(A, B) with A A' = OMEGA and B = A'^-1 (K, K), from OMEGA's eigendecomposition (works for a block OMEGA
    near singular, where a Cholesky factor may not exist in floating point)."""
    if omega.numel() == 0:
        return omega, omega
    vals, vecs = torch.linalg.eigh(0.5 * (omega + omega.T))
    vals = vals.clamp(min=torch.finfo(vals.dtype).tiny)
    return vecs * vals.sqrt(), vecs / vals.sqrt()
