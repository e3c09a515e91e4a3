"""Model selection: AIC/BIC as NONMEM users compute them, cross-validated held-out -2LL that picks the true
structure, refusal of runs fitted to other data."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import hybridpk as hp
from hybridpk.classify import compare_runs, count_parameters
from hybridpk.cli import main
from hybridpk.errors import HybridPKError
from hybridpk.population import build_model, fit_population


def _two_compartment_data(n=40, seed=1):
    """IV bolus 500 mg, a clear distribution phase (2-cmt truth), 8 samples over 24 h."""
    design = hp.make_design(n, [dict(TIME=0, AMT=500)], [0.25, 0.5, 1, 2, 4, 8, 12, 24], jitter=0.05, seed=seed)
    sim = hp.simulate_population("2cmt_iv", design, dict(CL=3.0, V=10.0, Q=8.0, V2=40.0),
                                 dict(CL=0.09, V=0.04), proportional=0.1, additive=0.05, seed=seed)
    return sim.dataset


def _fit(model, ds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_population(build_model(model, iiv=["CL", "V"], error="combined"), ds, progress=False,
                              covariance=False)


@pytest.fixture(scope="module")
def runs():
    ds = _two_compartment_data()
    return ds, {"1cmt": _fit("1cmt_iv", ds), "2cmt": _fit("2cmt_iv", ds)}


def test_aic_and_bic_as_nonmem_users_compute_them(runs):
    ds, fits = runs
    one = fits["1cmt"]
    # THETA CL, V; OMEGA CL, V; residual ADD, PROP
    assert count_parameters(one) == 6 and count_parameters(fits["2cmt"]) == 8
    result = compare_runs(fits, ds, folds=0)
    row = result.table.set_index("run").loc["1cmt"]
    assert row.AIC == pytest.approx(one.estimation.ofv + 12)
    assert row.BIC == pytest.approx(one.estimation.ofv + 6 * math.log(ds.n_observations))
    assert result.recommended == "2cmt" and "AIC" in result.reason


def test_cross_validation_picks_the_true_structure(runs, tmp_path, capsys):
    ds, fits = runs
    result = compare_runs(fits, ds, folds=3, seed=2)
    scores = {s.name: s for s in result.scores}
    assert len(scores["2cmt"].cv_nll) == 3 and all(np.isfinite(scores["2cmt"].cv_nll))
    assert result.recommended == "2cmt" and "3 of 3 folds" in result.reason
    assert scores["2cmt"].mean_cv_nll < scores["1cmt"].mean_cv_nll
    assert np.mean(scores["2cmt"].cv_rmse) < np.mean(scores["1cmt"].cv_rmse)
    for name, fit in fits.items():
        fit.save(tmp_path / name)
    ds.to_dataframe().to_csv(tmp_path / "data.csv", index=False)
    assert main(["compare", str(tmp_path / "1cmt"), str(tmp_path / "2cmt"), "--data", str(tmp_path / "data.csv"),
                 "--folds", "0", "--out", str(tmp_path / "c.csv")]) == 0
    assert "recommended: 2cmt" in capsys.readouterr().out


def test_runs_fitted_to_other_data_are_refused(runs):
    ds, fits = runs
    other = _two_compartment_data(seed=5)
    with pytest.raises(HybridPKError, match="other data"):
        compare_runs(fits, other, folds=0)
    with pytest.raises(HybridPKError, match="at least two"):
        compare_runs({"1cmt": fits["1cmt"]}, ds)
    with pytest.raises(HybridPKError, match="folds"):
        compare_runs(fits, ds, folds=1)


def test_the_one_standard_error_rule():
    """A hybrid whose held-out -2LL is lower by less than one standard error of the fold differences loses to
    the simpler ODE run; one lower by much more wins."""
    from hybridpk.classify.compare import RunScore, _rank

    ode = RunScore("2-cmt", "ODE", 100.0, 10, 120.0, 150.0, cv_nll=(-3.40, -3.50, -3.45), cv_rmse=(0.1, 0.1, 0.1))
    tie = RunScore("VAE", "hybrid", None, None, None, None, cv_nll=(-3.41, -3.49, -3.46), cv_rmse=(0.1, 0.1, 0.1))
    far = RunScore("VAE", "hybrid", None, None, None, None, cv_nll=(-3.90, -4.00, -3.95), cv_rmse=(0.1, 0.1, 0.1))
    close = _rank([ode, tie], 3, 300)
    assert close.recommended == "2-cmt" and "one-standard-error rule" in close.reason
    assert _rank([ode, far], 3, 300).recommended == "VAE"


def test_a_model_that_reduces_to_the_simpler_one_ties_with_it():
    """A 2-cmt fit of 1-cmt data whose second compartment vanishes predicts what the 1-cmt fit predicts: lower by
    1e-5 per observation in every fold (benchmarks/model_selection.py, seed 4), so the SE of the differences is
    ~0. Summed over the 1000 observations the difference is 0.01, below the tie margin: the simpler run. A
    difference of 2 points in all is not a tie."""
    from hybridpk.classify.compare import TIE, RunScore, _rank

    one = RunScore("1-cmt", "ODE", 100.0, 8, 116.0, 150.0, cv_nll=(-3.15, -3.16, -3.14), cv_rmse=(0.1, 0.1, 0.1))
    two = RunScore("2-cmt", "ODE", 100.0, 10, 120.0, 160.0, cv_nll=(-3.15001, -3.16001, -3.14001),
                   cv_rmse=(0.1, 0.1, 0.1))
    tied = _rank([one, two], 3, 1000)
    assert tied.recommended == "1-cmt" and "one-standard-error rule" in tied.reason and TIE == 1.0
    better = RunScore("2-cmt", "ODE", 100.0, 10, 120.0, 160.0, cv_nll=(-3.152, -3.162, -3.142), cv_rmse=(0.1,) * 3)
    assert _rank([one, better], 3, 1000).recommended == "2-cmt"
