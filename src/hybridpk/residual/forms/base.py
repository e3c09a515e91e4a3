"""The interface of a correction form: how the hybrid's latent-conditioned term enters the prediction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...solve.closed_form import concentration, input_response
from ..features import input_features, input_grid

__all__ = ["CorrectionForm", "StructuralGridForm", "GridInputs", "grid_inputs", "grid_concentrations",
           "midpoint_response", "log_ratio", "require_structure"]


class CorrectionForm(nn.Module):
    """A strategy object (one final subclass per form, each in its own module). It owns the decoder's
    parameters and turns the ODE prediction into the hybrid one.

    Class attributes: ``name``; ``average`` (True: predictions average the hybrid and ODE-only with the patient's
    Akaike weight, for forms that fit noise where the ODE suffices); ``structural`` (True: the term is carried by
    the linear structural model with the patient's own parameters, so it needs joint training and a linear model);
    ``conserves_mass`` (True: the correction only moves or removes drug that is in the body, so it extrapolates to
    new regimens under that constraint); ``intervals`` (grid forms: default number of time intervals over the
    observed span on which the learnt rates are constant).
    """

    name: str = ""
    average: bool = False
    structural: bool = False
    conserves_mass: bool = False
    intervals: int = 96

    def __init__(self, n_features: int, latent_dim: int, hidden: int):
        super().__init__()

    def cells(self, records: int, intervals: int, doses: int, scale: dict) -> int:
        """About how many numbers one subject's prediction holds at once, with ``records`` records, ``intervals``
        grid intervals and ``doses`` doses (what the callers size their batches by): a form without a time grid,
        the closed form's records x doses."""
        return records * max(doses, 1)

    def forward(self, batch, ipred, z, scale: dict, params=None, structural=None):
        """(hybrid concentration (N, R) mg/L, the correction r (N, R) in log space) at every record of
        ``batch``, for latent ``z`` (N, K), the ODE prediction ``ipred`` (N, R), the normalising constants
        ``scale`` and, for structural forms, the individual ``params`` and the ``structural`` model."""
        raise NotImplementedError


@dataclass(frozen=True)
class GridInputs:
    """The time grid of a grid form: interval width ``dt`` (h), ``starts`` (N, G) h, decoder inputs ``x``
    (N, G, F), the last dose amount ``amt`` (N, G) mg, and the after-first-dose ``gate`` (N, G)."""

    dt: float
    starts: torch.Tensor
    x: torch.Tensor
    amt: torch.Tensor
    gate: torch.Tensor


def grid_inputs(batch, scale: dict) -> GridInputs:
    """The grid of intervals of ``scale["input_dt"]`` h from each patient's first dose to its last record."""
    dt = float(scale["input_dt"])
    starts = input_grid(batch, dt)
    x, amt, gate = input_features(batch, starts, dt, scale)
    return GridInputs(dt, starts, x, amt, gate)


def log_ratio(pred, ipred, scale: dict):
    """The correction in log space, r = log(pred + c0) - log(IPRED + c0) (c0: a small concentration)."""
    c0 = scale["c0"]
    return torch.log(pred + c0) - torch.log(ipred.clamp(min=0) + c0)


def require_structure(form: CorrectionForm, params, structural) -> None:
    if params is None or structural is None or not structural.linear:
        raise ValueError(f"the {form.name} form needs a linear structural model and its individual parameters")


class StructuralGridForm(CorrectionForm):
    """A structural form solved on the grid: subclasses give ``_concentration(batch, z, params, structural,
    grid, scale)`` -> the hybrid concentration (N, R) mg/L."""

    structural = True

    def cells(self, records: int, intervals: int, doses: int, scale: dict) -> int:
        """The closed form at the records and at the intervals' fill points, by dose, plus the response of every
        record to every interval and the coupling of the intervals among themselves (intervals squared)."""
        points = int(scale.get("fill_points", 1))
        return (intervals * points + records) * max(doses, 1) + records * intervals + intervals * intervals

    def forward(self, batch, ipred, z, scale, params=None, structural=None):
        require_structure(self, params, structural)
        pred = self._concentration(batch, z, params, structural, grid_inputs(batch, scale), scale)
        return pred, log_ratio(pred, ipred, scale)

    def _concentration(self, batch, z, params, structural, g, scale):
        raise NotImplementedError


def _within(g: GridInputs, points: int):
    """Offsets (S,) h of ``points`` equally spaced times within a grid interval: the midpoints of S equal
    sub-intervals (S = 1: the interval's midpoint)."""
    return (torch.arange(points, dtype=g.starts.dtype, device=g.starts.device) + 0.5) * (g.dt / points)


def grid_concentrations(model, params, batch, g: GridInputs, points: int = 1):
    """Concentrations of ``model`` over the grid's intervals (N, G) and at the records (N, R), mg/L: at each
    interval's midpoint (``points`` 1), or its average over the interval by the composite midpoint rule at
    ``points`` times (a time on a dose time comes after the dose)."""
    n, n_grid = g.starts.shape
    inner = (g.starts.unsqueeze(-1) + _within(g, points)).reshape(n, n_grid * points)
    times = torch.cat([inner, batch.time], 1)
    keys = torch.cat([torch.full_like(inner, float(batch.time.shape[1] + 1)), batch.row.to(g.starts.dtype)], 1)
    conc = concentration(model, params, batch, times, keys)
    return conc[:, :n_grid * points].reshape(n, n_grid, points).mean(-1), conc[:, n_grid * points:]


def midpoint_response(model, params, g: GridInputs, points: int = 1):
    """Concentration (N, G) at the midpoint of interval ``lag`` (or its average over the interval at
    ``points`` times, as in :func:`grid_concentrations`) after a unit rate (amount/h) on the first interval, into
    ``model``'s dose compartment: on the regular grid the response of every interval to every interval depends
    only on the lag (Toeplitz). Padding intervals sit after the last record and reach none."""
    n_grid = g.starts.shape[1]
    ar = torch.arange(n_grid, device=g.starts.device, dtype=g.starts.dtype)
    first = g.starts[:, :1]
    times = first + (ar.unsqueeze(-1) * g.dt + _within(g, points)).reshape(1, n_grid * points)
    resp = input_response(model, params, times, first, g.dt)[..., 0]
    return resp.reshape(-1, n_grid, points).mean(-1)
