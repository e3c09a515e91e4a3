"""The hybrid on top of a model hybridpk did not build from options (issue 14, point 4): a published spec refitted
from its estimates (`hybridpk fit DATA --model SPEC`), and a spec used as it stands, each with its own error model
and covariates."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

import hybridpk as hp
from hybridpk.cli import main
from hybridpk.population import load_model
from hybridpk.residual import TrainConfig, fit_hybrid

#: nlmixr2's FOCEi estimates on theo_sd (Fidler et al. 2019, as in models/theophylline_nlmixr2.toml)
NLMIXR2 = {"KA": 1.57, "CL": 2.76, "V": 31.5}


def test_a_published_spec_is_refitted_from_its_estimates_and_extended_by_the_hybrid(tmp_path, capsys):
    rc = main(["fit", "theoph", "--model", "theophylline_nlmixr2", "--hybrid", "vae", "--hybrid-form", "log",
               "--epochs", "30", "--no-covariance", "--quiet", "--seed", "3", "--out", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    est = {k: v["estimate"] for k, v in summary["parameters"].items()}
    for name, published in NLMIXR2.items():        # the same data, the same model: nlmixr2's numbers
        assert est[name] == pytest.approx(published, rel=0.03), (name, est[name])
    assert list(summary["sigma"]) == ["ADD"]        # the spec's additive error, not the CLI's proportional default
    run = hp.load_run(tmp_path / "run")
    assert run.population.model.error.kind == "additive" and run.vae.form_name == "log"
    assert np.isfinite(run.individual.NLL_HYBRID).all()


def test_options_that_would_change_a_published_model_are_refused(capsys):
    rc = main(["fit", "theoph", "--model", "theophylline_nlmixr2", "--error", "proportional", "--iiv", "CL",
               "--out", "never-written"])
    err = capsys.readouterr().err
    assert rc == 2 and "--iiv, --error" in err and "--model 1cmt_oral" in err and "Traceback" not in err


def test_a_published_model_with_covariates_and_combined_error_carries_the_hybrid_as_it_stands():
    """vancomycin_goti2018 (CL ~ CRCL, DIAL; V ~ WT, DIAL; combined error), not refitted: the hybrid's ODE part
    is the spec's own individual fit (its covariates and error model), and the training uses the spec's SDs."""
    spec = load_model("vancomycin_goti2018")
    rng = np.random.default_rng(3)
    rows = []
    for i in range(1, 31):
        cov = {"WT": rng.uniform(50, 110), "CRCL": rng.uniform(30, 140), "DIAL": int(rng.random() < 0.3)}
        rows.append({"ID": i, "TIME": 0.0, "AMT": 1000.0, "RATE": 1000.0, "DV": 0.0, "MDV": 1, "EVID": 1, **cov})
        rows += [{"ID": i, "TIME": t, "AMT": 0.0, "RATE": 0.0, "DV": 0.0, "MDV": 0, "EVID": 0, **cov}
                 for t in sorted(rng.choice([1.5, 3.0, 6.0, 9.0, 12.0, 18.0, 24.0], 5, replace=False))]
    design = hp.read_nonmem(pd.DataFrame(rows))
    sim = spec.simulate(design, n=1, seed=3)
    df = design.to_dataframe()
    df["DV"] = sim.DV.to_numpy()
    ds = hp.read_nonmem(df)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hyb = fit_hybrid(spec.model, ds, population=spec, seed=1, progress=False,
                         config=TrainConfig(epochs=20, warmup_epochs=5, progress=False, form="input"))
    assert hyb.population is spec and hyb.population.model.error.kind == "combined"
    assert np.isfinite([h[1] for h in hyb.history]).all()
    ours, own = hyb.predict(ds).table, spec.predict(ds).table
    np.testing.assert_allclose(ours.IPRED_ODE, own.IPRED, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.PRED, own.PRED, rtol=1e-10)
    at_6h = own[own.TIME == 6.0].PRED
    assert at_6h.std() > 0.1 * at_6h.mean()      # the typical curve differs by patient: the covariates act


def test_the_published_models_are_listed_with_their_structure_covariates_and_error(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "published models (--model NAME):" in out
    assert "vancomycin_goti2018: 2cmt_iv, covariates CRCL, DIAL, WT, combined error" in out
    assert main(["models", "theophylline_nlmixr2", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == {"theophylline_nlmixr2": {"published": True, "structure": "1cmt_oral",
                                               "citation": load_model("theophylline_nlmixr2").citation,
                                               "covariates": [], "error": "additive", "dosing": {}}}
