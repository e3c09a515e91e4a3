"""Forecasts of a patient's concentrations with prediction intervals, and the forecast plot."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..population.simulation import residual_noise
from .model import patient_estimate

__all__ = ["Forecast", "forecast", "plot_forecast"]


@dataclass(frozen=True)
class Forecast:
    """``table``: TIME, IPRED_MAP (at the MAP estimate), MEDIAN (of the posterior predictions) and the
    ``level`` intervals PIxx_LOW/HIGH (prediction: parameter uncertainty plus residual error) and
    CIxx_LOW/HIGH (parameter uncertainty only), mg/L; ``draws`` (S, T) the predictive draws with residual
    error (for PIT / calibration checks); ``warnings`` where the forecast lies beyond what the model was
    built on (a hybrid's training design)."""

    table: pd.DataFrame
    draws: np.ndarray = field(repr=False)
    level: float = 0.90
    warnings: tuple = ()


def forecast(est, draws, times, regimen=None, seed: int = 0, level: float = 0.90) -> Forecast:
    """The concentrations at ``times`` (h) of the (first) patient of ``est`` (its MAP estimate: a
    PatientEstimate, or IndividualEstimates of a FittedPopulation) over its posterior ``draws`` (S, P) of the
    point (``PatientPosterior.draws``: the ETAs, and for a hybrid z), optionally continuing with the doses of
    ``regimen`` (a :class:`~hybridpk.data.Regimen`)."""
    est = patient_estimate(est)
    model = est.model
    error = model.population.model.error
    t = np.asarray(times, dtype=float)
    batch = est.batch.extend(regimen, t)
    k = len(t)
    copies = batch.select([0] * draws.shape[0])
    full = est.concentrations(copies, draws)
    conc = full[:, -k:]
    point = est.concentrations(batch, est.eta[:1])[:, -k:][0]
    gen = torch.Generator().manual_seed(seed)
    noisy = residual_noise(error, model.residual_variance(copies, draws, full)[:, -k:], conc, gen)
    if not error.ltbs:
        noisy = noisy.clamp(min=0.0)  # no negative levels
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    pct = int(level * 100)
    point, conc, noisy = point.cpu(), conc.cpu(), noisy.cpu()
    table = pd.DataFrame({"TIME": t, "IPRED_MAP": point.numpy(), "MEDIAN": conc.median(0).values.numpy(),
                          f"PI{pct}_LOW": torch.quantile(noisy, lo, 0).numpy(),
                          f"PI{pct}_HIGH": torch.quantile(noisy, hi, 0).numpy(),
                          f"CI{pct}_LOW": torch.quantile(conc, lo, 0).numpy(),
                          f"CI{pct}_HIGH": torch.quantile(conc, hi, 0).numpy()})
    n_new = regimen.n_doses if regimen is not None else 0
    warns = model.design_warnings(est, [regimen.dose] if regimen is not None else [],
                                  [regimen.interval] if regimen is not None and regimen.n_doses > 1 else [],
                                  float(t.max()) if len(t) else None, n_new)
    return Forecast(table=table, draws=noisy.numpy(), level=level, warnings=tuple(warns))


def plot_forecast(fc: Forecast, est, path=None, title: str = "", target=None, regimen=None, note: str = ""):
    """The forecast: MAP prediction, its prediction interval (parameter uncertainty and residual error), the
    TDM levels and the doses given (grey lines); with ``regimen`` its new doses (dashed), with ``target`` (a
    :class:`~hybridpk.dosing.targets.Target` or its text) the window: a band on the concentration axis for a
    trough, peak or concentration target (from the first new dose on), or, for an AUC target, stated in the
    legend; ``note`` (e.g. the predicted exposure) is written in the corner. Returns the matplotlib Figure
    (nothing is shown; saved to ``path`` if given)."""
    from matplotlib.figure import Figure

    from .targets import parse_target

    table = fc.table
    df = est.dataset.to_dataframe()
    obs = df[(df.EVID == 0) & (df.MDV == 0)]
    doses = df[df.EVID.isin([1, 4])]
    low = [c for c in table.columns if c.startswith("PI") and c.endswith("LOW")][0]
    high = low.replace("LOW", "HIGH")
    t_unit, c_unit = est.dataset.axis_units
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.fill_between(table.TIME, table[low], table[high], alpha=0.25, label=f"{low[2:4]}% prediction interval")
    ax.plot(table.TIME, table.IPRED_MAP, lw=1.5, label="MAP prediction")
    ax.plot(obs.TIME, obs.DV, "o", color="black", label="TDM levels")
    for t in doses.TIME:
        ax.axvline(t, color="grey", lw=0.5, alpha=0.5)
    if regimen is not None:
        shown = [t for t in regimen.dose_events()["time"] if t <= float(table.TIME.max())]
        for k, t in enumerate(shown):
            ax.axvline(t, color="tab:blue", lw=0.6, ls="--", alpha=0.6,
                       label=f"new doses ({regimen.dose:g} mg every {regimen.interval:g} {t_unit})" if k == 0 else None)
    if target is not None:
        tg = parse_target(target) if isinstance(target, str) else target
        if tg.metric in ("trough", "peak", "conc"):
            x0 = regimen.start if regimen is not None else float(table.TIME.min())
            ax.fill_between([x0, float(table.TIME.max())], tg.low, tg.high, color="tab:green", alpha=0.18,
                            label=f"target {tg.label} {tg.low:g}-{tg.high:g} {c_unit}")
        else:
            ax.plot([], [], " ", label=f"target {tg.label} {tg.low:g}-{tg.high:g} {c_unit}*{t_unit}")
    if note:
        ax.text(0.01, 0.98, note, transform=ax.transAxes, va="top", fontsize=8)
    origin = est.dataset.time_origin.get(est.dataset.ids[0]) if est.dataset.n_subjects == 1 else None
    ax.set(xlabel=f"time ({t_unit}{' since ' + origin if origin else ''})", ylabel=f"concentration ({c_unit})",
           title=title)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
