"""Estimation driver: naive-pooled start, FOCE-I outer optimisation (BFGS on transformed parameters with
exact OFV gradients), covariance of the estimates, EBEs and diagnostics; returns the
:class:`~hybridpk.population.fitted.FittedPopulation` with its :class:`Estimation` record."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize

from ..errors import HybridPKError
from ..progress import Progress
from .diagnostics import diagnostics
from .estimation import ConvergenceWarning, Estimation
from .fitted import FittedPopulation
from .focei import Problem
from .omega import OmegaBlocks
from .tables import OmegaTable, SigmaEstimate, SigmaTable, ThetaEstimate, ThetaTable

__all__ = ["fit_population"]


class Packing:
    """Unconstrained vector x <-> (THETA natural, OMEGA (its blocks, see :mod:`.omega`), residual SDs)."""

    def __init__(self, pm, omega=None, sigma=None):
        self.pm = pm
        self.free = [t for t in pm.thetas if not t.fixed]
        self.omega0 = np.array(omega if omega is not None else pm.omega_init, dtype=float)
        self.omega = OmegaBlocks(pm.blocks, pm.n_eta)
        s0 = pm.error.init_values()
        if sigma:
            s0.update(sigma)
        self.sigma_names = pm.error.names
        self.sigma0 = np.array([s0[k] for k in self.sigma_names], dtype=float)

    @property
    def block(self) -> bool:
        return bool(self.omega.multi)

    def x0(self, theta=None):
        theta = theta or {t.name: t.init for t in self.pm.thetas}
        xs = [self._to_x(t, theta[t.name]) for t in self.free]
        return np.array(xs + self.omega.x0(self.omega0) + list(np.log(self.sigma0)), dtype=float)

    @staticmethod
    def _to_x(t, v):
        lo, hi = t.lower, t.upper
        if math.isfinite(lo) and math.isfinite(hi):
            u = (v - lo) / (hi - lo)
            return math.log(u / (1 - u))
        if math.isfinite(lo):
            return math.log(v - lo)
        if math.isfinite(hi):
            return -math.log(hi - v)
        return v

    @staticmethod
    def _from_x(t, x):
        lo, hi = t.lower, t.upper
        if math.isfinite(lo) and math.isfinite(hi):
            return lo + (hi - lo) * torch.sigmoid(x)
        if math.isfinite(lo):
            return lo + torch.exp(x)
        if math.isfinite(hi):
            return hi - torch.exp(-x)
        return x

    def unpack(self, x):
        """x (tensor) -> theta {name: scalar}, omega (K, K), sd {name: scalar}."""
        theta = {}
        i = 0
        for t in self.pm.thetas:
            if t.fixed:
                theta[t.name] = torch.tensor(t.init, dtype=x.dtype)
            else:
                theta[t.name] = self._from_x(t, x[i])
                i += 1
        n_om = self.omega.n_params
        omega = self.omega.unpack(x[i:i + n_om])
        i += n_om
        sd = {name: torch.exp(x[i + j]) for j, name in enumerate(self.sigma_names)}
        return theta, omega, sd

    def natural(self, x):
        """All estimated quantities on their reported scale, as a flat tensor (for the delta method)."""
        theta, omega, sd = self.unpack(x)
        extra = [omega[r, c] for r, c in self.omega.offdiagonal()]
        return torch.stack([theta[t.name] for t in self.free] + list(torch.diagonal(omega)) +
                           [sd[n] for n in self.sigma_names] + extra)


def _naive_pooled(prob, pack, x0):
    """Typical values by least squares on log concentrations with ETA = 0 (a robust starting point)."""
    nt = len(pack.free)
    if nt == 0:
        return x0
    eta0 = torch.zeros(prob.batch.n_subjects, prob.pm.n_eta, dtype=torch.float64)
    obs = prob.obs & (prob.batch.dv > 0)
    logy = torch.log(torch.where(obs, prob.batch.dv, torch.ones_like(prob.batch.dv)))

    def fun(xt):
        x = torch.tensor(np.r_[xt, x0[nt:]], dtype=torch.float64, requires_grad=True)
        theta, _, _ = pack.unpack(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = prob.predict(theta, eta0) if not prob.pm.error.ltbs else torch.exp(prob.predict(theta, eta0))
        r = torch.where(obs, logy - torch.log(f.clamp(min=1e-12)), torch.zeros_like(f))
        loss = (r * r).sum()
        if not torch.isfinite(loss):
            return 1e30, np.zeros(nt)
        (g,) = torch.autograd.grad(loss, x)
        return float(loss.detach()), g[:nt].numpy()

    try:
        res = minimize(fun, x0[:nt], jac=True, method="L-BFGS-B", options={"maxiter": 200})
        out = x0.copy()
        out[:nt] = res.x
        return out
    except (HybridPKError, RuntimeError):
        return x0


def fit_population(pm, dataset, *, seed: int = 0, omega=None, sigma=None, maxiter: int = 300,
                   progress: bool = True, covariance: bool = True, pooled_start: bool = True,
                   method: str = "auto") -> FittedPopulation:
    """Fit a population model by FOCE with interaction.

    Parameters
    ----------
    pm : PopulationModel  (see :func:`hybridpk.population.build_model`)
    dataset : Dataset
    seed : int  recorded in the result (FOCE-I itself is deterministic)
    omega, sigma : initial OMEGA variances (list, ETA order) and residual SDs ({"ADD": .., "PROP": ..})
    maxiter : outer iterations (BFGS)
    progress : show the progress with the OFV (a bar on a terminal, a line per 10% of ``maxiter`` in a log)
    covariance : compute standard errors (inverse Hessian of the OFV)
    pooled_start : start typical values from a naive pooled fit
    method : solver path of the predictions: "auto" (closed form for linear models), "closed_form" or "ode"

    Returns the FittedPopulation (THETA/OMEGA/SIGMA tables with standard errors) with its Estimation record
    (OFV, convergence, shrinkage, EBEs as ``estimation.individual`` and ``estimation.estimates``, and
    PRED/IPRED/CWRES/IWRES as ``estimation.predictions``).
    """
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    prob = Problem(pm, dataset, method=method)
    if not bool(prob.obs.any()):
        raise HybridPKError(f"{dataset.source or 'the dataset'}: no observations (records with EVID=0 and MDV=0), "
                            "so there is nothing to fit: add the measured concentrations, or set MDV=0 on the "
                            "records that hold them")
    pack = Packing(pm, omega, sigma)
    x0 = pack.x0()
    theta0, _, sd0 = pack.unpack(torch.tensor(x0, dtype=torch.float64))
    prob.require_positive_variance(theta0, sd0)
    if pooled_start:
        x0 = _naive_pooled(prob, pack, x0)
    n, k = dataset.n_subjects, pm.n_eta
    state = {"eta": torch.zeros(n, k, dtype=torch.float64), "best": math.inf, "evals": 0, "iter": 0}
    bar = Progress(maxiter, "FOCE-I", "it", enabled=progress)

    def evaluate(xv, need_grad=True):
        x = torch.tensor(xv, dtype=torch.float64, requires_grad=need_grad)
        theta, om, sd = pack.unpack(x)
        with torch.no_grad():
            oinv = torch.linalg.inv(om) if k else om
        eta = prob.ebe(theta, oinv, sd, state["eta"])
        ofv = prob.ofv(theta, om, sd, eta)
        state["evals"] += 1
        if not torch.isfinite(ofv):
            return math.inf, np.zeros_like(xv), eta
        if need_grad:
            (g,) = torch.autograd.grad(ofv, x)
            return float(ofv.detach()), g.numpy(), eta
        return float(ofv.detach()), None, eta

    def fun(xv):
        ofv, g, eta = evaluate(xv)
        if math.isfinite(ofv) and ofv < state["best"]:
            state["best"] = ofv
            state["eta"] = eta
        return ofv, g

    def cb(xk):
        state["iter"] += 1
        bar.update(1, OFV=f"{state['best']:.4f}")

    res = minimize(fun, x0, jac=True, method="BFGS", callback=cb,
                   options={"maxiter": maxiter, "gtol": 1e-4, "xrtol": 1e-7})
    bar.close()
    x_hat = res.x
    ofv, g, eta = evaluate(x_hat)
    converged = bool(res.success) or float(np.abs(g).max()) < 1e-2
    message = str(res.message)
    warn = []
    if not converged:
        warn.append(f"the estimation did not converge ({message}; max |gradient| {np.abs(g).max():.3g})")
        warnings.warn(warn[-1], ConvergenceWarning, stacklevel=2)
    cov_nat = None
    if covariance:
        cov_nat, cov_warn = _covariance(evaluate, pack, x_hat)
        if cov_warn:
            warn.append(cov_warn)
            warnings.warn(cov_warn, ConvergenceWarning, stacklevel=2)
    if prob.fallback_steps:
        warn.append(f"{prob.fallback_steps} EBE Newton steps met a singular Hessian (extreme ETAs or a tiny residual "
                    "variance during the search) and took a gradient step instead")
    theta, om, sd = pack.unpack(torch.tensor(x_hat, dtype=torch.float64))
    fitted = _tables(pm, pack, theta, om, sd, cov_nat)
    est = fitted.estimate(dataset)          # the EBEs: the same code path as any later estimate
    diag = diagnostics(prob, fitted.theta.tensors(), fitted.omega.tensor(), fitted.sigma.sd_tensors(), est.eta)
    record = Estimation(method="FOCE-I", ofv=float(ofv), converged=converged, message=message,
                        iterations=state["iter"], evaluations=state["evals"],
                        seconds=time.perf_counter() - t_start, shrinkage=diag["shrinkage"],
                        individual=_individual_table(dataset, pm, est), predictions=_prediction_table(dataset, prob,
                                                                                                      diag),
                        n_subjects=dataset.n_subjects, n_observations=dataset.n_observations, seed=seed,
                        warnings=tuple(warn), data_sha256=dataset.fingerprint(), estimates=est,
                        ebe_fallbacks=prob.fallback_steps)
    return fitted.with_estimation(record)


def _tables(pm, pack, theta, omega, sd, cov_natural) -> FittedPopulation:
    """The estimates as typed tables, with standard errors from the covariance of the estimates on their
    natural scale (order of ``Packing.natural``: free THETAs, OMEGA diagonal, residual SDs, OMEGA
    covariances)."""
    se = np.sqrt(np.clip(np.diag(cov_natural), 0, None)) if cov_natural is not None else None
    i = 0
    rows = []
    for t in pm.thetas:
        s = None
        if not t.fixed:
            s = float(se[i]) if se is not None else None
            i += 1
        rows.append(ThetaEstimate(t.name, float(theta[t.name]), s, t.fixed, t.unit))
    k = pm.n_eta
    om_se = [[None] * k for _ in range(k)]
    for j in range(k):
        om_se[j][j] = float(se[i + j]) if se is not None else None
    i += k
    sig = []
    for j, kind in enumerate(pack.sigma_names):
        sig.append(SigmaEstimate(kind, pm.sigma_labels.get(kind, kind), float(sd[kind]),
                                 float(se[i + j]) if se is not None else None, pm.sigma_scale))
    i += len(pack.sigma_names)
    for j, (r, c) in enumerate(pack.omega.offdiagonal()):
        om_se[r][c] = om_se[c][r] = float(se[i + j]) if se is not None else None
    matrix = tuple(tuple(float(v) for v in row) for row in omega.tolist())
    om = OmegaTable(tuple(pm.etas), tuple(pm.omega_labels or pm.etas), matrix,
                    tuple(tuple(row) for row in om_se) if se is not None else None, pack.omega.blocks)
    return FittedPopulation(model=pm, theta=ThetaTable(tuple(rows)), omega=om, sigma=SigmaTable(tuple(sig)),
                            name="fit", citation="hybridpk fit")


def _individual_table(dataset, pm, est):
    """ID, the EBEs and the individual parameters at them."""
    ind = pd.DataFrame({"ID": list(dataset.ids)})
    for j, name in enumerate(pm.etas):
        ind[name] = est.eta[:, j].numpy()
    for name in est.parameters.columns[1:]:
        ind[name] = est.parameters[name].to_numpy()
    return ind


def _prediction_table(dataset, prob, diag):
    df = dataset.to_dataframe()
    pick = prob.batch.to_rows
    return pd.DataFrame({"ID": df.ID.to_numpy(), "TIME": df.TIME.to_numpy(), "DV": df.DV.to_numpy(),
                         "MDV": df.MDV.to_numpy(), "PRED": pick(diag["pred"]), "IPRED": pick(diag["ipred"]),
                         "CWRES": pick(diag["cwres"]), "IWRES": pick(diag["iwres"])})


def _covariance(evaluate, pack, x_hat):
    """Covariance of the estimates on their natural scale: 2 H^-1 (H: Hessian of the OFV by central differences
    of the exact gradient), mapped by the delta method."""
    p = len(x_hat)
    hess = np.zeros((p, p))
    for i in range(p):
        h = 1e-4 * max(1.0, abs(x_hat[i]))
        e = np.zeros(p)
        e[i] = h
        gp = evaluate(x_hat + e)[1]
        gm = evaluate(x_hat - e)[1]
        hess[i] = (gp - gm) / (2 * h)
    hess = 0.5 * (hess + hess.T)
    try:
        w = np.linalg.eigvalsh(hess)
        if w.min() <= 0:
            return None, (f"the Hessian of the OFV is not positive definite (smallest eigenvalue {w.min():.3g}); "
                          "standard errors are not available")
        cov_x = 2.0 * np.linalg.inv(hess)
    except np.linalg.LinAlgError:
        return None, "the Hessian of the OFV is singular; standard errors are not available"
    x = torch.tensor(x_hat, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(pack.natural, x).numpy()
    return jac @ cov_x @ jac.T, None
