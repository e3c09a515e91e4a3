"""The exposure a patient already had: the AUC of the given dosing history over any window.

The AUC (mg*h/L) of the concentration over [start, end] h is integrated by Gauss-Legendre quadrature (8
nodes per piece of at most 1 h) on segments split at every dose time and infusion end in the window (the
concentration is smooth within each; a bolus's jump falls between segments); no further dose is assumed
after the history (a window beyond the last record is a forecast of the washout). The MAP value and the
posterior median and 90% interval over the patient's posterior draws, as for every other dosing answer.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import HybridPKError
from .model import dosing_model

__all__ = ["auc", "time_above"]

#: the longest piece of the quadrature (h) and its number of Gauss-Legendre nodes
PIECE_H = 1.0
NODES = 8


def auc(model, dataset, start: float | None = None, end: float | None = None, *, n_samples: int | None = None,
        seed: int = 0, posterior=None) -> dict:
    """AUC (mg*h/L) of the patient's concentration from ``start`` to ``end`` (h; defaults: the first dose and
    the last record), with the doses of the history and no more: ``map`` (at the MAP estimate), ``median``,
    ``p05``, ``p95`` over the posterior draws, and the window."""
    from .recommend import estimate_patient

    model = dosing_model(model)
    a, b = _default_window(dataset, start, end)
    post = posterior or estimate_patient(model, dataset, n_samples, seed)
    est = post.estimate
    grid, weights = _quadrature(_breakpoints(est.batch, a, b, est))
    conc = _on_grid(post, grid)
    values = (conc * torch.as_tensor(weights, dtype=conc.dtype, device=conc.device)).sum(1).cpu().numpy()
    draws = values[1:]
    return {"start_h": a, "end_h": b, "map": float(values[0]), "median": float(np.median(draws)),
            "p05": float(np.quantile(draws, 0.05)), "p95": float(np.quantile(draws, 0.95)),
            "warnings": list(post.warnings) + model.design_warnings(est, until=b)}


def _default_window(dataset, start, end) -> tuple:
    """(start, end) h, defaults: the first dose (or record) and the last record; checked by :func:`_window`."""
    df = dataset.to_dataframe()
    doses = df[df.EVID.isin([1, 4])]
    t0 = float(doses.TIME.min()) if len(doses) else float(df.TIME.min())
    return _window(t0 if start is None else start, float(df.TIME.max()) if end is None else end)


def _on_grid(post, grid):
    """Concentrations (1 + S, len(grid)) at ``grid`` (h) with the history's doses only: row 0 at the MAP, then
    each posterior draw."""
    est = post.estimate
    points = torch.cat([est.eta[:1], post.draws])
    batch = est.batch.extend(None, grid)
    return est.concentrations(batch.select([0] * points.shape[0]), points)[:, -len(grid):]


def _window(start, end) -> tuple:
    try:
        a, b = float(start), float(end)
    except (TypeError, ValueError):
        a = b = math.nan
    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise HybridPKError(f"AUC window {start!r} to {end!r}: give finite times (h) with start < end "
                            "(defaults: the first dose and the last record)")
    return a, b


def _breakpoints(batch, a: float, b: float, est=None) -> np.ndarray:
    """The window's ends and every time strictly inside it where a dose starts or ends acting (h), sorted: with
    ``est`` (the patient's PatientEstimate), doses into the model's dose compartment start ALAG after their
    record and a RATE-given infusion lasts F AMT / RATE (NONMEM's rule), at the MAP's F and ALAG, so that no
    quadrature piece straddles the kink where a lagged oral dose starts."""
    mask = batch.dose_mask[0]
    t = batch.dose_time[0][mask].cpu().numpy()
    dur = batch.dose_duration[0][mask].cpu().numpy()
    rate = batch.dose_rate[0][mask].cpu().numpy()
    amt = batch.dose_amt[0][mask].cpu().numpy()
    lag, f = np.zeros_like(t), np.ones_like(t)
    if est is not None:
        par = est.parameters.iloc[0]
        cmt = batch.dose_cmt[0][mask].cpu().numpy()
        default = (cmt == 0) | (cmt == est.model.population.model.structural.dose_cmt)
        lag = np.where(default, float(par["ALAG"]) if "ALAG" in par else 0.0, 0.0)
        f = np.where(default, float(par["F"]) if "F" in par else 1.0, 1.0)
    start = t + lag
    ends = start + np.where(dur > 0, dur, np.where(rate > 0, f * amt / np.where(rate > 0, rate, 1.0), 0.0))
    inner = np.concatenate([t, start, ends])
    return np.unique(np.concatenate([[a, b], inner[(inner > a) & (inner < b)]]))


def _quadrature(cuts: np.ndarray):
    """(nodes, weights) of Gauss-Legendre quadrature (``NODES`` points) on pieces of at most ``PIECE_H`` h of
    each segment between ``cuts``: exact for polynomials of degree 2 NODES - 1 on each piece, so for sums of
    exponentials with rates up to a few per hour the relative error is below 1e-9. No node lies on a cut (the
    one-sided limits at a bolus need no care)."""
    x0, w0 = np.polynomial.legendre.leggauss(NODES)
    nodes, weights = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        m = max(1, math.ceil((hi - lo) / PIECE_H))
        edges = np.linspace(lo, hi, m + 1)
        half = 0.5 * np.diff(edges)[:, None]
        nodes.append(((edges[:-1] + edges[1:])[:, None] / 2 + half * x0).ravel())
        weights.append((half * w0).ravel())
    return np.concatenate(nodes), np.concatenate(weights)


def time_above(model, dataset, level: float, start: float | None = None, end: float | None = None, *,
               n_samples: int | None = None, seed: int = 0, posterior=None) -> dict:
    """Hours (and the fraction of the window) during which the concentration is above ``level`` (mg/L) from
    ``start`` to ``end`` (h; defaults: the first dose and the last record), with the doses given and no more,
    e.g. the time above an MIC (fT>MIC of a beta-lactam, with the free fraction applied to the level): the
    MAP value with every crossing found by Brent's method within a 0.02-h grid, and the posterior median and
    90% interval (crossings interpolated on the grid)."""
    from scipy.optimize import brentq

    from .recommend import _number_check, estimate_patient

    level = _number_check(level, "level", "mg/L")
    model = dosing_model(model)
    a, b = _default_window(dataset, start, end)
    post = posterior or estimate_patient(model, dataset, n_samples, seed)
    est = post.estimate
    grid = np.linspace(a, b, int(np.ceil((b - a) / 0.02)) + 1)
    conc = _on_grid(post, grid).cpu().numpy() - level

    def exact(t):
        one = est.batch.extend(None, [float(t)])
        return float(est.concentrations(one, est.eta[:1])[0, -1]) - level

    def hours(row, refine):
        above = row > 0
        total, t_prev, inside = 0.0, a, bool(above[0])
        for j in np.nonzero(above[1:] != above[:-1])[0]:
            lo, hi = grid[j], grid[j + 1]
            if refine and exact(lo) * exact(hi) < 0:
                t = brentq(exact, lo, hi, xtol=1e-10)
            else:     # linear interpolation within the grid step (or a jump at a bolus)
                t = lo if row[j] == row[j + 1] else lo + (hi - lo) * row[j] / (row[j] - row[j + 1])
            if inside:
                total += t - t_prev
            t_prev, inside = t, not inside
        return total + (b - t_prev if inside else 0.0)

    h_map = hours(conc[0], True)
    draws = np.array([hours(r, False) for r in conc[1:]])
    return {"level": level, "start_h": a, "end_h": b, "map_hours": h_map, "map_fraction": h_map / (b - a),
            "median_hours": float(np.median(draws)), "p05_hours": float(np.quantile(draws, 0.05)),
            "p95_hours": float(np.quantile(draws, 0.95)),
            "warnings": list(post.warnings) + model.design_warnings(est, until=b)}
