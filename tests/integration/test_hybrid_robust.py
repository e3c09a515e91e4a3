"""No optimiser failure reaches the user: the hybrid's likelihood stays finite when a correction drives a
prediction to 0 under proportional error, and a failing refinement keeps each patient's best point."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from hybridpk.cli import main
from hybridpk.population import build_model, fit_population
from hybridpk.residual import TrainConfig, fit_hybrid
from hybridpk.residual.objective import gaussian_nll, variance_floor
from hybridpk.solve.examples import simulate_ehc_population


def test_the_variance_floor_keeps_a_zero_prediction_finite_and_acts_only_there():
    from hybridpk.population import ErrorModel

    ds, _ = simulate_ehc_population(3, seed=1)
    batch = ds.to_batch()
    prop = ErrorModel("proportional")
    sd = {"PROP": torch.tensor(0.1, dtype=torch.float64)}
    zero = torch.zeros_like(batch.dv)
    assert not torch.isfinite(gaussian_nll(batch, zero, batch.is_obs, prop, sd)).all()     # the failure mode
    floor = variance_floor(prop, sd, 0.05)
    assert float(floor) == pytest.approx((0.1 * 0.05) ** 2)
    assert torch.isfinite(gaussian_nll(batch, zero, batch.is_obs, prop, sd, floor)).all()
    # above c0 the likelihood is the population model's
    high = torch.full_like(batch.dv, 2.0)
    torch.testing.assert_close(gaussian_nll(batch, high, batch.is_obs, prop, sd, floor),
                               gaussian_nll(batch, high, batch.is_obs, prop, sd), rtol=0, atol=0)
    # a combined model whose additive SD exceeds PROP c0 is never floored; additive / LTBS: no floor
    comb = ErrorModel("combined")
    sd2 = {"ADD": torch.tensor(0.05, dtype=torch.float64), **sd}
    v = comb.variance(zero, sd2)
    assert bool((v >= variance_floor(comb, sd2, 0.05)).all())
    assert variance_floor(ErrorModel("additive"), {"ADD": sd2["ADD"]}, 0.05) == 0.0


@pytest.fixture(scope="module")
def small_fit():
    ds, _ = simulate_ehc_population(40, seed=4)
    pm = build_model("1cmt_oral", iiv=["CL", "V", "KA"])          # default: proportional error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pm, ds, progress=False, covariance=False)
    return ds, pm, fit


def test_a_failing_refinement_keeps_each_patients_best_point(small_fit, monkeypatch):
    ds, pm, fit = small_fit
    hyb = fit_hybrid(pm, ds, population=fit, seed=1, progress=False,
                     config=TrainConfig(epochs=20, warmup_epochs=5, progress=False, form="input"))
    plain = hyb.estimate(ds)

    def failing_step(self, closure):        # what torch's strong-Wolfe search does on some problems
        closure()
        with torch.no_grad():
            self.param_groups[0]["params"][0].add_(0.05)
        closure()
        raise IndexError("list index out of range")

    monkeypatch.setattr(torch.optim.LBFGS, "step", failing_step)
    guarded = hyb.estimate(ds)
    assert guarded.refine_failure.startswith("IndexError")
    unrefined = hyb.estimate(ds, refine=False)
    assert bool((guarded.objective <= unrefined.objective + 1e-12).all())     # nobody ends worse than it started
    assert torch.isfinite(guarded.z).all() and guarded.n_unrefined < ds.n_subjects
    assert plain.refine_failure == "" and bool((plain.objective <= guarded.objective + 1e-9).all())


def test_an_imported_nonmem_model_trains(pharmpy_examples):
    """pheno (NONMEM import, proportional error): the training loss showed 0.000 after the first epoch (every
    minibatch was skipped as NaN: the input form drove a prediction to 0, so its proportional variance), and
    the refinement then crashed inside L-BFGS."""
    from hybridpk.population.nonmem import read_control_stream

    pm, ds = read_control_stream(pharmpy_examples / "pheno.mod")
    fit = fit_population(pm, ds, progress=False, pooled_start=False, covariance=False)
    hyb = fit_hybrid(pm, ds, population=fit, seed=7, progress=False,
                     config=TrainConfig(epochs=30, warmup_epochs=10, progress=False))
    train = np.array([h[1] for h in hyb.history])
    assert np.isfinite(train).all() and (train != 0.0).all()
    assert hyb.individual.NLL_HYBRID.notna().all() and hyb.refine_failure == ""


def test_default_command_fits_predicts_and_logs_a_few_progress_lines(tmp_path, capsys):
    """The default command (combined error) on EHC data with a covariate column, run as a user would with
    stderr going to a log file: it fits and predicts new patients (it crashed inside L-BFGS), and the log
    gets a line per 10% of the epochs, not thousands of redrawn bars."""
    from tests.unit.test_progress import lines_of

    _Payload.target = tmp_path / "payload-ran"

    ds, _ = simulate_ehc_population(30, seed=2, dose=500.0)
    df = ds.to_dataframe()
    wt = dict(zip(ds.ids, np.round(np.random.default_rng(2).normal(75, 12, ds.n_subjects), 1)))
    df.insert(2, "WT", df.ID.map(wt))
    df.to_csv(tmp_path / "ehc.csv", index=False)
    with open(tmp_path / "log.txt", "w") as log:   # stderr is a file, not a terminal
        proc = subprocess.run([sys.executable, "-m", "hybridpk", "fit", str(tmp_path / "ehc.csv"), "--model",
                               "1cmt_oral", "--hybrid", "vae", "--epochs", "200", "--no-covariance", "--seed", "7",
                               "--out", str(tmp_path / "run")], stdout=subprocess.DEVNULL, stderr=log, timeout=600)
    assert proc.returncode == 0, (tmp_path / "log.txt").read_text()[-2000:]
    lines = lines_of((tmp_path / "log.txt").read_text())
    assert len(lines) < 100, len(lines)
    # the default form is chosen among four candidates, each trained 200 epochs (fewer than the 300 of the
    # screening): one line per 20 epochs each
    assert sum(ln.startswith("VAE (") for ln in lines) == 40, lines
    assert any(ln.startswith("FOCE-I: ") and "OFV=" in ln for ln in lines)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert math.isfinite(summary["hybrid"]["nll_hybrid_total"])
    assert summary["hybrid"]["refinement"]["patients"] == 30
    new, _ = simulate_ehc_population(5, seed=52, dose=500.0)
    new.to_dataframe().assign(WT=70.0).to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "new.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    # a weights file that carries code is refused as not a hybridpk file, without advising the unsafe option
    torch.save({"state": _Payload(), "scale": {}}, tmp_path / "run" / "vae.pt")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "new.csv"), "--out", str(tmp_path / "q.csv")]) == 2
    err = capsys.readouterr().err
    assert "is not a hybridpk model file" in err and "weights_only=False" not in err and "internal error" not in err
    assert not (tmp_path / "payload-ran").exists()


class _Payload:
    """Pickles to a call: what a weights file must never be allowed to run."""

    def __reduce__(self):
        return (open, (str(_Payload.target), "w"))
