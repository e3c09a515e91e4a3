"""Individual estimates under a fitted population model: MAP ETAs (NONMEM's EBEs, the POSTHOC step) with
their Laplace covariance, and draws from each patient's posterior by importance resampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .focei import Problem
from .psis import psis_log_weights

__all__ = ["IndividualEstimates", "ImportanceSample", "map_estimate", "posterior_draws", "importance_resample"]


@dataclass(frozen=True)
class IndividualEstimates:
    """MAP (maximum a posteriori) ETAs of each patient with their Laplace covariance.

    ``eta`` (N, K); ``cov`` (N, K, K) the Laplace covariance (inverse Hessian of -log posterior);
    ``objective`` (N,) -2 log posterior at the mode (without constants); ``parameters`` DataFrame of ID and
    the individual parameters at the mode (natural scale); ``n_levels`` (N,) observations used per patient;
    ``model`` the FittedPopulation they come from, ``problem`` its objective bound to ``dataset``;
    ``decrement`` (N,) the Newton decrement 1/2 g' H^-1 g of -2 log posterior at the reported ETAs: how much
    further the local quadratic model says the objective would fall (about 1e-18 at a mode; see
    :meth:`search_warning`).
    """

    model: object = field(repr=False)
    dataset: object = field(repr=False)
    problem: object = field(repr=False)
    eta: torch.Tensor
    cov: torch.Tensor
    objective: torch.Tensor
    parameters: pd.DataFrame
    n_levels: np.ndarray
    decrement: np.ndarray

    def not_at_mode(self, limit: float | None = None) -> np.ndarray:
        """Indices of the patients whose reported ETAs are not at a mode of their posterior to ``limit``
        (default :data:`DECREMENT_WARN`): their Newton decrement is above it after every search."""
        return np.flatnonzero(self.decrement > (DECREMENT_WARN if limit is None else limit))

    def search_warning(self) -> str | None:
        """The warning naming the patients whose EBE search ended away from a mode (:meth:`not_at_mode`), or
        None. NONMEM's POSTHOC step has no such report; a patient's ETAs, IPRED and OFV contribution there are
        not its mode's."""
        bad = self.not_at_mode()
        if not len(bad):
            return None
        named = subjects_phrase(self.dataset, bad, [f"{self.decrement[i]:.2g}" for i in bad])
        return (f"the EBE search of {len(bad)} subject{'s' if len(bad) > 1 else ''} ended away from a mode, after "
                f"up to {EXTRA_SEARCHES + 1} rounds of Newton iterations and a homotopy in the residual SDs (in "
                "brackets their Newton decrement, the fall of -2 log posterior the next Newton step predicts; about "
                f"1e-18 at a mode): {named}. "
                "Their ETAs, IPRED and OFV contributions are where the search stopped. Usual causes: a posterior "
                "too narrow for double precision (a tiny residual variance, e.g. FOCE's variance at PRED) or a "
                "kink in the model (ALAG, an IF on an ETA-dependent value)")

    def shrinkage(self) -> np.ndarray:
        """Individual shrinkage per patient and ETA: the posterior variance (the Laplace covariance's diagonal)
        over the prior's (OMEGA), near 1 where the data say little about the ETA, near 0 where they determine
        it (Phoenix NLME's individual shrinkage, from the relation of Xu et al., AAPS J 2012;14:927-936: the
        population's variance-based ETA shrinkage is about the mean of this ratio)."""
        post = torch.diagonal(self.cov, dim1=1, dim2=2)
        return (post / torch.diagonal(self.model.omega.tensor(post.device))).cpu().numpy()

    def patient(self, index: int) -> "IndividualEstimates":
        """The estimate of patient ``index`` alone (its records, MAP and covariance; a Problem of its own), as
        :func:`map_estimate` on that patient gives it (the batched Newton steps are per patient)."""
        from dataclasses import replace

        sub = self.dataset.subset([self.dataset.ids[index]])
        prob = self.problem
        one = Problem(prob.pm, sub, method=prob.method, rtol=prob.rtol, atol=prob.atol, estimation=prob.estimation,
                      device=prob.y.device)
        part = slice(index, index + 1)
        return replace(self, dataset=sub, problem=one, eta=self.eta[part], cov=self.cov[part],
                       objective=self.objective[part], parameters=self.parameters.iloc[part].reset_index(drop=True),
                       n_levels=self.n_levels[part], decrement=self.decrement[part])

    def to(self, device) -> "IndividualEstimates":
        """The same estimates on ``device`` (a torch device), with their model and a Problem there."""
        from dataclasses import replace

        from ..solve.device import same_device

        prob = self.problem
        if same_device(self.eta.device, device):
            return self
        moved = Problem(prob.pm, self.dataset, method=prob.method, rtol=prob.rtol, atol=prob.atol,
                        estimation=prob.estimation, device=device)
        return replace(self, model=self.model.to(device), problem=moved, eta=self.eta.to(device),
                       cov=self.cov.to(device), objective=self.objective.to(device))

    def posterior(self, index: int = 0, n: int = 1000, seed: int = 0):
        """(draws (n, K), effective sample size) from the posterior of patient ``index``; see
        :func:`posterior_draws`."""
        return posterior_draws(self, index, n, seed)


def subjects_phrase(dataset, index, notes=None, most: int = 5) -> str:
    """'subject(s) ID, ID, ... (and n more)' for the patient indices ``index`` of ``dataset``, each ID followed
    by its note in brackets where ``notes`` (one per index) are given."""
    ids = [str(dataset.ids[i]) + (f" ({notes[j]})" if notes is not None else "") for j, i in enumerate(index)]
    more = f" and {len(ids) - most} more" if len(ids) > most else ""
    return f"subject{'s' if len(ids) > 1 else ''} {', '.join(ids[:most])}{more}"


def map_estimate(model, dataset, estimation: str = "FOCE-I", start=None, problem=None) -> IndividualEstimates:
    """MAP ETAs of every patient of ``dataset`` under the FittedPopulation ``model``, in one batched call:
    Newton's method with the exact Hessian and per-patient line search, from ETA = 0, to |step| < 1e-10
    (the same EBE code as the FOCE-I fit), and their Laplace covariance from the exact Hessian.
    ``estimation`` "FOCE" or "FO": the modes of the objective without interaction (the residual variance at
    ETA = 0), as NONMEM reports the EBEs of such a run; the posterior itself is the FOCE-I default.
    ``start`` (N, K): ETAs to search from as well (a fit's last EBEs, as NONMEM's final EBEs continue its
    search); each patient keeps the mode of the two searches with the lower objective. A posterior with more
    than one mode (e.g. the flip-flop of KA and K in a 1-cmt oral model) can send the search from 0 to a worse
    mode than the fit's, or not reach one in its iterations. Patients whose mode still fits far worse than the
    model allows are searched again (:func:`_search_misfits_again`), an ETA of the lag time is searched from
    either side as well (:func:`_search_lag_modes`), and patients whose search ran out of
    iterations away from a mode are searched on (:func:`_search_on`), with the model's MCETA (a control stream's
    $ESTIMATION MCETA=n) from random starts too (:func:`search_random_starts`); those still away from one are named by
    :meth:`IndividualEstimates.search_warning`. ``problem``: the focei.Problem of this model, ``dataset`` and
    ``estimation`` (solver method "auto") when the caller has one (a fit's), to reuse instead of building it."""
    pm = model.model
    dev = model.device
    theta, omega, sd = model.theta.tensors(dev), model.omega.tensor(dev), model.sigma.sd_tensors(dev)
    prob = problem if problem is not None else Problem(pm, dataset, estimation=estimation, device=dev)
    prob.require_positive_variance(theta, sd)
    n, k = dataset.n_subjects, pm.n_eta
    zeros = torch.zeros(n, k, dtype=torch.float64, device=dev)
    if k:
        oinv = torch.linalg.inv(omega)
        eta = prob.ebe(theta, oinv, sd, zeros, tol=1e-10)
        if start is not None:
            eta = _lower_mode(prob, theta, oinv, sd, eta, prob.ebe(theta, oinv, sd, start, tol=1e-10))
        eta = _search_misfits_again(prob, dataset, theta, oinv, sd, eta)
        eta = _search_lag_modes(prob, theta, omega, oinv, sd, eta)
        eta = search_random_starts(prob, theta, omega, oinv, sd, eta, int(pm.recipe.get("mceta", 0)))
        eta, obj, grad, hess = _search_on(prob, dataset, theta, oinv, sd, eta)
        cov = 2.0 * torch.linalg.inv(hess)
        decrement = newton_decrement(grad, hess).cpu().numpy()
    else:   # no IIV: the individual prediction is the population one
        eta, cov = zeros, torch.zeros(n, 0, 0, dtype=torch.float64, device=dev)
        with torch.no_grad():
            obj = prob.objective(theta, omega, sd, eta)
        decrement = np.zeros(n)
    with torch.no_grad():
        ip = pm.parameters(theta, eta, prob.batch)
    # one row per patient: a parameter that changes between records is reported at the first record
    params = pd.DataFrame({"ID": list(dataset.ids), **{k2: (v[:, 0] if v.dim() == 2 else v).cpu().numpy()
                                                      for k2, v in ip.items()}})
    return IndividualEstimates(model=model, dataset=dataset, problem=prob, eta=eta, cov=cov, objective=obj.detach(),
                               parameters=params, n_levels=prob.obs.sum(1).cpu().numpy(), decrement=decrement)


WIDENED_SD = ((10.0, 3.0, 1.0), (1e4, 1e3, 100.0, 10.0, 3.0, 1.0))
"""The schedules of the second EBE searches (:func:`_search_misfits_again`): factors of the residual SDs,
each search from the last's mode, a homotopy from a smooth objective to the model's own. Two, because on
pharmpy's moxonidine example neither alone finds every patient's best mode (subjects 503 and 505 need the
first, 606 the second)."""


def _misfits(prob, theta, omega_inv, sd, eta) -> torch.Tensor:
    """Indices of the patients whose mode fits far worse than the model allows: sum r^2/V over their
    observations plus eta' OMEGA^-1 eta, which is about chi-square with n + K degrees of freedom at a mode of a
    patient the model describes, above n + K + 6 sqrt(2 (n + K)) + 10 (a false alarm costs only the second
    search)."""
    with torch.no_grad():
        f = prob.predict(theta, eta)
        v = torch.where(prob.obs, prob.variance(theta, eta, f, sd), torch.ones_like(f))
        r = torch.where(prob.obs, prob.y - f, torch.zeros_like(f))
        chi = (r * r / v).sum(1) + torch.einsum("nk,kl,nl->n", eta, omega_inv, eta)
    dof = prob.obs.sum(1).to(chi.dtype) + eta.shape[1]
    bad = torch.nan_to_num(chi, nan=torch.inf) > dof + 6 * torch.sqrt(2 * dof) + 10
    return torch.nonzero(bad).flatten()


def _search_misfits_again(prob, dataset, theta, omega_inv, sd, eta):
    """Second EBE searches for the patients whose mode fits far worse than the model allows
    (:func:`_misfits`): from ETA = 0 with the residual SDs widened by each factor of a :data:`WIDENED_SD`
    schedule in turn (a homotopy: the widened objective is smooth enough for Newton's method to find the basin
    that a tiny residual variance hides, e.g. with FOCE's variance at PRED, or the other branch of a
    flip-flop); each patient keeps its best mode. Measured on pharmpy's moxonidine example at a FOCE fit's
    estimates: subject 906's search from 0 crawled to -2 log posterior 1.4e11 in its 100 iterations, the second
    searches reached the fit's mode (-193.8); evaluated from ETA = 0 the OFV was not finite, with them (and
    :func:`_search_on`) it is -8561.505, the fit's own -8561.502 (at the modes it reports)."""
    bad = _misfits(prob, theta, omega_inv, sd, eta)
    if not len(bad):
        return eta
    sub = _subproblem(prob, dataset, bad)
    best = eta[bad]
    for schedule in WIDENED_SD:
        best = _lower_mode(sub, theta, omega_inv, sd, best,
                           _homotopy(sub, theta, omega_inv, sd, torch.zeros_like(best), schedule))
    out = eta.clone()
    out[bad] = best
    prob.fallback_steps += sub.fallback_steps
    return out


DECREMENT_SEARCH_ON = 1e-6
"""Newton decrement (1/2 g' H^-1 g of -2 log posterior) above which a patient's EBE search is continued; at a
mode it is rounding (at most 9e-19 on pheno, 2e-19 on theophylline)."""
DECREMENT_WARN = 1e-3
"""Newton decrement above which a patient still away from a mode after every search is named (a thousandth
of a unit of OFV: below any difference a model comparison reads)."""
EXTRA_SEARCHES = 4
"""Rounds of Newton iterations (each up to 100) that :func:`_search_on` adds, while the objective falls."""
SEARCH_ON_SD = (100.0, 10.0, 3.0, 1.0)
"""The homotopy :func:`_search_on` ends with for patients still away from a mode: factors of the residual SDs,
each search from the last's mode, starting where the rounds stopped."""


def newton_decrement(grad: torch.Tensor, hess: torch.Tensor) -> torch.Tensor:
    """1/2 g' H^-1 g (N,) for the gradient (N, K) and positive definite Hessian (N, K, K) of -2 log posterior:
    the fall of the objective a Newton step predicts (Boyd and Vandenberghe, Convex Optimization, 9.5.1,
    for f = obj / 2); affine-invariant, so one bound serves every parameterisation of the ETAs."""
    return 0.5 * (grad * torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)).sum(-1)


def _derivatives(prob, theta, omega_inv, sd, eta):
    """(obj (N,), gradient (N, K), Hessian (N, K, K)) of -2 log posterior at ``eta``: the exact Hessian, the
    first-order one for patients whose exact Hessian is not positive definite (as in the search)."""
    obj, grad, hess = prob.exact_hessian(theta, omega_inv, sd, eta)
    ok = torch.linalg.cholesky_ex(hess).info == 0
    if not bool(ok.all()):
        fo = 2 * prob.fo_hessian(theta, omega_inv, sd, eta)
        hess = torch.where(ok[:, None, None], hess, fo)
    return obj.detach(), grad.detach(), hess.detach()


def _search_on(prob, dataset, theta, omega_inv, sd, eta):
    """(eta, obj, gradient, Hessian) after continuing the EBE search of the patients whose Newton decrement
    is above :data:`DECREMENT_SEARCH_ON`: up to :data:`EXTRA_SEARCHES` more rounds of Newton iterations, while
    some of them still improve; then, for those still above :data:`DECREMENT_WARN`, the homotopy
    :data:`SEARCH_ON_SD` from where the rounds stopped (widened residual SDs widen the valley Newton's steps
    crawl along). Each patient keeps its best point.

    Measured on pharmpy's moxonidine example at a FOCE fit's estimates (a posterior with condition number
    1e13): six patients ended their 100 iterations from ETA = 0 off a mode. The rounds took subjects 807 and
    1202 to their modes (-2 log posterior -246.001 -> -246.672, -221.736 -> -222.342); 804 still crawled after
    eight rounds (-243.67 -> -248.86, the ETA of KA from 2.17 to 0.40); the homotopy reached its mode
    (-249.12, ETA of KA -0.15, Newton decrement 4e-19), which no number of rounds had."""
    derivs = _derivatives(prob, theta, omega_inv, sd, eta)
    for _ in range(EXTRA_SEARCHES):
        bad = torch.nonzero(newton_decrement(*derivs[1:]) > DECREMENT_SEARCH_ON).flatten()
        if not len(bad):
            break
        eta, derivs, moved = _search_from(prob, dataset, theta, omega_inv, sd, eta, derivs, bad, (1.0,))
        if not moved:           # no patient improved: a kink, or the precision's limit
            break
    bad = torch.nonzero(newton_decrement(*derivs[1:]) > DECREMENT_WARN).flatten()
    if len(bad):
        eta, derivs, _ = _search_from(prob, dataset, theta, omega_inv, sd, eta, derivs, bad, SEARCH_ON_SD)
    return (eta, *derivs)


def _search_from(prob, dataset, theta, omega_inv, sd, eta, derivs, bad, schedule):
    """(eta, derivs, whether any patient moved) after the homotopy ``schedule`` (:func:`_homotopy`) from the
    ETAs of the patients ``bad``, each keeping the better of its old and new point; ``derivs`` (obj, gradient,
    Hessian: :func:`_derivatives`) updated where they moved."""
    sub = _subproblem(prob, dataset, bad)
    again = _lower_mode(sub, theta, omega_inv, sd, eta[bad], _homotopy(sub, theta, omega_inv, sd, eta[bad], schedule))
    prob.fallback_steps += sub.fallback_steps
    if torch.equal(again, eta[bad]):
        return eta, derivs, False
    eta = eta.clone()
    eta[bad] = again
    derivs = tuple(d.clone() for d in derivs)
    for d, new in zip(derivs, _derivatives(sub, theta, omega_inv, sd, again)):
        d[bad] = new
    return eta, derivs, True


LAG_START_SD = 2.0
"""Where :func:`_search_lag_modes` starts its extra searches: this many prior SDs (sqrt OMEGA) either side of 0 on
an ETA of the lag time."""


def _lag_etas(prob, theta) -> list:
    """The ETAs (indices) that move the absorption lag time ALAG of ``prob``'s model (at the THETAs ``theta``)."""
    pm = prob.pm
    if "ALAG" not in {p.name for p in pm.structural.parameters} or not pm.n_eta:
        return []
    n = prob.batch.n_subjects
    with torch.no_grad():
        base = pm.parameters(theta, torch.zeros(n, pm.n_eta, dtype=torch.float64, device=prob.y.device),
                             prob.batch).get("ALAG")
        if base is None:        # no lag time given: ALAG takes its default, 0
            return []
        out = []
        for k in range(pm.n_eta):
            eta = torch.zeros(n, pm.n_eta, dtype=torch.float64, device=prob.y.device)
            eta[:, k] = 0.1
            moved = pm.parameters(theta, eta, prob.batch)["ALAG"]
            if bool((torch.as_tensor(moved) != torch.as_tensor(base)).any()):
                out.append(k)
    return out


def _search_lag_modes(prob, theta, omega, omega_inv, sd, eta):
    """Per patient, the lowest of the modes found so far and those of EBE searches started at +-2 prior SDs
    (:data:`LAG_START_SD`) on each ETA of the lag time. The posterior of a lag time has a mode per interval between
    samples (the prediction has a kink at each sample time the lag crosses): from 0 the search stays in the
    interval it starts in, and a slow absorption can stand in for a long lag. nlmixr2's warfarin run002 (NONMEM 7,
    ETA on ALAG1) evaluated at NONMEM's final estimates: subject 13's search from 0 ended at -2 log posterior 35.62
    (ETA_KA -1.57, ETA_ALAG 0.58) where NONMEM's mode (-0.45, 1.25) has 1.63; the OFV was 260.01, NONMEM's
    225.93 (with these searches 225.25: subject 9 has a lower mode than the one NONMEM reports)."""
    starts = []
    for k in _lag_etas(prob, theta):
        for sign in (1.0, -1.0):
            start = eta.clone()
            start[:, k] = sign * LAG_START_SD * torch.sqrt(omega[k, k])
            starts.append(start)
    return _lowest_from(prob, theta, omega_inv, sd, eta, starts)


def _lowest_from(prob, theta, omega_inv, sd, eta, starts):
    """Per patient, the lowest of the mode ``eta`` and the modes EBE searches reach from each of ``starts``."""
    for start in starts:
        eta = _lower_mode(prob, theta, omega_inv, sd, eta, prob.ebe(theta, omega_inv, sd, start, tol=1e-10))
    return eta


MCETA_SEED = 20070101
"""The seed of the random starting ETAs of :func:`search_random_starts` (the same draws every time: an
evaluation is reproducible)."""


def search_random_starts(prob, theta, omega, omega_inv, sd, eta, n: int):
    """Per patient, the lowest of the mode ``eta`` and the modes EBE searches reach from each of ``n`` draws of ETA
    from N(0, OMEGA) (seeded: :data:`MCETA_SEED`). NONMEM's $ESTIMATION MCETA=n (help $ESTIMATION, "MCETA"): the
    conditional search starts from the best, by the conditional objective, of ETA = 0, the previous ETAs and n
    random ETAs drawn with variance OMEGA; searching from every draw reaches more of the modes. Which modes random
    starts reach is chance, here as in NONMEM: Bauer's 2019 tutorial (M3 on the log scale, Laplace, MCETA=10) at
    its initial estimates gives OFV 646.76 from ETA = 0 (seven subjects at worse modes, by up to 13 units) and
    629.37 with these draws; at the lowest modes 200 random searches find it is 617.5646, NONMEM's 617.564634.
    Used for the EBEs a run reports (an evaluation's OFV, a fit's final OFV and tables, map and dose); the
    estimation's own searches start from the last EBEs as without MCETA."""
    if n <= 0 or not eta.shape[1]:
        return eta
    values, vectors = torch.linalg.eigh(omega)
    root = vectors * torch.sqrt(values.clamp(min=0.0))       # OMEGA = root root' (also with a variance 0 FIX)
    gen = torch.Generator(device="cpu").manual_seed(MCETA_SEED)
    # a patient's n draws in a row: the same for it whichever patients follow
    draws = (torch.randn(*eta.shape[:1], n, eta.shape[1], generator=gen, dtype=eta.dtype).to(eta.device)
             @ root.T).transpose(0, 1)
    return _lowest_from(prob, theta, omega_inv, sd, eta, draws)


def _homotopy(prob, theta, omega_inv, sd, eta, schedule):
    """The ETAs reached by EBE searches from ``eta`` with the residual SDs multiplied by each factor of
    ``schedule`` in turn, each from the last's end (to 1e-6 while widened, to 1e-10 at factor 1)."""
    for factor in schedule:
        eta = prob.ebe(theta, omega_inv, {k: v * factor for k, v in sd.items()}, eta,
                       tol=1e-10 if factor == 1.0 else 1e-6)
    return eta


def _subproblem(prob, dataset, index):
    """``prob`` on the patients ``index`` of ``dataset`` alone (the batched searches are per patient)."""
    return Problem(prob.pm, dataset.subset([dataset.ids[i] for i in index.tolist()]), method=prob.method,
                   rtol=prob.rtol, atol=prob.atol, estimation=prob.estimation)


def _lower_mode(prob, theta, omega_inv, sd, a, b):
    """Per patient, whichever of the ETAs ``a`` and ``b`` (N, K) has the lower objective (a non-finite
    objective counts as the higher); ``a`` where they are the same mode (``b`` lower by no more than rounding,
    1e-9 relative), so that a search that adds ``b`` keeps the numbers of one without it where they agree."""
    with torch.no_grad():
        oa, ob = prob.objective(theta, omega_inv, sd, a), prob.objective(theta, omega_inv, sd, b)
    oa = torch.nan_to_num(oa, nan=torch.inf)
    better = torch.isfinite(ob) & (ob < oa - 1e-9 * (1 + oa.abs()))
    return torch.where(better.unsqueeze(-1), b, a)


def posterior_draws(est: IndividualEstimates, index: int = 0, n: int = 1000, seed: int = 0,
                    proposal_scale: float = 1.5):
    """Draws (n, K) from the posterior of patient ``index``: adaptive importance sampling from the widened
    Laplace approximation with OMEGA as the defensive prior, Pareto-smoothed and resampled
    (:func:`importance_resample`). Returns an :class:`ImportanceSample` (draws, effective sample size, with
    ``pareto_k``)."""
    model = est.model
    pm = model.model
    prob = est.problem
    dev = prob.y.device
    oinv = torch.linalg.inv(model.omega.tensor(dev))
    sd = model.sigma.sd_tensors(dev)
    theta = model.theta.tensors(dev)

    def log_post(draws):
        m = draws.shape[0]
        f = model.concentrations(prob.batch.select([index] * m), draws)
        if pm.error.ltbs:   # the likelihood is on the log scale (prob.y holds log DV)
            f = pm.error.log_scale(f)
        v = pm.residual_variance(theta, draws, prob.batch.select([index] * m), f, sd)
        data = prob.residual_terms(f, v, rows=[index] * m)[0].sum(1)      # with the M3 terms of censored levels
        return -0.5 * (data + torch.einsum("nk,kl,nl->n", draws, oinv, draws))

    limit = PRIOR_SD_LIMIT * torch.sqrt(torch.diagonal(model.omega.tensor()))
    return importance_resample(est.eta[index], est.cov[index], log_post, n, seed, proposal_scale, limit=limit,
                               prior_cov=model.omega.tensor())


#: proposals with an ETA beyond this many prior SDs (sqrt OMEGA) are not evaluated (see importance_resample)
PRIOR_SD_LIMIT = 6.0


class ImportanceSample(tuple):
    """(draws (n, K), effective sample size) as a pair, with the diagnostics as attributes: ``pareto_k`` (the
    Pareto shape of the importance weights' tail, PSIS; above 0.7 the weights are unreliable: Vehtari et
    al., JMLR 2024; 25:1), ``proposals`` (how many points the posterior was evaluated at), ``rounds``."""

    def __new__(cls, draws, ess: float, pareto_k: float, proposals: int, rounds: int):
        self = super().__new__(cls, (draws, ess))
        self.draws, self.ess, self.pareto_k, self.proposals, self.rounds = draws, ess, pareto_k, proposals, rounds
        return self


#: PSIS tail shape above which the importance weights are unreliable (Vehtari et al. 2024)
PARETO_K_LIMIT = 0.7


def importance_resample(mean, cov, log_post, n: int = 1000, seed: int = 0, proposal_scale: float = 1.5,
                        limit=None, prior_cov=None, rounds: int = 4, defensive: float = 0.2,
                        proposals: int | None = None, prior_mean=None) -> ImportanceSample:
    """``n`` draws from a posterior known up to a constant, ``log_post(draws (M, K)) -> (M,)``, by adaptive
    multiple importance sampling (AMIS: Cornuet, Marin, Mira, Robert, Scand J Stat 2012; 39:798) and
    Pareto-smoothed importance resampling (PSIS: Vehtari et al. 2024).

    Round 1 draws 2/5 of the ``proposals`` (default 5 n) from a defensive mixture (Hesterberg 1995): a
    multivariate t (5 d.f.) at ``mean`` (K,) with scale ``proposal_scale``^2 ``cov`` (the Laplace
    approximation, widened), and, with share ``defensive``, the prior N(``prior_mean`` (default 0),
    ``prior_cov``), so that a second
    mode or a tail the Laplace approximation misses is still reached. Each further round (``rounds`` in all)
    draws from a t fitted to the weighted sample so far (its mean and covariance), and every point is
    weighted against the mixture of all proposals used (the deterministic-mixture weights that make AMIS
    consistent). The log weights are Pareto-smoothed (:func:`~hybridpk.population.psis.psis_log_weights`, ArviZ's
    psislw) and ``n`` draws resampled from them.
    Returns an :class:`ImportanceSample`: (draws, effective sample size 1 / sum w^2 of the smoothed
    weights), with ``pareto_k``. Seeded.

    ``limit`` (K,): proposals with |draw_k| > limit_k get weight 0 without evaluating ``log_post``: the t's tails
    reach ETAs whose parameters no solver integrates in reasonable time (KA e^10), and beyond 6 prior SDs the
    prior density is below e^-18 of its mode, so the posterior mass dropped is negligible unless the
    likelihood outweighs that, in which case the mode would lie there. The limit is never closer to ``mean``
    than 6 proposal SDs (a mode far out in the population keeps its neighbourhood).

    The sampling itself (K-dimensional points, their weights) runs on the CPU, so a seed gives the same draws
    on every device; ``log_post`` gets its points on ``mean``'s device, where the draws are returned."""
    device = mean.device
    mean, cov = mean.detach().cpu(), cov.detach().cpu()
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    k = mean.shape[0]
    total = 5 * n if proposals is None else int(proposals)
    first = max(total * 2 // 5, 1)
    sizes = [first] + [max((total - first) // max(rounds - 1, 1), 1)] * max(rounds - 1, 0)
    base = torch.linalg.cholesky(cov * proposal_scale ** 2)
    if limit is not None:   # never closer to the mode than 6 proposal SDs (a patient far out in the population)
        reach = mean.abs() + 6 * proposal_scale * torch.sqrt(torch.diagonal(cov))
        limit = torch.maximum(torch.as_tensor(limit, dtype=torch.float64, device="cpu"), reach)
    prior = torch.linalg.cholesky(torch.as_tensor(prior_cov, dtype=torch.float64, device="cpu")) \
        if prior_cov is not None and defensive > 0 else None
    # components: (share of all proposals, kind, centre, Cholesky factor)
    components, draws, logpost = [], [], []
    for r, m in enumerate(sizes):
        if r == 0:
            n_prior = int(round(m * defensive)) if prior is not None else 0
            new = [_t_draws(mean, base, m - n_prior, gen, rng)]
            components.append([m - n_prior, "t", mean, base])
            if n_prior:
                centre = torch.zeros(k, dtype=torch.float64, device="cpu") if prior_mean is None else \
                    torch.as_tensor(prior_mean, dtype=torch.float64, device="cpu")
                new.append(centre + torch.randn(n_prior, k, generator=gen, dtype=torch.float64, device="cpu")
                           @ prior.T)
                components.append([n_prior, "normal", centre, prior])
            x = torch.cat(new)
        else:
            w = _weights(torch.cat(draws), torch.cat(logpost), components)
            if not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
                break
            all_x = torch.cat(draws)
            centre = (w[:, None] * all_x).sum(0)
            dev = all_x - centre
            fitted = (w[:, None, None] * dev[:, :, None] * dev[:, None, :]).sum(0)
            fitted = 0.5 * (fitted + fitted.T) + 1e-9 * torch.eye(k, dtype=torch.float64, device="cpu")
            chol, info = torch.linalg.cholesky_ex(fitted)
            if int(info) != 0:
                break
            x = _t_draws(centre, chol, m, gen, rng)
            components.append([m, "t", centre, chol])
        inside = torch.ones(x.shape[0], dtype=torch.bool, device="cpu") if limit is None else \
            (x.abs() <= limit).all(-1)
        lp = torch.full((x.shape[0],), -float("inf"), dtype=torch.float64, device="cpu")
        with torch.no_grad():
            if bool(inside.any()):
                lp[inside] = log_post(x[inside].to(device)).to("cpu", torch.float64)
        draws.append(x)
        logpost.append(torch.nan_to_num(lp, nan=-np.inf))
    x, lp = torch.cat(draws), torch.cat(logpost)
    logw = lp - _log_mixture(x, components)
    finite = torch.isfinite(logw)
    k_hat = float("nan")
    if int(finite.sum()) >= 10:
        smoothed, k_hat = psis_log_weights(logw[finite].numpy())
        logw = logw.clone()
        logw[finite] = torch.from_numpy(smoothed)
    w = torch.softmax(logw, 0)
    ess = float(1.0 / (w * w).sum())
    idx = torch.multinomial(w, n, replacement=True, generator=gen)
    return ImportanceSample(x[idx].to(device), ess, k_hat, int(x.shape[0]), len(draws))


def _t_draws(centre, chol, m: int, gen, rng, df: float = 5.0):
    """``m`` draws of a multivariate t (``df`` d.f.) with location ``centre`` and scale chol chol'."""
    z = torch.randn(m, centre.shape[0], generator=gen, dtype=torch.float64, device="cpu")
    g = torch.from_numpy(rng.chisquare(df, m))
    return centre + (z / torch.sqrt(g / df).unsqueeze(-1)) @ chol.T


def _log_density(x, kind: str, centre, chol, df: float = 5.0):
    """Normalised log density of a multivariate t (``df`` d.f.) or normal at ``x`` (M, K)."""
    import math

    k = x.shape[1]
    maha = (torch.linalg.solve_triangular(chol, (x - centre).T, upper=False) ** 2).sum(0)
    logdet = torch.log(torch.diagonal(chol)).sum()
    if kind == "normal":
        return -0.5 * maha - logdet - 0.5 * k * math.log(2 * math.pi)
    return (math.lgamma((df + k) / 2) - math.lgamma(df / 2) - 0.5 * k * math.log(df * math.pi) - logdet
            - 0.5 * (df + k) * torch.log1p(maha / df))


def _log_mixture(x, components):
    """log of the mixture of every proposal used, each with its share of the draws (AMIS's denominator)."""
    total = sum(c[0] for c in components)
    parts = torch.stack([np.log(c[0] / total) + _log_density(x, c[1], c[2], c[3]) for c in components if c[0] > 0])
    return torch.logsumexp(parts, 0)


def _weights(x, lp, components):
    return torch.softmax(torch.nan_to_num(lp - _log_mixture(x, components), nan=-np.inf), 0)
