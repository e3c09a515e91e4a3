"""The record of an estimation run (what NONMEM's .lst, .ext, .phi and tables hold), kept with the fitted
model, written to and read back from a run folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import HybridPKError
from ..io import atomic_write_text, run_metadata

__all__ = ["Estimation", "ConvergenceWarning", "COVARIANCE_METHODS", "METHODS"]


class ConvergenceWarning(UserWarning):
    """The estimation or its covariance step did not converge; results are reported but need care."""


#: how each reported quantity is computed, as summary.json's "methods" states it (NONMEM users expect to know)
COVARIANCE_METHODS = {
    "sandwich": "R^-1 S R^-1 (the sandwich; NONMEM's default $COVARIANCE, nlmixr2's 'r,s'): R the Hessian of the "
                "OFV by central differences of its exact gradient, S the sum over subjects of the outer products "
                "of their OFV gradients",
    "R": "2 R^-1 (NONMEM's $COVARIANCE MATRIX=R): R the Hessian of the OFV by central differences of its exact "
         "gradient",
    "S": "4 S^-1 (NONMEM's $COVARIANCE MATRIX=S): S the sum over subjects of the outer products of their OFV "
         "gradients",
    "none": "not computed (no standard errors)",
}
METHODS = {
    "OFV": "-2 log-likelihood without the constant (as NONMEM reports it), by the approximation of the estimation "
           "method ('method': FOCE-I, FOCE, FO, LAPLACE-I or LAPLACE; Wang 2007)",
    "CWRES": "conditional weighted residuals (Hooker et al. 2007) as NONMEM's $TABLE writes them for a FOCE-I run: "
             "linearised at the EBE, residual variance at IPRED (with interaction), weighted by the symmetric "
             "inverse square root of each subject's covariance",
    "IWRES": "(DV - IPRED) / SD of the residual error at IPRED",
    "shrinkage": "ETA: 100 (1 - SD(EBE) / sqrt(OMEGA)), SD with divisor N over every subject; epsilon: "
                 "100 (1 - sqrt(mean(IWRES^2))) over every observation; ebv: 100 (1 - sqrt(1 - mean(ETC_ii / "
                 "OMEGA_ii))), ETC the inverse of half the first-order Hessian of each subject's objective; as "
                 "NONMEM 7.5.1's ETASHRINKSD, EPSSHRINKSD and EBVSHRINKSD (Savic & Karlsson 2009)",
    "etabar": "NONMEM's ETABAR: the mean of each ETA's EBEs, its SE = SD(EBE) / sqrt(N) (divisor N) and the two-sided "
              "normal P value of the null hypothesis that the true mean is 0",
}


@dataclass(frozen=True)
class Estimation:
    """How a population model was estimated and what came out besides the parameter tables.

    ``method`` "FOCE-I"; ``ofv`` -2 log-likelihood without the constant (NONMEM's OFV); ``converged``,
    ``message``, ``iterations``, ``evaluations``, ``seconds``; ``shrinkage`` {"eta": {ETA: %}, "epsilon": %,
    "ebv": {ETA: %}}; ``etabar`` {ETA: {"etabar", "se", "n", "p"}} (NONMEM's ETABAR, SE, N and P VAL; see
    :mod:`hybridpk.population.diagnostics`); ``individual`` DataFrame (ID, ETAs = EBEs, individual parameters);
    ``predictions`` DataFrame (ID, TIME, DV, MDV, PRED, IPRED, CWRES, IWRES for every record); counts, ``seed``,
    ``warnings`` and ``data_sha256`` (the fingerprint of the dataset it was fitted to); ``ebe_fallbacks`` EBE
    Newton steps that met a singular Hessian and took a gradient step; ``ebe_not_at_mode`` the IDs of the subjects
    whose EBE search ended away from a mode (IndividualEstimates.not_at_mode). ``evaluation_only``: NONMEM's
    MAXEVAL=0, nothing estimated (the OFV and EBEs at the initial estimates). ``covariance`` how the standard
    errors were computed (a key of ``COVARIANCE_METHODS``). ``derivatives``: how the OFV's gradients were
    computed, "analytic ..." (:mod:`hybridpk.population.analytic_focei`) or "automatic (torch): <why not
    analytic>". ``estimates``: the fitted patients' IndividualEstimates (in memory only; not saved).
    """

    method: str
    ofv: float
    converged: bool
    message: str
    iterations: int
    evaluations: int
    seconds: float
    shrinkage: dict
    individual: pd.DataFrame = field(repr=False)
    predictions: pd.DataFrame = field(repr=False)
    n_subjects: int = 0
    n_observations: int = 0
    seed: int = 0
    warnings: tuple = ()
    data_sha256: str = ""
    estimates: object = field(default=None, repr=False, compare=False)
    ebe_fallbacks: int = 0
    covariance: str = "none"
    evaluation_only: bool = False
    ebe_not_at_mode: tuple = ()
    derivatives: str = "automatic (torch)"
    etabar: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The estimation part of summary.json."""
        return {"ofv": self.ofv, "method": self.method, "converged": self.converged, "message": self.message,
                "iterations": self.iterations, "function_evaluations": self.evaluations,
                "fit_seconds": round(self.seconds, 3), "shrinkage": self.shrinkage, "etabar": self.etabar,
                "n_subjects": self.n_subjects, "n_observations": self.n_observations, "seed": self.seed,
                "warnings": list(self.warnings),
                "data_sha256": self.data_sha256, "ebe_fallbacks": self.ebe_fallbacks, "covariance": self.covariance,
                "evaluation_only": self.evaluation_only, "ebe_not_at_mode": list(self.ebe_not_at_mode),
                "derivatives": self.derivatives,
                "methods": {**METHODS, "covariance": COVARIANCE_METHODS.get(self.covariance, self.covariance)}}

    def save(self, run: Path, tables: dict) -> None:
        """Write individual.csv, predictions.csv and summary.json (this record, the parameter ``tables`` and
        the software versions), each atomically."""
        atomic_write_text(run / "individual.csv", self.individual.to_csv(index=False))
        atomic_write_text(run / "predictions.csv", self.predictions.to_csv(index=False))
        d = self.to_dict()
        summary = {**{k: d[k] for k in ("ofv", "method", "evaluation_only", "converged", "message", "iterations",
                                          "function_evaluations", "fit_seconds")},
                   **tables, **{k: d[k] for k in ("shrinkage", "etabar", "n_subjects", "n_observations", "seed",
                                                  "warnings", "data_sha256", "ebe_fallbacks", "ebe_not_at_mode",
                                                  "covariance", "derivatives", "methods")},
                   **run_metadata()}
        atomic_write_text(run / "summary.json", json.dumps(summary, indent=2, default=_json_default))

    @classmethod
    def load(cls, run: Path) -> "Estimation | None":
        """The record saved in ``run`` (None when the run holds no summary.json, e.g. a model written as data)."""
        path = run / "summary.json"
        if not path.is_file():
            return None
        s = read_json(path)
        try:
            return cls(method=s["method"], ofv=float(s["ofv"]), converged=bool(s["converged"]),
                       message=str(s.get("message", "")), iterations=int(s.get("iterations", 0)),
                       evaluations=int(s.get("function_evaluations", 0)), seconds=float(s.get("fit_seconds", 0.0)),
                       shrinkage=s.get("shrinkage", {}), etabar=s.get("etabar", {}),
                       individual=_read_csv(run / "individual.csv"),
                       predictions=_read_csv(run / "predictions.csv"), n_subjects=int(s.get("n_subjects", 0)),
                       n_observations=int(s.get("n_observations", 0)), seed=int(s.get("seed", 0)),
                       warnings=tuple(s.get("warnings", ())), data_sha256=str(s.get("data_sha256", "")),
                       ebe_fallbacks=int(s.get("ebe_fallbacks", 0)), covariance=str(s.get("covariance", "none")),
                       evaluation_only=bool(s.get("evaluation_only", False)),
                       ebe_not_at_mode=tuple(s.get("ebe_not_at_mode", ())),
                       derivatives=str(s.get("derivatives", "automatic (torch)")))
        except (KeyError, TypeError, ValueError) as exc:
            raise HybridPKError(f"{path} is damaged ({type(exc).__name__}: {exc}); refit the model") from None


def read_json(path: Path) -> dict:
    """A JSON object from ``path`` (plain data: loading it never executes code), or a clear error."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HybridPKError(f"cannot read {path} ({exc}); it is not a file written by hybridpk") from None
    if not isinstance(data, dict):
        raise HybridPKError(f"{path} is not a hybridpk file (expected a JSON object)")
    return data


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
