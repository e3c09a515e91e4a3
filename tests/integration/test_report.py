"""Diagnostics and the HTML report: every figure is drawn from the run's own numbers and embedded."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

import hybridpk as hp
from hybridpk.cli import main
from hybridpk.diagnostics import cwres_qq, eta_figure, gof_figure, individual_fits
from hybridpk.report import write_report
from hybridpk.report.html import FIGURES


@pytest.fixture(scope="module")
def theoph(tmp_path_factory):
    ds = hp.read_nonmem(hp.bundled_dataset("theoph"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.fit_population(hp.build_model("1cmt_oral", error="combined"), ds, progress=False)
    run = tmp_path_factory.mktemp("report") / "run"
    fit.save(run)
    return ds, fit, run


def test_the_figures_hold_the_runs_numbers(theoph):
    ds, fit, _ = theoph
    preds = fit.estimation.predictions
    obs = preds[preds.MDV == 0]
    fig = gof_figure(preds)
    axes = fig.axes
    assert len(axes) == 4
    dv_pred = axes[0].collections[0].get_offsets()
    assert len(dv_pred) == len(obs) and np.allclose(np.sort(dv_pred[:, 0]), np.sort(obs.PRED))
    assert [a.get_xlabel() for a in axes] == ["PRED (mg/L)", "IPRED (mg/L)", "TIME (h)", "PRED (mg/L)"]
    assert len(cwres_qq(preds).axes[0].collections[0].get_offsets()) == obs.CWRES.notna().sum()
    etas = eta_figure(fit.estimation.individual, {e.eta: e.variance for e in fit.omega},
                      fit.estimation.shrinkage["eta"])
    assert len(etas.axes) == 3 and "shrinkage" in etas.axes[0].get_title()
    pages = individual_fits(fit, ds, per_page=5)
    assert len(pages) == math.ceil(12 / 5) and sum(a.get_visible() for p in pages for a in p.axes) == 12


def test_the_report_embeds_every_figure(theoph, tmp_path, capsys):
    ds, fit, run = theoph
    path = write_report(run, ds, tmp_path / "rep")
    page = path.read_text()
    for name in FIGURES + ("fits_1", "eta_covariates"):
        assert (tmp_path / "rep" / f"{name}.png").stat().st_size > 5000
        assert f'alt="{name}" src="data:image/png;base64,' in page
    meta = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert meta["summary"]["AIC"] == pytest.approx(fit.estimation.ofv + 2 * 8)   # 3 THETA, 3 OMEGA, ADD, PROP
    assert meta["metadata"]["versions"]["hybridpk"] and "RSE %" in page and "CL" in page
    assert "<th>ETABAR</th>" in page and "<th>P VAL</th>" in page       # the run's saved ETABAR table
    ds.to_dataframe().to_csv(tmp_path / "d.csv", index=False)
    assert main(["report", str(run), "--data", str(tmp_path / "d.csv"), "--out", str(tmp_path / "r2")]) == 0
    assert "report.html" in capsys.readouterr().out
    other = hp.read_nonmem(hp.bundled_dataset("ehc"))
    other.to_dataframe().to_csv(tmp_path / "e.csv", index=False)
    assert main(["report", str(run), "--data", str(tmp_path / "e.csv"), "--out", str(tmp_path / "r3")]) == 2


def test_the_axes_carry_the_datasets_units(theoph, tmp_path):
    """Units come from the dataset's column sidecar (here ug/mL and h), on every axis that has one; each ETA is
    drawn against each covariate."""
    from hybridpk.diagnostics import axis_units, eta_covariate_figure

    ds, fit, run = theoph
    labelled = hp.read_nonmem(ds.to_dataframe(), columns={"columns": {"DV": {"role": "DV", "unit": "ug/mL"},
                                                                       "WT": {"role": "covariate", "unit": "kg"}}})
    assert axis_units(labelled) == ("h", "ug/mL") and axis_units(ds) == ("h", "mg/L")
    write_report(run, labelled, tmp_path / "rep", vpc_replicates=20)
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["units"] == {"time": "h",
                                                                                    "concentration": "ug/mL"}
    cov = ds.to_dataframe().groupby("ID")[["WT"]].first().reset_index()
    fig = eta_covariate_figure(fit.estimation.individual, cov, {"WT": "kg"})
    assert len(fig.axes) == 3 and {a.get_xlabel() for a in fig.axes} == {"WT (kg)"}
    points = fig.axes[0].collections[0].get_offsets()
    merged = fit.estimation.individual.merge(cov, on="ID")
    assert np.allclose(points[:, 0], merged.WT) and np.allclose(points[:, 1], merged[fig.axes[0].get_ylabel()])
    t_unit, c_unit = axis_units(labelled)
    gof = gof_figure(fit.estimation.predictions, time_unit=t_unit, conc_unit=c_unit)
    assert [a.get_xlabel() for a in gof.axes] == ["PRED (ug/mL)", "IPRED (ug/mL)", "TIME (h)", "PRED (ug/mL)"]


def test_fit_writes_the_report_when_asked(tmp_path, capsys):
    assert main(["fit", "theoph", "--model", "1cmt_oral", "--out", str(tmp_path / "run"), "--report"]) == 0
    page = (tmp_path / "run" / "report" / "report.html").read_text()
    assert all(f'alt="{name}"' in page for name in FIGURES)
    assert "report: " in capsys.readouterr().out


@pytest.mark.slow
def test_the_report_renders_in_a_headless_browser(theoph, tmp_path):
    """Opt-in: Debian's chromium renders the report (benchmarks/report_screenshot.py); the screenshot is not
    blank (the figures are laid out: many distinct colours)."""
    import importlib.util
    import shutil
    from pathlib import Path

    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    spec = importlib.util.spec_from_file_location(
        "report_screenshot", Path(__file__).resolve().parents[2] / "benchmarks" / "report_screenshot.py")
    shot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shot)
    ds, _, run = theoph
    png = shot.screenshot(write_report(run, ds, tmp_path / "rep", vpc_replicates=50), tmp_path / "shot.png")
    from matplotlib.image import imread

    image = imread(png)
    assert image.shape[1] == 1200 and len(np.unique(image.reshape(-1, image.shape[-1])[::50], axis=0)) > 50
