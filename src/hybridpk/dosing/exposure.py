"""The exposure a patient already had: the AUC of the given dosing history over any window.

The AUC (mg*h/L) of the concentration over [start, end] h is integrated by composite Simpson's rule on
segments split at every dose time and infusion end in the window (the concentration is smooth within each,
and each segment's ends are taken 1e-9 h inside it: the one-sided limits where a bolus makes it jump),
each with steps of at most ``STEP_H``; no further dose is assumed after the history (a window beyond the last
record is a forecast of the washout). The MAP value and the posterior median and 90% interval over the
patient's posterior draws, as for every other dosing answer.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import HybridPKError
from .model import dosing_model

__all__ = ["auc", "STEP_H"]

#: the largest Simpson step (h)
STEP_H = 0.02
#: how far inside a segment its end nodes are taken (h): the one-sided limits at a dose
EDGE_H = 1e-9


def auc(model, dataset, start: float | None = None, end: float | None = None, *, n_samples: int | None = None,
        seed: int = 0, posterior=None) -> dict:
    """AUC (mg*h/L) of the patient's concentration from ``start`` to ``end`` (h; defaults: the first dose and
    the last record), with the doses of the history and no more: ``map`` (at the MAP estimate), ``median``,
    ``p05``, ``p95`` over the posterior draws, and the window."""
    from .recommend import estimate_patient

    model = dosing_model(model)
    df = dataset.to_dataframe()
    doses = df[df.EVID.isin([1, 4])]
    t0 = float(doses.TIME.min()) if len(doses) else float(df.TIME.min())
    a, b = _window(t0 if start is None else start, float(df.TIME.max()) if end is None else end)
    post = posterior or estimate_patient(model, dataset, n_samples, seed)
    est = post.estimate
    grid, weights = _simpson(_breakpoints(est.batch, a, b))
    points = torch.cat([est.eta[:1], post.draws])
    batch = est.batch.extend(None, grid)
    conc = est.concentrations(batch.select([0] * points.shape[0]), points)[:, -len(grid):]
    values = (conc * torch.as_tensor(weights, dtype=conc.dtype)).sum(1).numpy()
    draws = values[1:]
    return {"start_h": a, "end_h": b, "map": float(values[0]), "median": float(np.median(draws)),
            "p05": float(np.quantile(draws, 0.05)), "p95": float(np.quantile(draws, 0.95)),
            "warnings": list(post.warnings) + model.design_warnings(est, until=b)}


def _window(start, end) -> tuple:
    try:
        a, b = float(start), float(end)
    except (TypeError, ValueError):
        a = b = math.nan
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise HybridPKError(f"AUC window {start!r} to {end!r}: give finite times (h) with start < end "
                            "(defaults: the first dose and the last record)")
    return a, b


def _breakpoints(batch, a: float, b: float) -> np.ndarray:
    """The window's ends and every dose time and infusion end strictly inside it (h), sorted."""
    mask = batch.dose_mask[0]
    t = batch.dose_time[0][mask].numpy()
    dur = batch.dose_duration[0][mask].numpy()
    rate = batch.dose_rate[0][mask].numpy()
    amt = batch.dose_amt[0][mask].numpy()
    ends = t + np.where(dur > 0, dur, np.where(rate > 0, amt / np.where(rate > 0, rate, 1.0), 0.0))
    inner = np.concatenate([t, ends])
    return np.unique(np.concatenate([[a, b], inner[(inner > a) & (inner < b)]]))


def _simpson(cuts: np.ndarray):
    """(nodes, weights) of composite Simpson's rule on each segment between ``cuts``, steps <= STEP_H."""
    nodes, weights = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        m = max(2, 2 * math.ceil((hi - lo) / (2 * STEP_H)))
        x = np.linspace(lo, hi, m + 1)
        # a bolus makes the concentration jump at a cut: each segment takes its own one-sided limit
        x[0], x[-1] = lo + EDGE_H, hi - EDGE_H
        w = np.full(m + 1, 2.0)
        w[1::2] = 4.0
        w[0] = w[-1] = 1.0
        nodes.append(x)
        weights.append(w * (hi - lo) / (3 * m))
    return np.concatenate(nodes), np.concatenate(weights)
