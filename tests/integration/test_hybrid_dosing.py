"""Precision dosing with a hybrid run and with nonlinear models: the joint posterior over (ETAs, z), the
dose search by simulation (checked against the exact linear formulas), and the warnings when a patient or a
regimen lies outside the training design."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.cli import main
from hybridpk.data import Regimen
from hybridpk.dosing import estimate_patient, forecast, recommend_dose
from hybridpk.dosing.model import HybridDosing, PopulationDosing, dosing_model
from hybridpk.dosing.targets import metric_coefficients, metrics_by_simulation, parse_target
from hybridpk.population import build_model
from hybridpk.residual import HybridFit, TrainConfig, fit_hybrid
from hybridpk.residual.hybrid import _ode_only
from tests.integration.ehc import fitted_ehc_population
from tests.reference.hybrids import zero_correction_vae


@pytest.fixture(scope="module")
def ehc_fit():
    ds, _, pm, fit = fitted_ehc_population(60, seed=4)
    return ds, pm, fit


@pytest.fixture(scope="module")
def hybrid_run(ehc_fit, tmp_path_factory):
    """A small trained hybrid (reservoir form) and its saved run folder."""
    ds, pm, fit = ehc_fit
    hyb = fit_hybrid(pm, ds, population=fit, config=TrainConfig(epochs=40, warmup_epochs=10, progress=False,
                                                                form="reservoir"), seed=3, progress=False)
    run = tmp_path_factory.mktemp("hybrid") / "run"
    hyb.save(run)
    return hyb, run


def _zero_hybrid(fit, ds):
    """A hybrid whose correction is exactly 0 (log form, decoder output 0): the ODE model in disguise."""
    _, batch, ipred = _ode_only(fit, ds)
    vae = zero_correction_vae(batch, ipred, n_shift=3)
    return HybridFit(population=fit, vae=vae, config=TrainConfig(), individual=pd.DataFrame())


def _patient(ds, sid=1, doses=2):
    """One patient: ``doses`` doses of 100 mg every 12 h and the first three of its levels."""
    df = ds.to_dataframe()
    g = df[df.ID == sid]
    obs = g[g.EVID == 0].iloc[:3]
    dose = g[g.EVID == 1].iloc[:1].assign(ADDL=doses - 1, II=12.0)
    return hp.read_nonmem(pd.concat([dose, obs.assign(ADDL=0, II=0.0)]).reset_index(drop=True))


@pytest.mark.parametrize("target", ["auc24=20:30", "trough=0.2:0.4", "peak=1:2", "auc24@2=15:30", "conc@30=0.2:0.5"])
def test_simulated_metrics_equal_the_exact_linear_ones(ehc_fit, target):
    """The simulation path (used for hybrids and nonlinear models) against the closed-form coefficients
    (metric = a + b dose, steady state exact) on a linear model, at several ETA draws and doses."""
    ds, _, fit = ehc_fit
    tgt = parse_target(target)
    est = PopulationDosing(fit).estimate(_patient(ds))
    eta = torch.cat([est.eta, est.eta + 0.2, est.eta - 0.3])
    doses = [50.0, 130.0]
    a, b = metric_coefficients(fit, est.batch, eta, tgt, 24.0, 12.0, 0.0)
    exact = torch.stack([a + b * d for d in doses], 1)
    sim, _ = metrics_by_simulation(lambda bb: fit.concentrations(bb.select([0] * 3), eta), est.batch, tgt, 24.0, 12.0,
                                   0.0, doses, 40)
    torch.testing.assert_close(sim, exact, rtol=2e-3, atol=1e-6)


def test_zero_correction_hybrid_doses_as_its_ode_model(ehc_fit):
    """A hybrid whose correction is 0 must give the ODE model's MAP ETAs (z = 0), the same posterior of the
    ETAs, and the same recommendation, although its exposures come from simulation and the ODE model's from
    the exact formula."""
    ds, _, fit = ehc_fit
    pat = _patient(ds, sid=3)
    hyb = _zero_hybrid(fit, ds)
    ph = estimate_patient(hyb, pat, n_samples=800, seed=2)
    po = estimate_patient(fit, pat, n_samples=800, seed=2)
    assert ph.draws.shape == (800, 5) and ph.model.point_names == ("ETA_CL", "ETA_V", "ETA_KA", "Z1", "Z2")
    torch.testing.assert_close(ph.estimate.eta[0, :3], po.estimate.eta[0], atol=1e-5, rtol=0)
    assert float(ph.estimate.eta[0, 3:].abs().max()) < 1e-5
    np.testing.assert_allclose(ph.draws[:, :3].mean(0).numpy(), po.draws.mean(0).numpy(), atol=0.05)
    np.testing.assert_allclose(ph.draws[:, 3:].std(0).numpy(), 1.0, atol=0.1)   # z: its prior, N(0, 1)
    for target in ("auc24=20:30", "trough=0.2:0.4"):
        rh = recommend_dose(hyb, pat, target, interval=12, duration=0, dose_step=10, posterior=ph)
        ro = recommend_dose(fit, pat, target, interval=12, duration=0, dose_step=10, posterior=po)
        assert rh.dose == ro.dose
        assert any("log form does not conserve mass" in w for w in rh.warnings)
        m_h, m_o = rh.exposure[target.split("=")[0]], ro.exposure[target.split("=")[0]]
        assert m_h["map"] == pytest.approx(m_o["map"], rel=0.01)
        assert rh.pta == pytest.approx(ro.pta, abs=0.08)


def test_hybrid_run_is_dosed_with_its_correction_and_warns_outside_its_design(ehc_fit, hybrid_run):
    ds, _, _ = ehc_fit
    hyb, run = hybrid_run
    cov = hyb.coverage
    assert cov.dose_min == cov.dose_max == 100.0 and cov.interval_min is None and 20 < cov.span_h < 24
    assert len(cov.z_mean) == 2 and np.all(np.linalg.eigvalsh(np.array(cov.z_cov)) > 0)
    loaded = hp.load_run(run)
    assert loaded.coverage == cov
    model = dosing_model(run)
    assert isinstance(model, HybridDosing)
    pat = _patient(ds, sid=2, doses=1)
    post = estimate_patient(model, pat, seed=1)
    assert post.draws.shape == (250, 5) and np.isfinite(post.ess)
    assert not any("not used" in w for w in post.warnings)
    # the forecast is the hybrid's prediction at the MAP point
    times = np.linspace(0.0, 20.0, 21)
    fc = forecast(post.estimate, post.draws, times)
    design = pat.prediction_design(times, cmt=2)
    direct = loaded.concentrations(design.to_batch(), post.estimate.eta)
    t = design.to_dataframe()
    on = (t.EVID == 2).to_numpy()
    np.testing.assert_allclose(fc.table.IPRED_MAP.to_numpy(), direct[0].numpy()[on], rtol=1e-8, atol=1e-10)
    tab = fc.table
    assert (tab.PI90_LOW <= tab.MEDIAN + 1e-12).all() and (tab.MEDIAN <= tab.PI90_HIGH + 1e-12).all()
    assert fc.warnings == ()                      # within the 0-24 h the training covered
    late = forecast(post.estimate, post.draws, [40.0], regimen=Regimen(24.0, 300.0, 12.0, 2))
    text = " ".join(late.warnings)
    assert "300 mg lie outside" in text and "single doses only" in text and "beyond the training data" in text
    rec = recommend_dose(model, pat, "auc24=20:30", interval=12, duration=0, dose_step=10, posterior=post)
    assert rec.dose % 10 == 0 and rec.dose > 0 and 20 <= rec.exposure["auc24"]["map"] <= 30
    assert any("single doses only" in w for w in rec.warnings)
    assert not any("conserve mass" in w for w in rec.warnings)      # the reservoir form does
    # the regimen's MAP AUC24 at steady state, simulated independently with the saved hybrid: 2 x the AUC of
    # the 10th interval of the regimen given on its own
    end = rec.start + 10 * 12.0
    grid = np.linspace(end - 12.0, end, 2001)
    b = post.estimate.batch.extend(rec.regimen, grid, keep_records=False, keep_doses=False)
    c = loaded.concentrations(b, post.estimate.eta)[0, -len(grid):]
    auc = float(torch.trapezoid(c, torch.as_tensor(grid))) * 2.0
    assert auc == pytest.approx(rec.exposure["auc24"]["map"], rel=0.01)


def test_a_long_record_is_estimated_in_chunks_of_bounded_memory(ehc_fit, hybrid_run, monkeypatch):
    """Posterior draws of a patient whose record spans days, for a hybrid trained on one day (a fine grid: the
    reservoir's arrays grow with the intervals squared), are evaluated a few at a time: 250 at once took over
    24 GB for a 30-day record."""
    ds, _, _ = ehc_fit
    hyb, run = hybrid_run
    short = _patient(ds, sid=2, doses=1)
    assert hyb.chunk_size(short.to_batch()) == 100
    df = short.to_dataframe()
    long = hp.read_nonmem(pd.concat([df[df.EVID == 1].assign(ADDL=15, II=12.0),
                                     df[df.EVID == 0].assign(ADDL=0, II=0.0, TIME=df[df.EVID == 0].TIME + 180.0)])
                          .reset_index(drop=True))
    model = dosing_model(run)
    est = model.estimate(long)
    step = hyb.chunk_size(est.batch, most=250)
    intervals = math.ceil(float(est.batch.time.max()) / hyb.vae.scale["input_dt"])
    one = hyb.vae.form.cells(est.batch.time.shape[1], intervals, est.batch.dose_time.shape[1], hyb.vae.scale)
    assert 1 <= step < 250 and step * one <= 2e7
    sizes = []
    objective = HybridDosing._objective

    def recorded(self, batch, points):
        sizes.append(points.shape[0])
        return objective(self, batch, points)

    monkeypatch.setattr(HybridDosing, "_objective", recorded)
    draws, *_ = model.posterior(est, 250, seed=1)
    assert draws.shape == (250, 5) and 0 < max(sizes) <= step


def test_latent_outside_training_is_warned(ehc_fit):
    ds, _, fit = ehc_fit
    from hybridpk.residual.coverage import TrainingCoverage

    cov = TrainingCoverage(100.0, 100.0, None, None, 24.0, 1, 0.5)
    assert cov.latent_warnings(torch.tensor([0.1, 0.2])) == []
    assert "outside the training patients' latent values" in cov.latent_warnings(torch.tensor([1.0, 0.5]))[0]


def test_cli_dose_and_map_take_a_hybrid_run(ehc_fit, hybrid_run, tmp_path, capsys):
    ds, _, _ = ehc_fit
    _, run = hybrid_run
    _patient(ds, sid=5).to_dataframe().to_csv(tmp_path / "p.csv", index=False)
    assert main(["dose", str(run), str(tmp_path / "p.csv"), "--target", "auc24=20:30",
                 "--interval", "12", "--duration", "0", "--dose-step", "10", "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["dose_mg"] > 0 and "warning:" in out and any("trained" in w for w in rec["warnings"])
    assert main(["map", str(run), str(tmp_path / "p.csv"), "--out", str(tmp_path / "f.csv")]) == 0
    out = capsys.readouterr().out
    assert "Z1" in out and "CL" in out
    f = pd.read_csv(tmp_path / "f.csv")
    assert (f.PI90_LOW <= f.PI90_HIGH).all()


def test_nonlinear_structural_model_is_dosed_by_simulation():
    """A Michaelis-Menten model (no closed form, previously refused): the recommended dose's MAP AUC24,
    simulated independently, lies in the window and one step more would not be closer to its middle."""
    pm = build_model("1cmt_iv_mm", iiv=["VMAX", "V"], error="proportional")
    names = [t.name for t in pm.thetas]
    theta = {"VMAX": 20.0, "KM": 5.0, "V": 30.0}
    fitted = hp.FittedPopulation.from_values(pm, {n: theta[n] for n in names}, {"VMAX": 0.09, "V": 0.04},
                                             {"PROP": 0.1}, name="mm")
    rows = [dict(ID=1, TIME=0.0, DV=0.0, AMT=200.0, RATE=200.0, ADDL=1, II=12.0, EVID=1, MDV=1),
            dict(ID=1, TIME=6.0, DV=3.0, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0),
            dict(ID=1, TIME=11.5, DV=1.2, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0)]
    pat = hp.read_nonmem(pd.DataFrame(rows))
    post = estimate_patient(fitted, pat, n_samples=100)
    rec = recommend_dose(fitted, pat, "auc24=150:200", interval=12, duration=1, dose_step=25, posterior=post)
    assert rec.dose > 0 and 150 <= rec.exposure["auc24"]["map"] <= 200

    def auc(dose):
        end = rec.start + 10 * 12.0
        grid = np.linspace(end - 12.0, end, 1201)
        b = post.estimate.batch.extend(Regimen(rec.start, dose, 12.0, 10, 1.0), grid, keep_records=False,
                                       keep_doses=False)
        c = fitted.concentrations(b, post.estimate.eta)[0, -len(grid):]
        return float(torch.trapezoid(c, torch.as_tensor(grid))) * 2.0

    assert auc(rec.dose) == pytest.approx(rec.exposure["auc24"]["map"], rel=0.01)
    assert abs(auc(rec.dose) - 175) <= abs(auc(rec.dose + 25) - 175) + 1e-9
    assert auc(rec.dose + 25) > auc(rec.dose)       # nonlinear: more than proportional near saturation


def test_censored_levels_are_refused_by_the_hybrid_not_read_as_measured(hybrid_run, ehc_fit, tmp_path, capsys):
    """A BLQ level (CENS=1, the limit in DV): the population model takes it by M3, the hybrid's likelihood has no
    M3 and would read 0.05 mg/L as a measured level. Its estimate (map, dose, predict) and its training refuse it
    by name; with MDV=1 on that record the patient is answered."""
    from hybridpk.errors import ModelError

    hyb, run = hybrid_run
    ds, pm, _ = ehc_fit
    df = ds.to_dataframe()
    patient = df[df.ID == df.ID.iloc[0]].copy()
    patient["CENS"] = 0
    last = patient.index[patient.MDV == 0][-1]
    patient.loc[last, ["DV", "CENS"]] = [0.05, 1]
    with pytest.raises(ModelError, match=r"1 censored observation\(s\) .* the hybrid's estimate would read as levels "
                                         r"measured at the limit; set MDV=1"):
        hyb.estimate(hp.read_nonmem(patient))
    patient.to_csv(tmp_path / "p.csv", index=False)
    assert main(["map", str(run), str(tmp_path / "p.csv")]) == 2
    assert "censored observation" in capsys.readouterr().err
    patient.loc[last, "MDV"] = 1
    hyb.estimate(hp.read_nonmem(patient))
    train = df.assign(CENS=0)
    train.loc[train.index[train.MDV == 0][-1], ["DV", "CENS"]] = [0.05, 1]
    train.to_csv(tmp_path / "train.csv", index=False)
    assert main(["fit", str(tmp_path / "train.csv"), "--model", "1cmt_oral", "--hybrid", "vae", "--out",
                 str(tmp_path / "run")]) == 2
    assert "the hybrid's training would read as levels measured at the limit" in capsys.readouterr().err
    assert not (tmp_path / "run" / "summary.json").exists()           # refused before the population fit
