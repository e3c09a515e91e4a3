"""A hybrid's predictive score on held-out patients: how well it predicts levels it has not seen.

The held-out -ELBO scores a patient's observations at the z (and ETAs) estimated from those same observations,
so a flexible correction that follows each patient's samples scores well even where it is wrong between them
(on benchmarks/vae_ehc.py seed 1 the log form had the better held-out -ELBO, -15.67 against the reservoir's
-15.57, and 1.55x the reservoir's RMSE against the true curves). The predictive score is cross-validation within
each held-out patient: its observations are split into two halves (alternate samples in time), the patient is
estimated from one half (:meth:`HybridFit.estimate`, the same per-patient MAP as any prediction) and the other half
is scored, -2 log-likelihood under the residual-error model, then the halves swap. Its mean per observation is
what form selection compares (:mod:`hybridpk.residual.selection`).
"""

from __future__ import annotations

import torch

from .objective import gaussian_nll

__all__ = ["predictive_score", "split_halves"]


def split_halves(dataset, ids) -> tuple:
    """(A, B, full): the patients ``ids`` of ``dataset`` with every other observation kept (A: the 1st, 3rd, ...,
    B: the 2nd, 4th, ...; the others become MDV=1 records), and all their records."""
    df = dataset.to_dataframe()
    df = df[df.ID.isin(list(ids))].reset_index(drop=True)
    obs = (df.EVID == 0) & (df.MDV == 0)
    rank = obs.groupby(df.ID, sort=False).cumsum()            # 1, 2, ... along each patient's observations
    halves = []
    for keep in (1, 0):
        part = df.copy()
        part.loc[obs & (rank % 2 != keep), "MDV"] = 1
        halves.append(dataset.with_records(part))
    return halves[0], halves[1], dataset.with_records(df)


def predictive_score(hybrid, dataset, ids, halves=None) -> float:
    """Mean -2 log-likelihood (without the constant) per observation of the patients ``ids`` of ``dataset``, each
    half of a patient's observations predicted by ``hybrid`` (a HybridFit) from the other half. ``halves``: the
    :func:`split_halves` of ``dataset`` and ``ids``, when already made (one split for every candidate)."""
    a, b, full = halves if halves is not None else split_halves(dataset, ids)
    pop = hybrid.population
    sd = pop.sigma.sd_tensors()
    error = hybrid.error
    floor = hybrid.vae.variance_floor(error, sd)
    total, count = 0.0, 0
    for given, scored in ((a, b), (b, a)):
        out = hybrid.predict(given, design=full)
        mask = _observations_of(scored, out.batch)
        total += float(2 * gaussian_nll(out.batch, out.ipred, mask, error, sd, floor).sum())
        count += int(mask.sum())
    return total / max(count, 1)


def _observations_of(scored, batch) -> torch.Tensor:
    """The (N, R) mask of ``batch`` (all records of the same patients, in the same row order) that holds the
    observations of ``scored``."""
    df = scored.to_dataframe()
    observed = torch.tensor(((df.EVID == 0) & (df.MDV == 0)).to_numpy().copy())
    return batch.record_mask & batch.is_obs & observed[batch.row.clamp(min=0)]
