"""``hybridpk report``: a run's estimates and diagnostics in one HTML file that opens offline.

The file embeds every figure (PNG, base64) and holds: the run's metadata (model, estimation method, data
fingerprint, versions, seed), the OFV with AIC and BIC (ODE-only runs; :mod:`hybridpk.classify.compare`
says why a hybrid has none), THETA with RSE, OMEGA as variance and CV%, the residual error, ETA shrinkage,
NONMEM's ETABAR table, and the figures of :mod:`hybridpk.diagnostics` (goodness of fit, CWRES QQ, ETAs, ETAs
against covariates, a VPC, NPDE, individual fits; for a hybrid also its training curves and the latent space
coloured by P_COMPLEX when the run has its classifier), with the units the dataset declares.
The PNGs are written beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..diagnostics import axis_units, cwres_qq, eta_covariate_figure, eta_figure, gof_figure, individual_fits
from ..errors import HybridPKError, ModelError
from ..io import atomic_write_bytes, atomic_write_text, run_metadata

__all__ = ["write_report", "FIGURES", "HYBRID_FIGURES"]

#: the figures every report holds (file stems); individual fits add fits_1, fits_2, ...; data with covariates
#: add "eta_covariates"; a hybrid adds HYBRID_FIGURES (and "classifier" when the run has its classifier)
FIGURES = ("gof", "gof_log", "cwres_qq", "etas", "vpc", "npde")
HYBRID_FIGURES = ("training", "latent")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def write_report(run_dir, dataset, out_dir, max_pages: int = 5, vpc_replicates: int = 200, seed: int = 0) -> Path:
    """Write ``report.html`` and the PNGs of the run in ``run_dir`` (fitted to ``dataset``) into ``out_dir``
    (with a VPC of ``vpc_replicates`` simulations; 0: none); returns the HTML's path."""
    from ..classify import count_parameters, load_classifier, patient_covariates
    from ..residual import HybridFit, load_run

    model = load_run(run_dir)
    pop = model.population if isinstance(model, HybridFit) else model
    est = pop.estimation
    if est is None:
        raise HybridPKError(f"{run_dir} holds a published model, not a fit: a report describes a fit to data")
    if est.data_sha256 and est.data_sha256 != dataset.fingerprint():
        raise HybridPKError("the dataset is not the one the run was fitted to (its fingerprint differs)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preds = est.predictions
    t_unit, c_unit = axis_units(dataset)
    figures = {"gof": gof_figure(preds, time_unit=t_unit, conc_unit=c_unit, title="goodness of fit"),
               "gof_log": gof_figure(preds, log=True, time_unit=t_unit, conc_unit=c_unit,
                                     title="goodness of fit (log axes)"),
               "cwres_qq": cwres_qq(preds),
               "etas": eta_figure(est.individual, {e.eta: e.variance for e in pop.omega},
                                  est.shrinkage.get("eta", {}))}
    if dataset.covariates:
        figures["eta_covariates"] = eta_covariate_figure(est.individual, patient_covariates(dataset),
                                                         dict(dataset.units))
    notes = {}
    try:
        pop.require_simulation()
    except ModelError as exc:               # a stream's simulation-step code hybridpk would not run: not drawn
        notes["VPC and NPDE"] = f"not drawn: {exc}"
        vpc_replicates = 0
    if vpc_replicates:
        from ..diagnostics import npde, plot_npde, plot_vpc, vpc

        figures["vpc"] = plot_vpc(vpc(model, dataset, n=vpc_replicates, seed=seed), time_unit=t_unit,
                                  conc_unit=c_unit)
        figures["npde"] = plot_npde(npde(model, dataset, n=vpc_replicates, seed=seed), time_unit=t_unit)
    for k, fig in enumerate(individual_fits(model, dataset, conc_unit=c_unit, time_unit=t_unit)[:max_pages], 1):
        figures[f"fits_{k}"] = fig
    if isinstance(model, HybridFit):
        from ..diagnostics import training_figure

        rc = load_classifier(run_dir)
        curves = model.training_curves()
        if len(curves):
            figures["training"] = training_figure(curves, warmup=model.config.warmup_epochs)
        figures["latent"] = _latent_figure(model.individual, rc)
        if rc is not None and {"LABEL", "P_COMPLEX"} <= set(model.individual.columns):
            from ..diagnostics import classifier_figure

            figures["classifier"] = classifier_figure(model.individual)
    images = {}
    for name, fig in figures.items():
        data = _png(fig)
        atomic_write_bytes(out / f"{name}.png", data)
        images[name] = base64.b64encode(data).decode()
    n_obs = int(est.n_observations)
    p = count_parameters(pop)
    summary = {"OFV": est.ofv, "parameters": p, "AIC": est.ofv + 2 * p if not isinstance(model, HybridFit) else None,
               "BIC": est.ofv + p * np.log(max(n_obs, 1)) if not isinstance(model, HybridFit) else None,
               "subjects": est.n_subjects, "observations": n_obs, "method": est.method,
               "converged": est.converged, "data_sha256": est.data_sha256, **notes}
    meta = run_metadata(seed=est.seed)
    page = _html(model, pop, summary, meta, images, isinstance(model, HybridFit))
    path = out / "report.html"
    atomic_write_text(path, page)
    atomic_write_text(out / "report.json", json.dumps({"summary": summary, "metadata": meta, "figures": sorted(images),
                                                        "units": {"time": t_unit, "concentration": c_unit}},
                                                       indent=2, default=float))
    return path


def _latent_figure(individual: pd.DataFrame, rc):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.2))
    ax = fig.subplots()
    z2 = individual["Z2"] if "Z2" in individual else np.zeros(len(individual))
    colour = individual["P_COMPLEX"] if "P_COMPLEX" in individual else individual.get("COMPLEXITY")
    sc = ax.scatter(individual["Z1"], z2, c=colour, cmap="viridis", s=14)
    fig.colorbar(sc, ax=ax, label="P_COMPLEX" if "P_COMPLEX" in individual else "COMPLEXITY (-2LL)")
    ax.set_xlabel("Z1 (latent)")
    ax.set_ylabel("Z2 (latent)" if "Z2" in individual else "")
    ax.set_title("latent space" + (" (classifier in the run)" if rc is not None else ""))
    fig.tight_layout()
    return fig


def _table(rows, header) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


def _hybrid_variability(model) -> str:
    """The hybrid's own OMEGA and residual error SDs beside the ODE-only fit's (iterative two-stage, with the
    correction in place); nothing for runs saved before they were estimated."""
    found = model.summary().get("omega")
    if not found:
        return ""
    rows = [(name, found["hybrid"][i][i], found["population"][i][i]) for i, name in enumerate(found["etas"])]
    rows += [(f"{k} (SD)", v, found["sigma_population"].get(k)) for k, v in found["sigma_hybrid"].items()]
    return ("<p>The hybrid's ETAs and residual error, estimated again with the correction in place (an iterative "
            "two-stage step on the training patients); the hybrid's estimates, predictions and doses use these.</p>"
            + _table(rows, ["hybrid", "value", "ODE-only fit"]))


def _html(model, pop, summary, meta, images, hybrid: bool) -> str:
    theta = [(r.shown, r.value, r.se, r.rse, "FIX" if r.fixed else "") for r in pop.theta.rows]
    omega = [(e.label, e.variance, e.cv_percent, e.se) for e in pop.omega]
    sigma = [(s.label, s.value, s.scale, s.se) for s in pop.sigma.rows]
    shr = pop.estimation.shrinkage
    parts = [f"<h1>hybridpk report: {html.escape(pop.name)}</h1>",
             "<h2>Run</h2>", _table([(k, v) for k, v in summary.items()], ["item", "value"]),
             _table([(k, json.dumps(v) if isinstance(v, dict) else v) for k, v in meta.items()], ["metadata", "value"]),
             "<p>AIC = OFV + 2p and BIC = OFV + p ln(observations), p the estimated parameters"
             + (" of the ODE part; a hybrid's likelihood is conditional on each patient's z, so it has no AIC or BIC "
                "of the same kind (compare hybrids by cross-validation: hybridpk compare)" if hybrid else "") + ".</p>",
             "<h2>Estimates</h2>", _table(theta, ["THETA", "estimate", "SE", "RSE %", ""]),
             _table(omega, ["OMEGA", "variance", "CV %", "SE"]), _table(sigma, ["SIGMA", "value", "scale", "SE"]),
             _hybrid_variability(model) if hybrid else "",
             _table([(k, v, shr.get("ebv", {}).get(k)) for k, v in shr.get("eta", {}).items()]
                    + [("epsilon", shr.get("epsilon"), None)], ["shrinkage", "ETA SD %", "EBV SD %"]),
             _table([(k, b["etabar"], b["se"], b["n"], b["p"]) for k, b in pop.estimation.etabar.items()],
                    ["ETA", "ETABAR", "SE", "N", "P VAL"]) if pop.estimation.etabar else "",
             "<h2>Diagnostics</h2>"]
    for name, data in images.items():
        parts.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}'
                     "</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>hybridpk report</title><style>{style}</style>" \
           f"</head><body>{''.join(parts)}</body></html>"
