"""Estimation driver: naive-pooled start, FOCE-I outer optimisation (BFGS on transformed parameters with
exact OFV gradients), covariance of the estimates, EBEs and diagnostics; returns the
:class:`~hybridpk.population.fitted.FittedPopulation` with its :class:`Estimation` record."""

from __future__ import annotations

import math
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize

from ..errors import HybridPKError, Interrupted, ModelError
from ..io import atomic_write_text
from ..progress import Progress
from ..solve.device import resolve_device
from .diagnostics import diagnostics
from .estimates import map_estimate, subjects_phrase
from .estimation import COVARIANCE_METHODS, ConvergenceWarning, Estimation
from .fitted import FittedPopulation, route_of
from .focei import Problem
from .omega import OmegaBlocks
from .tables import OmegaTable, SigmaEstimate, SigmaTable, ThetaEstimate, ThetaTable

__all__ = ["fit_population"]


class Packing:
    """Unconstrained vector x <-> (THETA natural, OMEGA (its blocks, see :mod:`.omega`), residual SDs).

    x holds what is estimated: the THETAs not fixed, the OMEGA parameters of blocks neither fixed
    (``pm.omega_fixed``) nor SAME as another block (``pm.omega_same``: they take the source's values), and the
    log residual SDs not fixed (``pm.sigma_fixed``)."""

    def __init__(self, pm, omega=None, sigma=None):
        self.pm = pm
        self.free = [t for t in pm.thetas if not t.fixed]
        self.omega0 = np.array(omega if omega is not None else pm.omega_init, dtype=float)
        self.omega = OmegaBlocks(pm.blocks, pm.n_eta, pm.omega_zeros)
        s0 = pm.error.init_values()
        if sigma:
            s0.update(sigma)
        self.sigma_given = frozenset(sigma or ())       # SD starts the caller gave (not the model's defaults)
        self.sigma_names = pm.error.names
        self.sigma0 = np.array([s0[k] for k in self.sigma_names], dtype=float)
        # OMEGA parameters: ("x", position in x) estimated, ("fixed", value), ("same", source parameter)
        full = self.omega.x0(self.omega0)
        role = [None] * self.omega.n_params
        for b, src in pm.omega_same:
            for i, j in zip(self.omega.param_indices(b), self.omega.param_indices(src)):
                role[i] = ("same", j)
        for b in self.omega.blocks:
            if b[0] in pm.omega_fixed:
                for i in self.omega.param_indices(b):
                    role[i] = ("fixed", full[i])
        self.omega_free = [i for i, r in enumerate(role) if r is None]
        self._omega_role = role
        self._omega_full0 = full
        self.sigma_free = [j for j, name in enumerate(self.sigma_names) if name not in pm.sigma_fixed]

    @property
    def block(self) -> bool:
        return bool(self.omega.multi)

    def x0(self, theta=None):
        theta = theta or {t.name: t.init for t in self.pm.thetas}
        xs = [self._to_x(t, theta[t.name]) for t in self.free]
        om = [self._omega_full0[i] for i in self.omega_free]
        return np.array(xs + om + [math.log(self.sigma0[j]) for j in self.sigma_free], dtype=float)

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

    def _omega_params(self, xo):
        """The full unconstrained OMEGA vector from its estimated part ``xo``."""
        if not self._omega_role or all(r is None for r in self._omega_role):
            return xo
        where = {i: k for k, i in enumerate(self.omega_free)}

        def value(i):
            r = self._omega_role[i]
            if r is None:
                return xo[where[i]]
            if r[0] == "fixed":
                return torch.tensor(r[1], dtype=xo.dtype, device=xo.device)
            return value(r[1])

        return torch.stack([value(i) for i in range(self.omega.n_params)])

    def unpack(self, x):
        """x (tensor) -> theta {name: scalar}, omega (K, K), sd {name: scalar}."""
        theta = {}
        i = 0
        for t in self.pm.thetas:
            if t.fixed:
                theta[t.name] = torch.tensor(t.init, dtype=x.dtype, device=x.device)
            else:
                theta[t.name] = self._from_x(t, x[i])
                i += 1
        n_om = len(self.omega_free)
        omega = self.omega.unpack(self._omega_params(x[i:i + n_om]))
        i += n_om
        sd, j = {}, 0
        for k, name in enumerate(self.sigma_names):
            if k in self.sigma_free:
                sd[name] = torch.exp(x[i + j])
                j += 1
            else:
                sd[name] = torch.tensor(float(self.sigma0[k]), dtype=x.dtype, device=x.device)
        return theta, omega, sd

    def natural(self, x):
        """All estimated quantities on their reported scale, as a flat tensor (for the delta method)."""
        theta, omega, sd = self.unpack(x)
        extra = [omega[r, c] for r, c in self.omega.offdiagonal()]
        return torch.stack([theta[t.name] for t in self.free] + list(torch.diagonal(omega)) +
                           [sd[n] for n in self.sigma_names] + extra)

    def fixed_etas(self) -> set:
        """ETA indices whose OMEGA is fixed (no standard error)."""
        return set(self.pm.omega_fixed)


def _naive_pooled(prob, pack, x0):
    """Typical values by least squares on log concentrations with ETA = 0 (a robust starting point), and the
    additive SD's start in the data's units (:func:`_additive_start`)."""
    nt = len(pack.free)
    if nt == 0 or getattr(prob.pm.structural, "given_per_record", False):   # $PRED: Y need not be a concentration
        return x0
    dev = prob.y.device
    eta0 = torch.zeros(prob.batch.n_subjects, prob.pm.n_eta, dtype=torch.float64, device=dev)
    obs = prob.obs & (prob.batch.dv > 0)
    logy = torch.log(torch.where(obs, prob.batch.dv, torch.ones_like(prob.batch.dv)))

    engine = prob.analytic(pack.unpack(torch.tensor(x0, dtype=torch.float64, device=dev))[0])

    def fun(xt):
        x = torch.tensor(np.r_[xt, x0[nt:]], dtype=torch.float64, device=dev, requires_grad=True)
        theta, _, _ = pack.unpack(x)
        if engine is not None:
            return _pooled_analytic(engine, theta, x, nt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = prob.predict(theta, eta0) if not prob.pm.error.ltbs else torch.exp(prob.predict(theta, eta0))
        r = torch.where(obs, logy - torch.log(f.clamp(min=1e-12)), torch.zeros_like(f))
        loss = (r * r).sum()
        if not torch.isfinite(loss):
            return 1e30, np.zeros(nt)
        (g,) = torch.autograd.grad(loss, x)
        return float(loss.detach()), g[:nt].cpu().numpy()

    try:
        res = minimize(fun, x0[:nt], jac=True, method="L-BFGS-B", options={"maxiter": 200})
        out = x0.copy()
        out[:nt] = res.x
        return _additive_start(prob, pack, out)
    except (HybridPKError, RuntimeError):
        return _additive_start(prob, pack, x0)


def _additive_start(prob, pack, x):
    """``x`` with the start of the additive residual SD (ADD, in DV units) moved to the data's concentration
    units, where the model's own start evidently presumes others: the model library's 0.5 is meant for levels
    in mg/L, about ten times it. When a tenth of the median positive level is more than about 30-fold from the
    start (10^1.5), the start is multiplied by the power of 1000 nearest that ratio: levels in ug/L (ng/mL) or
    g/L given with the library's start. From ADD 0.5 with theophylline's levels in ug/L, variances 1e6-fold too
    small at the pre-dose levels, the outer search took 78 iterations to the minimum (104.3221 + 2 n log 1000 =
    1927.9695) that the same data in mg/L reach in 17; with the start moved it takes the mg/L fit's path (17;
    ng/mL with the doses in ng: 21 against 51). Only the start moves: ADD is estimated as before. Not for SD
    starts the caller gave (``sigma``), log-transform-both-sides (ADD on the log scale) or a general $ERROR."""
    err = prob.pm.error
    if err.ltbs or err.kind not in ("additive", "combined", "combined1") or "ADD" in pack.sigma_given:
        return x
    j = pack.sigma_names.index("ADD")
    levels = prob.batch.dv[prob.obs & (prob.batch.dv > 0)]
    if j not in pack.sigma_free or not levels.numel():
        return x
    k = round(math.log10(0.1 * float(levels.median()) / pack.sigma0[j]) / 3)
    if k == 0:
        return x
    out = np.array(x, dtype=float)
    out[len(pack.free) + len(pack.omega_free) + pack.sigma_free.index(j)] = math.log(pack.sigma0[j] * 1000.0 ** k)
    return out


def _pooled_analytic(engine, theta, x, nt):
    """The naive-pooled loss (sum of squared log residuals at ETA = 0) and its gradient in the first ``nt``
    entries of ``x`` by the analytic path (the closed form's derivatives in its log-parameters, through the
    subjects' typical parameters)."""
    phi0 = engine.typical(theta)
    with np.errstate(all="ignore"):
        f, g, _ = engine.jet(phi0.detach().numpy())
    obs = engine.mask & (engine.y > 0)
    r = np.where(obs, np.log(np.where(obs, engine.y, 1.0)) - np.log(np.maximum(f, 1e-12)), 0.0)
    loss = float((r * r).sum())
    if not math.isfinite(loss):
        return 1e30, np.zeros(nt)
    slope = np.where(obs & (f > 1e-12), -2.0 * r / np.where(f > 1e-12, f, 1.0), 0.0)      # dloss/df
    d_phi = (slope[..., None] * g).sum(1)                                                  # (N, P)
    (gx,) = torch.autograd.grad((phi0 * torch.as_tensor(d_phi, device="cpu")).sum(), x)
    return loss, gx[:nt].numpy()


#: the outer search also ends when the best OFV fell by less than STALL_OFV over STALL_ITERATIONS iterations: on a
#: flat objective (a parameter running to its bound, e.g. a transit model's NN -> 0 on data without a delay, or
#: an ODE model's solver noise in the gradient) BFGS otherwise crawls to maxiter (hours for ODE models)
STALL_ITERATIONS, STALL_OFV = 10, 1e-4
#: a BFGS trial point further than this (max over the estimated parameters, on the estimation scale: log THETA,
#: OMEGA's Cholesky factors, log SDs) from the last iterate is not evaluated; it reads as an OFV above the best
#: one, and the line search steps back. A BFGS update from poorly informed curvature can otherwise propose
#: absurd values (seen: V 64 -> 0.013 L, an OMEGA of 7e5, on the EHC data with the transit model), where an
#: ODE model takes minutes per solve; 2 allows a 7-fold change of a THETA per iteration
TRUST_STEP = 2.0
#: the outer search also ends, converged, when ROUNDING_EVALUATIONS evaluations in a row land within ROUNDING_OFV
#: of the best OFV without lowering it: BFGS's line search is then probing the OFV's rounding (EBE modes found
#: to 1e-9). Seen on 100 subjects: the OFV settled to 1e-9 after 23 evaluations, and the line search spent 45
#: more within 1.5e-9 of it before scipy gave up.
ROUNDING_EVALUATIONS, ROUNDING_OFV = 6, 1e-6
#: when BFGS stops on a failed line search ("precision loss", or the stop at rounding where the gradient is not
#: small) far from a minimum, the search restarts from its best point with a fresh (identity) Hessian
#: approximation, at most this many times and only while a restart lowers the OFV: an update from curvature
#: measured far away can point where no step lowers the OFV. metrumresearchgroup/bbr's example model (ADVAN2,
#: started at V 10 where NONMEM ends at 465) stopped so after 4 iterations at OFV 4805.5; NONMEM reaches 2636.85
#: from the same start.
RESTARTS = 5
#: max |dOFV/dx| (estimation scale) below which a point where the search ended counts as a minimum: at the minima
#: the rounding stop ends on it is 1e-4 to 1e-3; where the line search only failed to go on, 1e2 to 1e3
GRADIENT_AT_MINIMUM = 1e-2


def _beyond_trust(xv, ofv_iterate: float, far: float):
    """The value and gradient the outer search sees at a trial point ``far`` beyond TRUST_STEP from the last
    iterate (not evaluated): the iterate's OFV plus 1000 (1 + far), with a zero gradient, so that no line search
    takes it for a decrease (sufficient decrease fails) and it steps back. It once took the best OFV seen, which an
    earlier trial of the same line search can have lowered below the iterate's: scipy's BFGS then accepted the
    point as a decrease and ended 'successfully' on its zero gradient; a fit of theophylline with DV in ug/L
    stopped so after 3 iterations at OFV 328482, where its minimum is 1928. (Where the iterate is the best point,
    as it nearly always is, the value is the one it was. A gradient rising outward was tried: it changed the line
    searches' interpolation and the lag-time fit of theophylline ended at another mode, OFV 147.21 against
    146.81.)"""
    return ofv_iterate + 1e3 * (1.0 + far), np.zeros_like(np.asarray(xv, dtype=float))


class _AtRounding(Exception):
    """Raised from the objective when the search is probing the OFV's rounding (see ROUNDING_EVALUATIONS)."""


def fit_population(pm, dataset, *, seed: int = 0, omega=None, sigma=None, maxiter: int = 300,
                   progress: bool = True, covariance=None, pooled_start: bool = True,
                   method: str = "auto", checkpoint=None, estimation: str | None = None,
                   evaluate: bool | None = None, device="cpu") -> FittedPopulation:
    """Fit a population model by FOCE with interaction (or, ``estimation``, FOCE or FO).

    Parameters
    ----------
    pm : PopulationModel  (see :func:`hybridpk.population.build_model`)
    dataset : Dataset
    seed : int  recorded in the result (FOCE-I itself is deterministic)
    omega, sigma : initial OMEGA variances (list, ETA order) and residual SDs ({"ADD": .., "PROP": ..})
    maxiter : outer iterations (BFGS); the search also stops, converged, when the OFV fell by less than 1e-4
        over the last 10 iterations (:data:`STALL_OFV`, :data:`STALL_ITERATIONS`), or when six evaluations in a
        row landed within 1e-6 of the best OFV (its line search probing rounding: :data:`ROUNDING_EVALUATIONS`)
    progress : show the progress with the OFV (a bar on a terminal, a line per 10% of ``maxiter`` in a log)
    covariance : how the standard errors are computed: "sandwich" (R^-1 S R^-1, NONMEM's default; also
        ``True``), "R" (2 R^-1, NONMEM's MATRIX=R), "S" (4 S^-1, MATRIX=S), or False/"none" (no standard
        errors); see :data:`hybridpk.population.estimation.COVARIANCE_METHODS`. None (default): as the model asks
        (an imported control stream's $COVARIANCE: MATRIX=R or S, the sandwich, or none without the record), else
        the sandwich
    pooled_start : start typical values from a naive pooled fit (and the additive SD in the data's units)
    method : solver path of the predictions: "auto" (closed form for linear models), "closed_form" or "ode"
    estimation : "FOCE-I" (NONMEM's METHOD=1 INTERACTION), "FOCE" (METHOD=1: the residual variance at eta = 0)
        or "FO" (METHOD=0: the model linearised at eta = 0; the EBEs reported are POSTHOC modes), with the
        OFVs of Wang (J Pharmacokinet Pharmacodyn 2007;34:575-93); see :mod:`hybridpk.population.focei`.
        None: the method the model asks for (an imported control stream's $ESTIMATION), else FOCE-I
    evaluate : NONMEM's MAXEVAL=0: no estimation; the OFV, EBEs (POSTHOC), tables and (if asked) standard errors
        at the initial estimates. None: as the model asks (a control stream's ``MAXEVAL=0``), else False
    checkpoint : a JSON file written atomically after every outer iteration (the iterate and the EBEs
        that warm-start the next one). When it exists the fit resumes from that iterate, with a new BFGS
        Hessian approximation: the estimates agree with an uninterrupted fit's to the convergence
        tolerance, not bit for bit. A checkpoint of other data, model or options is refused.
    device : the torch device the fit computes on ("cpu", "cuda", "cuda:N", "auto"), in float64; the model it
        returns computes there too (:meth:`FittedPopulation.to`). The analytic path of 1- to 3-compartment models is
        numpy code, so on a GPU the fit takes the automatic-differentiation path (summary.json's
        "derivatives" says which); the outer search (scipy's BFGS) runs on the CPU either way.

    Returns the FittedPopulation (THETA/OMEGA/SIGMA tables with standard errors) with its Estimation record
    (OFV, convergence, shrinkage, EBEs as ``estimation.individual`` and ``estimation.estimates``, and
    PRED/IPRED/CWRES/IWRES as ``estimation.predictions``).
    """
    with ExitStack() as scope:
        return _fit(pm, dataset, seed=seed, omega=omega, sigma=sigma, maxiter=maxiter, progress=progress,
                    covariance=covariance, pooled_start=pooled_start, method=method, checkpoint=checkpoint,
                    estimation=estimation, evaluate=evaluate, scope=scope, device=device)


@contextmanager
def _one_torch_thread():
    """torch on one thread for the block: the analytic path computes in numpy, and torch's idle OpenMP threads
    spinning after its small operations took the cores from it (benchmarks/fit_scale.py's 1000 subjects, in
    process: 0.39-0.44 s against 0.32-0.33 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(pm, dataset, *, seed, omega, sigma, maxiter, progress, covariance, pooled_start, method, checkpoint,
         estimation, evaluate, scope, device) -> FittedPopulation:
    """The body of :func:`fit_population`; ``scope`` holds what must be undone when it returns (an ExitStack)."""
    if pm.recipe.get("only_simulation"):
        raise ModelError(f"{pm.recipe['only_simulation']}: $SIMULATION ONLYSIMULATION asks NONMEM to simulate without "
                         "estimating; to simulate at the stream's values here, remove ONLYSIMULATION, evaluate them "
                         "($ESTIMATION MAXEVAL=0, or `hybridpk fit --evaluate`) and give that run to "
                         "`hybridpk simulate --model RUN`; to fit, remove ONLYSIMULATION")
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    estimation = estimation or pm.recipe.get("estimation", "FOCE-I")
    evaluate = bool(pm.recipe.get("evaluate", False) if evaluate is None else evaluate)
    if evaluate:
        pooled_start = False      # the OFV at the estimates given, not at a naive-pooled start
    if covariance is None:
        covariance = pm.recipe.get("covariance", "sandwich")
    cov_method = "sandwich" if covariance is True else "none" if covariance is False else str(covariance)
    if cov_method not in COVARIANCE_METHODS:
        raise HybridPKError(f"covariance={covariance!r}: give one of {', '.join(COVARIANCE_METHODS)} (or True/False)")
    prob = Problem(pm, dataset, method=method, estimation=estimation, device=resolve_device(device))
    dev = prob.y.device

    def point(xv, requires_grad=False):
        """The estimation vector as a tensor on the fit's device."""
        return torch.tensor(xv, dtype=torch.float64, device=dev, requires_grad=requires_grad)

    if not bool(prob.obs.any()):
        raise HybridPKError(f"{dataset.source or 'the dataset'}: no observations (records with EVID=0 and MDV=0), "
                            "so there is nothing to fit: add the measured concentrations, or set MDV=0 on the "
                            "records that hold them")
    pack = Packing(pm, omega, sigma)
    x0 = pack.x0()
    theta0, _, sd0 = pack.unpack(point(x0))
    prob.require_positive_variance(theta0, sd0, estimating=not evaluate)
    # the OFV and its gradient by the closed form's analytic derivatives where they cover the model and data (the
    # same numbers as the general path's, checked on these data first), else by automatic differentiation
    analytic = prob.analytic(theta0)
    derivatives = ANALYTIC if analytic is not None else f"automatic (torch): {prob.analytic_reason}"
    if analytic is not None:
        scope.enter_context(_one_torch_thread())
    n, k = dataset.n_subjects, pm.n_eta
    state = {"eta": torch.zeros(n, k, dtype=torch.float64, device=dev), "best": math.inf, "evals": 0, "iter": 0,
             "flat": 0}
    key = _fit_fingerprint(pm, dataset, omega, sigma, method, pooled_start, estimation + ("/evaluate" if evaluate
                                                                                         else ""))
    resumed = _read_checkpoint(checkpoint, key, (n, k)) if checkpoint else None
    if resumed is not None:
        x0, state["eta"], state["iter"] = resumed
        state["eta"] = state["eta"].to(dev)
    elif pooled_start:
        x0 = _naive_pooled(prob, pack, x0)
    bar = Progress(maxiter, estimation, "it", enabled=progress, initial=state["iter"])
    state["x"] = np.array(x0, dtype=float)       # the last iterate (TRUST_STEP)
    state["seen"] = {}      # the OFVs evaluated since that iterate (and its own), by point
    conditional = estimation != "FO"          # FO's OFV needs no EBEs

    def analytic_at(xv, per_subject=False):
        """:func:`_analytic_at` from the best point's EBEs and their predictor; its EBE fallbacks are the fit's."""
        before = analytic.fallback_steps
        out = _analytic_at(analytic, pack, xv, state["eta"], per_subject, predictor=state.get("predictor"))
        prob.fallback_steps += analytic.fallback_steps - before
        return out

    def evaluate_at(xv, need_grad=True):
        state.pop("candidate", None)
        if analytic is not None:
            out = analytic_at(xv)
            if out is not None:
                state["evals"] += 1
                ofv_i, g, eta, state["candidate"] = out
                ofv = float(ofv_i.sum())
                if not math.isfinite(ofv):
                    return math.inf, np.zeros_like(xv), eta
                return ofv, g, eta
        x = point(xv, need_grad)
        theta, om, sd = pack.unpack(x)
        with torch.no_grad():
            oinv = torch.linalg.inv(om) if k else om
        eta = prob.ebe(theta, oinv, sd, state["eta"]) if conditional else state["eta"]
        ofv = prob.ofv(theta, om, sd, eta)
        state["evals"] += 1
        if not torch.isfinite(ofv):
            return math.inf, np.zeros_like(xv), eta
        if need_grad:
            (g,) = torch.autograd.grad(ofv, x)
            return float(ofv.detach()), g.cpu().numpy(), eta
        return float(ofv.detach()), None, eta

    def fun(xv):
        far = float(np.abs(xv - state["x"]).max()) - TRUST_STEP
        at_x = state["seen"].get(state["x"].tobytes(), state["best"])       # the last iterate's OFV
        if far > 0 and math.isfinite(at_x):
            return _beyond_trust(xv, at_x, far)
        ofv, g, eta = evaluate_at(xv)
        state["seen"][np.asarray(xv, dtype=float).tobytes()] = ofv
        flat = math.isfinite(ofv) and abs(ofv - state["best"]) <= ROUNDING_OFV
        state["flat"] = state["flat"] + 1 if flat else 0
        if math.isfinite(ofv) and ofv < state["best"]:
            state["best"], state["eta"], state["x_best"] = ofv, eta, np.array(xv, dtype=float)
            state["predictor"] = state.pop("candidate", None)     # the analytic path's EBE predictor there
        if state["flat"] >= ROUNDING_EVALUATIONS:
            raise _AtRounding
        return ofv, g

    trace = []      # the best OFV after each outer iteration (the stall criterion)

    def cb(xk):
        state["iter"] += 1
        state["x"] = np.array(xk, dtype=float)
        here = state["x"].tobytes()
        state["seen"] = {here: state["seen"][here]} if here in state["seen"] else {}
        bar.update(1, OFV=f"{state['best']:.4f}")
        if checkpoint:
            _write_checkpoint(checkpoint, key, xk, state)
            state["saved"] = state["iter"]
        trace.append(state["best"])
        if len(trace) > STALL_ITERATIONS and trace[-STALL_ITERATIONS - 1] - trace[-1] < STALL_OFV:
            raise StopIteration     # scipy ends the search at this iterate

    def search(start):
        return minimize(fun, start, jac=True, method="BFGS", callback=cb,
                        options={"maxiter": max(1, maxiter - state["iter"]), "gtol": 1e-4, "xrtol": 1e-7})

    def stuck(res, at_rounding) -> bool:
        """The search ended on a failed line search, or its line search probed the best OFV's rounding where
        the gradient is not small (not a minimum: the rounding stop's false alarm), so a restart may go on."""
        if at_rounding:     # kept: where no restart follows, the fit's final evaluation is this one
            state["at_best"] = (state["x_best"].copy(), evaluate_at(state["x_best"]))
            return float(np.abs(state["at_best"][1][1]).max()) >= GRADIENT_AT_MINIMUM
        return res is not None and not res.success and "precision loss" in str(res.message)

    res, at_rounding, restarts, start = None, False, 0, x0
    try:
        while not evaluate:
            before = state["best"]
            try:
                found, rounding = search(start), False
            except _AtRounding:
                found, rounding = None, True
            if restarts and not state["best"] < before - STALL_OFV:
                break               # the restart found nothing lower: keep the search that ended there
            res, at_rounding = found, rounding
            if (restarts >= RESTARTS or state["iter"] >= maxiter or not math.isfinite(state["best"])
                    or not stuck(res, at_rounding)):
                break
            restarts += 1
            start = state["x"] = state["x_best"]          # the trust region is centred on the restart
            state["flat"] = 0
    except KeyboardInterrupt:
        saved = state.get("saved", resumed[2] if resumed is not None else None)
        where = (f"the checkpoint {checkpoint} holds iteration {saved}" if saved is not None
                 else "no checkpoint was written yet" if checkpoint else "no checkpoint file was asked for")
        raise Interrupted(f"the {estimation} fit was interrupted after {state['iter']} outer iterations; "
                          f"{where}") from None
    finally:
        bar.close()
    x_hat = x0 if evaluate else state["x_best"] if at_rounding else res.x
    known = state.pop("at_best", None)
    ofv, g, eta = known[1] if known is not None and np.array_equal(known[0], x_hat) else evaluate_at(x_hat)
    if evaluate:
        converged, message = False, ("evaluation only (MAXEVAL=0): the OFV and EBEs at the initial estimates, "
                                     "nothing estimated")
    elif at_rounding:
        converged = float(np.abs(g).max()) < GRADIENT_AT_MINIMUM
        message = (f"the OFV is at its minimum to rounding: {ROUNDING_EVALUATIONS} evaluations in a row changed it "
                   f"by less than {ROUNDING_OFV:g}" if converged else
                   f"the line search found no lower OFV near the best point ({ROUNDING_EVALUATIONS} evaluations in a "
                   f"row within {ROUNDING_OFV:g} of it), where the gradient is not small")
    else:
        stalled = "StopIteration" in str(res.message)
        converged = bool(res.success) or stalled or float(np.abs(g).max()) < GRADIENT_AT_MINIMUM
        message = (f"the OFV fell by less than {STALL_OFV:g} over the last {STALL_ITERATIONS} iterations"
                   if stalled else str(res.message))
    if restarts:
        message += (f" (BFGS restarted {restarts} time{'s' if restarts > 1 else ''} from its best point after a "
                    "failed line search)")
    warn = []
    if not converged and not evaluate:
        warn.append(f"the estimation did not converge ({message}; max |gradient| {np.abs(g).max():.3g})")
        warnings.warn(warn[-1], ConvergenceWarning, stacklevel=2)
    # the EBEs: the same code path as any later estimate (FOCE, FO: the modes of the method's conditional
    # objective, as NONMEM reports them), searched from 0 and from the EBEs behind the OFV (in an evaluation
    # those came from 0 as well: map_estimate's own search; where it ran out of iterations, map_estimate
    # searches on: moxo's evaluation gives -8561.5045 so, -8561.5046 searching from them too, 56 s against 62 s);
    # the OFV is taken again where a patient's reported mode is better than the one behind it, so that the
    # tables and the OFV agree
    theta, om, sd = pack.unpack(point(x_hat))
    searched_before = prob.fallback_steps      # the fit's count: the reported EBEs' searches are not the fit's
    est = map_estimate(_tables(pm, pack, theta, om, sd, None, dataset).to(dev), dataset, estimation,
                       start=eta if conditional and k and not evaluate else None,
                       problem=prob if method == "auto" else None)
    prob.fallback_steps = searched_before
    if conditional and k:
        ofv, moved = _ofv_at_reported(prob, theta, om, sd, eta, est, ofv)
        if moved:
            mceta = int(pm.recipe.get("mceta", 0))
            warn.append(f"for {subjects_phrase(dataset, moved)} the EBE searches after the estimation (from ETA = 0, "
                        "from its last EBEs, from either side on a lag time's ETA, "
                        + (f"from {mceta} random ETAs (MCETA={mceta}), " if mceta else "")
                        + "and with the residual SDs widened first) found modes with a lower "
                        f"objective than the EBEs of its last OFV; the OFV reported ({ofv:.4f}) and the tables "
                        "are at those modes")
        state["eta"] = est.eta      # the covariance step's EBE searches start at the modes reported
    if not math.isfinite(ofv):
        warn.append(_not_finite(prob, dataset, theta, om, sd, est.eta))
    if searched := est.search_warning():
        warn.append(searched)

    def subject_gradients(xv):
        """(N, P) gradients of each subject's OFV contribution at ``xv`` (the S matrix's ingredients)."""
        out = analytic_at(xv, per_subject=True) if analytic is not None else None
        if out is not None:
            return out[1]
        x = point(xv)
        theta, om, sd = pack.unpack(x)
        oinv = torch.linalg.inv(om) if k else om
        eta = prob.ebe(theta, oinv, sd, state["eta"]) if conditional else state["eta"]
        return per_subject_gradients(lambda xt: prob.ofv(*pack.unpack(xt), eta, per_subject=True), x)

    cov_nat = None
    if cov_method != "none":
        cov_nat, cov_warn = _covariance(evaluate_at, subject_gradients, pack, x_hat, cov_method)
        if cov_warn:
            warn.append(cov_warn)
            warnings.warn(cov_warn, ConvergenceWarning, stacklevel=2)
    warn += _boundary_warnings(pack, x_hat, n)
    if prob.fallback_steps:
        warn.append(f"{prob.fallback_steps} EBE Newton steps met a singular Hessian (extreme ETAs or a tiny residual "
                    "variance during the search) and took a gradient step instead")
    fitted = _tables(pm, pack, theta, om, sd, cov_nat, dataset).to(dev)
    est = replace(est, model=fitted)
    diag = diagnostics(prob, fitted.theta.tensors(dev), fitted.omega.tensor(dev), fitted.sigma.sd_tensors(dev),
                       est.eta)
    warn += _residual_error_warnings(prob, diag)
    record = Estimation(method=estimation, ofv=float(ofv), converged=converged, message=message,
                        iterations=state["iter"], evaluations=state["evals"],
                        seconds=time.perf_counter() - t_start, shrinkage=diag["shrinkage"], etabar=diag["etabar"],
                        individual=_individual_table(dataset, pm, est, diag),
                        predictions=_prediction_table(dataset, prob, diag),
                        n_subjects=dataset.n_subjects, n_observations=dataset.n_observations, seed=seed,
                        warnings=tuple(warn), data_sha256=dataset.fingerprint(), estimates=est,
                        ebe_fallbacks=prob.fallback_steps, covariance=cov_method if cov_nat is not None else "none",
                        evaluation_only=evaluate, derivatives=derivatives,
                        ebe_not_at_mode=tuple(dataset.ids[i] for i in est.not_at_mode()))
    return fitted.with_estimation(record)


#: Estimation.derivatives of a fit whose OFV gradients came from the analytic path
ANALYTIC = "analytic (closed form, numpy): hybridpk.population.analytic_focei"


def _analytic_at(engine, pack, xv, eta0, per_subject: bool = False, predictor=None):
    """(OFV_i (N,), the gradient (P,) of their sum with respect to the estimation vector ``xv`` or, with
    ``per_subject``, each subject's (N, P), the EBEs (N, K) as a tensor, the predictor of the EBEs near ``xv``)
    by the analytic path; None where the closed form meets its 0/0 (KA = CL/V for some subject: the general
    path takes that evaluation). The EBE search starts at ``eta0`` or, per subject where its objective is lower,
    at the first-order prediction from ``predictor`` (an earlier call's: the EBEs move with the population values
    by the implicit function's derivative; a better start, the same mode). The gradients come by subject's typical
    log-parameters (where THETA and covariates act), OMEGA's entries and the SDs, and go to the estimation
    vector's through the model's parameter map and the packing by automatic differentiation of that small graph:
    one backward pass, or the per-subject Jacobian (:func:`per_subject_gradients`) for the S matrix. On the CPU,
    where the analytic path computes."""
    x = torch.tensor(xv, dtype=torch.float64, device="cpu", requires_grad=True)

    def population(xt):     # (typical log-parameters (N, P), OMEGA's entries and the SDs (R,))
        theta, omega, sd = pack.unpack(xt)
        return engine.typical(theta), torch.cat([omega.reshape(-1), torch.stack([sd[a] for a in kinds])])

    kinds = pack.sigma_names
    phi0, rest = population(x)
    phi_values, rest_values = phi0.detach().numpy(), rest.detach().numpy()
    k = eta0.shape[1]
    guess = None
    if predictor is not None:
        base_phi, base_rest, eta_base, sens = predictor
        s_phi, s_rest = sens()
        guess = (eta_base + (s_phi @ (phi_values - base_phi)[..., None])[..., 0]
                 + s_rest @ (rest_values - base_rest))
    try:
        with np.errstate(all="ignore"):
            ofv_i, eta, grads, sensitivity = engine.ofv(phi_values, rest_values[:k * k].reshape(k, k),
                                                        dict(zip(kinds, rest_values[k * k:])), eta0.numpy(), guess)
    except FloatingPointError:
        return None

    def flat(parts):       # OMEGA's entries and the SDs, in the order of ``rest``
        return np.concatenate([parts["omega"].reshape(*parts["phi"].shape[:-1], -1),
                               np.stack([parts["sd"][a] for a in kinds], -1)], -1)

    g_phi, g_rest = torch.as_tensor(grads["phi"], device="cpu"), torch.as_tensor(flat(grads), device="cpu")
    cache = []

    def sens():            # ((N, K, P), (N, K, R)), computed once, when a later search starts from here
        if not cache:
            s = sensitivity()
            cache.append((s["phi"], flat(s)))
        return cache[0]

    predictor = (phi_values, rest_values, eta, sens)

    def contributions(xt):  # each subject's first-order OFV change: its gradient is the subject's
        p, r = population(xt)
        return (p * g_phi).sum(1) + g_rest @ r

    if per_subject:
        return ofv_i, per_subject_gradients(contributions, x.detach()), torch.as_tensor(eta, device="cpu"), predictor
    # a scalar's gradient: autograd.grad with explicit grad_outputs imports sympy on first use (0.2 s)
    (g,) = torch.autograd.grad(((phi0 * g_phi).sum() + (g_rest.sum(0) * rest).sum()), x)
    return ofv_i, g.numpy(), torch.as_tensor(eta, device="cpu"), predictor


def _ofv_at_reported(prob, theta, omega, sd, eta, est, ofv):
    """(the OFV at the reported EBEs ``est.eta``, the indices of the patients whose reported mode has a lower
    conditional objective than ``eta``, the estimation's last EBEs). Where there are none the OFV stays
    ``ofv``, the estimation's own."""
    with torch.no_grad():
        before = torch.nan_to_num(prob.objective(theta, torch.linalg.inv(omega), sd, eta), nan=math.inf)
    moved = torch.nonzero(est.objective < before - 1e-6 * (1 + est.objective.abs())).flatten().tolist()
    if not moved:
        return ofv, []
    with torch.enable_grad():       # the OFV re-attaches the EBEs by one Newton step (autograd)
        new = float(prob.ofv(theta, omega, sd, est.eta).detach())
    return (new if math.isfinite(new) else math.inf), moved


def _not_finite(prob, dataset, theta, omega, sd, eta) -> str:
    """The warning for an OFV that is not finite: the subjects whose contribution is not, with their
    conditional objective at the EBEs."""
    with torch.enable_grad():
        per = prob.ofv(theta, omega, sd, eta, per_subject=True).detach()
    with torch.no_grad():
        obj = prob.objective(theta, torch.linalg.inv(omega), sd, eta)
    bad = torch.nonzero(~torch.isfinite(per)).flatten().tolist()
    if not bad:
        return "the OFV is not finite"
    worst = ", ".join(f"ID {dataset.ids[i]}: {float(obj[i]):.4g}" for i in bad[:5])
    return (f"the OFV is not finite: the contribution of {subjects_phrase(dataset, bad)} is not (-2 log posterior at "
            f"their EBEs: {worst}); their EBE search did not reach a mode their observations allow at these "
            "estimates (look at their records and residual-error model, or start from estimates nearer theirs)")


def per_subject_gradients(ofv_i, x, mode: str = "auto") -> np.ndarray:
    """(N, P) Jacobian of the per-subject OFV contributions ``ofv_i(x)`` (N,) in the packed parameters x (P,).

    "weights" (the default): with subject weights w, v(w) = d/dx sum_i w_i ofv_i(x) = sum_i w_i g_i, so the
    gradient of v_j in w is column j: P backward passes over the graph of v, a cost that grows as N (0.09 s at
    N = 1000, 1-cmt oral, 7 parameters). "backward": the N backward passes of the OFV contributions batched
    into one (vmap), a cost that grows as N^2 (27 s at N = 1000). "auto" takes the weights and falls back to
    the batched passes where an operation has no double-backward rule. The two agree to rounding
    (tests/unit/test_covariance.py)."""

    def weights():
        xr = x.detach().clone().requires_grad_(True)
        out = ofv_i(xr)
        w = torch.ones_like(out.detach()).requires_grad_(True)
        (v,) = torch.autograd.grad((w * out).sum(), xr, create_graph=True)
        cols = [torch.autograd.grad(v[j], w, retain_graph=True, allow_unused=True)[0] for j in range(v.shape[0])]
        return torch.stack([torch.zeros_like(w) if c is None else c for c in cols], 1).detach().cpu().numpy()

    def backward():
        xr = x.detach().clone().requires_grad_(True)
        out = ofv_i(xr)
        try:      # all N backward passes at once
            (g,) = torch.autograd.grad(out, xr, torch.eye(out.shape[0], dtype=out.dtype, device=out.device),
                                       retain_graph=True, is_grads_batched=True)
            return g.detach().cpu().numpy()
        except (RuntimeError, NotImplementedError):   # an operation without a batching rule: one pass each
            return np.stack([torch.autograd.grad(out[i], xr, retain_graph=True)[0].cpu().numpy()
                             for i in range(out.shape[0])])

    if mode != "auto":
        return {"weights": weights, "backward": backward}[mode]()
    try:
        return weights()
    except (RuntimeError, NotImplementedError):
        return backward()


#: FOCE/LAPLACE without INTERACTION: a residual variance at PRED under this fraction of the one at IPRED ...
VARIANCE_AT_PRED_SMALL = 0.01
#: ... at this fraction of the observations or more is warned about (:func:`_variance_at_pred_warnings`)
VARIANCE_AT_PRED_SHARE = 0.05
#: a residual SD under this fraction of the individual predictions (median over the observations) is no assay's
NOISE_FREE = 1e-3


def _residual_error_warnings(prob, diag: dict) -> list[str]:
    """What the fitted residual error says about the estimates: :func:`_variance_at_pred_warnings` and
    :func:`_noise_free_warnings`, from the residual variances at the observations that
    :func:`~hybridpk.population.diagnostics.diagnostics` computed (``diag``)."""
    obs = prob.obs
    at_ipred = diag["variance"][obs]
    if not at_ipred.numel():
        return []
    at_pred = None if diag["variance_at_pred"] is None else diag["variance_at_pred"][obs]
    # IPRED as a concentration (diagnostics returns it so); with log-transform-both-sides the SD is relative
    relative_sd = at_ipred.sqrt() / (1.0 if prob.pm.error.ltbs else diag["ipred"][obs].abs())
    return (_variance_at_pred_warnings(prob.estimation, at_pred, at_ipred, diag["etabar"])
            + _noise_free_warnings(float(relative_sd.median())))


def _variance_at_pred_warnings(estimation: str, at_pred, at_ipred, etabar: dict) -> list[str]:
    """FOCE or LAPLACE without INTERACTION take the residual variance at ETA = 0, the population prediction PRED
    (NONMEM's convention; Wang 2007). Where it scales with the prediction (proportional error) and PRED is far
    below IPRED, an observation's variance is a small part of what its individual prediction carries, so it
    weighs that much more in the estimates, and a fit can lower its OFV by moving PRED away from the data (the
    EBEs follow, so ETABAR moves away from 0). pharmpy's moxo.mod (METHOD=1, proportional error, its data
    simulated without residual error) went that way: at the estimates of its control stream 0.3% of the
    observations have PRED under a tenth of IPRED; its fit passed OFV -8561 (from -2868) with 48% of them there,
    typical CL 91 L/h against 23 and ETABAR(CL) -1.23, and went on falling. (With 15% proportional noise added to
    its DV the same stream converges in 21 iterations, CL 24.6 L/h, without this warning.) A warning when
    :data:`VARIANCE_AT_PRED_SHARE` or more of the observations have a variance at PRED (``at_pred``; None with
    interaction) under :data:`VARIANCE_AT_PRED_SMALL` of the one at IPRED (``at_ipred``)."""
    if at_pred is None:
        return []
    small = at_pred < VARIANCE_AT_PRED_SMALL * at_ipred
    share = float(small.double().mean())
    if share < VARIANCE_AT_PRED_SHARE:
        return []
    far = sorted(((abs(b["etabar"]), e) for e, b in etabar.items() if b.get("p") is not None and b["p"] < 1e-3),
                 reverse=True)
    moved = (f"; ETABAR of {', '.join(e for _, e in far[:3])} far from 0 (P < 0.001)" if far else "")
    return [f"{estimation} without INTERACTION takes the residual variance at PRED (ETA = 0): at "
            f"{int(small.sum())} of {small.numel()} observations ({100 * share:.0f}%) it is under "
            f"{100 * VARIANCE_AT_PRED_SMALL:.0f}% of the variance at IPRED (for a proportional error: PRED under a "
            f"tenth of IPRED), so these observations weigh 100 times more than their individual predictions "
            f"warrant, and the fit can lower its OFV by moving PRED away from the data{moved}. These estimates are "
            "not to be trusted: fit with INTERACTION ($ESTIMATION METHOD=1 INTERACTION, or --method FOCE-I)"]


def _noise_free_warnings(relative_sd: float) -> list[str]:
    """Data that the individual predictions fit as if measured without error (simulated without EPS, DV computed
    from a model) have no maximum-likelihood SIGMA: the likelihood grows as SIGMA falls, down to the DV's
    rounding. pharmpy's moxo.csv is such data: fitted with INTERACTION its proportional SD went to 0.025% (IPRED
    within 1e-5 of DV for half the observations, DV written with 5 decimals), with negative shrinkage and an
    OMEGA correlation of 1.00. A warning when the residual SD at IPRED over IPRED (on the log scale: the SD) of
    the median observation, ``relative_sd``, is under :data:`NOISE_FREE`."""
    if not relative_sd < NOISE_FREE:
        return []
    return [f"the residual SD is {100 * relative_sd:.2g}% of the individual predictions (median observation): the "
            "data fit as if measured without error (simulated without EPS, or DV computed from a model), where the "
            "likelihood grows as SIGMA falls, down to the DV's rounding; SIGMA, the OFV, the standard errors and "
            "the ETA diagnostics (shrinkage, ETABAR) are not those of measured data. Simulate the data with "
            "residual error, or fix SIGMA at the assay's"]


def _boundary_warnings(pack, x_hat, n: int) -> list[str]:
    """Estimates a user must not take at face value: an OMEGA variance at its boundary (0; NONMEM's
    "PARAMETER ESTIMATE IS NEAR ITS BOUNDARY") or implausibly large, OMEGA from fewer than two subjects, and a
    THETA of a library model outside the range the library gives as plausible for it."""
    out = []
    if n < 2 and pack.pm.n_eta:
        out.append(f"{n} subject: the between-subject variances (OMEGA) cannot be estimated from one subject, and "
                   "ETA shrinkage is undefined; fit several subjects, or a model without IIV")
    _, om, _ = pack.unpack(torch.tensor(x_hat, dtype=torch.float64, device="cpu"))
    low = [f"{e} ({float(om[j, j]):.2g})" for j, e in enumerate(pack.pm.etas)
           if float(om[j, j]) < 1e-6 and j not in pack.pm.omega_fixed]
    if low:
        out.append(f"OMEGA near its boundary of 0 for {', '.join(low)}: the data do not inform this IIV; consider "
                   "removing it (its ETA, CV and shrinkage are not meaningful)")
    high = [f"{e} ({float(om[j, j]):.3g})" for j, e in enumerate(pack.pm.etas)
            if float(om[j, j]) > OMEGA_IMPLAUSIBLE and j not in pack.pm.omega_fixed]
    if high:
        out.append(f"OMEGA implausibly large for {', '.join(high)} (a CV above {_cv(OMEGA_IMPLAUSIBLE):.0f}%): the "
                   "data do not determine this IIV, and the model is likely over-parameterised for them; simplify "
                   "it (fewer compartments or ETAs)")
    theta, _, _ = pack.unpack(torch.tensor(x_hat, dtype=torch.float64, device="cpu"))
    specs = {p.name: p for p in pack.pm.structural.parameters}
    outside = [f"{t.name} = {float(theta[t.name]):.3g}{' ' + specs[t.name].unit if specs[t.name].unit else ''} "
               f"(plausible {specs[t.name].lower:g} to {specs[t.name].upper:g})"
               for t in pack.pm.thetas if pack.pm.recipe.get("kind") != "nonmem" and t.name in specs
               and not specs[t.name].lower <= float(theta[t.name]) <= specs[t.name].upper]
    if outside:
        out.append(f"THETA outside the range the model library gives as plausible: {', '.join(outside)}; the data "
                   f"do not support this parameter of {pack.pm.structural.name}, or the model does not suit them")
    return out


#: an OMEGA variance above this (CV of the log-normal parameter above ~14 800%) is reported as implausible
OMEGA_IMPLAUSIBLE = 10.0


def _cv(variance: float) -> float:
    return 100 * math.sqrt(math.expm1(variance))


#: fit checkpoints: "format" and "version" this hybridpk writes and reads
_CHECKPOINT = ("hybridpk-foce-checkpoint", 2)


def _fit_fingerprint(pm, dataset, omega, sigma, method, pooled_start, estimation="FOCE-I") -> str:
    """SHA-256 of what a fit computes from: the records, the model (recipe, THETA bounds and initial values,
    OMEGA and SIGMA starts) and the options that change the path of the estimation."""
    import hashlib
    import json

    spec = {"recipe": pm.recipe, "thetas": [(t.name, t.init, t.lower, t.upper, t.fixed) for t in pm.thetas],
            "omega": np.asarray(omega if omega is not None else pm.omega_init, dtype=float).tolist(),
            "sigma": {**pm.error.init_values(), **(sigma or {})}, "etas": list(pm.etas),
            "blocks": [list(b) for b in pm.blocks], "fixed": [list(pm.omega_fixed), list(pm.sigma_fixed)],
            "same": [[list(b), list(c)] for b, c in pm.omega_same], "method": method,
            "zeros": sorted([int(r), int(c)] for r, c in pm.omega_zeros),
            "pooled_start": bool(pooled_start),
            "estimation": estimation}
    return hashlib.sha256((json.dumps(spec, sort_keys=True, default=str) + dataset.fingerprint()).encode()).hexdigest()


def _write_checkpoint(path, key: str, x, state) -> None:
    """The outer iterate (JSON numbers: floats round-trip exactly) and the warm-start EBEs (the bytes of their
    float64 values, little-endian, base64: exact, and 3 ms faster per iteration than 3000 JSON numbers at 1000
    subjects), as JSON, written atomically."""
    import base64
    import json

    eta = np.ascontiguousarray(state["eta"].cpu().numpy(), dtype="<f8")
    atomic_write_text(path, json.dumps({"format": _CHECKPOINT[0], "version": _CHECKPOINT[1], "fingerprint": key,
                                        "iteration": state["iter"], "x": [float(v) for v in x],
                                        "eta_shape": list(eta.shape),
                                        "eta_float64_base64": base64.b64encode(eta.tobytes()).decode("ascii")}))


def _checkpoint_eta(ck: dict):
    """The EBEs of a checkpoint: version 2's base64 float64 bytes, or version 1's JSON numbers."""
    import base64

    if ck.get("version") == 1:
        return torch.tensor(ck["eta"], dtype=torch.float64, device="cpu")
    raw = np.frombuffer(base64.b64decode(ck["eta_float64_base64"], validate=True), dtype="<f8")
    return torch.from_numpy(raw.reshape([int(n) for n in ck["eta_shape"]]).astype(np.float64))


def _read_checkpoint(path, key: str, shape):
    """(x, EBEs, iteration) from a fit checkpoint (version 1 or 2), None when there is none; refused when damaged
    or written for other data, model or options."""
    import binascii
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        return None
    try:
        ck = json.loads(path.read_text())
        ok = ck.get("format") == _CHECKPOINT[0] and ck.get("version") in (1, _CHECKPOINT[1])
        x, eta, it = np.array(ck["x"], dtype=float), _checkpoint_eta(ck), int(ck["iteration"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, binascii.Error):
        ok = False
    if not ok:
        raise HybridPKError(f"{path} is damaged or not a hybridpk fit checkpoint; delete it to fit from the start")
    if ck.get("fingerprint") != key or tuple(eta.shape) != tuple(shape):
        raise HybridPKError(f"{path} was written by a fit of other data, model or options; delete it to fit from "
                            "the start")
    return x, eta, it


def _tables(pm, pack, theta, omega, sd, cov_natural, dataset=None) -> FittedPopulation:
    """The estimates as typed tables, with standard errors from the covariance of the estimates on their
    natural scale (order of ``Packing.natural``: free THETAs, OMEGA diagonal, residual SDs, OMEGA
    covariances); the route of dosing as ``dataset`` dosed the model (:func:`~.fitted.route_of`)."""
    se = np.sqrt(np.clip(np.diag(cov_natural), 0, None)) if cov_natural is not None else None
    i = 0
    rows = []
    for t in pm.thetas:
        s = None
        if not t.fixed:
            s = float(se[i]) if se is not None else None
            i += 1
        rows.append(ThetaEstimate(t.name, float(theta[t.name]), s, t.fixed, t.unit, t.label))
    k = pm.n_eta
    om_se = [[None] * k for _ in range(k)]
    fixed = set(pm.omega_fixed)            # FIX: no standard error (NONMEM prints none)
    for j in range(k):
        om_se[j][j] = float(se[i + j]) if se is not None and j not in fixed else None
    i += k
    sig = []
    for j, kind in enumerate(pack.sigma_names):
        sig.append(SigmaEstimate(kind, pm.sigma_labels.get(kind, kind), float(sd[kind]),
                                 float(se[i + j]) if se is not None and kind not in pm.sigma_fixed else None,
                                 pm.sigma_scale))
    i += len(pack.sigma_names)
    for j, (r, c) in enumerate(pack.omega.offdiagonal()):
        om_se[r][c] = om_se[c][r] = float(se[i + j]) if se is not None and r not in fixed else None
    matrix = tuple(tuple(float(v) for v in row) for row in omega.tolist())
    om = OmegaTable(tuple(pm.etas), tuple(pm.omega_labels or pm.etas), matrix,
                    tuple(tuple(row) for row in om_se) if se is not None else None, pack.omega.blocks)
    return FittedPopulation(model=pm, theta=ThetaTable(tuple(rows)), omega=om, sigma=SigmaTable(tuple(sig)),
                            name="fit", citation="hybridpk fit", route=route_of(pm.structural, dataset))


def _individual_table(dataset, pm, est, diag):
    """ID, the EBEs and the individual parameters at them, then what NONMEM's .phi adds: ETC_i_j, the conditional
    covariance of ETAs i and j (1-based, in the order of the ETA columns; the lower triangle row by row, as .phi's
    ETC(i,j)), and OBJ, the subject's contribution to the OFV."""
    ind = pd.DataFrame({"ID": list(dataset.ids)})
    for j, name in enumerate(pm.etas):
        ind[name] = est.eta[:, j].cpu().numpy()
    for name in est.parameters.columns[1:]:
        if pm.reports(name):
            ind[pm.label(name)] = est.parameters[name].to_numpy()
    if diag["etc"] is not None:
        etc = diag["etc"].cpu().numpy()
        for i in range(etc.shape[1]):
            for j in range(i + 1):
                ind[f"ETC_{i + 1}_{j + 1}"] = etc[:, i, j]
    ind["OBJ"] = diag["obj"].cpu().numpy()
    return ind


def _prediction_table(dataset, prob, diag):
    df = dataset.to_dataframe()
    pick = prob.batch.to_rows
    return pd.DataFrame({"ID": df.ID.to_numpy(), "TIME": df.TIME.to_numpy(), "DV": df.DV.to_numpy(),
                         "MDV": df.MDV.to_numpy(), "PRED": pick(diag["pred"]), "IPRED": pick(diag["ipred"]),
                         "CWRES": pick(diag["cwres"]), "IWRES": pick(diag["iwres"])})


def _covariance(evaluate, subject_gradients, pack, x_hat, method: str = "sandwich"):
    """Covariance of the estimates on their natural scale, mapped by the delta method from the unconstrained
    scale, where (OFV = -2 log-likelihood, R its Hessian by central differences of the exact gradient, S the
    sum over subjects of the outer products of their OFV gradients):
    "R" 2 R^-1, "S" 4 S^-1, "sandwich" R^-1 S R^-1 (NONMEM's default; the log-likelihood's
    I_R^-1 I_S I_R^-1 with I_R = R/2 and I_S = S/4)."""
    p = len(x_hat)
    hess = None
    if method in ("R", "sandwich"):
        hess = np.zeros((p, p))
        for i in range(p):
            h = 1e-4 * max(1.0, abs(x_hat[i]))
            e = np.zeros(p)
            e[i] = h
            gp = evaluate(x_hat + e)[1]
            gm = evaluate(x_hat - e)[1]
            hess[i] = (gp - gm) / (2 * h)
        hess = 0.5 * (hess + hess.T)
        w = np.linalg.eigvalsh(hess)
        if not np.isfinite(w).all() or w.min() <= 0:
            return None, (f"the Hessian of the OFV (R) is not positive definite (smallest eigenvalue {w.min():.3g}); "
                          "standard errors are not available")
    s_mat = None
    if method in ("S", "sandwich"):
        g = subject_gradients(x_hat)
        s_mat = g.T @ g
        ws = np.linalg.eigvalsh(s_mat) if np.isfinite(s_mat).all() else np.array([np.nan])
        if not np.isfinite(ws).all() or ws.min() <= 1e-10 * max(ws.max(), 1e-300):
            # NONMEM: "S MATRIX ALGORITHMICALLY SINGULAR"; the sandwich would give SEs of 0 in some directions
            return None, (f"the S matrix is singular (the sum of the {len(g)} subjects' gradient outer products has "
                          f"rank {np.linalg.matrix_rank(s_mat) if np.isfinite(s_mat).all() else 0} for {p} "
                          f"parameters: too few subjects, or a parameter the data do not inform); the {method} "
                          "standard errors are not available; covariance='R' (--covariance R) gives them from the "
                          "Hessian alone")
    try:
        if method == "R":
            cov_x = 2.0 * np.linalg.inv(hess)
        elif method == "S":
            cov_x = 4.0 * np.linalg.inv(s_mat)
        else:
            r_inv = np.linalg.inv(hess)
            cov_x = r_inv @ s_mat @ r_inv
    except np.linalg.LinAlgError:
        return None, f"the {method} covariance matrix is singular; standard errors are not available"
    x = torch.tensor(x_hat, dtype=torch.float64, device="cpu")
    jac = torch.autograd.functional.jacobian(pack.natural, x).numpy()
    return jac @ cov_x @ jac.T, None
