"""Doses with RATE = -2 (-1) and their duration (rate) a parameter: NONMEM's D1 (R1), e.g. zero-order absorption.
They were refused by every model ('RATE=-1/-2 ... without a DUR column is not supported'). The models take the
duration from the parameter D (R), of the doses into the dose compartment, as F and ALAG; a control stream's D1/R1
is that parameter (the ODE solvers: tests/integration/test_modelled_input_ode.py). Checked against the zero-order
input's own solution and its derivative in D, against the same doses with the duration given in the data, and by a
fit that recovers D."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.errors import ModelError
from hybridpk.population import build_model, fit_population
from hybridpk.population.nonmem import read_control_stream
from hybridpk.solve import simulate

TIMES = [0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0]


def _records(rate=-2.0, dur=None, n=1):
    rows = []
    for i in range(1, n + 1):
        rows.append(dict(ID=i, TIME=0.0, AMT=100.0, RATE=rate, DV=0.0, EVID=1, MDV=1,
                         **({"DUR": dur} if dur is not None else {})))
        rows += [dict(ID=i, TIME=t, AMT=0.0, RATE=0.0, DV=1.0, EVID=0, MDV=0, **({"DUR": 0.0} if dur is not None
                                                                                 else {})) for t in TIMES]
    return pd.DataFrame(rows)


def _zero_order(t, dose, d, cl, v):
    """The 1-compartment concentration after a zero-order input of ``dose`` over ``d`` h (its own solution)."""
    k = cl / v
    during = dose / d / cl * (1 - np.exp(-k * np.minimum(t, d)))
    return np.where(t <= d, during, during * np.exp(-k * (t - d)))


def test_the_duration_parameter_gives_the_zero_order_solution_and_its_derivative():
    """1cmt_iv, 100 mg with RATE = -2 and D = 2.3 h (no level at its end, where the solution has a kink in D): the
    zero-order input's solution to 1e-12, the derivative in D (autograd through the closed form) the central
    difference of that solution, and the same as the duration given in a DUR
    column; the ODE solvers give the same solution and derivative; a model without D refuses the doses."""
    batch = hp.read_nonmem(_records()).to_batch()
    d = torch.tensor([2.3], dtype=torch.float64, requires_grad=True)
    p = {"CL": torch.tensor([3.0], dtype=torch.float64), "V": torch.tensor([30.0], dtype=torch.float64), "D": d}
    c = simulate("1cmt_iv", p, batch).ipred[0, 1:]
    t = np.array(TIMES)
    np.testing.assert_allclose(c.detach().numpy(), _zero_order(t, 100.0, 2.3, 3.0, 30.0), rtol=1e-12)
    grad = torch.autograd.grad(c.sum(), d)[0].item()
    h = 1e-6
    fd = (_zero_order(t, 100.0, 2.3 + h, 3.0, 30.0) - _zero_order(t, 100.0, 2.3 - h, 3.0, 30.0)).sum() / (2 * h)
    assert grad == pytest.approx(fd, rel=1e-6)
    given = hp.read_nonmem(_records(dur=2.3)).to_batch()
    c_given = simulate("1cmt_iv", {"CL": 3.0, "V": 30.0}, given).ipred[0, 1:]
    torch.testing.assert_close(c.detach(), c_given, rtol=1e-12, atol=0)
    with pytest.raises(ModelError, match="needs the rate R or the duration D"):
        simulate("1cmt_iv", {"CL": 3.0, "V": 30.0}, batch)
    for solver, tol in (("expm", 1e-12), ("dp5", 1e-7)):
        d_ode = d.detach().clone().requires_grad_()
        c_ode = simulate("1cmt_iv", {**p, "D": d_ode}, batch, method="ode", solver=solver).ipred[0, 1:]
        np.testing.assert_allclose(c_ode.detach().numpy(), c.detach().numpy(), rtol=tol)
        assert torch.autograd.grad(c_ode.sum(), d_ode)[0].item() == pytest.approx(fd, rel=1e-6)


STREAM = """$PROBLEM zero-order input, its duration a THETA
$INPUT ID TIME AMT RATE DV EVID MDV
$DATA {data} IGNORE=@
$SUBROUTINE ADVAN1 TRANS2
$PK
CL = THETA(1)*EXP(ETA(1))
V = THETA(2)*EXP(ETA(2))
D1 = THETA(3)*EXP(ETA(3))
S1 = V
$ERROR
Y = F + F*EPS(1)
$THETA (0, 3) (0, 30) (0, {d})
$OMEGA 0.09 0.04 0.04
$SIGMA 0.01
$ESTIMATION METHOD=1 INTERACTION {maxeval}
"""


def _simulated(folder, n=24, seed=3, d=2.0):
    rng = np.random.default_rng(seed)
    df = _records(n=n)
    for i in range(1, n + 1):
        cl, v, dd = 3.0 * math.exp(rng.normal(0, 0.3)), 30.0 * math.exp(rng.normal(0, 0.2)), d
        rows = (df.ID == i) & (df.EVID == 0)
        c = _zero_order(df.TIME[rows].to_numpy(), 100.0, dd, cl, v)
        df.loc[rows, "DV"] = np.round(c * (1 + 0.1 * rng.normal(size=c.size)), 5)
    df.to_csv(folder / "zero.csv", index=False)
    return df


def test_a_control_streams_d1_is_the_duration_and_is_estimated(tmp_path):
    """ADVAN1 with D1 = THETA(3) and RATE = -2 on 24 simulated patients (zero-order input over 2 h): the fit from
    D1 = 1.5 h recovers the duration (within 10%) and CL, and reports the individual duration as D1; the native
    1cmt_iv with D a THETA (--init D=1.5) gives the same fit; at the initial
    estimates the stream's OFV is the native model's with the same duration given in a DUR column. A dose
    recommendation gives its doses the model's duration (RATE = -2); with a modelled rate it is refused."""
    df = _simulated(tmp_path)
    (tmp_path / "zero.mod").write_text(STREAM.format(data="zero.csv", d=1.5, maxeval="")
                                       .replace("D1 = THETA(3)*EXP(ETA(3))", "D1 = THETA(3)")
                                       .replace("$OMEGA 0.09 0.04 0.04", "$OMEGA 0.09 0.04"))
    pm, ds = read_control_stream(tmp_path / "zero.mod")
    assert pm.label("D") == "D1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pm, ds, progress=False, covariance=False)
    assert np.isfinite(fit.estimation.ofv)
    assert fit.theta["THETA_3"].value == pytest.approx(2.0, rel=0.1)
    assert fit.theta["THETA_1"].value == pytest.approx(3.0, rel=0.15)
    assert "D" in fit.estimate(ds).parameters.columns
    # a dose recommendation gives the new doses the model's own duration (RATE = -2): its MAP steady-state trough is
    # the zero-order input's own solution summed over 400 past doses at the patient's MAP CL, V and D1
    from hybridpk.dosing import recommend_dose

    one = ds.subset([ds.ids[0]])
    rec = recommend_dose(fit, one, "trough=0.5:1.5", interval=12)
    assert (rec.records.RATE == -2).all() and rec.to_dict()["infusion_duration_h"] is None
    m = {k: v["map"] for k, v in rec.map_parameters.items()}
    trough = sum(_zero_order(np.array([12.0 * k]), rec.dose, m["D1"], m["CL"], m["V"])[0] for k in range(1, 401))
    assert rec.exposure["trough"]["map"] == pytest.approx(trough, rel=1e-6)
    assert abs(m["D1"] - 2.0) < 0.5
    # a modelled rate (R1, RATE = -1): a dose lasts AMT/R1 h, its levels are not proportional to it: refused
    df.assign(RATE=np.where(df.EVID == 1, -1.0, 0.0)).to_csv(tmp_path / "rate.csv", index=False)
    (tmp_path / "rate.mod").write_text(STREAM.format(data="rate.csv", d=50.0, maxeval="MAXEVAL=0")
                                       .replace("D1 = THETA(3)*EXP(ETA(3))", "R1 = THETA(3)")
                                       .replace("$OMEGA 0.09 0.04 0.04", "$OMEGA 0.09 0.04"))
    pm_r, ds_r = read_control_stream(tmp_path / "rate.mod")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at_r = fit_population(pm_r, ds_r, progress=False, covariance=False, evaluate=True)
    with pytest.raises(hp.HybridPKError, match=r"modelled rate \(R1\)"):
        recommend_dose(at_r, ds_r.subset([ds_r.ids[0]]), "auc24=30:60")
    # the native model with the duration a THETA (hybridpk fit --init D=1.5): the stream's fit
    native_d = build_model("1cmt_iv", iiv=["CL", "V"], error="proportional", initial={"CL": 3.0, "V": 30.0, "D": 1.5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fit_population(native_d, hp.read_nonmem(tmp_path / "zero.csv"), progress=False, covariance=False,
                              omega=[0.09, 0.04], sigma={"PROP": 0.1})
    assert ours.estimation.ofv == pytest.approx(fit.estimation.ofv, abs=1e-5)
    assert ours.theta["D"].value == pytest.approx(fit.theta["THETA_3"].value, rel=1e-4)
    # the same records with the duration in the data: the OFV at D's value with no IIV on it
    (tmp_path / "fixed.mod").write_text(STREAM.format(data="zero.csv", d=2.0, maxeval="MAXEVAL=0")
                                        .replace("D1 = THETA(3)*EXP(ETA(3))", "D1 = THETA(3)")
                                        .replace("$OMEGA 0.09 0.04 0.04", "$OMEGA 0.09 0.04"))
    pm1, ds1 = read_control_stream(tmp_path / "fixed.mod")
    native = hp.read_nonmem(df.assign(RATE=np.where(df.EVID == 1, -2.0, 0.0),
                                      DUR=np.where(df.EVID == 1, 2.0, 0.0)))
    pm2 = build_model("1cmt_iv", iiv=["CL", "V"], error="proportional", initial={"CL": 3.0, "V": 30.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = fit_population(pm1, ds1, progress=False, covariance=False, evaluate=True)
        b = fit_population(pm2, native, progress=False, covariance=False, evaluate=True, omega=[0.09, 0.04],
                           sigma={"PROP": 0.1}, pooled_start=False)
    assert a.estimation.ofv == pytest.approx(b.estimation.ofv, abs=1e-6)


@pytest.mark.parametrize("model, initial", [("1cmt_oral", {"ALAG": 0.2}), ("1cmt_iv", {"D": 1.5})])
def test_a_run_that_estimates_an_optional_parameter_loads_again(tmp_path, theoph_path, model, initial):
    """A fit that estimates ALAG, F, D or R (given an initial value, --init ALAG=0.2) is saved and loaded with them:
    it could not be loaded ('the THETA/OMEGA tables do not match the model'), so predict, map, dose and report
    refused every such run."""
    from hybridpk.population import FittedPopulation

    if model == "1cmt_oral":
        ds = hp.read_nonmem(theoph_path)
    else:
        _simulated(tmp_path)
        ds = hp.read_nonmem(tmp_path / "zero.csv")
    pm = build_model(model, iiv=["CL", "V"], initial=initial, error="combined")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pm, ds, progress=False, covariance=False, maxiter=5)
    fit.save(tmp_path / "run")
    back = FittedPopulation.load(tmp_path / "run")
    name = next(iter(initial))
    assert back.theta[name].value == fit.theta[name].value
    np.testing.assert_allclose(back.predict(ds).table.IPRED, fit.predict(ds).table.IPRED, rtol=1e-12)
