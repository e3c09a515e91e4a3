"""The frozen result of a population fit, and how it is written to a run folder and read back safely."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import HybridPKError
from ..io import atomic_write_text, run_metadata

__all__ = ["FitResult", "ConvergenceWarning"]


class ConvergenceWarning(UserWarning):
    """The estimation or its covariance step did not converge; results are reported but need care."""


@dataclass(frozen=True)
class FitResult:
    """Everything a fit produced (immutable).

    Attributes
    ----------
    ofv : float  objective function value (-2 log-likelihood without the constant; NONMEM's OFV)
    method : str  "FOCE-I"
    converged : bool; message : str; iterations, evaluations : int; seconds : float
    parameters : dict  THETA name -> {"estimate", "se", "rse"} on the natural scale
    omega : dict  ETA name -> {"variance", "se", "cv_percent"}
    omega_covariance : dict  "ETA_A,ETA_B" -> {"covariance", "se", "correlation"} (block OMEGA only)
    sigma : dict  residual SD name (ADD, PROP) -> {"estimate", "se", "variance"}
    shrinkage : dict  {"eta": {ETA: %}, "epsilon": %}
    individual : DataFrame  ID, ETA_*, individual parameters
    predictions : DataFrame  ID, TIME, DV, PRED, IPRED, CWRES, IWRES, MDV (every record)
    """

    ofv: float
    method: str
    converged: bool
    message: str
    iterations: int
    evaluations: int
    seconds: float
    parameters: dict
    omega: dict
    sigma: dict
    shrinkage: dict
    individual: pd.DataFrame = field(repr=False)
    predictions: pd.DataFrame = field(repr=False)
    n_subjects: int = 0
    n_observations: int = 0
    seed: int = 0
    warnings: tuple = ()
    spec: dict = field(default_factory=dict, repr=False)
    omega_covariance: dict = field(default_factory=dict)
    omega_matrix: tuple = ()

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, pm, dataset, theta, omega, sd, eta, ofv, converged, message, iterations, evaluations,
              cov_natural, pack, diagnostics, seed, seconds, warnings):
        se = np.sqrt(np.clip(np.diag(cov_natural), 0, None)) if cov_natural is not None else None
        i = 0
        params = {}
        for t in pm.thetas:
            est = float(theta[t.name])
            s = None
            if not t.fixed and se is not None:
                s = float(se[i])
            if not t.fixed:
                i += 1
            params[t.name] = {"estimate": est, "se": s, "rse": (100 * s / abs(est)) if s and est else None,
                              "fixed": t.fixed}
        labels = getattr(pm, "labels", {}) or {}
        om = {}
        omega_names = labels.get("omega_names") or list(pm.etas)
        for j, name in enumerate(pm.etas):
            var = float(omega[j, j])
            s = float(se[i + j]) if se is not None else None
            om[omega_names[j]] = {"variance": var, "se": s, "cv_percent": 100 * math.sqrt(math.expm1(var)),
                                  "eta": name}
        i += pm.n_eta
        sig = {}
        nm_sigma = labels.get("sigma_names")   # NONMEM imports: SIGMA is the variance of EPS
        for j, name in enumerate(pack.sigma_names):
            est = float(sd[name])
            s = float(se[i + j]) if se is not None else None
            if nm_sigma:
                sig[nm_sigma[name]] = {"estimate": est * est, "se": 2 * est * s if s is not None else None,
                                       "sd": est, "type": name}
            else:
                sig[name] = {"estimate": est, "se": s, "variance": est * est}
        i += len(pack.sigma_names)
        om_cov = {}
        if getattr(pm, "omega_block", False):
            rows, cols = np.tril_indices(pm.n_eta, -1)
            for j, (r, c) in enumerate(zip(rows, cols)):
                cv = float(omega[r, c])
                s = float(se[i + j]) if se is not None else None
                corr = cv / math.sqrt(float(omega[r, r]) * float(omega[c, c]))
                om_cov[f"{pm.etas[c]},{pm.etas[r]}"] = {"covariance": cv, "se": s, "correlation": corr}
        ids = list(dataset.ids)
        ind = pd.DataFrame({"ID": ids})
        for j, name in enumerate(pm.etas):
            ind[name] = eta[:, j].numpy()
        b = dataset.to_batch(covariates=list(pm.covariates))
        cov = b.baseline_covariates()
        import torch

        with torch.no_grad():
            ipar = pm.individual(theta, eta, cov)
        for name, v in ipar.items():
            ind[name] = v.numpy()
        df = dataset.to_dataframe()
        pick = b.to_rows
        preds = pd.DataFrame({"ID": df.ID.to_numpy(), "TIME": df.TIME.to_numpy(), "DV": df.DV.to_numpy(),
                              "MDV": df.MDV.to_numpy(), "PRED": pick(diagnostics["pred"]),
                              "IPRED": pick(diagnostics["ipred"]), "CWRES": pick(diagnostics["cwres"]),
                              "IWRES": pick(diagnostics["iwres"])})
        spec = getattr(pm, "labels", {}).get("spec", {})
        return cls(ofv=float(ofv), method="FOCE-I", converged=converged, message=message, iterations=iterations,
                   evaluations=evaluations, seconds=seconds, parameters=params, omega=om, sigma=sig,
                   shrinkage=diagnostics["shrinkage"], individual=ind, predictions=preds,
                   n_subjects=dataset.n_subjects, n_observations=dataset.n_observations, seed=seed,
                   warnings=tuple(warnings), spec=dict(spec), omega_covariance=om_cov,
                   omega_matrix=tuple(tuple(float(v) for v in row) for row in omega.tolist()))

    # ------------------------------------------------------------------ output
    def summary(self) -> dict:
        """The content of summary.json."""
        return {
            "ofv": self.ofv, "method": self.method, "converged": self.converged, "message": self.message,
            "iterations": self.iterations, "function_evaluations": self.evaluations,
            "fit_seconds": round(self.seconds, 3), "parameters": self.parameters, "omega": self.omega,
            "sigma": self.sigma, "omega_covariance": self.omega_covariance, "shrinkage": self.shrinkage, "n_subjects": self.n_subjects,
            "n_observations": self.n_observations, "seed": self.seed, "warnings": list(self.warnings),
            **run_metadata(),
        }

    def save(self, run_dir) -> Path:
        """Write summary.json, individual.csv, predictions.csv and model.json (the fitted model as data:
        loading it never executes code) into ``run_dir``, each atomically."""
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "individual.csv", self.individual.to_csv(index=False))
        atomic_write_text(run / "predictions.csv", self.predictions.to_csv(index=False))
        model = {"format": "hybridpk-population-model", "version": 1, "spec": self.spec,
                 "theta": {k: v["estimate"] for k, v in self.parameters.items()},
                 "omega": [list(row) for row in self.omega_matrix],
                 "sigma_sd": {v.get("type", k): v.get("sd", v["estimate"]) for k, v in self.sigma.items()}}
        atomic_write_text(run / "model.json", json.dumps(model, indent=2))
        atomic_write_text(run / "summary.json", json.dumps(self.summary(), indent=2, default=_json_default))
        return run


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_model_file(run_dir) -> dict:
    """Read RUN/model.json (plain JSON: safe)."""
    path = Path(run_dir) / "model.json" if Path(run_dir).is_dir() else Path(run_dir)
    if not path.is_file():
        raise HybridPKError(f"{path} not found: expected a run folder written by 'hybridpk fit'")
    data = json.loads(path.read_text())
    if data.get("format") != "hybridpk-population-model":
        raise HybridPKError(f"{path} is not a hybridpk model file")
    return data
