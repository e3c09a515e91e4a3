"""Which model a dosing question is answered with, and what the dosing functions use of it.

Any fitted model answers: a FittedPopulation (a fit, a NONMEM import, a published spec), a HybridFit, a run
folder or a spec name. :func:`dosing_model` wraps it in a :class:`DosingModel`, which gives one patient's
estimate as a *point* (the patient's unknowns: the ETAs, and for a hybrid also its latent z) with a Laplace
covariance and posterior draws, and the concentrations at any points on any records. Recommendations,
forecasts and checks are written against that interface only, so a hybrid is dosed with its hybrid
prediction and its joint posterior over (ETAs, z).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.regimen import MODEL_DURATION
from ..errors import HybridPKError
from ..population import FittedPopulation, load_model
from ..population.estimates import IndividualEstimates, importance_resample, posterior_draws
from ..residual import HybridFit, load_run
from ..residual.inference import guarded_lbfgs

__all__ = ["dosing_model", "DosingModel", "PopulationDosing", "HybridDosing", "PatientEstimate"]


@dataclass(frozen=True)
class PatientEstimate:
    """One patient's MAP estimate under a :class:`DosingModel`.

    ``eta`` (1, P) the MAP point (the ETAs; for a hybrid the ETAs, then Z1..ZK: ``model.point_names``);
    ``cov`` (1, P, P) its Laplace covariance (inverse Hessian of -log posterior); ``parameters`` a DataFrame
    of ID and the individual structural parameters at the MAP (natural scale); ``n_levels`` (1,) the levels
    used; ``batch`` the patient's records (a one-subject EventBatch); ``obs``/``y`` (1, R) which records are
    observations and the values the likelihood reads; ``source`` the fitted model's own estimate
    (IndividualEstimates, or a HybridEstimate)."""

    model: "DosingModel" = field(repr=False)
    dataset: object = field(repr=False)
    batch: object = field(repr=False)
    eta: torch.Tensor
    cov: torch.Tensor
    parameters: pd.DataFrame
    n_levels: np.ndarray
    obs: torch.Tensor = field(repr=False)
    y: torch.Tensor = field(repr=False)
    source: object = field(default=None, repr=False)
    weight: float | None = None

    def shrinkage(self) -> np.ndarray:
        """(1, n_eta): the individual shrinkage of each ETA, posterior variance / prior variance (near 1: the
        levels say little; see :meth:`IndividualEstimates.shrinkage`)."""
        k = self.model.n_eta
        post = torch.diagonal(self.cov[:, :k, :k], dim1=1, dim2=2)
        return (post / torch.diagonal(self.model.population.omega.tensor(post.device))).cpu().numpy()

    def posterior(self, index: int = 0, n: int = 1000, seed: int = 0):
        """(draws (n, P), effective sample size) from the patient's posterior (importance resampling)."""
        return self.model.posterior(self, n, seed)

    def concentrations(self, batch, points):
        """Concentrations (S, R) at every record of ``batch`` (S copies of this patient) at ``points`` (S, P)."""
        return self.model.concentrations(batch, points, self)


class DosingModel:
    """What the dosing functions use of a fitted model (see the module docstring). ``linear``: every exposure
    metric is affine in the dose (a linear structural model and no hybrid term), so two simulations give it
    exactly; otherwise each candidate dose is simulated."""

    fitted: object
    population: FittedPopulation
    linear: bool
    #: posterior draws per patient when the caller does not say
    default_samples: int = 1000

    @property
    def name(self) -> str:
        return self.fitted.name

    @property
    def notes(self) -> tuple:
        return tuple(self.population.notes)

    def require_given_input(self) -> None:
        """Refuse to recommend doses for a model whose doses take a modelled rate (a control stream's R1 with
        RATE = -1, hybridpk's R): a dose then lasts AMT/R1 h, so its levels are not proportional to the dose, which
        the dose search assumes of a linear model. MAP estimates read such records. A modelled duration (D1 with
        RATE = -2) is given to the new doses (:meth:`new_dose_duration`)."""
        modelled = self._modelled_input("rate")
        if modelled:
            raise HybridPKError(f"{self.name} gives its doses a modelled {' and '.join(modelled)} (RATE = -1): a "
                                "dose then lasts AMT/rate h, and hybridpk's dose search takes levels proportional "
                                "to the dose: not supported ('hybridpk map' estimates the patient from such "
                                "records)")

    @property
    def model_duration(self) -> bool:
        """Whether the model's doses into its dose compartment take a modelled duration (D1 with RATE = -2)."""
        return bool(self._modelled_input("duration"))

    def _modelled_input(self, kind: str) -> list:
        """The recipe's modelled inputs of ``kind`` ("duration" or "rate"), as both importers write them:
        'duration (D1)', 'rate (R)' (:func:`hybridpk.population.spec.build_model`, the control-stream reader)."""
        return [m for m in self.population.model.recipe.get("modelled_input", ()) if m.startswith(kind)]

    def new_dose_duration(self, duration: float | None, cmt: int) -> float:
        """The duration (h) of new doses: the caller's; else, for doses into the dose compartment of a model whose
        doses take a modelled duration (a control stream's D1 with RATE = -2, zero-order absorption), the model's
        own (:data:`~hybridpk.data.regimen.MODEL_DURATION`: the new records carry RATE = -2, as NONMEM gives
        them); else :attr:`default_duration`."""
        if duration is not None:
            return duration
        if self.model_duration and cmt in (0, self.population.model.structural.dose_cmt):
            return MODEL_DURATION
        return self.default_duration

    @property
    def concentration_scale(self) -> str:
        """How the model's levels differ from amount/L, when they do (a control stream's S2 = V/1000: levels in
        ng/mL for doses in mg); "" otherwise (:attr:`PopulationModel.concentration_scale`)."""
        return self.population.model.concentration_scale

    @property
    def default_duration(self) -> float:
        """The duration (h) of a new dose when the caller does not say: 0 (bolus or oral dose) for a model
        whose route is oral or bolus (a spec's ``route``; a fit of a model that doses into a depot, or of one
        to data dosed by bolus only: :func:`~hybridpk.population.fitted.route_of`), else a 1-h infusion."""
        return 0.0 if self.population.route in ("oral", "bolus") else 1.0

    @property
    def covariates(self) -> tuple:
        return tuple(self.population.covariates)

    @property
    def ranges(self) -> dict:
        return self.population.ranges

    @property
    def n_eta(self) -> int:
        return self.population.model.n_eta

    @property
    def device(self) -> str:
        """The torch device this model computes on (:meth:`FittedPopulation.to`)."""
        return self.population.device

    @property
    def point_names(self) -> tuple:
        return tuple(self.population.model.etas)

    def residual_variance(self, batch, points, conc):
        """Var(DV) (S, R) around the concentrations ``conc`` (S, R) of ``batch``'s subjects at ``points`` (S, P):
        the population model's residual error (a general $ERROR reads the points' ETAs)."""
        pop = self.population
        return pop.model.residual_variance(pop.theta.tensors(self.device), points[:, :self.n_eta], batch, conc,
                                           pop.sigma.sd_tensors(self.device))

    def dose_compartment(self, cmt) -> int:
        """``cmt`` checked as the compartment of new doses (NONMEM numbering, 0: the model's dose compartment)."""
        structural = self.population.model.structural
        names = list(structural.compartments)
        try:
            k = int(cmt)
        except (TypeError, ValueError):
            k = -1
        if k != cmt or not 0 <= k <= len(names):
            raise HybridPKError(f"cmt = {cmt!r}: the new doses go into one of {self.name}'s compartments, "
                                + ", ".join(f"{j} ({n})" for j, n in enumerate(names, 1))
                                + f", or 0 for its dose compartment ({structural.dose_cmt})")
        return k

    def route_warnings(self, cmt: int) -> list[str]:
        """Warnings when new doses go where the model was not built to take them (hybrids: another route)."""
        return []

    def design_warnings(self, est: PatientEstimate, doses=(), intervals=(), until: float | None = None,
                        n_new: int = 0) -> list[str]:
        """Warnings when a regimen or forecast lies beyond what the model was built on (hybrids: their
        training design); none for population models, whose compartments extrapolate by construction."""
        return []


class PopulationDosing(DosingModel):
    """A FittedPopulation: the point is the ETAs; MAP by the fit's EBE code (:func:`map_estimate`), posterior
    draws by :func:`posterior_draws`."""

    def __init__(self, fitted: FittedPopulation):
        if getattr(fitted.model.structural, "given_per_record", False):
            raise HybridPKError(f"{fitted.name}: a $PRED model gives its predictions at its own data records (from "
                                "their data items), with no doses or compartments; it cannot forecast a patient or "
                                "try a regimen")
        self.fitted = self.population = fitted
        self.linear = bool(fitted.model.structural.linear)

    def estimate(self, dataset) -> PatientEstimate:
        return self.from_estimate(self.fitted.estimate(dataset))

    def from_estimate(self, est: IndividualEstimates) -> PatientEstimate:
        prob = est.problem
        pm = self.fitted.model
        if pm.recipe.get("kind") != "build":     # $PK data items (occasions, TIME): not carried forward
            pm.require_per_subject(prob.batch, "dosing (forecasts and regimens)")
        batch = replace(prob.batch.select([0]), occasion=self.occasion)
        if self.occasion is not None:
            self._require_occasion_ahead(batch)
        return PatientEstimate(model=self, dataset=est.dataset, batch=batch, eta=est.eta[:1],
                               cov=est.cov[:1], parameters=est.parameters.iloc[:1], n_levels=est.n_levels[:1],
                               obs=prob.obs[:1], y=prob.y[:1], source=est)

    def posterior(self, est: PatientEstimate, n: int, seed: int):
        return posterior_draws(est.source, 0, n, seed)

    def concentrations(self, batch, points, est=None):
        return self.fitted.concentrations(batch, points)

    def prior_points(self, n: int, gen):
        z = torch.randn(n, self.n_eta, generator=gen, dtype=torch.float64, device="cpu").to(self.device)
        return z @ torch.linalg.cholesky(self.population.omega.tensor(self.device)).T

    @property
    def occasion(self) -> str | None:
        """The occasion column of a model with IOV (built with ``iov``), else None."""
        recipe = self.fitted.model.recipe
        return recipe.get("occasion") if recipe.get("iov") else None

    def _require_occasion_ahead(self, batch) -> None:
        """The regimen ahead is a new occasion; the model must have one more than the patient's history used."""
        recipe = self.fitted.model.recipe
        ahead = int(batch.ahead_covariates()[0, batch.covariate_names.index(self.occasion)])
        if ahead > int(recipe["occasions"]):
            raise HybridPKError(f"{self.name}: the patient's records reach occasion {ahead - 1} ({self.occasion}) and "
                                f"the regimen ahead is occasion {ahead}, but the model has {recipe['occasions']} "
                                "occasions; number the patient's occasions from 1 (recent ones only), or use a model "
                                "with more occasions")

    def individual_parameters(self, est: PatientEstimate, points) -> dict:
        """Parameters of the regimen ahead: with the covariates of the patient's last record (a new occasion for
        a model with IOV: its IOV ETAs are those of ``points`` for that occasion, 0 at the MAP); the model's
        own parameters beside the structure's (e.g. busulfan_longboyle2015's CLIN beside VMAX = CLIN KM)."""
        batch = est.batch
        last = batch.ahead_covariates()[0]
        cov = {c: last[k].expand(points.shape[0]) for k, c in enumerate(batch.covariate_names)}
        with torch.no_grad():
            return self.fitted.individual_parameters(points, cov, every=True)


class HybridDosing(DosingModel):
    """A HybridFit: the point is (ETAs, z). The MAP is the hybrid's own per-patient estimate (the encoder's
    guess refined to the joint MAP) refined once more on the joint density of (ETAs, z)
    (:meth:`HybridFit.objective`: OMEGA the prior of the ETAs; the trained latent distribution, the training
    patients' aggregate posterior (``coverage.latent_prior``), the prior of z, so that a patient with few
    levels gets the corrections the training population had, not the wider N(0, I) that the encoder's
    posteriors do not fill; runs saved without it use the training's prior); the Laplace
    covariance is the inverse Hessian of that density (autograd), eigenvalues floored at the prior's
    precision where the data make it indefinite; posterior draws by importance resampling from it.
    Concentrations are the hybrid prediction (for the log form averaged with ODE-only by the patient's
    HYBRID_WEIGHT)."""

    linear = False
    default_samples = 250

    def __init__(self, fitted: HybridFit):
        # the ODE part with the hybrid's OMEGA: the prior of the patient's ETAs
        self.fitted, self.population = fitted, fitted.hybrid_population
        prior = fitted.coverage.latent_prior() if fitted.coverage is not None else None
        k, dev = fitted.latent_dim, self.device
        if prior is not None:
            cov = prior[1] + 1e-6 * torch.eye(k, dtype=torch.float64, device="cpu")
            self.z_mean, self.z_cov = prior[0].to(dev), cov.to(dev)
            self.z_prior = (self.z_mean, torch.linalg.inv(self.z_cov))
        else:   # the training's prior: N(0, I / prior_weight)
            self.z_mean = torch.zeros(k, dtype=torch.float64, device=dev)
            self.z_cov = torch.eye(k, dtype=torch.float64, device=dev) / fitted.vae.prior_weight
            self.z_prior = None

    def _objective(self, batch, points):
        return self.fitted.objective(batch, points, z_prior=self.z_prior)

    @property
    def point_names(self) -> tuple:
        return self.fitted.point_names

    def estimate(self, dataset) -> PatientEstimate:
        hyb = self.fitted
        h = hyb.estimate(dataset)
        ode = h.ode
        batch = ode.problem.batch.select([0])
        start = torch.cat([h.eta[:1], h.z[:1]], 1).detach()

        def objective(p):
            return self._objective(batch.select([0] * p.shape[0]), p)

        to_whitened, from_whitened = hyb.whitening()             # the search moves the ETAs whitened
        x, _ = guarded_lbfgs(lambda w: objective(from_whitened(w)), to_whitened(start), 100)
        with torch.no_grad():
            x = from_whitened(x)
            point = x if bool(torch.isfinite(objective(x)).all() and objective(x) <= objective(start)) else start
        cov = self._laplace(objective, point)
        params = hyb.individual_parameters(batch, point)
        table = pd.DataFrame({"ID": list(dataset.ids)[:1], **{k: v.cpu().numpy() for k, v in params.items()}})
        return PatientEstimate(model=self, dataset=dataset, batch=batch, eta=point, cov=cov.unsqueeze(0),
                               parameters=table, n_levels=ode.n_levels[:1], obs=ode.problem.obs[:1],
                               y=ode.problem.y[:1], source=h, weight=float(h.weight[0]))

    def _laplace(self, objective, point):
        """Inverse Hessian (P, P) of ``objective`` at ``point`` (1, P)."""
        hess = torch.autograd.functional.hessian(lambda v: objective(v.unsqueeze(0)).sum(), point[0].detach())
        hess = 0.5 * (hess + hess.T)
        floor = float(torch.linalg.eigvalsh(self._prior_precision()).min())
        vals, vecs = torch.linalg.eigh(torch.nan_to_num(hess, nan=0.0))
        vals = vals.clamp(min=floor)
        return (vecs / vals) @ vecs.T

    def _prior_precision(self):
        oinv = (torch.linalg.inv(self.population.omega.tensor(self.device)) if self.n_eta
                else torch.zeros(0, 0, dtype=torch.float64, device=self.device))
        return torch.block_diag(oinv, torch.linalg.inv(self.z_cov))

    def posterior(self, est: PatientEstimate, n: int, seed: int):
        step = self.fitted.chunk_size(est.batch, most=250)      # fewer at once for a long record at a fine grid

        def log_post(draws):
            out = []
            for i in range(0, draws.shape[0], step):
                d = draws[i:i + step]
                out.append(-self._objective(est.batch.select([0] * d.shape[0]), d))
            return torch.cat(out)

        return importance_resample(est.eta[0], est.cov[0], log_post, n, seed, prior_cov=self._prior_cov(),
                                   prior_mean=torch.cat([torch.zeros(self.n_eta, dtype=torch.float64, device="cpu"),
                                                         self.z_mean.cpu()]))

    def _prior_cov(self):
        omega = self.population.omega.tensor()       # on the CPU, where importance_resample draws
        return torch.block_diag(omega, self.z_cov.cpu())

    def concentrations(self, batch, points, est=None):
        return self.fitted.concentrations(batch, points, weight=est.weight if est is not None else None)

    def prior_points(self, n: int, gen):
        k = self.fitted.latent_dim
        eta = torch.randn(n, self.n_eta, generator=gen, dtype=torch.float64, device="cpu") @ \
            torch.linalg.cholesky(self.population.omega.tensor()).T
        z = self.z_mean.cpu() + torch.randn(n, k, generator=gen, dtype=torch.float64, device="cpu") @ \
            torch.linalg.cholesky(self.z_cov.cpu()).T
        return torch.cat([eta, z], 1).to(self.device)

    def individual_parameters(self, est: PatientEstimate, points) -> dict:
        return self.fitted.individual_parameters(est.batch.select([0] * points.shape[0]), points)

    def latent_warnings(self, est: PatientEstimate) -> list[str]:
        cov = self.fitted.coverage
        if cov is None:
            return ["this hybrid run does not record its training design (saved by an earlier version): whether "
                    "the patient or a regimen lies inside it cannot be checked; refit to record it"]
        return cov.latent_warnings(est.eta[0, self.n_eta:])

    def route_warnings(self, cmt: int) -> list[str]:
        dose_cmt = self.population.model.structural.dose_cmt
        if cmt in (0, dose_cmt):
            return []
        return [f"the new doses go into compartment {cmt}, but the hybrid's correction was trained on doses into "
                f"compartment {dose_cmt}: over this route it is an extrapolation; compare with the ODE-only model"]

    def design_warnings(self, est, doses=(), intervals=(), until=None, n_new: int = 0) -> list[str]:
        out = []
        if n_new and not self.fitted.vae.form.conserves_mass:
            # benchmarks/mipd_hybrid.py, seed 1: true AUC24 in the window for 15% of patients with the input form,
            # 56% with the (mass-conserving) reservoir form, 58% with ODE-only
            out.append(f"the hybrid's {self.fitted.vae.form_name} form does not conserve mass: over a new regimen "
                       "its correction is extrapolated without that constraint, and on the EHC dosing benchmark it "
                       "dosed far worse than ODE-only; compare with the ODE-only recommendation (or refit with "
                       "--hybrid-form reservoir)")
        cov = self.fitted.coverage
        if cov is None:
            return out
        b = est.batch
        given = b.dose_mask[0] & (b.dose_amt[0] > 0)
        first = float(b.dose_time[0][given].min()) if bool(given.any()) else 0.0
        return out + cov.design_warnings(doses, intervals, None if until is None else until - first,
                                         int(given.sum()) + n_new if n_new else None)


def dosing_model(model, device=None) -> DosingModel:
    """The :class:`DosingModel` for ``model``: a FittedPopulation (a fit, or a published spec loaded by
    ``load_model``), a HybridFit, a DosingModel, a run folder, or a spec name / .toml file. ``device``: the
    torch device its estimates, draws and forecasts compute on ("cpu", "cuda", "auto"; None: the model's own,
    the CPU for a file)."""
    if isinstance(model, DosingModel):
        return model if device is None else dosing_model(model.fitted, device)
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        model = load_run(model)
    elif not isinstance(model, (FittedPopulation, HybridFit)):
        model = load_model(model)       # a spec name or file (anything else is refused there, by name)
    if device is not None:
        model = model.to(device)
    if isinstance(model, HybridFit):
        return HybridDosing(model)
    return PopulationDosing(model)


def patient_estimate(est) -> PatientEstimate:
    """``est`` as a PatientEstimate (an IndividualEstimates of a FittedPopulation is wrapped: its first
    patient)."""
    if isinstance(est, PatientEstimate):
        return est
    if isinstance(est, IndividualEstimates):
        return PopulationDosing(est.model).from_estimate(est)
    raise TypeError(f"not a patient estimate: {type(est).__name__}")
