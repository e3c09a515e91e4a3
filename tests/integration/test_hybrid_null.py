"""The null model of form selection: the hybrid without a correction (form "none") is the ODE model, and "auto"
keeps it when no trained correction predicts held-out patients' levels better (benchmarks/vae_ehc.py
--no-recirculation, seed 3: the reservoir, chosen after screening, ended 4.5% worse than ODE-only)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pandas as pd
import pytest
import torch

from hybridpk.population import build_model, fit_population
from hybridpk.residual import HybridFit, ODEBaseline, TrainConfig, fit_hybrid, load_run
from hybridpk.residual.hybrid import _ode_only
from hybridpk.residual.selection import Candidate, select
from hybridpk.residual.training import null_model
from hybridpk.solve.examples import simulate_ehc_population


@pytest.fixture(scope="module")
def population():
    ds, _ = simulate_ehc_population(40, seed=4, recirculating=False)
    pm = build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pm, ds, progress=False, covariance=False)
    return ds, fit


def test_the_null_hybrid_is_the_ode_model(population):
    ds, fit = population
    est, batch, ipred = _ode_only(fit, ds)
    vae = null_model(batch, ipred, TrainConfig(latent_dim=2), ODEBaseline(fit))
    hyb = HybridFit(population=fit, vae=vae, config=TrainConfig(form="none"), individual=pd.DataFrame())
    out = hyb.predict(ds)
    torch.testing.assert_close(out.hybrid, out.ode, rtol=1e-6, atol=1e-9)    # the MAP tolerance apart
    torch.testing.assert_close(out.estimates.eta, est.eta, rtol=1e-6, atol=1e-6)   # the ODE-only MAP ETAs
    assert float(out.estimates.z.abs().max()) < 1e-6                               # z at its prior mean


def test_auto_on_a_population_the_ode_describes_reports_the_ode_model_and_saves_the_choice(population, tmp_path):
    """A short default selection (forms auto): the ODE model (form none) is scored with the trained forms, and a
    run whose hybrid is the ODE model saves and loads as such."""
    ds, fit = population
    cfg = TrainConfig(epochs=12, screen_epochs=4, warmup_epochs=2, progress=False)
    hyb = fit_hybrid(fit.model, ds, population=fit, config=cfg, seed=1, progress=False)
    forms = [c.form for c in hyb.candidates]
    assert forms[-1] == "none" and len(forms) == 5 and sum(c.chosen for c in hyb.candidates) == 1
    est, batch, ipred = _ode_only(fit, ds)
    none = replace(hyb, vae=null_model(batch, ipred, TrainConfig(latent_dim=2), ODEBaseline(fit)),
                   config=TrainConfig(form="none"), omega=None, sigma=None)
    none.save(tmp_path / "run")
    back = load_run(tmp_path / "run")
    assert back.vae.form_name == "none"
    torch.testing.assert_close(back.predict(ds).hybrid, none.predict(ds).ode, rtol=1e-6, atol=1e-9)


def _fake(scores):
    """train/score/null for select(): each candidate's scores after screening and at the end, fixed."""
    def train(c, epochs):
        return (f"model {c.form}", epochs), [(e, 0.0, 0.0) for e in range(epochs)]

    def score(c, model):
        return scores[c.form][0 if model[1] <= 10 else 1] if c.form != "none" else scores["none"]

    return train, score, (lambda k: "ODE model")


@pytest.mark.parametrize("final, chosen", [(-3.08, "none"), (-3.12, "reservoir"), (-3.10, "none")])
def test_auto_keeps_the_ode_model_unless_a_correction_predicts_better(final, chosen):
    """The screening winner continues; at the end it must score strictly below the ODE model (ties: none)."""
    train, score, null = _fake({"reservoir": (-3.16, final), "log": (-3.08, None), "none": -3.10})
    cands = [Candidate("reservoir", 2), Candidate("log", 2)]
    model, _, best = select(cands, train, 40, 10, score=score, null=null)
    assert best.form == chosen and best.chosen
    assert [c.form for c in cands] == ["reservoir", "log", "none"]       # the null model is reported with them
    assert cands[-1].score == -3.10 and cands[-1].epochs == 0
    assert model == ("ODE model" if chosen == "none" else ("model reservoir", 40))
    assert sum(c.chosen for c in cands) == 1
