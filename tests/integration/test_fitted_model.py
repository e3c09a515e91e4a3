"""The fitted-model object: typed tables with stated scales, save/load as plain data, one loader, the same
predictions and estimates before and after a round trip, and simulation with known truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.errors import HybridPKError
from hybridpk.population import FittedPopulation, build_model, fit_population
from hybridpk.population.nonmem import read_control_stream


@pytest.fixture(scope="module")
def theoph_fit():
    ds = hp.read_nonmem(hp.bundled_dataset("theoph"))
    pm = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="additive", data=ds)
    return ds, fit_population(pm, ds, progress=False)


def test_round_trip_reproduces_the_fitted_model(theoph_fit, tmp_path):
    ds, fit = theoph_fit
    fit.save(tmp_path / "run")
    back = hp.load_run(tmp_path / "run")
    assert isinstance(back, FittedPopulation) and back.name == "run"
    assert (back.theta, back.omega, back.sigma) == (fit.theta, fit.omega, fit.sigma)   # SEs included
    assert back.estimation.ofv == fit.estimation.ofv and back.estimation.data_sha256 == ds.fingerprint()
    pd.testing.assert_frame_equal(back.estimation.individual, fit.estimation.individual)
    a, b = fit.predict(ds), back.predict(ds)
    pd.testing.assert_frame_equal(a.table, b.table)
    # the fit's EBEs are what estimate() gives for the fitted data (one code path)
    torch.testing.assert_close(fit.estimation.estimates.eta, back.estimate(ds).eta, rtol=0, atol=0)
    np.testing.assert_array_equal(a.table.IPRED.to_numpy(), fit.estimation.predictions.IPRED.to_numpy())


def test_tables_state_their_scale(theoph_fit, pharmpy_examples, tmp_path):
    _, fit = theoph_fit
    add = fit.sigma["ADD"]
    assert add.scale == "sd" and add.value == add.sd and add.variance == pytest.approx(add.sd ** 2)
    assert fit.theta["CL"].rse == pytest.approx(100 * fit.theta["CL"].se / fit.theta["CL"].value)
    assert fit.omega["ETA_CL"].cv_percent == pytest.approx(100 * math.sqrt(math.expm1(fit.omega["ETA_CL"].variance)))
    pm, ds = read_control_stream(pharmpy_examples / "pheno.mod")
    res = fit_population(pm, ds, progress=False, pooled_start=False)
    s = res.sigma["SIGMA"]
    assert s.kind == "PROP" and s.scale == "variance" and s.value == pytest.approx(s.sd ** 2)
    assert s.se == pytest.approx(2 * s.sd * s.se_sd)                       # delta method
    assert [o.label for o in res.omega] == ["IIV_CL", "IIV_VC"]
    res.save(tmp_path / "pheno")
    saved = json.loads((tmp_path / "pheno" / "summary.json").read_text())["sigma"]["SIGMA"]
    assert saved["scale"] == "variance" and saved["estimate"] == pytest.approx(saved["sd"] ** 2)
    back = hp.load_run(tmp_path / "pheno")
    assert back.sigma == res.sigma and back.model.recipe["kind"] == "nonmem"


def test_a_published_spec_is_the_same_kind_of_object(tmp_path):
    spec = hp.load_model("vancomycin_goti2018")
    assert isinstance(spec, FittedPopulation) and spec.estimation is None and spec.ranges["CRCL"] == (5.0, 150.0)
    spec.save(tmp_path / "vanco")
    assert not (tmp_path / "vanco" / "summary.json").exists()
    back = hp.load_run(tmp_path / "vanco")
    assert (back.theta, back.omega, back.sigma, back.ranges) == (spec.theta, spec.omega, spec.sigma, spec.ranges)


def test_damaged_or_foreign_model_files_are_refused(theoph_fit, tmp_path):
    _, fit = theoph_fit
    run = fit.save(tmp_path / "run")
    model = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**model, "version": 1}))
    with pytest.raises(HybridPKError, match="refit"):
        hp.load_run(run)
    (run / "model.json").write_text('{"format": "hybridpk-population-model", "ver')
    with pytest.raises(HybridPKError, match="not a file written by hybridpk"):
        hp.load_run(run)
    with pytest.raises(HybridPKError, match="not a run folder"):
        hp.load_run(tmp_path / "nothing")


def test_run_folders_are_checked_against_their_manifest(theoph_fit, tmp_path, capsys):
    """Every file a run lists in manifest.json is checked (size, SHA-256): a missing, truncated, edited or
    foreign file is refused by name, through the library and the CLI (exit 2, no internal error)."""
    import shutil

    from hybridpk.cli import main

    ds, fit = theoph_fit
    run = fit.save(tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["format"] == "hybridpk-run" and set(manifest["files"]) == {
        "model.json", "summary.json", "individual.csv", "predictions.csv"}
    hp.load_run(run)
    ds.to_dataframe().query("ID == 1").to_csv(tmp_path / "p.csv", index=False)

    def damaged(name, change, message):
        bad = tmp_path / f"bad_{len(list(tmp_path.glob('bad_*')))}"
        shutil.copytree(run, bad)
        change(bad / name)
        with pytest.raises(HybridPKError, match=message):
            hp.load_run(bad)
        capsys.readouterr()
        assert main(["predict", str(bad), str(tmp_path / "p.csv"), "--out", str(tmp_path / "o.csv")]) == 2
        err = capsys.readouterr().err
        assert name in err and "internal error" not in err and "Traceback" not in err

    def edit_theta(path):   # valid JSON, right format version, one THETA changed by hand
        m = json.loads(path.read_text())
        m["theta"][0]["value"] *= 1.1
        path.write_text(json.dumps(m, indent=2))

    damaged("model.json", edit_theta, "model.json has changed since hybridpk wrote it")
    damaged("individual.csv", lambda f: f.write_text(f.read_text()[:200]), "individual.csv has changed")
    damaged("summary.json", lambda f: f.unlink(), "summary.json is missing")
    damaged("manifest.json", lambda f: f.unlink(), "no manifest.json")
    damaged("manifest.json", lambda f: f.write_text("{"), "manifest.json is damaged")


def test_simulate_draws_the_model_it_is(theoph_fit):
    ds, fit = theoph_fit
    a = fit.simulate(ds, n=2, seed=3)
    pd.testing.assert_frame_equal(a, fit.simulate(ds, n=2, seed=3))
    assert not a.DV.equals(fit.simulate(ds, n=2, seed=4).DV)
    assert len(a) == 2 * len(ds) and set(a.REP) == {1, 2}
    sim = fit.simulate(ds, n=300, seed=1)
    etas = sim.groupby(["REP", "ID"]).first()
    for o in fit.omega:
        assert np.var(etas[o.eta]) == pytest.approx(o.variance, rel=0.15), o.eta
    obs = sim[(sim.EVID == 0) & (sim.MDV == 0)]
    assert np.std(obs.DV - obs.IPRED) == pytest.approx(fit.sigma["ADD"].sd, rel=0.05)   # additive error
    doses = sim[sim.EVID == 1]
    assert (doses.DV == 0).all()
