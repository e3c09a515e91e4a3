"""Visual predictive checks: the simulation-based VPC and the prediction-corrected VPC.

The fitted model (for a hybrid: ETAs from OMEGA and z from its latent prior) simulates ``n`` replicates of the
study design (doses, sampling times, covariates, with residual error). Observations are binned by time
(``bins`` bins with equal numbers of observations, or given edges), or by the time after the most recent dose
(``idv="TAD"``, PsN vpc's ``-idv=TAD``: for TDM records over weeks, whose doses and samples fall at irregular
times, binning by time since the start mixes peaks and troughs). In each bin the observed 5th, 50th and
95th percentiles are compared with the distribution of the same percentiles over the replicates, summarised
by its ``level`` interval (the shaded bands of the plot). An observed percentile outside its band in several
adjacent bins is model misspecification (Holford 2005; Karlsson and Holford, PAGE 2008).

Prediction correction (Bergstrand, Hooker, Wallin, Karlsson; AAPS J 2011; 13:143, eq. 1): each observed and
simulated value Y_ij is normalised by the typical prediction of its record, pcY_ij = lb + (Y_ij - lb)
(PRED_bin - lb) / (PRED_ij - lb), with PRED_bin the median PRED of the bin and lb the lower bound of the data
(0 for concentrations), which removes the variability that dosing and covariates put within a bin. Records
whose PRED is at or below the bound (before the first dose) are left out of the prediction-corrected VPC.

Censored levels (M3 data: BLQ, CENS, a control stream's F_FLAG) are handled as Bergstrand and Karlsson recommend
(AAPS J 2009; 11:371, the censored VPC, PsN vpc's -lloq): the simulated levels are censored at the same limit as
the observed ones (one LLOQ for every record when the data's limits agree, else each record's own), a percentile
that falls among censored values is not drawn (NaN in the table; in the comparison it is below every level, so
an observed percentile below the LLOQ is inside its band exactly when the band reaches below the LLOQ too), and
the fraction of levels below the LLOQ (above an ULOQ) per bin is checked against its simulated interval
(OBS_BLQ, SIM_BLQ_LOW / MEDIAN / HIGH, INSIDE_BLQ; OBS_ALQ ... likewise above). Without this the observed lower
percentiles sat at the LLOQ, where the censored levels hold it, while the simulated ones fell below it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

__all__ = ["VPCResult", "vpc", "prediction_correct", "plot_vpc"]

PERCENTILES = (5, 50, 95)


@dataclass(frozen=True)
class VPCResult:
    """``table``: one row per bin (and stratum): ``idv`` (TIME or TAD: the median of the bin's observations), N,
    and per percentile p (5, 50, 95) OBS_Pp, SIM_Pp_LOW / SIM_Pp_MEDIAN / SIM_Pp_HIGH (the ``level`` interval of
    the simulated percentile) and INSIDE_Pp; ``observed`` the observations used (TIME, TAD with ``idv`` TAD,
    DV, BIN; pcDV if prediction-corrected); ``n`` replicates, ``pc``, ``level``, ``seed``; ``left_out``: the
    observations before any dose (no time after dose) with ``idv`` TAD; ``tad_source``: where TAD came from
    (the data's TAD column when it has one, else computed from the dose records)."""

    table: pd.DataFrame
    observed: pd.DataFrame = field(repr=False)
    n: int
    pc: bool
    level: float
    seed: int
    idv: str = "TIME"
    left_out: int = 0
    tad_source: str = ""

    @property
    def fraction_inside(self) -> float:
        """The fraction of (bin, percentile) pairs whose observed percentile lies in its simulated band."""
        cols = [f"INSIDE_P{p}" for p in PERCENTILES]
        return float(self.table[cols].to_numpy().mean())

    @property
    def censored(self) -> tuple:
        """The censored fractions the table checks: ("BLQ",), ("ALQ",), both or none."""
        return tuple(k for k in ("BLQ", "ALQ") if f"INSIDE_{k}" in self.table)


def prediction_correct(y, pred, bins, lower: float = 0.0) -> np.ndarray:
    """Bergstrand et al.'s eq. 1: lb + (y - lb) (median PRED of the bin - lb) / (PRED - lb); NaN where PRED <= lb."""
    y, pred, bins = np.asarray(y, float), np.asarray(pred, float), np.asarray(bins)
    out = np.full(y.shape, np.nan)
    ok = pred > lower
    for b in np.unique(bins[ok]):
        m = ok & (bins == b)
        ref = np.median(pred[m])
        out[m] = lower + (y[m] - lower) * (ref - lower) / (pred[m] - lower)
    return out


def _bin_edges(times, bins) -> np.ndarray:
    if np.ndim(bins):
        return np.asarray(bins, float)
    edges = np.unique(np.quantile(times, np.linspace(0, 1, int(bins) + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    return edges


def vpc(model, dataset, n: int = 500, bins=8, pc: bool = False, level: float = 0.90, seed: int = 0,
        stratify: str | None = None, progress=None, idv: str = "TIME") -> VPCResult:
    """The VPC (or, ``pc``, the pcVPC) of ``model`` (a FittedPopulation or HybridFit) on ``dataset``'s design
    and observations (see the module docstring). ``stratify``: a covariate column; one set of bins per value.
    ``idv``: what the observations are binned and drawn by, "TIME" or "TAD" (the time after the most recent
    dose: the data's TAD column when it has one, as PsN's vpc reads it, else
    :meth:`~hybridpk.data.batch.EventBatch.time_after_dose`; observations without one, before any dose, are left
    out)."""
    from ..errors import HybridPKError

    if n < 20:
        raise HybridPKError(f"n = {n}: a VPC needs at least 20 replicates (500 is usual)")
    if idv not in ("TIME", "TAD"):
        raise HybridPKError(f"idv {idv!r}: bin by TIME or by TAD (the time after the most recent dose)")
    pm = getattr(model, "population", model).model
    pm.require_dv_scale(dataset)        # a log-DV control stream's model: DV of a stated scale only
    dataset = pm.read_levels(dataset)   # levels its M3 censors (F_FLAG), censored
    df = dataset.to_dataframe()
    obs_mask = ((df.EVID == 0) & (df.MDV == 0)).to_numpy()
    if not obs_mask.any():
        raise HybridPKError("the dataset has no observations to check")
    if stratify is not None and stratify not in df.columns:
        raise HybridPKError(f"--stratify {stratify}: not a column of the data ({', '.join(df.columns)})")
    left_out, tad_source = 0, ""
    if idv == "TAD":            # observations before any dose have no time after dose: left out
        if "TAD" in df.columns:     # the data's own (PsN's -idv=TAD reads it so)
            tad_source = "the data's TAD column"
            df = df.assign(TAD=pd.to_numeric(df.TAD, errors="coerce"))
        else:
            tad_source = "computed from the dose records"
            batch = dataset.to_batch()
            df = df.assign(TAD=np.asarray(batch.to_rows(batch.time_after_dose()), float))
        after = obs_mask & np.isfinite(df.TAD.to_numpy(float))
        if not after.any():
            raise HybridPKError("no observation comes after a dose: there is no time after dose to bin by (use TIME)")
        left_out, obs_mask = int(obs_mask.sum() - after.sum()), after
    sims = model.simulate(dataset, n=n, seed=seed)
    if progress:
        progress(f"simulated {n} replicates")
    first = sims[sims.REP == 1]
    if len(sims) != n * len(df) or not np.array_equal(first.TIME.to_numpy(float), df.TIME.to_numpy(float)):
        raise RuntimeError("simulated replicates are not in the dataset's record order")
    sim_dv = sims.DV.to_numpy(float).reshape(n, len(df))[:, obs_mask]         # (n, observations)
    obs = df.loc[obs_mask, ["ID", "TIME"] + (["TAD"] if idv == "TAD" else []) + ["DV"]].reset_index(drop=True)
    obs["STRATUM"] = df.loc[obs_mask, stratify].to_numpy() if stratify else 0
    obs["BIN"] = -1
    for s in obs.STRATUM.unique():
        m = (obs.STRATUM == s).to_numpy()
        x = obs[idv][m].to_numpy(float)
        edges = _bin_edges(x, bins)
        obs.loc[m, "BIN"] = np.clip(np.digitize(x, edges[1:-1]), 0, len(edges) - 2)
    y_obs, y_sim = obs.DV.to_numpy(float), sim_dv
    below, above, lloq, uloq, kinds = _censoring(dataset, obs_mask)
    if kinds:       # censored levels: observed and simulated alike, -inf below the LLOQ and +inf above the ULOQ
        y_obs = np.where(below, -np.inf, np.where(above, np.inf, y_obs))
        y_sim = np.where(y_sim < lloq, -np.inf, np.where(y_sim > uloq, np.inf, y_sim))
    if pc:
        pred = _population_predictions(model, dataset)[obs_mask]
        key = obs.STRATUM.astype(str) + ":" + obs.BIN.astype(str)
        y_obs = prediction_correct(y_obs, pred, key)
        y_sim = np.vstack([prediction_correct(row, pred, key) for row in y_sim])
        obs["pcDV"] = y_obs
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    rows = []
    for (s, b), part in obs.groupby(["STRATUM", "BIN"], sort=True):
        idx = part.index.to_numpy()
        keep = ~np.isnan(y_obs[idx])        # NaN: left out of the pcVPC; +-inf: censored, kept
        if keep.sum() < 2:
            continue
        idx = idx[keep]
        row = {"STRATUM": s, "BIN": int(b), idv: float(np.median(obs[idv][idx])), "N": int(idx.size)}
        sim_pct = _percentiles(y_sim[:, idx], PERCENTILES, axis=1)          # (3, n)
        for k, p in enumerate(PERCENTILES):
            o = float(_percentiles(y_obs[idx], [p])[0])
            band = _percentiles(sim_pct[k], [100 * lo, 50, 100 * hi])
            row.update({f"OBS_P{p}": _drawn(o), f"SIM_P{p}_LOW": _drawn(band[0]),
                        f"SIM_P{p}_MEDIAN": _drawn(band[1]), f"SIM_P{p}_HIGH": _drawn(band[2]),
                        f"INSIDE_P{p}": bool(band[0] <= o <= band[2])})
        for kind in kinds:      # the fraction of levels below the LLOQ (above the ULOQ): observed against simulated
            tail = np.isneginf if kind == "BLQ" else np.isposinf
            o = float(tail(y_obs[idx]).mean())
            band = np.quantile(tail(y_sim[:, idx]).mean(1), [lo, 0.5, hi])
            row.update({f"OBS_{kind}": o, f"SIM_{kind}_LOW": band[0], f"SIM_{kind}_MEDIAN": band[1],
                        f"SIM_{kind}_HIGH": band[2], f"INSIDE_{kind}": bool(band[0] <= o <= band[2])})
        rows.append(row)
    table = pd.DataFrame(rows)
    if not stratify:
        table = table.drop(columns="STRATUM")
    return VPCResult(table, obs, int(n), bool(pc), float(level), int(seed), idv, left_out, tad_source)


def _censoring(dataset, obs_mask):
    """(below, above, LLOQ, ULOQ, kinds) per observation of ``obs_mask``: whether the observed level is censored
    below (above) its limit, the limits the simulated levels are censored at (NaN: none;
    :meth:`~hybridpk.data.Dataset.censoring_limits`), and the ``kinds`` ("BLQ", "ALQ") present."""
    cens = dataset.censoring()[0][obs_mask]
    lloq, uloq = (limit[obs_mask] for limit in dataset.censoring_limits())
    flags = (cens == 1, cens == -1)
    kinds = tuple(k for k, f in zip(("BLQ", "ALQ"), flags) if f.any())
    return flags[0], flags[1], lloq, uloq, kinds


def _percentiles(values, q, axis=None) -> np.ndarray:
    """np.nanpercentile of values that may hold -inf / +inf (censored levels): a percentile that interpolates with a
    censored value is censored itself (-inf / +inf)."""
    big = np.finfo(float).max / 4
    v = np.clip(np.asarray(values, float), -big, big)
    out = np.nanpercentile(v, q, axis=axis)
    return np.where(out <= -big / 1e6, -np.inf, np.where(out >= big / 1e6, np.inf, out))


def _drawn(x: float) -> float:
    """A percentile as the table and plot show it: NaN where it is censored (not drawn)."""
    return float(x) if np.isfinite(x) else float("nan")


def _population_predictions(model, dataset) -> np.ndarray:
    """PRED (ETA = 0; for a hybrid the ODE part's) at every record of ``dataset``."""
    pop = model.population if hasattr(model, "vae") else model
    batch = dataset.to_batch(covariates=list(pop.covariates))
    with torch.no_grad():
        pred = pop.concentrations(batch, torch.zeros(batch.n_subjects, pop.model.n_eta, dtype=torch.float64))
    return np.asarray(batch.to_rows(pred), float)


def plot_vpc(result: VPCResult, time_unit: str = "h", conc_unit: str = "mg/L", log: bool = False):
    """The VPC figure: observations, the observed 5/50/95th percentiles (lines) and the simulated percentiles'
    ``level`` bands (shaded), one panel per stratum."""
    from matplotlib.figure import Figure

    t = result.table
    strata = sorted(t.STRATUM.unique()) if "STRATUM" in t else [None]
    fig = Figure(figsize=(6 * len(strata), 4.5))
    axes = np.atleast_1d(fig.subplots(1, len(strata)))
    ycol = "pcDV" if result.pc else "DV"
    for ax, s in zip(axes, strata):
        part = t if s is None else t[t.STRATUM == s]
        o = result.observed if s is None else result.observed[result.observed.STRATUM == s]
        x = result.idv
        ax.plot(o[x], o[ycol], "o", color="0.5", ms=2.5, alpha=0.6, label="observations")
        for p, colour in zip(PERCENTILES, ("tab:blue", "tab:red", "tab:blue")):
            what = "P5 and P95" if p == 5 else "P50"
            ax.fill_between(part[x], part[f"SIM_P{p}_LOW"], part[f"SIM_P{p}_HIGH"], color=colour, alpha=0.2,
                            label=f"simulated {what} ({result.level:.0%} interval)" if p != 95 else None)
            ax.plot(part[x], part[f"OBS_P{p}"], "-", color=colour, lw=1.5,
                    label=f"observed {what}" if p != 95 else None)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel(f"time after dose ({time_unit})" if x == "TAD" else f"TIME ({time_unit})")
        ax.set_ylabel(("prediction-corrected " if result.pc else "") + f"DV ({conc_unit})")
        ax.set_title(("pcVPC" if result.pc else "VPC") + (f" ({s})" if s is not None else "")
                     + f", {result.n} replicates")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
