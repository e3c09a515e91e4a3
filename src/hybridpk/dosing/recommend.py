"""One function per clinical question (as posologyr): the patient's posterior, then the regimen for a
target, the interval for a dose, the time to a concentration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..data import Regimen
from ..errors import HybridPKError
from ..population.estimates import PARETO_K_LIMIT
from . import safety
from .constraints import check_limits
from .model import dosing_model
from .summary import patient_summary
from .targets import metric_coefficients, metrics_by_simulation, parse_target

__all__ = ["PatientPosterior", "Recommendation", "estimate_patient", "recommend_dose", "interval_for_dose",
           "time_to_concentration"]


@dataclass(frozen=True)
class PatientPosterior:
    """One patient's posterior under a model: ``estimate`` (a :class:`~hybridpk.dosing.model.PatientEstimate`:
    the MAP point, its Laplace covariance, the individual parameters), ``draws`` (S, P) posterior draws of the
    point (adaptive importance sampling, Pareto-smoothed and resampled; the ETAs, and for a hybrid also z:
    ``model.point_names``), ``ess`` the effective sample size of the importance weights, ``pareto_k`` their
    PSIS tail shape (above 0.7: unreliable), ``proposals`` the points the posterior was evaluated at,
    ``warnings`` about the patient and the estimate."""

    estimate: object = field(repr=False)
    draws: torch.Tensor = field(repr=False)
    ess: float
    warnings: tuple
    pareto_k: float = float("nan")
    proposals: int = 0

    @property
    def model(self):
        return self.estimate.model

    def parameters(self) -> dict:
        """Per individual parameter: MAP value, posterior median and 5%/95% quantiles (natural scale), for the
        regimen ahead (covariates of the patient's last record), under the names the model reports them
        (an imported control stream's: PopulationModel.parameter_labels)."""
        est, samples = self.estimate, self.draws
        draws = est.model.individual_parameters(est, samples)
        at_map = est.model.individual_parameters(est, est.eta[:1])
        pm = est.model.population.model
        out = {}
        for name in (n for n in draws if pm.reports(n)):
            v = draws[name].cpu().numpy()
            out[pm.label(name)] = {"map": float(at_map[name].reshape(-1)[0]), "median": float(np.median(v)),
                                   "p05": float(np.quantile(v, 0.05)), "p95": float(np.quantile(v, 0.95))}
        return out

    def to_inference_data(self):
        """ArviZ InferenceData with the posterior draws of the ETAs, one chain."""
        import warnings

        with warnings.catch_warnings():   # arviz announces its 1.0 refactor on import
            warnings.simplefilter("ignore", FutureWarning)
            import arviz as az

        post = {name: self.draws[:, j].cpu().numpy()[None, :] for j, name in enumerate(self.model.point_names)}
        return az.from_dict(posterior=post)


@dataclass(frozen=True)
class Recommendation:
    """A dose recommendation with its uncertainty. ``regimen`` the recommended :class:`Regimen`;
    ``records`` its NONMEM dose record (append it to the patient's data to simulate the regimen)."""

    model: str
    regimen: Regimen
    target: str
    exposure: dict
    pta: float
    map_parameters: dict
    warnings: tuple
    records: pd.DataFrame = field(repr=False)
    candidates: list = field(default_factory=list, repr=False)
    pta_mc_se: float | None = None
    estimate: dict | None = field(default=None, repr=False)
    dose_step_mg: float | None = None

    @property
    def dose(self) -> float:
        return self.regimen.dose

    @property
    def interval(self) -> float:
        return self.regimen.interval

    @property
    def duration(self) -> float:
        return self.regimen.duration

    @property
    def start(self) -> float:
        return self.regimen.start

    def to_dict(self) -> dict:
        return {"model": self.model, "dose_mg": self.dose, "interval_h": self.interval,
                "infusion_duration_h": None if self.regimen.model_duration else self.duration,
                "given": self.regimen.how.strip(" ()"), "start_h": self.start, "target": self.target,
                "probability_of_target_attainment": self.pta,
                "probability_of_target_attainment_mc_se": self.pta_mc_se, "predicted_exposure": self.exposure,
                "map_parameters": self.map_parameters, "warnings": list(self.warnings),
                "dose_step_mg": self.dose_step_mg, "records": self.records.to_dict(orient="records"),
                "candidates": self.candidates, "patient_estimate": self.estimate}


def estimate_patient(model, dataset, n_samples: int | None = None, seed: int = 0,
                     estimate=None) -> PatientPosterior:
    """MAP estimate and ``n_samples`` posterior draws for one patient under ``model`` (any fitted model, a
    hybrid, a run folder or a published spec name), with the safety warnings (for a hybrid also when the
    patient's latent z lies outside the training patients'). ``n_samples`` None: the model's default, 1000
    for population models and 250 for hybrids (each draw of a hybrid is simulated through its correction
    over the whole regimen; the probability of target attainment reports its Monte-Carlo error).
    ``estimate``: the patient's MAP estimate when already computed (a PatientEstimate, e.g. from a batched
    MAP of many patients: :func:`~hybridpk.dosing.many.estimate_patients`)."""
    model = dosing_model(model)
    n_samples = model.default_samples if n_samples is None else int(n_samples)
    dataset, filled = safety.with_covariate_defaults(model, dataset)
    warns = filled + safety.check_patient(model, dataset.to_dataframe())
    est = model.estimate(dataset) if estimate is None else estimate
    warns += safety.check_levels(est)
    search = getattr(est.source, "search_warning", None)
    if search is not None and search():
        warns.append(search())
    if hasattr(model, "latent_warnings"):
        warns += model.latent_warnings(est)
    n_point = est.eta.shape[1]
    if n_samples < 1:
        raise HybridPKError(f"n_samples (--draws) = {n_samples}: give a whole number of posterior draws >= 1")
    if not n_point:
        return PatientPosterior(estimate=est, draws=est.eta, ess=float("nan"), warnings=tuple(warns))
    sample = est.posterior(0, n_samples, seed)
    k_hat = float(getattr(sample, "pareto_k", float("nan")))
    if sample.ess < 100 or k_hat > PARETO_K_LIMIT:
        warns.append(f"the posterior sampling is poorly resolved (effective sample size {sample.ess:.0f}, Pareto k "
                     f"{k_hat:.2f}; reliable: k <= {PARETO_K_LIMIT:g}); intervals are approximate: give more draws "
                     "(--draws) or check the patient's data")
    return PatientPosterior(estimate=est, draws=sample.draws, ess=sample.ess, warnings=tuple(warns), pareto_k=k_hat,
                            proposals=int(getattr(sample, "proposals", 0)))


def _candidate(tgt, dose, tau, m_map: float, m, ess: float) -> dict:
    """Exposure of one (dose, interval) candidate: its MAP value ``m_map``, posterior median/5%/95% of its
    draws ``m`` (S,), and the probability of target attainment over them with its Monte-Carlo standard
    error sqrt(p (1 - p) / ESS)."""
    pta = float(np.mean((m >= tgt.low) & (m <= tgt.high)))
    se = math.sqrt(pta * (1 - pta) / ess) if math.isfinite(ess) and ess > 0 else None
    # draws whose exposure is infinite (no elimination): the quantiles are draws, not interpolations (inf - inf)
    how = "linear" if np.isfinite(m).all() else "closest_observation"
    p05, median, p95 = (float(np.quantile(m, q, method=how)) for q in (0.05, 0.5, 0.95))
    return {"dose_mg": dose, "interval_h": tau, "pta": pta, "pta_mc_se": se,
            "map_exposure": float(m_map), "median": median, "p05": p05, "p95": p95}


def _allowed_doses(raw: float, limits) -> list:
    """The allowed doses next to ``raw`` (mg, the dose that puts the MAP exposure at the target's middle):
    whole multiples of the step between one step and the largest allowed dose."""
    step, top = limits.dose_step, limits.top
    if not math.isfinite(raw) or raw <= 0:   # the history alone reaches the middle: only the smallest dose
        return [step]
    lo = min(max(step, math.floor(raw / step) * step), top)
    return sorted({lo, min(lo + step, top)})


#: a regimen in the target window that needs more than this times the daily dose of another regimen in the
#: window is not chosen (a trough target with a long interval for a drug with a short half-life: meropenem
#: reached a trough of 1-4 mg/L with 1.1e7 mg every 24 h, or about 3 g a day every 8 h)
DAILY_DOSE_RATIO = 2.0


def _choose(tgt, cands: list, warnings=()) -> dict:
    """The candidate whose MAP exposure lies in the window closest to its middle (relative), among those whose
    daily dose is at most :data:`DAILY_DOSE_RATIO` times the smallest daily dose in the window; ties: the smaller
    daily dose, then the order of the candidates (the intervals as given, smaller dose first). Deterministic:
    the posterior draws do not decide. No candidate in the window: HybridPKError naming the nearest allowed
    regimen and its exposure, and the patient's ``warnings``."""
    inside = [c for c in cands if tgt.low <= c["map_exposure"] <= tgt.high]
    if inside:
        least = min(c["dose_mg"] * 24 / c["interval_h"] for c in inside)
        inside = [c for c in inside if c["dose_mg"] * 24 / c["interval_h"] <= DAILY_DOSE_RATIO * least]
    if not inside:
        def distance(c):
            return max(tgt.low - c["map_exposure"], c["map_exposure"] - tgt.high)

        near = min(cands, key=distance)
        raise HybridPKError(f"no allowed regimen puts the MAP {tgt.label} in {tgt.low:g}-{tgt.high:g}: the nearest is "
                            f"{near['dose_mg']:g} mg every {near['interval_h']:g} h with MAP {tgt.label} "
                            f"{near['map_exposure']:.1f} (posterior median {near['median']:.1f}); widen the limits "
                            "(maximum dose, dose step, intervals) or review the target"
                            + "".join(f"\n  warning: {w}" for w in warnings))
    return min(inside, key=lambda c: (abs(c["map_exposure"] - tgt.mid) / max(abs(tgt.mid), 1e-12),
                                      c["dose_mg"] * 24 / c["interval_h"], cands.index(c)))


class _Exposures:
    """The exposure of candidate doses for one interval, at the MAP and over the posterior draws.

    Linear models: metric = a + b dose (:func:`metric_coefficients`), so the dose that puts the MAP exposure
    at the window's middle is solved for. Other models (hybrids, nonlinear structures): each dose is
    simulated (:func:`metrics_by_simulation`), and that dose is bracketed by a search over the allowed
    doses on the MAP exposure (assumed to increase with the dose). Their steady-state metrics are taken
    after the fewest of the regimen's doses (3, 4, 6, 8, ... up to ``n_doses``) after which the MAP metric is
    within 0.5% of its steady state, estimated from the last three intervals by Aitken's extrapolation
    (geometric approach), first at the patient's last dose, then again at the dose found; this keeps the
    simulated horizon short."""

    def __init__(self, post: PatientPosterior, tgt, start: float, tau: float, duration: float, n_doses: int,
                 draws: bool = True, cmt: int = 0):
        self.post, self.tgt, self.start, self.tau, self.cmt = post, tgt, start, tau, cmt
        self.duration, self.n_doses = duration, n_doses
        est = post.estimate
        self.linear = est.model.linear
        if self.linear:
            fitted, patient = est.model.fitted, est.batch
            self.a_map, self.b_map = metric_coefficients(fitted, patient, est.eta[:1], tgt, start, tau, duration, cmt)
            if draws:   # False: the MAP exposure only (map_value)
                self.a_s, self.b_s = metric_coefficients(fitted, patient, post.draws, tgt, start, tau, duration,
                                                         cmt)
        self._map = {}
        self.n_sim = n_doses
        if not self.linear and tgt.metric in ("auc24", "trough", "peak"):
            b = est.batch
            given = b.dose_mask[0] & (b.dose_amt[0] > 0)
            self.n_sim = self._steady_doses(float(b.dose_amt[0][given][-1]) if bool(given.any()) else 1.0)

    def _steady_doses(self, dose: float) -> int:
        n = 3
        while n < self.n_doses:
            self.n_sim = n
            if self.steady_state_error(dose) < 0.005:
                return n
            n = n + 1 if n < 4 else n + 2
        return self.n_doses

    def _simulate(self, points, doses, previous: int = 0):
        """Metrics (S, D) (and over the ``previous`` intervals before) at ``points`` (S, P); resampled
        posterior draws repeat, so each distinct point is simulated once."""
        est = self.post.estimate
        unique, inverse = torch.unique(points, dim=0, return_inverse=True)
        now, before = metrics_by_simulation(lambda b: est.concentrations(b.select([0] * unique.shape[0]), unique),
                                            est.batch, self.tgt, self.start, self.tau, self.duration, doses,
                                            self.n_sim, cmt=self.cmt, previous=previous)
        return now[inverse], (before[inverse] if before is not None else None)

    def map_value(self, dose: float) -> float:
        if self.linear:
            return float(self.a_map[0] + self.b_map[0] * dose)
        if dose not in self._map:
            self._map[dose] = float(self._simulate(self.post.estimate.eta[:1], [dose])[0][0, 0])
        return self._map[dose]

    def steady_state_error(self, dose: float) -> float:
        """Estimated relative distance of the MAP metric over the last simulated interval from its steady state
        (0 for linear models, whose steady state is exact): with m1, m2, m3 the last three intervals' values,
        d = m3 - m2 and r = d / (m2 - m1), |d r / (1 - r)| / |m3| for a geometric approach (0 < r < 1), else
        |d| / |m3|."""
        if self.linear:
            return 0.0
        now, before = self._simulate(self.post.estimate.eta[:1], [dose], previous=2)
        if before is None:
            return 0.0
        m1, m2, m3 = float(before[0, 0, 0]), float(before[0, 0, 1]), float(now[0, 0])
        if not (math.isfinite(m1) and math.isfinite(m2)):
            return 0.0
        d, d0 = m3 - m2, m2 - m1
        r = d / d0 if d0 != 0 else 0.0
        rest = abs(d * r / (1 - r)) if 0 < r < 1 else abs(d)
        return rest / max(abs(m3), 1e-12)

    def candidates(self, limits) -> list:
        """Candidate dicts for the allowed doses next to the one that puts the MAP exposure at the middle."""
        if self.linear:
            return self.candidates_at(_allowed_doses((self.tgt.mid - float(self.a_map[0])) / float(self.b_map[0]),
                                                     limits))
        doses = self._bracket(limits)
        if self.tgt.metric in ("auc24", "trough", "peak") and self.n_sim < self.n_doses \
                and self.steady_state_error(doses[-1]) >= 0.005:   # slower at this dose (nonlinear kinetics)
            self.n_sim, self._map = self._steady_doses(doses[-1]), {}
            doses = self._bracket(limits)
        return self.candidates_at(doses)

    def candidates_at(self, doses) -> list:
        """Candidate dicts for the given doses (mg)."""
        if self.linear:
            return [_candidate(self.tgt, d, self.tau, float(self.a_map[0] + self.b_map[0] * d),
                               (self.a_s + self.b_s * d).cpu().numpy(), self.post.ess) for d in doses]
        draws, _ = self._simulate(self.post.draws, list(doses))
        return [_candidate(self.tgt, d, self.tau, self.map_value(d), draws[:, j].cpu().numpy(), self.post.ess)
                for j, d in enumerate(doses)]

    def _bracket(self, limits) -> list:
        """The allowed doses around the one whose MAP exposure is the window's middle: the largest below it
        and the next step (one step when even it reaches the middle; the largest allowed dose when none
        does)."""
        step, mid = limits.dose_step, self.tgt.mid
        k_top = None if math.isinf(limits.top) else int(round(limits.top / step))
        if self.map_value(step) >= mid:
            return [step]
        lo, k = 1, 2
        while True:   # doubling, then bisection, over whole numbers of steps
            if k_top is not None:
                k = min(k, k_top)
            if self.map_value(k * step) >= mid:
                break
            lo = k
            if (k_top is not None and k == k_top) or k >= 2 ** 20:
                return [k * step]
            k *= 2
        hi = k
        while hi - lo > 1:
            m = (lo + hi) // 2
            if self.map_value(m * step) >= mid:
                hi = m
            else:
                lo = m
        return [lo * step, hi * step]


def _default_start(df: pd.DataFrame) -> float:
    """Last dose + its interval, or the last observed dosing interval continued, or the last record; a patient
    with no dose yet (a-priori dosing): the last record (its covariates are those of the regimen)."""
    doses = df[df.EVID.isin([1, 4])]
    if doses.empty:
        return float(df.TIME.max())
    last = doses.iloc[-1]
    ii = float(last.get("II", 0) or 0)
    addl = int(last.get("ADDL", 0) or 0)
    if ii > 0:
        return float(last.TIME + (addl + 1) * ii)
    if len(doses) >= 2:   # continue the last observed dosing interval
        return float(last.TIME + (last.TIME - doses.iloc[-2].TIME))
    return float(df.TIME.max())


def _exposure(tgt, choice) -> dict:
    return {tgt.label: {"map": choice["map_exposure"], "median": choice["median"], "p05": choice["p05"],
                        "p95": choice["p95"], "target": [tgt.low, tgt.high]}}


def recommend_dose(model, dataset, target, *, interval: float | None = None, intervals=(8.0, 12.0, 24.0),
                   duration: float | None = None, dose_step: float | None = None, max_dose: float | None = None,
                   start: float | None = None, n_doses: int = 10, n_samples: int | None = None, seed: int = 0,
                   posterior: PatientPosterior | None = None, cmt: int = 0) -> Recommendation:
    """The dose (and interval) that puts ``target`` in its window for this patient.

    Parameters
    ----------
    model : any fitted model (FittedPopulation, HybridFit), run folder, or published spec name/path
    dataset : Dataset  one patient: dose history, covariates and TDM levels
    target : str or Target  e.g. 'auc24=400:600' (mg*h/L, steady state), 'trough=10:15', 'peak=25:40',
        'conc@36=10:15' (mg/L, 36 h after the first new dose)
    interval : dosing interval (h); if None the best of ``intervals``
    duration : infusion duration (h); 0 for bolus/oral; at most the interval (no overlapping infusions);
        None: the model's own duration for a model whose doses take one (D1 with RATE = -2), else the model's
        route (0 for an oral or bolus model, else 1 h; ``DosingModel.new_dose_duration``)
    dose_step : doses are whole multiples of this (mg); None: a round step of at most a quarter of the median
        dose in the patient's record (:func:`~hybridpk.dosing.constraints.record_dose_step`: 1000 mg gives 250,
        3.5 mg gives 0.5; 250 for a record without a dose); the step taken is ``dose_step_mg``
    max_dose : cap per dose (mg, at least one step)
    start : time of the first new dose (h; default: last dose + its interval, or last record); within or
        up to 168 h after the patient's records
    posterior : the patient's PatientPosterior when already computed (``estimate_patient``)
    cmt : the compartment the new doses go into (NONMEM numbering; 0: the model's dose compartment), e.g. the
        central compartment for IV doses with a model fitted on oral data (bioavailability F then does not
        apply, as in NONMEM, where F1 belongs to the depot)

    The choice is deterministic (the sampling seed does not change it): for each interval, the allowed doses
    next to the one that puts the MAP exposure at the middle of the window, then the regimen whose MAP
    exposure lies in the window closest to its middle, among those needing at most twice the smallest daily dose
    in the window (:data:`DAILY_DOSE_RATIO`); ties: the smaller daily dose, then the order of ``intervals``.
    The probability of target attainment over the posterior draws is reported with its Monte-Carlo error.
    Invalid limits, or no allowed regimen whose MAP exposure is in the window, raise HybridPKError (the latter
    naming the nearest allowed regimen): a recommendation is never 0 mg, never above the maximum, and never
    overlaps infusions.
    """
    model = dosing_model(model)
    model.require_given_input()
    tgt = parse_target(target) if isinstance(target, str) else target
    cmt = model.dose_compartment(cmt)
    duration = model.new_dose_duration(duration, cmt)
    df = dataset.to_dataframe()
    limits = check_limits(df, intervals=[interval] if interval is not None else list(intervals), duration=duration,
                          dose_step=dose_step, max_dose=max_dose, start=_default_start(df) if start is None else start,
                          n_doses=n_doses)
    post = posterior or estimate_patient(model, dataset, n_samples, seed)
    cands, exposures = [], {}
    for tau in limits.intervals:
        exposures[tau] = _Exposures(post, tgt, limits.start, tau, limits.duration, limits.n_doses, cmt=cmt)
        cands += exposures[tau].candidates(limits)
    choice = _choose(tgt, cands, post.warnings)
    warns = list(post.warnings) + model.route_warnings(cmt) + safety.check_dose(choice["dose_mg"], limits.max_dose)
    warns += safety.check_dose_against_record(choice["dose_mg"], df)
    warns += _regimen_warnings(post, exposures[choice["interval_h"]], tgt, choice, limits.start, limits.n_doses)
    regimen = Regimen(limits.start, choice["dose_mg"], choice["interval_h"], limits.n_doses, limits.duration, cmt)
    return Recommendation(model=model.name, regimen=regimen, target=str(target), exposure=_exposure(tgt, choice),
                          pta=choice["pta"], map_parameters=post.parameters(), warnings=tuple(warns),
                          records=regimen.records(df.ID.iloc[0]), candidates=cands, pta_mc_se=choice["pta_mc_se"],
                          estimate=patient_summary(post), dose_step_mg=limits.dose_step)


def _regimen_warnings(post, exposure, tgt, choice, start: float, n_doses: int) -> list[str]:
    """Steady state not reached within the regimen (simulated models) and a regimen beyond the design the
    model was built on (hybrids)."""
    out = []
    if tgt.metric in ("auc24", "trough", "peak"):
        gap = exposure.steady_state_error(choice["dose_mg"])
        if gap > 0.01:
            out.append(f"the {tgt.label} is taken over the last interval of {exposure.n_sim} new doses, where the MAP "
                       f"prediction is not yet at steady state (an estimated {gap:.1%} from it); give more doses "
                       "(n_doses) for a steady-state answer")
    tau = choice["interval_h"]
    out += post.model.design_warnings(post.estimate, [choice["dose_mg"]], [tau], start + n_doses * tau, n_doses)
    return out


#: the dosing intervals :func:`interval_for_dose` searches (h)
INTERVAL_RANGE = (0.5, 168.0)


def interval_for_dose(model, dataset, dose: float, target, *, duration: float | None = None,
                      interval_range: tuple = INTERVAL_RANGE, interval_step: float | None = None,
                      start: float | None = None, n_doses: int = 10, n_samples: int | None = None, seed: int = 0,
                      posterior: PatientPosterior | None = None, cmt: int = 0) -> Recommendation:
    """The dosing interval (h) at which ``dose`` (mg) puts the MAP steady-state ``target`` (auc24, trough or
    peak) at the middle of its window, solved continuously (Brent's root of MAP metric(interval) = middle
    within ``interval_range``; the metric falls as the interval grows). ``interval_step`` (h): round the
    answer to a whole multiple of it (the multiple whose MAP metric lies closest to the middle), e.g. 0.5 or
    a clinical 6 h; the exact root is kept in ``candidates[0]['exact_interval_h']``.

    posologyr's ``poso_inter_cmin`` answers the same question for a trough but takes the level 0.1 h before
    the 11th dose rather than at steady state, and minimises ((target - Cmin) / Cmin)^2 by L-BFGS-B from 12 h
    instead of finding the root. ``duration`` None: the model's route (as in :func:`recommend_dose`); the
    interval is never shorter than the infusion; ``cmt`` as in :func:`recommend_dose`. No interval in the
    range reaching the middle: HybridPKError naming the metric at both ends of the range."""
    model = dosing_model(model)
    model.require_given_input()
    tgt = parse_target(target) if isinstance(target, str) else target
    if tgt.metric not in ("auc24", "trough", "peak"):
        raise HybridPKError(f"target {tgt.label}: the interval for a dose is solved for a steady-state target "
                            "(auc24, trough or peak); for conc@T or auc24@DAY give --interval and ask for the dose")
    d = _number_check(dose)
    cmt = model.dose_compartment(cmt)
    duration = model.new_dose_duration(duration, cmt)
    lo, hi = _interval_range(interval_range, duration, interval_step)
    df = dataset.to_dataframe()
    limits = check_limits(df, intervals=[lo], duration=duration, dose_step=d, max_dose=None,
                          start=_default_start(df) if start is None else start, n_doses=n_doses)
    post = posterior or estimate_patient(model, dataset, n_samples, seed)

    def metric(tau: float) -> float:
        return _Exposures(post, tgt, limits.start, tau, limits.duration, n_doses, draws=False, cmt=cmt).map_value(d)

    exact = _solve_interval(metric, tgt, lo, hi, d)
    tau = exact if interval_step is None else _round_interval(metric, tgt, exact, float(interval_step), lo, hi)
    exposure = _Exposures(post, tgt, limits.start, tau, limits.duration, n_doses, cmt=cmt)
    c = {**exposure.candidates_at([d])[0], "exact_interval_h": exact}
    regimen = Regimen(limits.start, d, tau, n_doses, limits.duration, cmt)
    warns = list(post.warnings) + model.route_warnings(cmt) + _regimen_warnings(post, exposure, tgt, c, limits.start,
                                                                                n_doses)
    if not tgt.low <= c["map_exposure"] <= tgt.high:
        warns.append(f"every {tau:g} h (the step {interval_step:g} h) puts the MAP {tgt.label} at "
                     f"{c['map_exposure']:.3g}, outside {tgt.low:g}-{tgt.high:g}; the exact interval is {exact:.3g} h")
    return Recommendation(model=model.name, regimen=regimen, target=str(target), exposure=_exposure(tgt, c),
                          pta=c["pta"], map_parameters=post.parameters(), warnings=tuple(warns),
                          records=regimen.records(df.ID.iloc[0]), candidates=[c], pta_mc_se=c["pta_mc_se"],
                          estimate=patient_summary(post))


def _interval_range(interval_range, duration, step) -> tuple:
    """(lowest, highest) interval searched (h): the range, never below the infusion duration; refused when
    empty or not finite."""
    try:
        lo, hi = (float(x) for x in interval_range)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise HybridPKError(f"interval_range = {interval_range!r}: give (lowest, highest) dosing interval in h, "
                            "0 < lowest < highest")
    if step is not None and not (math.isfinite(float(step)) and float(step) > 0):
        raise HybridPKError(f"interval_step = {step!r}: the interval is rounded to whole multiples of it, so it "
                            "must be a number > 0 (h)")
    lo = max(lo, float(duration or 0.0))
    if lo >= hi:
        raise HybridPKError(f"the infusion duration ({duration:g} h) leaves no interval in {interval_range!r}")
    return lo, hi


def _solve_interval(metric, tgt, lo: float, hi: float, dose: float) -> float:
    """The interval (h) in [lo, hi] where metric(interval) equals the target's middle (Brent, relative
    tolerance 1e-10 on the interval)."""
    from scipy.optimize import brentq

    mid = tgt.mid

    def gap(tau):
        return metric(tau) / mid - 1.0

    g_lo, g_hi = gap(lo), gap(hi)
    if g_lo * g_hi > 0:
        raise HybridPKError(f"no dosing interval between {lo:g} and {hi:g} h puts the MAP {tgt.label} of "
                            f"{dose:g} mg at {mid:g}: it is {metric(lo):.3g} every {lo:g} h and {metric(hi):.3g} every "
                            f"{hi:g} h; change the dose or the interval range")
    if g_lo == 0 or g_hi == 0:
        return lo if g_lo == 0 else hi
    return float(brentq(gap, lo, hi, xtol=1e-12, rtol=1e-10))


def _round_interval(metric, tgt, exact: float, step: float, lo: float, hi: float) -> float:
    """The whole multiple of ``step`` next to ``exact`` (within [lo, hi]) whose MAP metric lies closest to the
    target's middle."""
    near = {k * step for k in (math.floor(exact / step), math.ceil(exact / step)) if lo <= k * step <= hi}
    if not near:
        raise HybridPKError(f"no whole multiple of interval_step = {step:g} h lies in {lo:g}-{hi:g} h")
    return min(sorted(near), key=lambda tau: abs(metric(tau) - tgt.mid))


def _number_check(value, what: str = "dose", unit: str = "mg") -> float:
    try:
        d = float(value)
    except (TypeError, ValueError):
        d = math.nan
    if not math.isfinite(d) or d <= 0:
        raise HybridPKError(f"{what} = {value!r}: the {what} must be a number > 0 ({unit})")
    return d


def time_to_concentration(model, dataset, concentration: float, *, horizon: float = 168.0, method: str = "root",
                          n_samples: int | None = None, seed: int = 0,
                          posterior: PatientPosterior | None = None) -> dict:
    """When the concentration falls to ``concentration`` (mg/L) after the last dose (ADDL doses counted) if
    nothing more is given, e.g. when to re-dose after a toxic level: the MAP time and the 5-95% posterior
    interval (h, absolute time; ``map_time_after_last_dose_h`` from the last dose).

    ``method`` "root": the first time after the concentration's peak that it reaches the level, found on a
    0.05-h grid and refined by Brent's method on the MAP prediction (the draws by log-linear interpolation
    within the grid step). "grid": posologyr's ``poso_time_cmin`` (tdm = TRUE) semantics: the first time on
    the grid last dose + 0.2, + 0.3, ... (0.1 h) at which the concentration is below the level (no peak
    condition). ``None`` where it does not happen within ``horizon`` h."""
    if method not in ("root", "grid"):
        raise HybridPKError(f"method = {method!r}: use 'root' (exact, after the peak) or 'grid' (posologyr)")
    level = _number_check(concentration, "concentration", "mg/L")
    model = dosing_model(model)
    post = posterior or estimate_patient(model, dataset, n_samples, seed)
    est = post.estimate
    df = dataset.to_dataframe()
    doses = df[df.EVID.isin([1, 4])]
    extra = doses.ADDL * doses.II if {"ADDL", "II"} <= set(doses.columns) else 0.0
    t_last = float((doses.TIME + extra).max())           # the last dose, additional doses (ADDL) included
    if method == "grid":
        grid = t_last + np.round(np.arange(0.2, horizon + 1e-9, 0.1), 10)
    else:
        grid = np.linspace(t_last, t_last + horizon, int(horizon * 20) + 1)
    draws = torch.cat([est.eta[:1], post.draws])

    def conc_at(times):
        batch = est.batch.extend(None, times)
        return est.concentrations(batch.select([0] * draws.shape[0]), draws)[:, -len(times):].cpu().numpy()

    conc = conc_at(grid)
    times = np.array([_first_below(grid, row, level, after_peak=(method == "root")) for row in conc])
    if method == "root" and np.isfinite(times[0]):
        times[0] = _refine_map_root(est, grid, conc[0], level, times[0])
    post_t = np.where(np.isfinite(times[1:]), times[1:], np.inf)   # not reached: beyond the horizon
    with np.errstate(invalid="ignore"):     # inf - inf between two draws beyond the horizon: NaN, reported as None
        q05, q95 = np.quantile(post_t, 0.05), np.quantile(post_t, 0.95)
    found = not np.isnan(times[0])
    return {"concentration": level, "method": method, "map_time_h": float(times[0]) if found else None,
            "map_time_after_last_dose_h": float(times[0] - t_last) if found else None, "last_dose_h": t_last,
            "p05_h": float(q05) if np.isfinite(q05) else None, "p95_h": float(q95) if np.isfinite(q95) else None,
            "fraction_reached_within_horizon": float(np.isfinite(post_t).mean()),
            "warnings": list(post.warnings) + post.model.design_warnings(est, until=grid[-1])}


def _first_below(grid, row, level: float, after_peak: bool) -> float:
    """The first time on ``grid`` (after the row's maximum when ``after_peak``) at which ``row`` is at or
    below ``level`` (strictly below without ``after_peak``, as posologyr), log-linearly interpolated within
    the grid step for the root method; NaN when none."""
    if not after_peak:
        hit = np.nonzero(row < level)[0]
        return float(grid[hit[0]]) if len(hit) else np.nan
    peak = int(np.argmax(row))
    hit = np.nonzero(row[peak:] <= level)[0]
    if not len(hit):
        return np.nan
    j = peak + hit[0]
    if j == peak or row[j] <= 0 or row[j - 1] <= 0:
        return float(grid[j])
    a, b = math.log(row[j - 1]), math.log(row[j])
    return float(grid[j - 1] + (grid[j] - grid[j - 1]) * (a - math.log(level)) / (a - b))


def _refine_map_root(est, grid, row, level: float, guess: float) -> float:
    """Brent's root of MAP concentration(t) = level within the grid step around ``guess`` (h)."""
    from scipy.optimize import brentq

    j = int(np.searchsorted(grid, guess))
    lo, hi = float(grid[max(j - 1, 0)]), float(grid[min(j, len(grid) - 1)])

    def gap(t):
        batch = est.batch.extend(None, [float(t)])
        return float(est.concentrations(batch, est.eta[:1])[0, -1]) - level

    g_lo, g_hi = gap(lo), gap(hi)
    if g_lo == 0 or g_hi == 0 or g_lo * g_hi > 0:
        return guess if g_lo * g_hi > 0 else (lo if g_lo == 0 else hi)
    return float(brentq(gap, lo, hi, xtol=1e-10, rtol=1e-12))
