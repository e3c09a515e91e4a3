"""Simulate a population: typical values + log-normal IIV (OMEGA) + residual error, on a dosing design.

Used to make datasets with known truth for tests, tutorials and parameter-recovery studies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..errors import ModelError
from ..models import get_model
from .device import resolve_device
from .simulate import simulate

__all__ = ["PopulationSimulation", "simulate_population", "simulate_population_chunks", "virtual_design",
           "make_design", "observe"]


@dataclass(frozen=True)
class PopulationSimulation:
    """``dataset``: the design with simulated DV; ``parameters``: ID + individual parameters (natural scale);
    ``etas``: ID + ETA_<name>; ``ipred``: noise-free concentrations at every record (ID, TIME, IPRED)."""

    dataset: object
    parameters: pd.DataFrame
    etas: pd.DataFrame
    ipred: pd.DataFrame
    seed: int


def simulate_population(model, design, typical: dict, omega: dict | None = None, *, proportional: float = 0.0,
                        additive: float = 0.0, covariates: dict | None = None, seed: int = 0,
                        method: str = "auto", correlation: dict | None = None,
                        stream: int | None = None, device="cpu") -> PopulationSimulation:
    """Simulate DV for every observation record of ``design`` (a Dataset).

    Parameters
    ----------
    model : str or CompartmentModel
    design : Dataset  dose records and sampling times (its DV values are replaced)
    typical : dict  typical values on the natural scale, e.g. {"CL": 5.0, "V": 50.0}
    omega : dict  IIV variances of log-normal ETAs, e.g. {"CL": 0.09} (30% CV); a parameter not listed has none
    proportional, additive : residual error SDs: DV = IPRED (1 + proportional eps1) + additive eps2
    covariates : dict  power covariate effects {param: (covariate, reference, exponent)}, e.g.
        {"CL": ("WT", 70.0, 0.75)}: P_i = typical (COV_i / reference)^exponent exp(ETA_i)
    seed : int  random seed (numpy Generator); the same seed gives the same dataset
    correlation : dict  correlations between ETAs, e.g. {("CL", "V"): 0.6} (default: independent)
    stream : int  an independent random stream of the same seed (the chunks of
        :func:`simulate_population_chunks`); None: the seed's own stream
    device : where the model is solved ("cpu", "cuda", "auto": :func:`~hybridpk.solve.device.resolve_device`);
        the random draws are made on the CPU (numpy), so the same seed gives the same population on any device,
        and the results come back to the CPU
    """
    model = get_model(model)
    omega = dict(omega or {})
    unknown = [k for k in list(typical) + list(omega) if k not in model.parameter_names]
    if unknown:
        raise ModelError(f"model {model.name} has no parameter(s) {', '.join(unknown)}")
    # a stream of its own (not the design's), so that a design and a simulation made with the same seed
    # do not draw the same random numbers (which would correlate ETAs with covariates or sampling times)
    rng = np.random.default_rng([int(seed), 0x51] + ([int(stream)] if stream is not None else []))
    ids = design.ids
    n = len(ids)
    design.require_constant_covariates([c for c, _, _ in (covariates or {}).values()], "simulate_population")
    base = design.to_dataframe()
    first = base.groupby("ID", sort=False).first().loc[list(ids)]
    params = {}
    etas = {}
    names = [p.name for p in model.parameters if omega.get(p.name, 0) > 0 and p.name in typical]
    cov = np.diag([omega[k] for k in names])
    for (a, b), rho in (correlation or {}).items():
        if a not in names or b not in names:
            raise ModelError(f"correlation between {a} and {b}: both need IIV (omega > 0)")
        i, j = names.index(a), names.index(b)
        cov[i, j] = cov[j, i] = rho * np.sqrt(omega[a] * omega[b])
    draws = rng.multivariate_normal(np.zeros(len(names)), cov, size=n, method="cholesky") if names else None
    for spec in model.parameters:
        if spec.name not in typical:
            continue
        value = np.full(n, float(typical[spec.name]))
        if covariates and spec.name in covariates:
            cov, ref, expo = covariates[spec.name]
            if cov not in first:
                raise ModelError(f"covariate {cov} is not in the design dataset")
            value = value * (first[cov].to_numpy(dtype=float) / ref) ** expo
        if spec.name in names:
            eta = draws[:, names.index(spec.name)]
            etas[f"ETA_{spec.name}"] = eta
            value = value * np.exp(eta)
        params[spec.name] = value
    ds, ipred = observe(model, design, params, rng, proportional=proportional, additive=additive, method=method,
                        device=device)
    par = pd.DataFrame({"ID": list(ids), **params})
    eta_df = pd.DataFrame({"ID": list(ids), **etas})
    return PopulationSimulation(dataset=ds, parameters=par, etas=eta_df, ipred=ipred, seed=seed)


def virtual_design(design, start: int, n: int):
    """``n`` virtual patients with IDs start + 1 .. start + n, patient i on the records (doses, sampling times,
    covariates) of the design's subject number i modulo the number of subjects, in the design's order: a
    design of one patient repeated, or of several template patients cycled."""
    from ..data.dataset import read_nonmem

    df = design.to_dataframe()
    ids = list(design.ids)
    groups = {sid: g for sid, g in df.groupby("ID", sort=False)}
    template = [groups[ids[(start + i) % len(ids)]] for i in range(min(n, len(ids)))]
    reps = -(-n // len(template))                     # ceil: whole passes over the templates, then cut
    rows = np.tile([len(g) for g in template], reps)[:n]   # records of each virtual patient
    block = pd.concat(template, ignore_index=True)
    out = pd.concat([block] * reps, ignore_index=True).iloc[:int(rows.sum())].copy()
    out["ID"] = np.repeat(np.arange(start + 1, start + n + 1), rows)
    return read_nonmem(out, covariates=list(design.covariates))


def simulate_population_chunks(model, design, n: int, typical: dict, omega: dict | None = None, *,
                               chunk: int = 10_000, seed: int = 0, **options):
    """Simulate ``n`` virtual patients on ``design`` (cycled, :func:`virtual_design`) ``chunk`` at a time, so
    that memory does not grow with ``n``: yields one :class:`PopulationSimulation` per chunk (IDs 1..n in
    order). ``options`` as :func:`simulate_population`. Chunk k draws from stream k + 1 of ``seed``: the same
    seed and chunk size give the same population; another chunk size gives another draw of it."""
    if int(n) < 1 or int(chunk) < 1:
        raise ModelError(f"the number of virtual patients ({n}) and the chunk size ({chunk}) must be at least 1")
    for k, start in enumerate(range(0, int(n), int(chunk))):
        part = virtual_design(design, start, min(int(chunk), int(n) - start))
        yield simulate_population(model, part, typical, omega, seed=seed, stream=k + 1, **options)


def observe(model, design, params: dict, rng, *, proportional: float = 0.0, additive: float = 0.0,
            method: str = "auto", decimals: int | None = None, device="cpu"):
    """Simulate DV = IPRED (1 + proportional eps1) + additive eps2 at the observation records of ``design``
    for individual parameters ``params`` {name: (N,) array, natural scale}, drawing eps from ``rng`` (a numpy
    Generator), the model solved on ``device`` (:func:`~hybridpk.solve.device.resolve_device`). Returns
    (Dataset with the simulated DV, noise-free ID/TIME/IPRED at every record)."""
    from ..data.dataset import read_nonmem

    batch = design.to_batch().to(resolve_device(device))
    pred = simulate(model, {k: torch.tensor(np.asarray(v, dtype=float), device=batch.time.device)
                            for k, v in params.items()}, batch, method=method)
    ipred = pred.to_dataframe(batch)
    conc = ipred["IPRED"].to_numpy()
    eps = rng.normal(size=(2, len(conc)))
    dv = conc * (1 + proportional * eps[0]) + additive * eps[1]
    if decimals is not None:
        dv = np.round(dv, decimals)
    out = design.simulated_records(dv)      # censored as the design's levels are
    return read_nonmem(out, covariates=list(design.covariates)), ipred


def make_design(n_subjects: int, doses: list[dict], times, *, covariates: dict | None = None,
                jitter: float = 0.0, seed: int = 0, obs_cmt: int = 0):
    """A NONMEM-style design Dataset: the same dose records for everyone, sampling ``times`` (h) per subject
    (each shifted by up to +/- ``jitter`` h, then sorted), covariates drawn by ``covariates`` =
    {name: callable(rng, n) -> values}.

    ``doses`` are dicts with TIME, AMT and optionally CMT, RATE, ADDL, II, SS.
    """
    from ..data.dataset import read_nonmem

    rng = np.random.default_rng([int(seed), 0xDE])
    cov_values = {k: np.asarray(f(rng, n_subjects), dtype=float) for k, f in (covariates or {}).items()}
    rows = []
    for i in range(n_subjects):
        t = np.asarray(times, dtype=float)
        if jitter:
            t = np.sort(np.clip(t + rng.uniform(-jitter, jitter, len(t)), 0.0, None))
        recs = []
        for d in doses:
            recs.append(dict(ID=i + 1, TIME=float(d["TIME"]), DV=0.0, AMT=float(d["AMT"]), EVID=1, MDV=1,
                             CMT=int(d.get("CMT", 0)), RATE=float(d.get("RATE", 0.0)), ADDL=int(d.get("ADDL", 0)),
                             II=float(d.get("II", 0.0)), SS=int(d.get("SS", 0)), _o=0))
        for tt in t:
            recs.append(dict(ID=i + 1, TIME=round(float(tt), 4), DV=0.0, AMT=0.0, EVID=0, MDV=0, CMT=obs_cmt,
                             RATE=0.0, ADDL=0, II=0.0, SS=0, _o=1))
        recs.sort(key=lambda r: (r["TIME"], r["_o"]))
        for r in recs:
            r.pop("_o")
            for k, v in cov_values.items():
                r[k] = v[i]
        rows += recs
    df = pd.DataFrame(rows)
    # drop duplicate sampling times that jitter/rounding may create
    obs = df.EVID == 0
    df = df[~(obs & df.duplicated(["ID", "TIME", "EVID"]))].reset_index(drop=True)
    return read_nonmem(df, covariates=list(cov_values))
