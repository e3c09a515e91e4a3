"""The fitted population model: one object from fit (or published spec) to prediction, estimation,
simulation and dosing, saved as plain data.

A :class:`FittedPopulation` is a :class:`~hybridpk.population.spec.PopulationModel` with fixed THETA, OMEGA
and SIGMA tables (:mod:`hybridpk.population.tables`), what is known about where it comes from (name,
citation, covariate ranges of its population) and, for a fit, its :class:`Estimation` record. It is what
``fit_population`` returns, what ``load_run`` reads back from a run folder and what ``load_model`` makes of a
published spec (models/*.toml); the hybrid model and the dosing functions build on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from ..errors import HybridPKError, ModelError
from ..io import atomic_write_text
from .estimates import IndividualEstimates, map_estimate
from .estimation import Estimation, read_json
from .manifest import read_manifest, write_manifest
from .predictions import Predictions
from .spec import PopulationModel, model_from_recipe
from .tables import OmegaTable, SigmaEstimate, SigmaTable, ThetaEstimate, ThetaTable

__all__ = ["FittedPopulation", "MODEL_FORMAT"]

#: model.json: "format" and "version" of the fitted-model file this hybridpk writes and reads
MODEL_FORMAT = ("hybridpk-population-model", 2)


def route_of(structural, dataset=None) -> str:
    """How a fit's data dosed the model, the route its dose recommendations default to: "oral" for a model
    that doses into a depot; otherwise "bolus" when every dose record of ``dataset`` is a bolus (RATE 0, no
    DUR), "infusion" when one is an infusion or no data are given. (A fit of a 2-cmt IV model to nlme's
    Indometh, boluses only, had ``hybridpk dose`` recommend 1-h infusions.)"""
    if structural.dose_cmt != structural.obs_cmt:
        return "oral"
    if dataset is None:
        return "infusion"
    doses = dataset.doses()
    doses = doses[doses["AMT"] > 0]
    infused = (doses["RATE"] != 0) | (doses["DUR"] > 0)
    return "infusion" if bool(infused.any()) or not len(doses) else "bolus"


@dataclass(frozen=True)
class FittedPopulation:
    """A population model with fixed population values.

    ``model`` the PopulationModel (structure, parameter map, covariates, error model); ``theta``,
    ``omega``, ``sigma`` the typed tables (scales stated in each); ``estimation`` the fit's record (None for a
    published spec); ``name``, ``citation``, ``ranges`` {covariate: (low, high)} of the population it was
    built on, ``route`` of dosing, ``units``, ``notes`` (caveats every estimate and recommendation repeats),
    ``covariate_defaults`` {covariate: value} taken for a patient whose file lacks the column (e.g. DIAL = 0,
    not on dialysis; the answer says so), ``dosing`` the regimen conventions a published model states (a
    spec's [dosing]: ``target`` e.g. "auc24=14.4:21.6", ``interval`` h, ``duration`` h of an infusion,
    ``dose_step`` and ``max_dose`` mg), which ``hybridpk dose`` takes when its flags are not given.
    ``device`` the torch device its predictions, estimates and simulations compute on (:meth:`to`; not saved:
    a run folder loads on the CPU).
    """

    model: PopulationModel = field(repr=False)
    theta: ThetaTable
    omega: OmegaTable
    sigma: SigmaTable
    estimation: Estimation | None = field(default=None, repr=False)
    name: str = "model"
    citation: str = ""
    ranges: dict = field(default_factory=dict)
    route: str = "infusion"
    units: dict = field(default_factory=dict)
    notes: tuple = ()
    covariate_defaults: dict = field(default_factory=dict)
    dosing: dict = field(default_factory=dict)
    device: str = field(default="cpu", repr=False, compare=False)

    def to(self, device) -> "FittedPopulation":
        """The same model computing on ``device`` ("cpu", "cuda", "cuda:1", "auto": see
        :func:`hybridpk.solve.device.resolve_device`): a patient's records, the ETAs and every intermediate
        stay there, in float64; tables and numbers come back to the CPU. The model itself when it is there
        already."""
        from ..solve.device import resolve_device, same_device

        device = resolve_device(device)
        return self if same_device(self.device, device) else replace(self, device=str(device))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_values(cls, pm: PopulationModel, theta: dict, omega, sd: dict, **info) -> "FittedPopulation":
        """From explicit population values: ``theta`` {name: value} (natural scale), ``omega`` the ETA
        variances as {parameter or ETA name: variance} (diagonal) or a (K, K) matrix, ``sd`` the residual
        SDs {"ADD": mg/L, "PROP": fraction}; ``info``: name, citation, ranges, route, units, notes,
        covariate_defaults, dosing."""
        th = ThetaTable(tuple(ThetaEstimate(t.name, float(theta[t.name]), fixed=t.fixed, unit=t.unit, label=t.label)
                              for t in pm.thetas))
        if isinstance(omega, dict):
            var = [float(omega[e] if e in omega else omega[e.removeprefix("ETA_")]) for e in pm.etas]
            matrix = tuple(tuple(v if i == j else 0.0 for j in range(len(var))) for i, v in enumerate(var))
        else:
            matrix = tuple(tuple(float(x) for x in row) for row in (omega.tolist() if torch.is_tensor(omega)
                                                                     else omega))
        om = OmegaTable(tuple(pm.etas), tuple(pm.omega_labels or pm.etas), matrix, None, pm.blocks)
        sig = SigmaTable(tuple(SigmaEstimate(kind, pm.sigma_labels.get(kind, kind), float(sd[kind]),
                                             scale=pm.sigma_scale) for kind in pm.error.names))
        return cls(model=pm, theta=th, omega=om, sigma=sig, **info)

    def starting_model(self) -> PopulationModel:
        """The model with this one's values as its initial estimates (THETA, OMEGA, residual SDs): to refit a
        published model (or an earlier fit) on new data from where it stands, as NONMEM users copy the final
        estimates of a run into the next one's $THETA/$OMEGA/$SIGMA."""
        from dataclasses import replace

        th = {r.name: r.value for r in self.theta.rows}
        thetas = tuple(replace(t, init=th[t.name]) for t in self.model.thetas)
        omega = self.omega.tensor()
        init = (tuple(float(v) for v in omega.diagonal()) if not self.model.omega_block
                else tuple(tuple(float(x) for x in row) for row in omega.tolist()))
        sd = {r.kind: r.sd for r in self.sigma.rows}
        error = replace(self.model.error, add=sd.get("ADD", self.model.error.add),
                        prop=sd.get("PROP", self.model.error.prop))
        return replace(self.model, thetas=thetas, omega_init=init, error=error)

    # ------------------------------------------------------------------ the model as a function
    @property
    def covariates(self) -> tuple:
        return tuple(self.model.covariates)

    def individual_parameters(self, eta, covariates: dict, every: bool = False) -> dict:
        """{parameter: (N,) tensor} on the natural scale for ETAs ``eta`` (N, K) and baseline covariates
        {name: (N,) tensor}: the structural model's parameters, and with ``every`` the model's own ones too (a
        spec's parameters from which structural ones are computed, e.g. CLIN for VMAX = CLIN KM)."""
        fn = (self.model.every_parameter if every else None) or self.model.individual
        return fn(self.theta.tensors(self.device), eta, covariates)

    def concentrations(self, batch, eta):
        """Concentrations (N, R) at every record of ``batch`` for ETAs ``eta`` (N, K) (covariates as the model
        reads them, see :meth:`PopulationModel.parameters`; NaN for a subject whose solve failed)."""
        from ..solve import simulate

        with torch.no_grad():
            p = self.model.parameters(self.theta.tensors(self.device), eta, batch)
            return simulate(self.model.structural, p, batch, throw=False, rule=self.model.covariate_rule).ipred

    # ------------------------------------------------------------------ the four verbs
    def estimate(self, dataset) -> IndividualEstimates:
        """MAP ETAs (EBEs) of every patient of ``dataset`` from its own observations, with their Laplace
        covariance (the fit's EBEs come from this same call). A control stream's M3 censors the levels it would
        censor in its own $DATA (:meth:`PopulationModel.read_levels`)."""
        dataset.require_units(self.units, self.name or "the model")
        return map_estimate(self, self.model.read_levels(dataset))

    def predict(self, dataset, estimates: IndividualEstimates | None = None) -> Predictions:
        """PRED (ETA = 0) and IPRED (MAP ETAs from each patient's observations; a patient without
        observations keeps ETA = 0) at every record of ``dataset``, in mg/L, with the ETAs; with censored levels
        (M3) also CENS (1 below the limit, -1 above it; their DV is the limit)."""
        est = estimates or self.estimate(dataset)
        prob = est.problem
        with torch.no_grad():
            theta = self.theta.tensors(self.device)
            pred = prob.predict(theta, torch.zeros_like(est.eta))
            ipred = prob.predict(theta, est.eta)
            if self.model.error.ltbs:   # log scale inside the fit; concentrations out
                pred, ipred = torch.exp(pred), torch.exp(ipred)
        b = prob.batch
        df = dataset.to_dataframe()
        table = pd.DataFrame({"ID": df.ID.to_numpy(), "TIME": df.TIME.to_numpy(), "DV": df.DV.to_numpy(),
                              "MDV": df.MDV.to_numpy(), "PRED": b.to_rows(pred), "IPRED": b.to_rows(ipred)})
        if bool(prob.cens.any()):   # M3: 1 below the limit, -1 above it (DV is the limit there)
            table.insert(4, "CENS", b.to_rows(torch.where(prob.above, -1, prob.cens.long())))
        idx = b.subject_of_rows()
        for j, name in enumerate(self.model.etas):
            table[name] = est.eta[idx, j].cpu().numpy()
        return Predictions(table=table, batch=b, pred=pred, ipred=ipred, estimates=est)

    def simulate(self, dataset, n: int = 1, seed: int = 0) -> pd.DataFrame:
        """``n`` replicates of the design of ``dataset`` (its doses, records and covariates): new ETAs from
        OMEGA, IPRED, and DV with the residual error at the observation records (0 elsewhere). Returns one
        row per replicate and record: REP (1..n), ID, TIME, EVID, MDV, IPRED, DV (mg/L) and the ETAs."""
        from .simulation import simulate_replicates

        self.require_simulation()
        dataset.require_units(self.units, self.name or "the model")
        return simulate_replicates(self, dataset, n, seed)

    def require_simulation(self) -> None:
        """Refuse to simulate a control stream that writes code for NONMEM's simulation step (IF (ICALL.EQ.4) ...:
        a truncation of simulated levels, a simulated event), which hybridpk's simulations (simulate, VPC, NPDE)
        would not run; its fit, predictions and dosing read the code NONMEM estimates with (ICALL = 2)."""
        where = self.model.recipe.get("simulation_code")
        if where:
            raise ModelError(f"{where}: the control stream has code for NONMEM's simulation step (ICALL.EQ.4), which "
                             "hybridpk's simulations do not run (they draw the levels from the error model NONMEM "
                             "estimates with); simulate in NONMEM, or remove that code to simulate here")

    # ------------------------------------------------------------------ persistence
    def tables_to_dict(self) -> dict:
        """The tables as summary.json reports them."""
        return {"parameters": self.theta.to_dict(), "omega": self.omega.to_dict(),
                "sigma": self.sigma.to_dict(), "omega_covariance": self.omega.covariances_to_dict()}

    #: the files of a run folder that :meth:`save` writes (without and with an estimation record)
    RUN_FILES = ("model.json",)
    FIT_FILES = ("summary.json", "individual.csv", "predictions.csv")

    def save(self, run_dir) -> Path:
        """Write model.json (the fitted model as plain data: loading it never executes code) and, for a fit,
        summary.json, individual.csv and predictions.csv into ``run_dir``, each atomically, then
        manifest.json with their sizes and SHA-256 (:func:`hybridpk.population.manifest.write_manifest`)."""
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        if self.estimation is not None:
            self.estimation.save(run, self.tables_to_dict())
        atomic_write_text(run / "model.json", json.dumps(self._model_json(), indent=2))
        write_manifest(run, self.run_files())
        return run

    def run_files(self) -> tuple:
        """The files :meth:`save` writes."""
        return self.RUN_FILES + (self.FIT_FILES if self.estimation is not None else ())

    def _model_json(self) -> dict:
        om = self.omega
        return {"format": MODEL_FORMAT[0], "version": MODEL_FORMAT[1], "model": self.model.recipe,
                "name": self.name, "citation": self.citation, "route": self.route, "units": self.units,
                "ranges": {k: list(v) for k, v in self.ranges.items()}, "notes": list(self.notes),
                "covariate_defaults": dict(self.covariate_defaults), "dosing": dict(self.dosing),
                "data_sha256": self.estimation.data_sha256 if self.estimation else None,
                "theta": [vars(r) for r in self.theta],
                "omega": {"etas": list(om.etas), "labels": list(om.labels), "blocks": [list(b) for b in om.blocks],
                          "matrix": [list(row) for row in om.matrix],
                          "se": None if om.se is None else [list(row) for row in om.se]},
                "sigma": [vars(r) for r in self.sigma]}

    @classmethod
    def load(cls, run_dir) -> "FittedPopulation":
        """The fitted model saved in ``run_dir`` (model.json, plus the estimation record if there is one),
        after checking every file against the run's manifest.json (a missing, truncated, edited or foreign
        file is refused by name)."""
        run = Path(run_dir)
        path = run / "model.json"
        if not path.is_file():
            raise HybridPKError(f"{path} not found: expected a run folder written by 'hybridpk fit'")
        data = read_json(path)
        if (data.get("format"), data.get("version")) != MODEL_FORMAT:
            raise HybridPKError(f"{path} is not a hybridpk model file of format version {MODEL_FORMAT[1]} "
                                f"(found {data.get('format')!r} version {data.get('version')!r}); refit the model "
                                "with this version of hybridpk")
        read_manifest(run)
        try:
            pm = model_from_recipe(data["model"])
            om = data["omega"]
            fitted = cls(model=pm, theta=ThetaTable(tuple(ThetaEstimate(**r) for r in data["theta"])),
                         omega=OmegaTable(tuple(om["etas"]), tuple(om["labels"]),
                                          tuple(tuple(float(x) for x in row) for row in om["matrix"]),
                                          None if om.get("se") is None else tuple(tuple(row) for row in om["se"]),
                                          tuple(tuple(int(i) for i in b) for b in om["blocks"])),
                         sigma=SigmaTable(tuple(SigmaEstimate(**r) for r in data["sigma"])),
                         estimation=Estimation.load(run), name=run.name,
                         citation=data.get("citation") or f"hybridpk fit {run}", ranges={
                             k: tuple(v) for k, v in (data.get("ranges") or {}).items()},
                         route=data.get("route", "infusion"), units=data.get("units") or {},
                         notes=tuple(data.get("notes") or ()),
                         covariate_defaults={k: float(v) for k, v in (data.get("covariate_defaults") or {}).items()},
                         dosing=dict(data.get("dosing") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise HybridPKError(f"{path} is damaged ({type(exc).__name__}: {exc}); refit the model") from None
        if ([t.name for t in fitted.theta] != list(pm.theta_names) or list(fitted.omega.etas) != list(pm.etas)
                or fitted.omega.blocks != pm.blocks):
            raise HybridPKError(f"{path}: the THETA/OMEGA tables do not match the model they belong to; refit")
        return fitted

    def with_estimation(self, estimation: Estimation) -> "FittedPopulation":
        return replace(self, estimation=estimation)
