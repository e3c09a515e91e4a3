"""Goodness-of-fit figures, as xpose and pmplots draw them.

Each function takes tables hybridpk already writes (a fit's predictions: ID, TIME, DV, MDV, PRED, IPRED,
CWRES; individual: ID and ETAs) or a fitted model and its data, and returns a matplotlib Figure; nothing is
shown. Units on every axis (time in h, concentrations in mg/L unless given).

* :func:`gof_figure`: DV against PRED and against IPRED with the identity line (log axes as an option),
  CWRES against TIME and against PRED with a LOESS-free running median and the +-2 lines;
* :func:`cwres_qq`: CWRES against standard-normal quantiles (CWRES ~ N(0, 1) when the model is right:
  Hooker, Staatz and Karlsson, Pharm Res 2007; 24:2187);
* :func:`eta_figure`: each ETA's histogram against its N(0, OMEGA) density, with shrinkage;
* :func:`eta_covariate_figure`: each ETA against each covariate (baseline values), with a running median: a
  trend is a covariate relation the model lacks;
* :func:`classifier_figure`: the latent classifier's ROC and calibration on its training patients;
* :func:`individual_fits`: each patient's levels, the population (PRED) and individual (IPRED; for a hybrid
  also the ODE-only part) curves on a fine grid, doses marked, in pages.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["gof_figure", "cwres_qq", "eta_figure", "eta_covariate_figure", "covariate_relations_figure",
           "individual_fits", "axis_units"]


def axis_units(dataset) -> tuple:
    """(time unit, concentration unit) of ``dataset`` (:attr:`hybridpk.data.Dataset.axis_units`)."""
    return dataset.axis_units


def _relation_panel(ax, x, y, xlabel: str, ylabel: str, bins: int, **median_style) -> None:
    """One relation: y against x with the running median through it (when x takes more than ``bins`` values)."""
    ax.scatter(x, y, s=10, alpha=0.6)
    if len(np.unique(x)) > bins:
        cx, cy = _running_median(x, y, bins=bins)
        if cx.size:
            ax.plot(cx, cy, "r-", **median_style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _figure(**kw):
    """A Figure not registered with pyplot (no global state, no backend chosen, nothing shown)."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def _observations(predictions: pd.DataFrame) -> pd.DataFrame:
    return predictions[predictions.MDV == 0].dropna(subset=["DV"])


def _running_median(x, y, bins: int = 10):
    """Medians of y in quantile bins of x (the trend line of a residual plot)."""
    if len(x) < bins * 2:
        return np.array([]), np.array([])
    edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)))
    idx = np.clip(np.digitize(x, edges[1:-1]), 0, len(edges) - 2)
    centres = np.array([np.median(x[idx == k]) for k in range(len(edges) - 1) if (idx == k).any()])
    medians = np.array([np.median(y[idx == k]) for k in range(len(edges) - 1) if (idx == k).any()])
    return centres, medians


def gof_figure(predictions: pd.DataFrame, log: bool = False, time_unit: str = "h", conc_unit: str = "mg/L",
               title: str = ""):
    """DV vs PRED, DV vs IPRED (identity lines), CWRES vs TIME, CWRES vs PRED (zero and +-2 lines, running
    median): a 2 x 2 figure of the observation records of ``predictions``."""
    obs = _observations(predictions)
    fig = _figure(figsize=(9, 8))
    axes = fig.subplots(2, 2)
    for ax, col in ((axes[0, 0], "PRED"), (axes[0, 1], "IPRED")):
        x, y = obs[col].to_numpy(float), obs.DV.to_numpy(float)
        keep = (x > 0) & (y > 0) if log else np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[keep], y[keep], s=10, alpha=0.6)
        hi = float(np.nanmax(np.concatenate([x[keep], y[keep]]))) if keep.any() else 1.0
        lo = float(np.nanmin(np.concatenate([x[keep], y[keep]]))) if log and keep.any() else 0.0
        ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="identity")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"{col} ({conc_unit})")
        ax.set_ylabel(f"DV ({conc_unit})")
        ax.set_title(f"DV vs {col}")
    for ax, col, unit in ((axes[1, 0], "TIME", time_unit), (axes[1, 1], "PRED", conc_unit)):
        res = obs.dropna(subset=["CWRES"])
        x, y = res[col].to_numpy(float), res.CWRES.to_numpy(float)
        ax.scatter(x, y, s=10, alpha=0.6)
        for level in (0, 2, -2):
            ax.axhline(level, color="k", lw=1, ls="-" if level == 0 else ":")
        cx, cy = _running_median(x, y)
        if cx.size:
            ax.plot(cx, cy, "r-", lw=1.5, label="running median")
            ax.legend(fontsize=8)
        ax.set_xlabel(f"{col} ({unit})")
        ax.set_ylabel("CWRES")
        ax.set_title(f"CWRES vs {col}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def cwres_qq(predictions: pd.DataFrame, title: str = ""):
    """CWRES against standard-normal quantiles, with the identity line."""
    from scipy.stats import norm

    y = np.sort(_observations(predictions).CWRES.dropna().to_numpy(float))
    q = norm.ppf((np.arange(1, len(y) + 1) - 0.5) / max(len(y), 1))
    fig = _figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.scatter(q, y, s=10, alpha=0.6)
    lim = float(max(np.abs(q).max(initial=1.0), np.abs(y).max(initial=1.0)))
    ax.plot([-lim, lim], [-lim, lim], "k-", lw=1)
    ax.set_xlabel("standard-normal quantile")
    ax.set_ylabel("CWRES")
    ax.set_title(title or "QQ plot of CWRES")
    fig.tight_layout()
    return fig


def eta_figure(individual: pd.DataFrame, omega: dict, shrinkage: dict | None = None):
    """Histogram of each ETA (columns ETA_*) with the N(0, OMEGA) density (``omega`` {ETA: variance}) and the
    ETA's shrinkage (%) in the title."""
    from scipy.stats import norm

    etas = [c for c in individual.columns if c.startswith("ETA_") and c in omega]
    fig = _figure(figsize=(3.6 * max(len(etas), 1), 3.4))
    axes = fig.subplots(1, max(len(etas), 1), squeeze=False)
    for ax, eta in zip(axes[0], etas):
        v = individual[eta].to_numpy(float)
        sd = math.sqrt(max(float(omega[eta]), 1e-12))
        ax.hist(v, bins=min(20, max(5, len(v) // 3)), density=True, alpha=0.6)
        x = np.linspace(-4 * sd, 4 * sd, 200)
        ax.plot(x, norm.pdf(x, 0, sd), "k-", lw=1, label="N(0, OMEGA)")
        shr = (shrinkage or {}).get(eta)
        ax.set_title(eta + (f" (shrinkage {shr:.0f}%)" if shr is not None else ""), fontsize=9)
        ax.set_xlabel(f"{eta} (log scale of the parameter)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def eta_covariate_figure(individual: pd.DataFrame, covariates: pd.DataFrame, units: dict | None = None):
    """Each ETA (columns ETA_* of ``individual``) against each covariate of ``covariates`` (one row per ID,
    an ID column and the covariates' baseline values), a running median through each panel; ``units``
    {covariate: unit} label the axes. Categorical covariates with few levels show as columns of points."""
    table = individual.merge(covariates, on="ID", how="inner")
    etas = [c for c in individual.columns if c.startswith("ETA_")]
    covs = [c for c in covariates.columns if c != "ID"]
    if not covs or not etas:
        fig = _figure(figsize=(4, 2))
        fig.subplots().set_title("no covariates in the data" if not covs else "no ETAs in the model")
        return fig
    fig = _figure(figsize=(3.2 * len(covs), 2.8 * len(etas)))
    axes = fig.subplots(len(etas), len(covs), squeeze=False)
    for i, eta in enumerate(etas):
        for j, cov in enumerate(covs):
            ax = axes[i, j]
            ax.axhline(0, color="k", lw=0.8)
            _relation_panel(ax, table[cov].to_numpy(float), table[eta].to_numpy(float), _with_unit(cov, units),
                            eta, bins=5, lw=1.5)
    fig.tight_layout()
    return fig


def covariate_relations_figure(screen: pd.DataFrame, table: pd.DataFrame, top: int = 4, units: dict | None = None):
    """The ``top`` strongest relations of a covariate screen (:func:`hybridpk.classify.screen_covariates`, rows in
    its order: lowest q-value first) drawn as their shape: each target (an ETA or a latent Z) against the covariate
    with a running median (a nonparametric partial dependence of the target on the covariate), the x axis on a log
    scale when the covariate spans more than two decades. ``table``: one row per patient with the targets and the
    covariates."""
    rows = list(screen.head(top).itertuples())
    fig = _figure(figsize=(4 * max(len(rows), 1), 3.5))
    axes = fig.subplots(1, max(len(rows), 1), squeeze=False)[0]
    for ax, r in zip(axes, rows):
        x = table[r.covariate].to_numpy(float)
        _relation_panel(ax, x, table[r.target].to_numpy(float), _with_unit(r.covariate, units), r.target, bins=8,
                        lw=2, label="running median (shape)")
        if ax.lines:
            ax.legend(fontsize=7)
        if (x > 0).all() and x.max() / x.min() > 100:
            ax.set_xscale("log")
        ax.set_title(f"rho {r.spearman_rho:.2f}, MI {r.mutual_information:.2f}, q {r.q_value:.3g}", fontsize=9)
    fig.tight_layout()
    return fig


def _with_unit(name: str, units: dict | None) -> str:
    unit = (units or {}).get(name)
    return f"{name} ({unit})" if unit else name


def individual_fits(model, dataset, per_page: int = 12, points: int = 200, conc_unit: str = "mg/L",
                    time_unit: str = "h") -> list:
    """Pages (figures) of per-patient panels: the levels, PRED and IPRED on a fine grid (for a hybrid also
    the ODE-only part), doses marked. ``model`` a FittedPopulation or a HybridFit fitted to (or predicting)
    ``dataset``."""
    import torch

    df = dataset.to_dataframe()
    grid = np.linspace(0.0, float(df.TIME.max()), points)
    design = dataset.prediction_design(grid)
    hybrid = hasattr(model, "vae")
    if hybrid:
        pred = model.predict(dataset, design=design).table
    else:
        est = model.estimate(dataset)
        batch = design.to_batch(covariates=list(model.covariates))
        with torch.no_grad():
            ipred = model.concentrations(batch, est.eta)
            prd = model.concentrations(batch, torch.zeros_like(est.eta))
        d = design.to_dataframe()
        pred = pd.DataFrame({"ID": d.ID.to_numpy(), "TIME": d.TIME.to_numpy(), "EVID": d.EVID.to_numpy(),
                             "PRED": batch.to_rows(prd), "IPRED": batch.to_rows(ipred)})
    if "EVID" not in pred:
        pred["EVID"] = design.to_dataframe().EVID.to_numpy()
    curves = pred[pred.EVID == 2]
    ids = list(dataset.ids)
    pages = []
    for start in range(0, len(ids), per_page):
        chunk = ids[start:start + per_page]
        cols = min(4, len(chunk))
        rows = math.ceil(len(chunk) / cols)
        fig = _figure(figsize=(3.2 * cols, 2.6 * rows))
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.ravel()[len(chunk):]:
            ax.set_visible(False)
        for ax, pid in zip(axes.ravel(), chunk):
            c = curves[curves.ID == pid]
            ax.plot(c.TIME, c.PRED, "k--", lw=1, label="PRED")
            if hybrid:
                ax.plot(c.TIME, c.IPRED_ODE, "b:", lw=1, label="IPRED (ODE only)")
            ax.plot(c.TIME, c.IPRED, "b-", lw=1.2, label="IPRED")
            p = df[(df.ID == pid) & (df.EVID == 0) & (df.MDV == 0)]
            ax.plot(p.TIME, p.DV, "ro", ms=3, label="DV")
            for t in df[(df.ID == pid) & df.EVID.isin([1, 4])].TIME:
                ax.axvline(float(t), color="0.7", lw=0.6)
            ax.set_title(f"ID {pid}", fontsize=9)
            ax.set_xlabel(f"TIME ({time_unit})", fontsize=8)
            ax.set_ylabel(conc_unit, fontsize=8)
        axes.ravel()[0].legend(fontsize=6)
        fig.tight_layout()
        pages.append(fig)
    return pages


def classifier_figure(table: pd.DataFrame, bins: int = 5):
    """The latent classifier on its training patients: ROC of the out-of-fold P_COMPLEX for the labels it was
    trained on (LABEL) and the calibration (mean predicted vs observed rate in quantile bins)."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p = table.LABEL.to_numpy(int), table.P_COMPLEX.to_numpy(float)
    fig = _figure(figsize=(9, 4))
    a, b = fig.subplots(1, 2)
    if np.unique(y).size == 2:
        fpr, tpr, _ = roc_curve(y, p)
        a.plot(fpr, tpr, "b-", label=f"AUROC {roc_auc_score(y, p):.3f} (out of fold)")
        observed, predicted = calibration_curve(y, p, n_bins=bins, strategy="quantile")
        b.plot(predicted, observed, "o-", label="out of fold")
    else:
        a.text(0.5, 0.5, "one class only", ha="center")
    for ax in (a, b):
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    a.set_xlabel("false positive rate")
    a.set_ylabel("true positive rate")
    a.set_title("latent classifier: ROC (training labels)")
    b.set_xlabel("predicted P_COMPLEX")
    b.set_ylabel("observed rate of COMPLEX labels")
    b.set_title("calibration")
    fig.tight_layout()
    return fig
