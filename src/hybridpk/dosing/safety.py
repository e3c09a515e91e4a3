"""Clinical-honesty checks: warnings that travel with every estimate and recommendation, and refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import HybridPKError
from .constraints import record_doses


def with_covariate_defaults(model, dataset):
    """(``dataset`` with the model's covariates as the model names them, warnings saying what was taken). A
    covariate whose column differs from the model's name only in case is read under the model's name (a
    control stream names its columns in $INPUT, so its $DATA's header may say wt where $PK reads WT:
    metrumresearchgroup/bbr's acop data). The model's ``covariate_defaults`` (a published spec's [defaults],
    e.g. DIAL = 0) are filled in for the covariates the file lacks, the only values ever filled in; any other
    missing covariate is refused by :func:`check_patient`."""
    defaults = getattr(model.population, "covariate_defaults", {}) or {}
    df = dataset.to_dataframe()
    by_case = {str(col).upper(): col for col in df.columns}    # unique: the reader refuses wt beside Wt
    renamed = {by_case[c.upper()]: c for c in model.covariates if c not in df.columns and c.upper() in by_case}
    df = df.rename(columns=renamed)
    missing = {c: v for c, v in defaults.items() if c in model.covariates and c not in df.columns}
    if not missing and not renamed:
        return dataset, []
    covariates = [renamed.get(c, c) for c in dataset.covariates] + list(missing)
    filled = dataset.with_records(df.assign(**missing), covariates=covariates)
    return filled, ([f"column {old} read as the model's covariate {new} (the names differ only in case)"
                     for old, new in renamed.items()]
                    + [f"{c} is not in the patient file: taken as {v:g}, the model's default (give the column if "
                       "that is not right)" for c, v in missing.items()])


def check_patient(model, df: pd.DataFrame) -> list[str]:
    """Warnings about one patient's data (and the model's own caveats); raises HybridPKError when the data
    cannot be used."""
    warnings = list(model.notes)
    if df["ID"].nunique() != 1:
        raise HybridPKError(f"the patient file holds {df['ID'].nunique()} IDs; give one patient per file")
    missing = [c for c in model.covariates if c not in df.columns]
    if missing:
        raise HybridPKError(f"model {model.name} needs covariate(s) {', '.join(missing)} in the patient file")
    doses = df[df.EVID.isin([1, 4])]
    levels = df[(df.EVID == 0) & (df.MDV == 0)]
    if doses.empty and (levels.DV > 0).any():
        raise HybridPKError("the patient file has drug levels but no dose record; give the dosing history")
    if doses.empty:
        warnings.append("no dose given yet: the a-priori dose, from the covariates and the population model "
                        "alone; measure levels after the first doses and re-estimate")
    for c, (lo, hi) in model.ranges.items():
        if c in df.columns:
            out = df[c][(df[c] < lo) | (df[c] > hi)]
            if len(out):
                v = float(out.iloc[0])
                warnings.append(f"covariate {c} = {v:g} is outside the population the model was built on "
                                f"({lo:g}-{hi:g}); predictions are extrapolations")
    occasion = getattr(model, "occasion", None)
    if occasion is not None and occasion in df.columns:
        last = int(df.sort_values("TIME", kind="stable")[occasion].iloc[-1])
        warnings.append(f"occasions ({occasion}) {', '.join(f'{v:g}' for v in sorted(df[occasion].unique()))} in the "
                        f"patient's records, each with its own IOV estimate; the forecast and the regimen ahead are "
                        f"occasion {last + 1}, whose IOV is unknown (0 at the MAP, drawn from its OMEGA in intervals)")
    for c in model.covariates:
        if c in df.columns and df[c].nunique() > 1 and c != occasion:
            last = df.sort_values("TIME", kind="stable").iloc[-1]
            warnings.append(f"covariate {c} changes within the patient's records ({df[c].iloc[0]:g} to {last[c]:g}): "
                            f"the history is predicted with each record's value, the forecast and the regimen with "
                            f"the last one ({c} = {last[c]:g} at {last.TIME:g} h)")
    obs = df[(df.EVID == 0) & (df.MDV == 0)]
    t0 = doses.TIME.min() if len(doses) else np.inf
    early = obs[(obs.TIME < t0) & (obs.DV > 0)] if len(doses) else obs.iloc[:0]
    if len(early):
        warnings.append(f"{len(early)} level(s) measured before the first recorded dose are positive; is a dose "
                        "missing from the history?")
    if (obs.DV < 0).any():
        raise HybridPKError("negative concentrations in DV; correct the levels")
    if len(obs) == 0 and len(doses):
        warnings.append("no drug levels: the estimate is the population (a priori) prediction from covariates")
    elif len(obs) == 1:
        warnings.append("a single drug level: the individual estimate leans heavily on the prior")
    return warnings


def check_levels(est, index: int = 0, n_draws: int = 2000, seed: int = 0) -> list[str]:
    """Implausible levels (outside the 0.05-99.95% range of the prior predictive distribution, with a 20%
    margin) and parameters the levels barely inform (posterior SD > 80% of the prior SD). ``est`` a
    PatientEstimate (its model's prior: OMEGA, and for a hybrid also the latent prior)."""
    import torch

    model = est.model
    warnings = []
    obs = est.obs[0]
    if bool(obs.any()) and est.eta.shape[1]:
        gen = torch.Generator().manual_seed(seed)
        points = model.prior_points(n_draws, gen)
        copies = est.batch.select([0] * n_draws)
        full = est.concentrations(copies, points)
        f = full[:, obs]
        sdev = torch.sqrt(model.residual_variance(copies, points, full)[:, obs])
        draws = f + sdev * torch.randn(f.shape, generator=gen, dtype=f.dtype, device="cpu").to(f.device)
        hi = torch.quantile(draws, 0.9995, 0) * 1.2
        lo = torch.quantile(draws, 0.0005, 0) / 1.2
        y = est.y[0][obs]
        bad = (y > hi) | ((y < lo) & (lo > 0))
        if bool(bad.any()):
            times = est.batch.time[0][obs][bad].tolist()
            warnings.append(f"{int(bad.sum())} level(s) (at t = {', '.join(f'{t:g}' for t in times)} h) are far "
                            "outside what the model predicts for this patient (beyond the 99.9% prior predictive "
                            "range); check sampling times, units and the dosing history")
    shr = est.shrinkage()[0]          # posterior variance / prior variance
    high = [name for name, s in zip(model.population.model.etas, shr) if s > 0.8 ** 2]
    if high:
        warnings.append(f"the levels barely inform {', '.join(high)} (posterior SD > 80% of prior SD); the "
                        "estimate is close to the population value")
    return warnings


#: a recommended dose more than this many times the largest dose in the patient's record (or less than the
#: smallest divided by it) is named: the levels were measured under the record's doses, and a target reached only
#: far from them usually means an interval or target that does not suit the drug (e.g. a trough target at 24 h for
#: a drug with a half-life of an hour: meropenem gets 1.1e7 mg every 24 h)
RECORD_FACTOR = 5.0


def check_dose_against_record(dose: float, df: pd.DataFrame) -> list[str]:
    """A warning when the recommended ``dose`` (mg) is more than :data:`RECORD_FACTOR` times the largest dose of
    the patient's record ``df`` (EVID 1/4 records with AMT > 0), or below the smallest divided by it."""
    given = record_doses(df)
    if given.empty or not np.isfinite(dose) or dose <= 0:
        return []
    high, low = float(given.max()), float(given.min())
    if dose > RECORD_FACTOR * high:
        return [f"the recommended dose ({dose:g} mg) is {dose / high:.3g} times the largest dose in the patient's "
                f"record ({high:g} mg), far from the doses the levels were measured under; check the target, the "
                "interval and that such doses lie in the model's range"]
    if dose < low / RECORD_FACTOR:
        return [f"the recommended dose ({dose:g} mg) is {low / dose:.3g} times smaller than the smallest dose in the "
                f"patient's record ({low:g} mg); check the target and the interval"]
    return []


def check_dose(dose: float, max_dose: float | None) -> list[str]:
    """Warnings about the recommended dose itself (capped, or no positive dose)."""
    out = []
    if max_dose is not None and dose >= max_dose:
        out.append(f"the recommended dose is capped at the maximum dose {max_dose:g} mg")
    if not np.isfinite(dose) or dose <= 0:
        out.append("no positive dose reaches the target")
    return out
