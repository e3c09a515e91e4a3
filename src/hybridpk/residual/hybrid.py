"""The hybrid model: a FittedPopulation plus its trained VAE (encoder and correction form), with the same
interface as the population model (estimate, predict, simulate, save); fitting it on a dataset."""

from __future__ import annotations

import functools
import io
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import HybridPKError
from ..io import atomic_write_bytes, atomic_write_text
from ..population import FittedPopulation, Predictions, fit_population
from ..population.estimation import read_json
from ..population.manifest import write_manifest
from ..population.simulation import eta_sampler, model_variance, replicates
from ..solve import simulate
from ..solve.device import same_device
from .baseline import ODEBaseline
from .coverage import TrainingCoverage
from .inference import HybridEstimate, estimate_hybrid, joint_objective, predict_with
from .objective import gaussian_nll, hybrid_error
from .omega import its_omega, with_omega
from .selection import Candidate, candidates, select
from .training import TrainConfig, null_model, train_vae
from .vae import HybridVAE, scale_from_tensors, scale_to_tensors

__all__ = ["HybridFit", "fit_hybrid", "HYBRID_FORMAT"]

#: vae.json: "format" and "version" of the hybrid-model file this hybridpk writes and reads
HYBRID_FORMAT = ("hybridpk-hybrid-model", 2)


@dataclass(frozen=True)
class HybridFit:
    """A population ODE model (``population``, a FittedPopulation) plus its trained VAE (``vae``).

    ``individual`` (the training patients) adds to the population fit's table Z1..ZK (refined latent means),
    Z1_SD..ZK_SD (the encoder's SDs), NLL_ODE / NLL_HYBRID (-2 log-likelihood of the patient's data under the
    ODE-only fit and the hybrid), COMPLEXITY (NLL_ODE - NLL_HYBRID: how much the correction explains; near 0 or
    negative when the ODE suffices), HYBRID_WEIGHT (Akaike weight of the hybrid against ODE-only for this patient;
    log-form predictions average the two with it) and RMSE_ODE / RMSE_HYBRID (mg/L, of the observations, for the
    ODE-only and the final prediction), REFINED (1 where the per-patient MAP refinement replaced the encoder's
    estimate). ``history``: (epoch, train -ELBO, validation -ELBO) per epoch of the chosen model (saved as
    training.csv with every candidate's curve, :meth:`training_curves`; empty for runs saved before it was kept);
    ``candidates``: the (form, latent dimension) pairs tried when either was "auto"
    (:class:`~hybridpk.residual.selection.Candidate`: the score after the screening epochs and at the end,
    epochs, seconds, which was chosen); empty when one was given; ``refine_failure``: the refinement optimiser's
    error on the training patients, if it failed ("" otherwise; each patient then kept its best point); ``coverage``
    the training design (:class:`TrainingCoverage`: doses, intervals, time span, latent values), against which
    forecasts and doses for new patients are checked (None for runs saved before it was recorded); ``omega``
    and ``sigma`` the hybrid's OMEGA (K x K) and residual error SDs {kind: SD}, estimated with the correction
    on the training patients (:mod:`hybridpk.residual.omega`), the prior of the ETAs and the residual error
    in every hybrid estimate, prediction, simulation and dose (None: the population fit's; runs saved before
    they were estimated). The population fit keeps the ODE-only model's, and the per-patient -2LL of
    ``individual`` (NLL_ODE, NLL_HYBRID) compare both predictions under that common residual error.
    """

    population: FittedPopulation
    vae: HybridVAE = field(repr=False)
    config: TrainConfig = field(repr=False)
    individual: pd.DataFrame = field(repr=False)
    history: list = field(default_factory=list, repr=False)
    candidates: list = field(default_factory=list)
    refine_failure: str = ""
    coverage: TrainingCoverage | None = None
    omega: tuple | None = None
    sigma: dict | None = None
    trained_log_shift: tuple | None = None

    @property
    def device(self) -> str:
        """The torch device this model computes on (:meth:`to`)."""
        return self.population.device

    def to(self, device) -> "HybridFit":
        """The same hybrid computing on ``device`` (see :meth:`FittedPopulation.to`): its networks and every
        estimate, prediction and simulation stay there; tables come back to the CPU."""
        import copy

        population = self.population.to(device)
        target = torch.device(population.device)
        tensors = list(self.vae.parameters()) + [v for v in self.vae.scale.values() if torch.is_tensor(v)]
        if all(same_device(t.device, target) for t in tensors):
            return self if population is self.population else replace(self, population=population)
        vae = copy.deepcopy(self.vae).to(target)         # the model itself stays where it is
        vae.scale = {k: v.to(target) if torch.is_tensor(v) else v for k, v in vae.scale.items()}
        return replace(self, population=population, vae=vae)

    @property
    def hybrid_population(self) -> FittedPopulation:
        """The population fit with the hybrid's OMEGA and SIGMA (``omega``, ``sigma``): the ODE part of the
        hybrid and its residual error."""
        if self.omega is None:
            return self.population
        return with_omega(self.population, self.omega, self.sigma)

    @property
    def latent_dim(self) -> int:
        return self.vae.latent_dim

    @functools.cached_property
    def error(self):
        """The residual-error model of the hybrid's likelihood (:func:`~hybridpk.residual.objective.hybrid_error`:
        a general $ERROR bound to the population fit's THETAs), built once (the dosing posterior evaluates it
        at every draw)."""
        return hybrid_error(self.population, self.vae.scale["c0"])

    @property
    def point_names(self) -> tuple:
        """Names of the columns of a point (one patient's unknowns): the ETAs, then Z1..ZK."""
        return tuple(self.population.model.etas) + tuple(f"Z{j + 1}" for j in range(self.latent_dim))

    @property
    def name(self) -> str:
        return self.population.name

    # ------------------------------------------------------------------ estimates and predictions
    def estimate(self, dataset, refine: bool = True) -> HybridEstimate:
        """Each patient of ``dataset`` from its own observations: the ODE-only MAP ETAs, then the encoder's z
        refined to the joint MAP of z and (for joint models) the ETAs. Censored observations are refused
        (:func:`require_uncensored`)."""
        require_uncensored(dataset, "estimate", "use the run's ODE model alone")
        return self._estimate_from(_ode_only(self.population, dataset), refine)

    def _estimate_from(self, ode_fit, refine: bool = True) -> HybridEstimate:
        est, batch, ipred0 = ode_fit
        hp_ = self.hybrid_population
        h = estimate_hybrid(self.vae, batch, ipred0, est.eta, self.error,
                            hp_.sigma.sd_tensors(self.device), baseline=ODEBaseline(hp_),
                            refine=refine)
        return h.with_ode(est, ipred0)

    def predict(self, dataset, design=None, refine: bool = True, estimates: HybridEstimate | None = None
                ) -> Predictions:
        """Predictions at every record of ``design`` (default: ``dataset`` itself; e.g.
        ``dataset.prediction_design(times)``, the same patients in the same order), the patients estimated
        from their observations in ``dataset``. IPRED is the final prediction: the hybrid, or for the log form
        its Akaike-weighted average with ODE-only; the table also has IPRED_ODE, IPRED_HYBRID, HYBRID_WEIGHT
        and Z1.. (mg/L)."""
        h = estimates or self.estimate(dataset, refine=refine)
        if design is not None and list(design.ids) != list(dataset.ids):
            raise HybridPKError("the prediction design must hold the same patients, in the same order, as the data")
        target = design if design is not None else dataset
        covariates = list(self.population.covariates)
        batch = (h.ode.problem.batch if design is None
                 else design.to_batch(covariates=covariates, device=self.device))
        curves = predict_with(self.vae, h, batch, ODEBaseline(self.hybrid_population))
        ipred, hyb, ode = curves.final, curves.hybrid, curves.ode
        pred = self.population.concentrations(batch, torch.zeros_like(h.eta_ode))
        df = target.to_dataframe()
        table = pd.DataFrame({"ID": df.ID.to_numpy(), "TIME": df.TIME.to_numpy(), "DV": df.DV.to_numpy(),
                              "MDV": df.MDV.to_numpy(), "PRED": batch.to_rows(pred), "IPRED_ODE": batch.to_rows(ode),
                              "IPRED_HYBRID": batch.to_rows(hyb), "IPRED": batch.to_rows(ipred)})
        idx = batch.subject_of_rows()
        table["HYBRID_WEIGHT"] = h.weight[idx].cpu().numpy()
        for j in range(h.z.shape[1]):
            table[f"Z{j + 1}"] = h.z[idx, j].cpu().numpy()
        return Predictions(table=table, batch=batch, pred=pred, ipred=ipred, estimates=h, ode=ode, hybrid=hyb)

    # ------------------------------------------------------------------ points (ETAs, z) of one patient
    def _split(self, points):
        k = self.population.model.n_eta
        return points[:, :k], points[:, k:]

    def whitening(self):
        """(to_whitened, from_whitened): functions of points (S, n_eta + K) that whiten their ETAs
        (:meth:`ODEBaseline.whiten <hybridpk.residual.baseline.ODEBaseline.whiten>` under the hybrid's OMEGA;
        z as it is), the coordinates a per-patient search moves in, and back; one OMEGA factorisation for both."""
        base = ODEBaseline(self.hybrid_population)

        def to_whitened(points):
            eta, z = self._split(points)
            return torch.cat([base.whiten(eta), z], 1)

        def from_whitened(points):
            u, z = self._split(points)
            return torch.cat([base.unwhiten(u), z], 1)

        return to_whitened, from_whitened

    def concentrations(self, batch, points, weight=None, chunk: int | None = None):
        """Hybrid concentrations (S, R) mg/L at every record of ``batch`` (S subjects, e.g. one patient
        repeated) for ``points`` (S, n_eta + K): each row the ETAs, then z (``point_names``). For the log form
        the prediction is averaged with ODE-only with ``weight`` (the patient's HYBRID_WEIGHT; None: the
        hybrid alone). Evaluated ``chunk`` rows at a time (default: :meth:`chunk_size`)."""
        base, pop = ODEBaseline(self.hybrid_population), self.population
        chunk = chunk or self.chunk_size(batch)
        out = []
        with torch.no_grad():
            for i in range(0, points.shape[0], chunk):
                sub = batch.select(list(range(i, min(i + chunk, points.shape[0]))))
                eta, z = self._split(points[i:i + chunk])
                averaged = weight is not None and self.vae.average
                # joint models recompute the ODE part inside predict_at: solve it here only when it is used
                ode = pop.concentrations(sub, eta) if (averaged or not self.vae.joint) else None
                hyb, _ = self.vae.predict_at(sub, z, base, eta, ode)
                if averaged:
                    hyb = weight * hyb + (1 - weight) * ode
                out.append(hyb)
        return torch.cat(out) if out else torch.zeros(0, batch.time.shape[1], dtype=torch.float64,
                                                      device=batch.time.device)

    def chunk_size(self, batch, cells: float = 2e7, most: int = 100) -> int:
        """How many subjects of ``batch`` to predict together: up to ``most``, fewer when the form's arrays per
        subject are large (:meth:`~hybridpk.residual.forms.CorrectionForm.cells`, about ``cells`` numbers at
        once): the grid forms' grow with the records, doses and the grid's intervals, the reservoir's and
        elimination's with the intervals squared. A long record at a fine grid (30 days of doses every 12 h for
        a hybrid trained on one day: 1900 intervals) had posterior draws take over 24 GB."""
        span = float((batch.time.max() - batch.time.min()).clamp(min=1.0))
        intervals = math.ceil(span / float(self.vae.scale.get("input_dt", span)))
        one = self.vae.form.cells(batch.time.shape[1], intervals, batch.dose_time.shape[1], self.vae.scale)
        return int(max(1, min(most, cells // max(one, 1))))

    def objective(self, batch, points, z_prior=None):
        """-log p(y, ETAs, z) (S,) up to a constant of the observations in ``batch`` at ``points`` (S, n_eta + K):
        :func:`~hybridpk.residual.inference.joint_objective` (``z_prior``: (mean, precision) of z in place of
        the training's prior), differentiable in ``points``."""
        eta, z = self._split(points)
        return joint_objective(self.vae, ODEBaseline(self.hybrid_population), batch, eta, z, self.error,
                               self.hybrid_population.sigma.sd_tensors(self.device), z_prior=z_prior)

    def individual_parameters(self, batch, points) -> dict:
        """The structural parameters {name: (S,)} of the ODE part at ``points`` (with the typical-value shifts
        learnt by joint training)."""
        eta, _ = self._split(points)
        base = ODEBaseline(self.hybrid_population)
        with torch.no_grad():
            return base.parameters(batch, eta, self.vae.log_shift if self.vae.joint else None)

    def simulate(self, dataset, n: int = 1, seed: int = 0) -> pd.DataFrame:
        """``n`` replicates of the design of ``dataset`` from the generative model: ETAs from OMEGA, z from
        the latent prior N(0, I), the hybrid prediction, and DV with the residual error at the observation
        records. One row per replicate and record: REP, ID, TIME, EVID, MDV, IPRED, DV (mg/L), ETAs, Z1..."""
        self.population.require_simulation()
        pop, pm = self.hybrid_population, self.population.model
        etas, base = eta_sampler(pop), ODEBaseline(pop)

        def draw(batch, gen):
            eta = etas(batch.n_subjects, gen)
            z = torch.randn(batch.n_subjects, self.latent_dim, generator=gen, dtype=torch.float64,
                            device="cpu").to(batch.time.device)
            with torch.no_grad():
                conc, _ = self.vae.predict_at(batch, z, base, eta, pop.concentrations(batch, eta))
            return conc, {**{name: eta[:, j] for j, name in enumerate(pm.etas)},
                          **{f"Z{j + 1}": z[:, j] for j in range(self.latent_dim)}}

        sd = pop.sigma.sd_tensors(self.device)
        return replicates(dataset, pm.covariates, pm.error, sd, n, seed, draw,
                          model_variance(pm, pop.theta.tensors(self.device), sd), device=self.device)

    # ------------------------------------------------------------------ persistence
    def summary(self) -> dict:
        ind = self.individual
        return {"kind": "vae", "form": self.vae.form_name, "latent_dim": self.latent_dim,
                "epochs_run": len(self.history), "validation_neg_elbo": float(self.vae.best_val),
                "candidates": [c.to_dict() for c in self.candidates],
                "nll_ode_total": float(ind.NLL_ODE.sum()), "nll_hybrid_total": float(ind.NLL_HYBRID.sum()),
                "rmse_ode": float(np.sqrt((ind.RMSE_ODE ** 2).mean())),
                "rmse_hybrid": float(np.sqrt((ind.RMSE_HYBRID ** 2).mean())),
                "refinement": self.refinement(), "config": asdict(self.config),
                "omega": self._omega_summary(), "typical_values": self.typical_values()}

    def typical_values(self) -> dict:
        """The typical values of the structural parameters that joint training and the ITS's THETA step move
        (:mod:`hybridpk.residual.omega`): {name: {"population": the population fit's, "trained": after joint
        training (when recorded), "hybrid": the hybrid's (times exp(shift))}}; empty for staged hybrids and
        models whose THETA are not named as parameters."""
        shift = self.vae.log_shift.detach()
        if not self.vae.joint or not shift.numel():
            return {}
        theta = self.population.theta.tensors()
        out = {}
        for i, n in enumerate(ODEBaseline(self.population).names):
            row = {"population": float(theta[n])}
            if self.trained_log_shift is not None:
                row["trained"] = float(theta[n]) * math.exp(self.trained_log_shift[i])
            out[n] = dict(row, hybrid=float(theta[n]) * float(torch.exp(shift[i])))
        return out

    def _omega_summary(self) -> dict | None:
        """The hybrid's OMEGA and residual error SDs beside the population fit's: "etas", "hybrid" and
        "population" (K x K lists), "sigma_hybrid" and "sigma_population" ({kind: SD}), "method"."""
        if self.omega is None:
            return None
        return {"etas": list(self.population.omega.etas), "hybrid": [list(r) for r in self.omega],
                "population": [list(r) for r in self.population.omega.matrix],
                "sigma_hybrid": dict(self.sigma or {}),
                "sigma_population": {r.kind: r.sd for r in self.population.sigma.rows},
                "method": "iterative two-stage on the training patients (hybridpk.residual.omega)"}

    def refinement(self) -> dict:
        """How the training patients' per-patient MAP refinement went: patients, those that kept the
        encoder's estimate (the refinement did not lower their objective, or its optimiser failed), and the
        optimiser's error if it failed."""
        kept = int((self.individual.REFINED == 0).sum()) if "REFINED" in self.individual else 0
        return {"patients": len(self.individual), "kept_encoder_estimate": kept,
                "optimizer_failure": self.refine_failure or None}

    def save(self, run_dir) -> Path:
        """The population run (model.json, summary.json, ...) plus vae.pt (tensors only: loaded with
        ``weights_only=True``) and vae.json; individual.csv gains the latent columns and summary.json the
        "hybrid" section."""
        run = self.population.save(run_dir)
        buf = io.BytesIO()
        torch.save({"state": self.vae.state_dict(), "scale": scale_to_tensors(self.vae.scale)}, buf)
        atomic_write_bytes(run / "vae.pt", buf.getvalue())
        meta = {"format": HYBRID_FORMAT[0], "version": HYBRID_FORMAT[1], "form": self.vae.form_name,
                "latent_dim": self.latent_dim, "hidden": self.config.hidden,
                "n_features": int(self.vae.encoder.phi[0].in_features - 2), "joint": self.vae.joint,
                "n_shift": int(self.vae.log_shift.numel()), "l2_correction": self.vae.l2,
                "prior_weight": self.vae.prior_weight, "best_val": float(self.vae.best_val),
                "candidates": [c.to_dict() for c in self.candidates], "refine_failure": self.refine_failure,
                "config": asdict(self.config),
                "coverage": self.coverage.to_dict() if self.coverage is not None else None,
                "omega": [list(r) for r in self.omega] if self.omega is not None else None,
                "sigma": dict(self.sigma) if self.sigma is not None else None,
                "trained_log_shift": list(self.trained_log_shift) if self.trained_log_shift is not None else None}
        atomic_write_text(run / "vae.json", json.dumps(meta, indent=2))
        atomic_write_text(run / "individual.csv", self.individual.to_csv(index=False))
        atomic_write_text(run / "training.csv", self.training_curves().to_csv(index=False))
        if (run / "summary.json").is_file():
            summary = read_json(run / "summary.json")
            summary["hybrid"] = self.summary()
            atomic_write_text(run / "summary.json", json.dumps(summary, indent=2, default=float))
        write_manifest(run, self.population.run_files() + ("vae.pt", "vae.json", "individual.csv",
                                                                "training.csv"))
        return run

    @classmethod
    def load(cls, run_dir) -> "HybridFit":
        """The hybrid saved in ``run_dir``; the weights load with ``torch.load(weights_only=True)``."""
        run = Path(run_dir)
        if not (run / "vae.pt").is_file():
            raise HybridPKError(f"{run} holds no hybrid model (vae.pt); fit with --hybrid vae")
        ck = _load_weights(run / "vae.pt")          # a file holding code is refused before anything else
        meta = read_json(run / "vae.json")
        if (meta.get("format"), meta.get("version")) != HYBRID_FORMAT:
            raise HybridPKError(f"{run / 'vae.json'} is not a hybridpk hybrid-model file of format version "
                                f"{HYBRID_FORMAT[1]}; refit the model with this version of hybridpk")
        population = FittedPopulation.load(run)     # and checks every file against the manifest
        vae = HybridVAE(meta["n_features"], meta["latent_dim"], meta["hidden"], meta["joint"], meta["n_shift"],
                        meta["form"]).double()
        vae.load_state_dict(ck["state"])
        vae.scale = scale_from_tensors(ck["scale"])
        vae.l2, vae.prior_weight, vae.best_val = meta["l2_correction"], meta["prior_weight"], meta["best_val"]
        vae.eval()
        individual = pd.read_csv(run / "individual.csv") if (run / "individual.csv").is_file() else pd.DataFrame()
        cands = _candidates(meta)
        history = _read_curves(run / "training.csv", cands, vae.form_name, int(meta["latent_dim"]))
        return cls(population=population, vae=vae, config=TrainConfig(**meta["config"]), individual=individual,
                   history=history, candidates=cands, refine_failure=meta.get("refine_failure", ""),
                   coverage=TrainingCoverage.from_dict(meta.get("coverage")), omega=_omega_of(meta, population),
                   sigma=_sigma_of(meta, population),
                   trained_log_shift=tuple(meta["trained_log_shift"]) if meta.get("trained_log_shift") else None)

    def training_curves(self) -> pd.DataFrame:
        """Every training curve of the fit, one row per candidate and epoch: FORM, LATENT_DIM, EPOCH (0-based),
        TRAIN_NEG_ELBO and VAL_NEG_ELBO (per patient, training and held-out patients), CHOSEN (1 for the model
        kept). With form selection, the candidates that lost stop after their screening epochs."""
        cols = ["FORM", "LATENT_DIM", "EPOCH", "TRAIN_NEG_ELBO", "VAL_NEG_ELBO", "CHOSEN"]
        runs = ([(c.form, c.latent_dim, c.history, c.chosen) for c in self.candidates] if self.candidates
                else [(self.vae.form_name, self.latent_dim, self.history, True)])
        rows = [(f, k, int(e), float(t), float(v), int(chosen)) for f, k, hist, chosen in runs for e, t, v in hist]
        return pd.DataFrame(rows, columns=cols)


def _omega_of(meta: dict, population) -> tuple | None:
    """The hybrid's OMEGA from vae.json (None for runs saved before it was estimated); refused when its shape is
    not the model's."""
    found = meta.get("omega")
    if found is None:
        return None
    k = len(population.omega.etas)
    if len(found) != k or any(len(r) != k for r in found):
        raise HybridPKError(f"vae.json: the hybrid's OMEGA is not {k} x {k} (the model's ETAs); refit the model")
    return tuple(tuple(float(x) for x in r) for r in found)


def _sigma_of(meta: dict, population) -> dict | None:
    """The hybrid's residual error SDs from vae.json (None for runs saved before they were estimated); refused
    when they are not the model's error parameters or not positive numbers."""
    found = meta.get("sigma")
    if found is None:
        return None
    names = set(population.model.error.names)
    try:
        out = {str(k): float(v) for k, v in found.items()}
    except (AttributeError, TypeError, ValueError):
        out = None
    if out is None or set(out) != names or not all(v >= 0 and np.isfinite(v) for v in out.values()):
        raise HybridPKError(f"vae.json: the hybrid's residual error is not {sorted(names)} with SDs >= 0; refit")
    return out


def _candidates(meta: dict) -> list:
    """The candidates of a saved run (runs of version 2 before form selection: {latent_dim: score})."""
    found = meta.get("candidates") or []
    if isinstance(found, dict):
        return [Candidate(meta["form"], int(k), score=float(v), chosen=int(k) == meta["latent_dim"])
                for k, v in found.items()]
    return [Candidate.from_dict(c) for c in found]


def _read_curves(path: Path, cands: list, form: str, latent_dim: int) -> list:
    """The chosen model's history from training.csv (and each candidate's into ``cands``); [] for runs saved
    before the curves were kept."""
    if not path.is_file():
        return []
    table = pd.read_csv(path)

    def curve(rows):
        return [(int(e), float(t), float(v)) for e, t, v in rows[["EPOCH", "TRAIN_NEG_ELBO", "VAL_NEG_ELBO"]]
                .itertuples(index=False)]

    for c in cands:
        c.history = curve(table[(table.FORM == c.form) & (table.LATENT_DIM == c.latent_dim)])
    return curve(table[(table.FORM == form) & (table.LATENT_DIM == latent_dim) & (table.CHOSEN == 1)])


def _load_weights(path: Path) -> dict:
    """The tensors of a hybrid-model weights file, loaded without executing code (``weights_only=True``); a
    file that holds anything else (code, or not a torch file at all) is refused as not a hybridpk file."""
    import pickle
    import zipfile

    try:
        ck = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        what = ("it holds objects other than tensors (code could run when they are loaded)"
                if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in reason
                else "it is damaged or not a torch tensor file (truncated, or another kind of file)")
        raise HybridPKError(f"{path} is not a hybridpk model file: {what}, so it was not loaded "
                            f"({reason.split('. ')[0]}); refit the model rather than loading it") from None
    if not isinstance(ck, dict) or "state" not in ck or "scale" not in ck:
        raise HybridPKError(f"{path} is not a hybridpk model file (no network state); refit the model")
    return ck


def _ode_only(population: FittedPopulation, dataset):
    """(ODE-only IndividualEstimates, their batch, IPRED (N, R) at the MAP ETAs) for ``dataset``: the fit's own
    EBEs when ``dataset`` is the data the population was fitted to (moved to the model's device), else a new
    estimate (the same code)."""
    rec = population.estimation
    est = rec.estimates if (rec is not None and rec.estimates is not None
                            and rec.data_sha256 == dataset.fingerprint()) else None
    est = est.to(population.device) if est is not None else population.estimate(dataset)
    b = est.problem.batch
    with torch.no_grad():
        p = population.individual_parameters(est.eta, est.problem.cov)
        ipred = simulate(population.model.structural, p, b).ipred
    return est, b, ipred


def _per_patient(hybrid: HybridFit, dataset, ode_fit):
    """The latent columns and per-patient fit statistics of ``individual``."""
    batch = ode_fit[1]
    pop = hybrid.population
    h = hybrid._estimate_from(ode_fit)
    out = hybrid.predict(dataset, estimates=h)
    obs, sd = batch.is_obs, pop.sigma.sd_tensors()

    def nll(pred):   # -2 log-likelihood
        return 2 * gaussian_nll(batch, pred, obs, hybrid.error, sd, hybrid.vae.variance_floor(hybrid.error, sd))

    def rmse(pred):
        n = obs.sum(1).clamp(min=1)
        return torch.sqrt(torch.where(obs, (batch.dv - pred) ** 2, torch.zeros_like(pred)).sum(1) / n)

    nll_o, nll_h = nll(out.ode), nll(out.hybrid)
    cols = {**{f"Z{j + 1}": h.z[:, j].cpu().numpy() for j in range(h.z.shape[1])},
            **{f"Z{j + 1}_SD": h.z_sd[:, j].cpu().numpy() for j in range(h.z.shape[1])},
            "NLL_ODE": nll_o.cpu().numpy(), "NLL_HYBRID": nll_h.cpu().numpy(),
            "COMPLEXITY": (nll_o - nll_h).cpu().numpy(),
            "HYBRID_WEIGHT": h.weight.cpu().numpy(), "RMSE_ODE": rmse(out.ode).cpu().numpy(),
            "RMSE_HYBRID": rmse(out.ipred).cpu().numpy(), "REFINED": h.refined.cpu().numpy().astype(int)}
    return cols, h.refine_failure


def _predictive(fit, dataset, cands, config_of, null: bool = False):
    """The candidates' score for form selection: the predictive score of :mod:`.predictive` on the patients the
    training holds out (the same for every candidate); None (the held-out -ELBO) with one candidate, unless it is
    compared with the ODE model (``null``), or with none held out."""
    from .predictive import predictive_score, split_halves
    from .training import held_out_patients

    held = held_out_patients(dataset.n_subjects, config_of(cands[0]))
    if (len(cands) < 2 and not null) or len(held) == 0:
        return None
    ids = [dataset.ids[i] for i in held.tolist()]
    halves = split_halves(dataset, ids)

    def score(c, model):
        return predictive_score(HybridFit(population=fit, vae=model, config=config_of(c), individual=pd.DataFrame()),
                                dataset, ids, halves)

    return score


def _kept(score, folder: Path):
    """``score`` with each candidate's screening score kept beside its checkpoint (vae_{form}_k{K}.screen.json,
    with the checkpoint's fingerprint), so that a resumed selection uses the scores of the interrupted one: a
    winner interrupted while it continued resumes past its screening state, which scoring again would not see."""
    if score is None:
        return None

    def kept(c, model):
        if c.screen_score is not None:              # the winner at the end of its training: not kept
            return score(c, model)
        ck, side = folder / f"vae_{c.form}_k{c.latent_dim}.pt", folder / f"vae_{c.form}_k{c.latent_dim}.screen.json"
        fingerprint = torch.load(ck, weights_only=True)["fingerprint"] if ck.is_file() else None
        if fingerprint is not None and side.is_file():
            try:
                saved = json.loads(side.read_text())
                if saved.get("fingerprint") == fingerprint and saved.get("epochs") == c.screen_epochs:
                    return float(saved["score"])
            except (ValueError, KeyError, TypeError):
                pass                                # a damaged record: score again
        value = score(c, model)
        if fingerprint is not None:
            atomic_write_text(side, json.dumps({"fingerprint": fingerprint, "epochs": c.screen_epochs,
                                                "score": value}))
        return value

    return kept


def require_hybrid_support(pm, dataset=None) -> None:
    """Refuse a model the hybrid does not extend: a $PRED model (no compartments, no doses to drive a
    correction) and a residual error whose SD reads ETAs (a general $ERROR's H; one written with THETAs and
    data items is evaluated: :class:`~hybridpk.residual.objective.BoundError`); with ``dataset``
    also a $PK that reads data items changing within its subjects (e.g. occasions of inter-occasion
    variability), whose parameters change in time, which the hybrid does not follow, and censored observations
    (M3), which its training does not evaluate. Called before the
    population fit, so that a refused run costs no fit."""
    from ..errors import ModelError

    if getattr(pm.structural, "given_per_record", False):
        raise ModelError("the hybrid extends compartmental models; a $PRED model gives its predictions record by "
                         "record, with no doses or compartments for the correction to act on")
    if pm.error.kind == "general" and set(pm.error.h.reads) & set(pm.etas):
        raise ModelError("the residual error's SD reads ETAs (e.g. W*EXP(ETA(k)) in $ERROR), which the hybrid's "
                         "likelihood does not follow as the ETAs move in training; the hybrid takes residual SDs "
                         "written with THETAs and data items (W = SQRT(THETA(5)**2 + (THETA(6)*IPRED)**2))")
    if dataset is not None and pm.record_items:
        pm.require_per_subject(dataset.to_batch(covariates=list(pm.covariates)), "the hybrid (VAE) model")
    if dataset is not None:
        require_uncensored(dataset, "training", "fit without --hybrid")


def require_uncensored(dataset, use: str, other: str) -> None:
    """Refuse censored observations (BLQ, CENS, below an LLOQ column) for the hybrid's ``use``: the population
    fit takes them by M3, the hybrid's likelihood would read them as levels measured at the limit."""
    from ..errors import ModelError

    censored = dataset.n_censored_observations
    if censored:
        raise ModelError(f"the data have {censored} censored observation(s) (BLQ, CENS, below an LLOQ column, or where "
                         f"a control stream's F_FLAG is 1), which the population model takes by M3 but the hybrid's "
                         f"{use} would read as levels measured at the limit; set MDV=1 on them to leave them out, or "
                         f"{other}")


def fit_hybrid(pm, dataset, *, latent_dim=None, config: TrainConfig | None = None, seed: int = 0,
               progress: bool = True, population: FittedPopulation | None = None,
               checkpoint_dir=None) -> HybridFit:
    """Fit the population ODE model (FOCE-I), then the VAE on its individual predictions.

    ``latent_dim`` an int, or "auto": 1, 2 and 4 are tried; None: the config's (default 2). With the config's form
    "auto" (the default) the forms that suit the structural model are tried (input, reservoir, elimination and log
    on a linear model with joint training; log otherwise). Of the candidates (every form with every latent
    dimension) the best predictive score on the held-out patients wins (:mod:`hybridpk.residual.predictive`,
    :mod:`hybridpk.residual.selection`: each is screened for
    ``config.screen_epochs`` epochs, then the best is trained to the end). ``population`` an existing fit of ``pm``
    on ``dataset`` (skips the ODE fit and reuses its EBEs). ``checkpoint_dir``: a folder for the checkpoints of the
    FOCE-I fit (foce.json) and of each training (vae_{form}_k{K}.pt); what is there is resumed (see
    :func:`train_vae`), so that an interrupted call repeated with the same arguments ends with the result of an
    uninterrupted one.
    """
    require_hybrid_support(pm, dataset)
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fit = population or fit_population(pm, dataset, seed=seed, progress=progress,
                                       checkpoint=ck / "foce.json" if ck is not None else None)
    fit = fit.to("cpu")     # the hybrid is put together on the CPU; its networks train on config.device
    ode_fit = _ode_only(fit, dataset)
    est, batch, ipred = ode_fit
    base = config or TrainConfig()
    sd = fit.sigma.sd_tensors()
    baseline = ODEBaseline(fit)
    cands = candidates(base.form, latent_dim, base.latent_dim, base.joint, baseline.structural.linear)

    def config_of(c, **extra):
        return TrainConfig(**{**asdict(base), "latent_dim": c.latent_dim, "form": c.form, "seed": seed,
                              "progress": progress, **extra})

    with tempfile.TemporaryDirectory(prefix="hybridpk-") as tmp:
        where = ck if ck is not None else Path(tmp)

        def null(k):       # the ODE model itself, which every trained correction must beat
            return null_model(batch, ipred, config_of(Candidate("none", k)), baseline if base.joint else None)

        def train(c, epochs):
            if c.form == "none":      # a refit of a run whose hybrid is the ODE model: nothing to train
                return null(c.latent_dim), []
            # several candidates resume from their own checkpoints (the screening's winner continues from it)
            path = (str(where / f"vae_{c.form}_k{c.latent_dim}.pt") if ck is not None or len(cands) > 1
                    else base.checkpoint)
            return train_vae(batch, ipred, hybrid_error(fit, 0.0), sd, config_of(c, epochs=epochs, checkpoint=path),
                             baseline=baseline if base.joint else None, eta0=est.eta if base.joint else None,
                             sigma_fixed=fit.model.sigma_fixed)

        model, hist, chosen = select(cands, train, base.epochs, base.screen_epochs, base.warmup_epochs,
                                     score=_kept(_predictive(fit, dataset, cands, config_of, base.form == "auto"),
                                                 where),
                                     null=null if base.form == "auto" else None)
    # the run does not depend on where its training was checkpointed, nor over how many processes it ran
    cfg = config_of(chosen, checkpoint=None, distributed=False)
    omega = sigma = None
    trained = tuple(float(v) for v in model.log_shift.detach())      # before the ITS's THETA step moves them
    if base.its_iterations > 0 and base.joint and fit.model.n_eta and chosen.form != "none":
        trained_sd = {k: torch.tensor(v, dtype=torch.float64) for k, v in model.trained_sd.items()}   # train_vae's
        matrix, sigma, _ = its_omega(model, fit, batch, ipred, est.eta, hybrid_error(fit, model.scale["c0"]),
                                     trained_sd, iterations=base.its_iterations)
        omega = tuple(tuple(float(x) for x in row) for row in matrix.tolist())
    draft = HybridFit(population=fit, vae=model, config=cfg, individual=pd.DataFrame(), omega=omega, sigma=sigma,
                      trained_log_shift=trained)
    ind = fit.estimation.individual.copy() if fit.estimation is not None else pd.DataFrame({"ID": list(dataset.ids)})
    cols, failure = _per_patient(draft, dataset, ode_fit)
    for name, values in cols.items():
        ind[name] = values
    z = torch.as_tensor(np.stack([cols[f"Z{j + 1}"] for j in range(model.latent_dim)], 1))
    z_sd = torch.as_tensor(np.stack([cols[f"Z{j + 1}_SD"] for j in range(model.latent_dim)], 1))
    return replace(draft, individual=ind, history=hist, candidates=cands if len(cands) > 1 else [],
                   refine_failure=failure, coverage=TrainingCoverage.from_training(batch, z, z_sd))
