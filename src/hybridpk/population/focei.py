"""NONMEM's classical objective functions: FOCE with interaction (Laplace with the first-order Hessian,
METHOD=1 INTERACTION, the default), FOCE without interaction (METHOD=1), FO (METHOD=0) and Laplace with the
exact Hessian of obj_i (METHOD=1 LAPLACE [INTERACTION]: "LAPLACE-I", "LAPLACE"), as derived by
Wang (J Pharmacokinet Pharmacodyn 2007;34:575-93).

For subject i with observations y, predictions f(eta), residual variances V(f):

    obj_i(eta) = sum_j [ (y_j - f_j)^2 / V_j + log V_j ] + eta' OMEGA^-1 eta
    OFV_i      = obj_i(eta_i) + log|OMEGA| + log| OMEGA^-1 + sum_j ( g_j g_j' / V_j + 1/2 h_j h_j' / V_j^2 ) |

with eta_i the mode of obj_i (empirical Bayes estimate), g = df/deta and h = dV/deta at eta_i. The OFV is
-2 log-likelihood without the constant n log(2 pi), exactly as NONMEM reports it, so differences can be
compared with NONMEM's. Below-LLOQ observations (M3) contribute -2 log Phi((LLOQ - f)/sqrt(V)).

FOCE without interaction ignores the dependence of the residual variance on eta (NONMEM evaluates dY/dEPS
at eta = 0): V is taken at the population prediction f(theta, 0) in obj_i and the OFV, and h = 0. FO
linearises at eta = 0: with r = y - f(theta, 0), G = df/deta at eta = 0 and C = G OMEGA G' + diag V(f(theta, 0)),

    OFV_i = log|C| + r' C^-1 r          (no EBEs enter; POSTHOC EBEs are the modes of the FOCE obj_i)

The gradient of the OFV with respect to the population parameters is exact up to the inner Hessian:
eta_i is re-attached to the parameters by one Newton step from its detached value (implicit
differentiation), so a single backward pass gives dOFV/dparameters.

Models solved by the adaptive ODE solver take their ETA derivatives by central differences over a stencil
of ETA points, all solved in one call with shared step sizes per subject (:meth:`Problem.predict_points`):
the EBE search's gradient and Hessian, the Hessian of the re-attaching Newton step and g. Automatic
differentiation through every solver step (K double-backward passes for a Hessian) costs 10-30 solves; the
stencil costs about one, and with shared steps its differences carry no step-selection noise. The gradient
that re-attaches eta_i to the parameters stays exact (automatic differentiation).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import SolverError
from ..solve import simulate
from ..solve.simulate import require_one_kind
from . import analytic_focei

LOG2PI = math.log(2 * math.pi)

#: central-difference step (on the ETA scale) of the EBE search's gradient and Hessian for ODE-solved models:
#: truncation error ~1e-8 relative, rounding ~1e-16 |obj_i| / STENCIL_STEP^2
STENCIL_STEP = 1e-4
#: central-difference step of g = df/deta (every model)
JACOBIAN_STEP = 1e-5
#: an EBE search stops a subject after this many accepted steps in a row that did not lower obj_i (Problem.ebe)
STALL_STEPS = 3
#: ODE-solved models' EBE search takes Gauss-Newton steps (2K + 1 solves) until every step is below this, then
#: Newton steps with the stencil's exact Hessian (1 + 2K^2 solves) for the quadratic end game
GAUSS_NEWTON_UNTIL = 1e-2

#: the estimation methods (NONMEM's names): $ESTIMATION METHOD=1 INTERACTION, METHOD=1, METHOD=0,
#: METHOD=1 LAPLACE INTERACTION, METHOD=1 LAPLACE
ESTIMATION_METHODS = ("FOCE-I", "FOCE", "FO", "LAPLACE-I", "LAPLACE")


class Problem:
    """A population model bound to a dataset: predictions, objectives and EBEs for a parameter set."""

    def __init__(self, pm, dataset, method="auto", rtol=1e-8, atol=1e-10, estimation: str = "FOCE-I",
                 device="cpu"):
        if estimation not in ESTIMATION_METHODS:
            from ..errors import HybridPKError

            raise HybridPKError(f"estimation method {estimation!r}: give one of {', '.join(ESTIMATION_METHODS)}")
        self.estimation = estimation
        # the residual variance follows eta (else: at eta = 0); Laplace: the exact Hessian of obj_i in the OFV
        self.interaction = estimation in ("FOCE-I", "LAPLACE-I")
        self.laplace = estimation.startswith("LAPLACE")
        self.pm = pm
        dataset.require_covariates(pm.covariates)
        dataset.require_constant_covariates([c for c in pm.covariates if c not in pm.record_items],
                                            "the population model")
        pm.require_occasions(dataset)
        pm.require_dv_scale(dataset)
        self.batch = dataset.to_batch(covariates=list(pm.covariates), device=device)
        b = self.batch
        if not pm.reads_dvid:
            require_one_kind(pm.structural, b)
        self.cov = b.baseline_covariates()
        self.obs = b.is_obs & (b.cens == 0)
        self.cens = b.is_obs & (b.cens != 0)
        self.above = b.is_obs & (b.cens < 0)
        self.y = b.dv
        # the censoring limits on the scale of the predictions (log with log-transform-both-sides)
        self.lloq = torch.log(b.lloq) if pm.error.ltbs else b.lloq
        if pm.error.ltbs:
            from ..errors import DatasetError, Violation

            first = torch.where(b.dose_mask, b.dose_time, torch.full_like(b.dose_time, float("inf"))).min(1).values
            # before the first dose the prediction is 0, unless the model starts from initial amounts (A_0) or the
            # control stream's guard gives LOG(F) a value there (IPRED = LOG(0.0025) where F is 0, as NONMEM fits)
            predicts_zero = not (pm.error.log_guard or getattr(pm.structural, "initial", ()))
            early = self.obs & (b.dv > 0) & (b.time <= first.unsqueeze(1)) & predicts_zero
            problems = []
            for bad, msg in ((self.obs & (b.dv <= 0), "log-transform-both-sides needs DV > 0 on observations; set "
                              "MDV=1 on these records or mark them as below LLOQ (BLQ/CENS)"),
                             (early, "an observation at or before the first dose, where the model predicts 0, cannot "
                              "be log-transformed; set MDV=1")):
                if bool(bad.any()):
                    problems.append(Violation(tuple(int(r) + 1 for r in b.row[bad].tolist()), "DV", msg))
            if problems:
                raise DatasetError(problems, dataset.source)
            self.y = torch.log(torch.where(self.obs, b.dv, torch.ones_like(b.dv)))
        self.method = method
        self.dataset, self.source = dataset, dataset.source
        self.rtol, self.atol = rtol, atol
        self.fallback_steps = 0   # EBE Newton steps that fell back to gradient steps (see _direction)
        self._stacked = {}        # number of stencil points -> (batch of that many copies, step groups)
        self._analytic = None     # (engine or None, why not) once asked: see analytic()
        sm = pm.structural
        #: ETA derivatives by stencil (see the module docstring): models the adaptive ODE solver integrates
        self.stencil = method != "closed_form" and (not sm.piecewise_linear
                                                    or bool(getattr(sm, "dose_as_input", False)))

    def require_positive_variance(self, theta, sd, estimating: bool = False) -> None:
        """Refuse observations the error model gives no likelihood: a zero residual variance, as a proportional
        error model has wherever the model predicts 0 (before the first dose, at the time of an oral dose or
        the start of an infusion). NONMEM stops on them too.

        ``estimating`` (a fit that estimates SIGMA): also refuse a combined error model whose likelihood has no
        maximum. Where the model predicts 0 its variance is ADD^2 alone, and when every level there is 0 too
        (pre-dose samples written as 0), those levels are fitted exactly at any ADD, so the likelihood grows
        without bound as ADD -> 0 and the fit ends at ADD near 0 with the other estimates biased (60 pre-dose zeros
        beside 420 levels: ADD 1.3e-4, CL 4.59 against 2.84 without them, truth 3). One such level that is not 0
        (theophylline's 0.74 mg/L at 0 h) bounds it; a fixed ADD, or an estimate of one patient under the
        model's SIGMA, is not concerned."""
        if self.pm.error.ltbs or not bool(self.obs.any()):
            return
        from ..errors import DatasetError

        with torch.no_grad():
            theta = {k: v.detach() for k, v in theta.items()}
            zero = torch.zeros(self.batch.n_subjects, self.pm.n_eta, dtype=torch.float64, device=self.y.device)
            f = self.predict(theta, zero)
            v = self.pm.residual_variance(theta, zero, self.batch, f, {k: t.detach() for k, t in sd.items()})
        bad = self.obs & ~(v > 0)
        if bool(bad.any()):
            message = ("the model predicts 0 here (before the first dose, or at the time of an oral dose or the "
                       f"start of an infusion), where a {self.pm.error.kind} error model has zero variance, so the "
                       "level has no likelihood: add an additive part to the error model (--error combined) or set "
                       "MDV=1 on these records (e.g. pre-dose samples)")
            raise DatasetError([self.dataset.violation(self.batch.row[bad].tolist(), "DV", message)], self.source)
        combined = self.pm.error.kind in ("combined", "combined1")
        if not (estimating and combined) or "ADD" in self.pm.sigma_fixed:
            return
        at_zero = self.obs & (f == 0)
        if bool(at_zero.any()) and not bool((at_zero & (self.y != 0)).any()):
            message = ("DV 0 where the model predicts 0 (before the first dose, or at the time of an oral dose or the "
                       "start of an infusion), and no level there is other than 0: with a combined error model the "
                       "variance there is ADD^2 alone, so these levels make the likelihood grow without bound as ADD "
                       "goes to 0 (the fit would end at ADD near 0, the other estimates biased); set MDV=1 on these "
                       "records (a level of 0 before the first dose carries no information), mark them below the "
                       "limit of quantification (BLQ or CENS, fitted by M3), or use --error additive")
            raise DatasetError([self.dataset.violation(self.batch.row[at_zero].tolist(), "DV", message)], self.source)

    # ------------------------------------------------------------------ predictions
    def _records(self, idx=None):
        """A $PRED's records with a level (see :meth:`PopulationModel.parameters`), else None; ``idx``: of the
        subjects a stacked batch copies."""
        if not getattr(self.pm.structural, "given_per_record", False):
            return None
        records = self.obs | self.cens
        return records if idx is None else records[idx]

    def predict(self, theta, eta):
        p = self.pm.parameters(theta, eta, self.batch, self._records())
        # throw=False: a trial point with impossible parameters gives NaN for those subjects (rejected by the
        # line searches) instead of stopping the fit
        f = simulate(self.pm.structural, p, self.batch, method=self.method, rtol=self.rtol, atol=self.atol,
                     throw=False, rule=self.pm.covariate_rule).ipred
        return self._transform(f)

    def _transform(self, f):
        """Predictions on the likelihood's scale (log with log-transform-both-sides). A $PRED's prediction that is
        not finite on a record without a level (LOG(0) on a dose record) is read as 0 there, as NONMEM leaves
        such a record out of the OFV; a NaN would spread through the ETA derivatives."""
        f = self.pm.error.log_scale(f) if self.pm.error.ltbs else f
        if getattr(self.pm.structural, "given_per_record", False):
            f = torch.where((self.obs | self.cens) | torch.isfinite(f), f, torch.zeros_like(f))
        return f

    def predict_points(self, theta, points):
        """Predictions (P, N, R) at P ETA points (P, N, K) in one solver call on P copies of every subject
        (closed-form models: one call instead of P, the same numbers); ODE-solved models' copies of a subject
        share their step sizes (so that differences between points are smooth in ETA). Falls back to P separate
        calls when the grouped batch cannot be solved together."""
        n_points, n, k = points.shape
        batch, groups = self._copies(n_points)
        p = self.pm.parameters(theta, points.reshape(n_points * n, k), batch, self._records(groups))
        try:
            f = simulate(self.pm.structural, p, batch, method=self.method, rtol=self.rtol, atol=self.atol,
                         throw=False, rule=self.pm.covariate_rule,
                         step_groups=groups if self.stencil else None).ipred
        except SolverError:
            return torch.stack([self.predict(theta, points[i]) for i in range(n_points)])
        return self._transform(f.reshape(n_points, n, -1))

    def _copies(self, n_points):
        """(batch of ``n_points`` copies of every subject, the copies' step groups: their subject)."""
        if n_points not in self._stacked:
            idx = torch.arange(self.batch.n_subjects, device=self.batch.time.device).repeat(n_points)
            self._stacked[n_points] = (self.batch.select(idx), idx)
        return self._stacked[n_points]

    def variance(self, theta, eta, f, sd):
        """The residual variance the estimation method uses (N, R), or (P, N, R) for P ETA points (P, N, K):
        with interaction (FOCE-I, LAPLACE-I) at the prediction ``f`` and its ETAs; without (FOCE, LAPLACE) at
        ETA = 0, the population prediction f(theta, 0) (Wang 2007)."""
        pm, records = self.pm, self.obs | self.cens
        if not self.interaction:
            zero = torch.zeros(self.batch.n_subjects, pm.n_eta, dtype=f.dtype, device=f.device)
            return pm.residual_variance(theta, zero, self.batch, self.predict(theta, zero), sd,
                                        records).expand_as(f)
        if f.dim() == 3:
            n_points, n, r = f.shape
            batch = self._copies(n_points)[0] if pm.error.kind == "general" else None
            return pm.residual_variance(theta, eta.reshape(n_points * n, -1), batch, f.reshape(n_points * n, r),
                                        sd, records.repeat(n_points, 1)).reshape(f.shape)
        return pm.residual_variance(theta, eta, self.batch, f, sd, records)

    def residual_terms(self, f, v, rows=None):
        """(-2 log-likelihood terms of each record without the constant (N, R), the residual variances) at the
        predictions ``f`` with residual variances ``v`` (:meth:`variance`); ``rows``: the patients (indices into
        this problem's, repeats allowed) that the rows of ``f`` and ``v`` belong to (default: all, in order).
        A censored level (M3) contributes -2 log P(below its limit) (Beal 2001), or -2 log P(above it) for a level
        above an upper limit (CENS = -1, as nlmixr2 and Monolix mark it), the limit on the scale of ``f`` (its log
        with log-transform-both-sides)."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        obs, cens, y = pick(self.obs), pick(self.cens), pick(self.y)
        v = torch.where(obs | cens, v, torch.ones_like(v))
        r = torch.where(obs, y - f, torch.zeros_like(f))
        data = torch.where(obs, r * r / v + torch.log(v), torch.zeros_like(v))
        if bool(cens.any()):  # M3: probability of being below LLOQ (above the ULOQ)
            # the limit where censored, else f itself: a NaN limit elsewhere (no LLOQ on that record) would
            # make the gradient NaN through torch.where's unselected branch
            z = (torch.where(cens, pick(self.lloq), f) - f) / torch.sqrt(v)
            z = torch.where(pick(self.above), -z, z)
            data = data + torch.where(cens, -2.0 * torch.special.log_ndtr(z), torch.zeros_like(v))
        return data, v

    def objective(self, theta, omega_inv, sd, eta):
        """obj_i (N,) at eta (N, K)."""
        f = self.predict(theta, eta)
        data, _ = self.residual_terms(f, self.variance(theta, eta, f, sd))
        prior = torch.einsum("nk,kl,nl->n", eta, omega_inv, eta)
        return data.sum(1) + prior

    def objective_points(self, theta, omega_inv, sd, points):
        """obj_i (P, N) at P ETA points (P, N, K), predicted in one call (:meth:`predict_points`)."""
        f = self.predict_points(theta, points)
        data, _ = self.residual_terms(f, self.variance(theta, points, f, sd))
        return data.sum(-1) + torch.einsum("pnk,kl,pnl->pn", points, omega_inv, points)

    def stencil_derivatives(self, theta, omega_inv, sd, eta, step=STENCIL_STEP):
        """obj_i (N,), its gradient (N, K) and Hessian (N, K, K) at eta by central differences over the
        1 + 2K^2 points eta, eta +- h e_i, eta +- h e_i +- h e_j, solved together (no graph)."""
        n, k = eta.shape
        unit = torch.eye(k, dtype=eta.dtype, device=eta.device) * step
        pts = [eta]
        for i in range(k):
            pts += [eta + unit[i], eta - unit[i]]
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        for i, j in pairs:
            pts += [eta + unit[i] + unit[j], eta + unit[i] - unit[j], eta - unit[i] + unit[j],
                    eta - unit[i] - unit[j]]
        with torch.no_grad():
            o = self.objective_points(theta, omega_inv, sd, torch.stack(pts))
        plus, minus = o[1:2 * k + 1:2], o[2:2 * k + 1:2]                       # (K, N)
        grad = ((plus - minus) / (2 * step)).T
        hess = torch.diag_embed(((plus - 2 * o[0] + minus) / step ** 2).T)
        for q, (i, j) in enumerate(pairs):
            pp, pm, mp, mm = o[2 * k + 1 + 4 * q: 2 * k + 5 + 4 * q]
            hess[:, i, j] = hess[:, j, i] = (pp - pm - mp + mm) / (4 * step ** 2)
        return o[0], grad, hess

    def jacobian(self, theta, eta, f0=None, step=JACOBIAN_STEP, sd=None):
        """g = df/deta (N, R, K) by central differences (differentiable with respect to theta and eta); the 2K
        points are solved in one call (:meth:`predict_points`). With ``sd``: (g, dV/deta (N, R, K)), the total
        derivative of the residual variance (:meth:`variance`) by the same differences."""
        k = eta.shape[1]
        unit = torch.eye(k, dtype=eta.dtype, device=eta.device) * step
        pts = torch.stack([eta + sign * unit[i] for i in range(k) for sign in (1.0, -1.0)])
        f = self.predict_points(theta, pts)
        g = torch.stack([(f[2 * i] - f[2 * i + 1]) / (2 * step) for i in range(k)], -1)
        if sd is None:
            return g
        v = self.variance(theta, pts, f, sd)
        return g, torch.stack([(v[2 * i] - v[2 * i + 1]) / (2 * step) for i in range(k)], -1)

    def fo_hessian(self, theta, omega_inv, sd, eta, f=None, g=None):
        """Half the first-order Hessian of obj_i: OMEGA^-1 + sum_j (g g'/V + 1/2 h h'/V^2) (N, K, K)."""
        if f is None:
            f = self.predict(theta, eta)
        general = self.pm.error.kind == "general" and self.interaction
        if general:     # V reads the ETAs beyond f (e.g. ETA on EPS): dV/deta by differences
            g, h = self.jacobian(theta, eta, sd=sd)
        elif g is None:
            g = self.jacobian(theta, eta)
        v = self.variance(theta, eta, f, sd)
        if not general:
            dv = self.pm.error.variance_slope(f, sd) if self.interaction else torch.zeros_like(f)
            h = dv.unsqueeze(-1) * g
        return omega_inv + self._information(g, h, v)

    def _information(self, g, h, v):
        """sum over the observed records of g g'/V + 1/2 h h'/V^2 (N, K, K), with g = df/deta and h = dV/deta
        (N, R, K) and V (N, R)."""
        m = (self.obs | self.cens).to(v.dtype)
        v = torch.where(m > 0, v, torch.ones_like(v))
        w1 = (m / v).unsqueeze(-1).unsqueeze(-1)
        w2 = (0.5 * m / (v * v)).unsqueeze(-1).unsqueeze(-1)
        return (w1 * g.unsqueeze(-1) * g.unsqueeze(-2) + w2 * h.unsqueeze(-1) * h.unsqueeze(-2)).sum(1)

    # ------------------------------------------------------------------ EBEs
    def _direction(self, hess, grad):
        """Newton direction H^-1 g per subject (N, K). Where H is singular or not finite (extreme ETAs, a
        tiny residual variance), a gradient step scaled to at most 1 per ETA instead, which the per-subject
        backtracking then shortens until the objective decreases; such steps are counted in
        ``fallback_steps``."""
        sol, info = torch.linalg.solve_ex(hess, grad.unsqueeze(-1))
        step = sol.squeeze(-1)
        bad = (info != 0) | ~torch.isfinite(step).all(-1)
        if bool(bad.any()):
            g = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            g = g / g.abs().amax(-1, keepdim=True).clamp(min=1.0)
            step = torch.where(bad.unsqueeze(-1), g, step)
            self.fallback_steps += int(bad.sum())
        return step

    def gauss_newton_derivatives(self, theta, omega_inv, sd, eta, step=STENCIL_STEP):
        """obj_i (N,), its gradient (N, K) by central differences and the first-order (Gauss-Newton, expected
        information) Hessian 2 (OMEGA^-1 + sum_j g g'/V + 1/2 h h'/V^2) (N, K, K), from the 1 + 2K points eta,
        eta +- h e_i solved together (ODE-solved models' cheap EBE steps far from the mode; no graph)."""
        n, k = eta.shape
        unit = torch.eye(k, dtype=eta.dtype, device=eta.device) * step
        pts = torch.stack([eta] + [eta + sign * unit[i] for i in range(k) for sign in (1.0, -1.0)])
        with torch.no_grad():
            f = self.predict_points(theta, pts)
            v = self.variance(theta, pts, f, sd)
            data, _ = self.residual_terms(f, v)
            o = data.sum(-1) + torch.einsum("pnk,kl,pnl->pn", pts, omega_inv, pts)
            grad = ((o[1::2] - o[2::2]) / (2 * step)).T                              # (N, K)
            g = ((f[1::2] - f[2::2]) / (2 * step)).permute(1, 2, 0)                  # (N, R, K)
            h = ((v[1::2] - v[2::2]) / (2 * step)).permute(1, 2, 0)
        return o[0], grad, 2 * (omega_inv + self._information(g, h, v[0]))

    def exact_hessian(self, theta, omega_inv, sd, eta):
        """obj_i, its gradient (N, K) and exact Hessian (N, K, K) at eta (K double-backward passes; ODE-solved
        models: the stencil, :meth:`stencil_derivatives`)."""
        if self.stencil:
            return self.stencil_derivatives(theta, omega_inv, sd, eta.detach())
        engine = self.analytic(theta) if self.pm.n_eta else None
        if engine is not None:
            with torch.no_grad():
                phi0 = engine.typical({k: v.detach() for k, v in theta.items()}).numpy()
            with np.errstate(all="ignore"):
                out = engine.derivatives(phi0, omega_inv.detach().numpy(), self._floats(sd), eta.detach().numpy())
            if all(np.isfinite(o).all() for o in out[1:]):
                return tuple(torch.as_tensor(o, device=eta.device) for o in out)
        e = eta.detach().clone().requires_grad_(True)
        obj = self.objective(theta, omega_inv, sd, e)
        (grad,) = torch.autograd.grad(obj.sum(), e, create_graph=True)
        rows = [torch.autograd.grad(grad[:, j].sum(), e, retain_graph=True)[0] for j in range(eta.shape[1])]
        hess = torch.stack(rows, 1).detach()
        return obj.detach(), grad.detach(), 0.5 * (hess + hess.transpose(1, 2))

    def analytic(self, theta):
        """The analytic path of this problem (:mod:`hybridpk.population.analytic_focei`: the closed form's own
        derivatives in numpy, the same numbers) when it covers the model and data, else None; decided once, its
        predictions checked against this problem's at ``theta`` ({name: tensor}). ``analytic_reason`` says why
        not."""
        if self._analytic is None:
            k = self.pm.n_eta
            self._analytic = (analytic_focei.analytic_problem(self.pm, self, theta) if k else (None, "no ETAs"))
        return self._analytic[0]

    @property
    def analytic_reason(self) -> str | None:
        return None if self._analytic is None else self._analytic[1]

    @staticmethod
    def _floats(values: dict) -> dict:
        return {a: float(v.detach()) if torch.is_tensor(v) else float(v) for a, v in values.items()}

    def ebe(self, theta, omega_inv, sd, eta0, max_iter=100, tol=1e-9):
        """Modes of obj_i: Newton's method with the exact Hessian (the first-order Hessian where the exact one
        is not positive definite), steps capped at 2 per ETA, per-subject backtracking.

        Each subject stops on its own: when its Newton step is below ``tol``; when no step along the Newton
        direction and then none along the gradient lowers obj_i at all; or after ``STALL_STEPS`` accepted
        steps in a row that lowered obj_i by no more than rounding (1e-12 relative). The last two are its
        mode at the precision of the predictions: a kink, or a direction in which obj_i is flat to rounding
        (an ETA the data do not inform, whose Newton step does not shrink)."""
        theta = {k: v.detach() for k, v in theta.items()}
        omega_inv, sd = omega_inv.detach(), {k: v.detach() for k, v in sd.items()}
        eta = eta0.detach().clone()
        n, k = eta.shape
        if k == 0:
            return eta
        engine = self.analytic(theta)
        if engine is not None:          # the same search by the closed form's own derivatives
            before = engine.fallback_steps
            try:
                with torch.no_grad():
                    phi0 = engine.typical(theta).numpy()
                with np.errstate(all="ignore"):
                    found = engine.ebe(phi0, omega_inv.numpy(), self._floats(sd), eta.numpy(), max_iter, tol)
                return torch.as_tensor(found, device=eta.device)
            except FloatingPointError:  # KA = CL/V for some subject: the general path takes the limit
                pass
            finally:                    # this search's fallbacks (the engine counts every caller's)
                self.fallback_steps += engine.fallback_steps - before
        active = torch.ones(n, dtype=torch.bool, device=eta.device)
        steepest = torch.zeros(n, dtype=torch.bool, device=eta.device)   # Newton failed last time: the gradient
        stalled = torch.zeros(n, dtype=torch.long, device=eta.device)    # accepted steps in a row without progress
        far = True                # ODE-solved models: Gauss-Newton steps until the steps are small
        for _ in range(max_iter):
            if self.stencil and far:
                obj, grad, hess = self.gauss_newton_derivatives(theta, omega_inv, sd, eta)
            else:
                obj, grad, hess = self.exact_hessian(theta, omega_inv, sd, eta)
            with torch.no_grad():
                pd_ok = torch.linalg.cholesky_ex(hess).info == 0
                if not bool(pd_ok.all()):
                    fo = 2 * self.fo_hessian(theta, omega_inv, sd, eta)
                    hess = torch.where(pd_ok[:, None, None], hess, fo)
                step = self._direction(hess, grad)
                g = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
                step = torch.where(steepest.unsqueeze(-1), g / g.abs().amax(-1, keepdim=True).clamp(min=1.0), step)
                big = step.abs().amax(-1, keepdim=True)
                step = torch.where(big > 2.0, step * 2.0 / big, step)   # ETA moves of at most 2 per iteration
                active = active & (step.abs().amax(-1) >= tol)
                if not bool(active.any()):
                    break
                far = far and float(step[active].abs().max()) > GAUSS_NEWTON_UNTIL
                eta, todo, new = self._backtrack(theta, omega_inv, sd, eta, step, obj, active.clone())
                flat = active & ~todo & (obj - new <= 1e-12 * (1 + obj.abs()))
                stalled = torch.where(flat, stalled + 1, torch.zeros_like(stalled))
                tiny = todo & (step.abs().amax(-1) < 1e-6)      # not even a step of rounding size lowers obj_i
                active = active & ~(todo & steepest) & ~tiny & (stalled < STALL_STEPS)   # at its mode (see above)
                steepest = todo & ~steepest
        return eta.detach()

    def _backtrack(self, theta, omega_inv, sd, eta, step, cur, todo, halvings=30, chunk=8):
        """Per-subject backtracking along ``step``: the first of eta - step, eta - step/2, ... (``halvings``
        trials) where obj_i does not increase. Returns (new eta, the subjects for which no trial did, obj_i at
        the new eta). ODE-solved models try the halvings after the first ``chunk`` at a time in one solver call
        (same result)."""
        tol = 1e-12 * (1 + cur.abs())
        alpha = torch.ones(eta.shape[0], dtype=eta.dtype, device=eta.device)
        value = cur.clone()
        start = eta
        size = step.abs().amax(-1)
        trying = todo.clone()     # subjects still halving: not accepted, and their move above 1e-12
        done = 0
        while done < halvings and bool(trying.any()):
            if self.stencil and done > 0:
                m = min(chunk, halvings - done)
                scale = 0.5 ** torch.arange(m, dtype=eta.dtype, device=eta.device)          # (M,)
                trials = start - (scale[:, None] * alpha[None, :]).unsqueeze(-1) * step     # (M, N, K)
                new = self.objective_points(theta, omega_inv, sd, trials)                   # (M, N)
                ok = trying & torch.isfinite(new) & (new <= cur + tol)
                first = torch.where(ok.any(0), ok.to(torch.int8).argmax(0), torch.zeros_like(alpha).long())
                hit = ok.any(0)
                every = torch.arange(eta.shape[0], device=eta.device)
                eta = torch.where(hit.unsqueeze(-1), trials[first, every], eta)
                value = torch.where(hit, new[first, every], value)
                todo, trying = todo & ~hit, trying & ~hit
                alpha = torch.where(trying, alpha * 0.5 ** m, alpha)
                trying = trying & (alpha * size > 1e-12)
                done += m
                continue
            trial = start - alpha.unsqueeze(-1) * step
            new = self.objective(theta, omega_inv, sd, trial)
            accept = trying & torch.isfinite(new) & (new <= cur + tol)
            eta = torch.where(accept.unsqueeze(-1), trial, eta)
            value = torch.where(accept, new, value)
            todo, trying = todo & ~accept, trying & ~accept
            alpha = torch.where(trying, alpha * 0.5, alpha)
            trying = trying & (alpha * size > 1e-12)
            done += 1
        return eta, todo, value

    # ------------------------------------------------------------------ OFV
    def ofv(self, theta, omega, sd, eta_hat, per_subject=False):
        """The OFV of the estimation method (differentiable in theta, omega, sd); FOCE: with eta_hat re-attached
        by one Newton step (FO does not use eta_hat)."""
        if self.estimation == "FO":
            return self.fo_ofv(theta, omega, sd, per_subject)
        omega_inv = torch.linalg.inv(omega)
        k = eta_hat.shape[1]
        if k:
            e = eta_hat.detach().clone().requires_grad_(True)
            obj = self.objective(theta, omega_inv, sd, e)
            (grad,) = torch.autograd.grad(obj.sum(), e, create_graph=True)
            if self.stencil:   # ODE-solved: the Hessian by the stencil (it is not differentiated)
                hess = self.stencil_derivatives({a: b.detach() for a, b in theta.items()}, omega_inv.detach(),
                                                {a: b.detach() for a, b in sd.items()}, eta_hat.detach())[2]
            else:  # exact Hessian of obj_i (subjects are independent: K double-backward passes give every block)
                rows = [torch.autograd.grad(grad[:, j].sum(), e, retain_graph=True)[0] for j in range(k)]
                hess = torch.stack(rows, 1).detach()
            hess = 0.5 * (hess + hess.transpose(1, 2))
            ok = torch.linalg.cholesky_ex(hess).info == 0  # not positive definite: first-order Hessian
            if not bool(ok.all()):  # not positive definite: first-order Hessian for those subjects
                with torch.no_grad():
                    fo = 2 * self.fo_hessian({a: b.detach() for a, b in theta.items()}, omega_inv.detach(),
                                             {a: b.detach() for a, b in sd.items()}, eta_hat)
                hess = torch.where(ok[:, None, None], hess, fo)
            eta = eta_hat.detach() - self._direction(hess, grad)
        else:
            eta = eta_hat
        f = self.predict(theta, eta)
        data, _ = self.residual_terms(f, self.variance(theta, eta, f, sd))
        prior = torch.einsum("nk,kl,nl->n", eta, omega_inv, eta)
        ofv_i = data.sum(1) + prior
        if k:
            h = self.laplace_hessian(theta, omega_inv, sd, eta) if self.laplace else None
            if h is None:
                h = self.fo_hessian(theta, omega_inv, sd, eta, f=f)
            ofv_i = ofv_i + torch.logdet(omega) + torch.logdet(h)
        return ofv_i if per_subject else ofv_i.sum()

    def laplace_hessian(self, theta, omega_inv, sd, eta):
        """Half the exact Hessian of obj_i at ``eta`` (N, K, K), differentiable in the population parameters and
        in ``eta`` itself (its dependence on them enters the OFV gradient): the Laplace approximation of NONMEM's
        METHOD=1 LAPLACE (Wang 2007, eq. 10 with the exact second derivative). Subjects whose Hessian is not
        positive definite take the first-order one (as in the EBE search); they are counted in
        ``fallback_steps``."""
        e = eta if eta.requires_grad else eta.detach().clone().requires_grad_(True)
        obj = self.objective(theta, omega_inv, sd, e)
        (grad,) = torch.autograd.grad(obj.sum(), e, create_graph=True)
        rows = [torch.autograd.grad(grad[:, j].sum(), e, create_graph=True)[0] for j in range(e.shape[1])]
        h = 0.25 * (torch.stack(rows, 1) + torch.stack(rows, 2))
        ok = torch.linalg.cholesky_ex(h.detach()).info == 0
        if bool(ok.all()):
            return h
        self.fallback_steps += int((~ok).sum())
        fo = self.fo_hessian(theta, omega_inv, sd, eta)
        return torch.where(ok[:, None, None], h, fo)

    def fo_ofv(self, theta, omega, sd, per_subject=False):
        """FO OFV (Wang 2007, eq. for FO; NONMEM's METHOD=0): the model linearised at eta = 0, per subject
        log|C| + r' C^-1 r with C = G OMEGA G' + diag V(f(theta, 0)) over its observations."""
        if bool(self.cens.any()):
            from ..errors import ModelError

            raise ModelError("below-LLOQ observations (M3) need a conditional method: NONMEM allows M3 with "
                             "LAPLACE only, hybridpk with FOCE-I; FO cannot use them")
        n, k = self.obs.shape[0], self.pm.n_eta
        zero = torch.zeros(n, k, dtype=self.y.dtype, device=self.y.device)
        f0 = self.predict(theta, zero)
        m = self.obs.to(f0.dtype)
        v = torch.where(self.obs, self.pm.residual_variance(theta, zero, self.batch, f0, sd, self.obs | self.cens),
                        torch.ones_like(f0))
        r = torch.where(self.obs, self.y - f0, torch.zeros_like(f0))
        cov = torch.diag_embed(v)
        if k:
            g = self.jacobian(theta, zero, f0) * m.unsqueeze(-1)                # unobserved rows: 0
            cov = cov + g @ omega @ g.transpose(1, 2)
        chol = torch.linalg.cholesky(cov)
        w = torch.cholesky_solve(r.unsqueeze(-1), chol).squeeze(-1)
        ofv_i = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1) + (r * w).sum(1)
        return ofv_i if per_subject else ofv_i.sum()
