"""$ERROR as NONMEM users write it beyond Y = F + F*EPS(1) + EPS(2): the residual SD as THETAs with
$SIGMA 1 FIX (W = SQRT(THETA(4)**2 + THETA(5)**2*IPRED**2)), ETA on EPS, an SD that depends on a data item,
two additive EPS. NONMEM's residual variance for any $ERROR is sum_k SIGMA(k) H_k^2 with H_k = dY/dEPS(k) at
EPS = 0; checked against the native combined model and against an independent FOCE-I objective written here
in numpy/scipy (Wang 2007: h = dV/deta taken as a total derivative, through f and directly)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import minimize

import hybridpk as hp
from hybridpk.errors import ModelError
from hybridpk.population import build_model
from hybridpk.population.nonmem import read_control_stream
from tests.integration.test_nonmem_import import _ofv

HEAD = """$PROBLEM theophylline
$INPUT ID TIME DV AMT EVID MDV CMT WT
$DATA theoph.csv IGNORE=@
$SUBROUTINE ADVAN2 TRANS2
$PK
KA = THETA(1)*EXP(ETA(1))
CL = THETA(2)*EXP(ETA(2))
V = THETA(3)*EXP(ETA(3))
S2 = V
"""
THETAS = """$THETA (0, 1.5) ; POP_KA
$THETA (0, 2.8) ; POP_CL
$THETA (0, 32) ; POP_V
$THETA (0, 0.3) ; RUV_ADD
$THETA (0, 0.1) ; RUV_PROP
$OMEGA 0.4
$OMEGA 0.07
$OMEGA 0.02
"""
W_FORM = HEAD + """$ERROR
IPRED = F
W = SQRT(THETA(4)**2 + THETA(5)**2*IPRED**2)
Y = IPRED + W*EPS(1)
""" + THETAS + "$SIGMA 1 FIX\n$ESTIMATION METHOD=1 INTERACTION\n"

#: ETA on EPS (Karlsson's IIV on the residual error) and an SD twice as large before 2 h (a data item)
ETA_ON_EPS = HEAD + """$ERROR
IPRED = F
W = SQRT(THETA(4)**2 + THETA(5)**2*IPRED**2)
IF (TIME.LT.2) W = 2*W
Y = IPRED + W*EXP(ETA(4))*EPS(1)
""" + THETAS + "$OMEGA 0.09\n$SIGMA 1 FIX\n$ESTIMATION METHOD=1 INTERACTION\n"

VALUES = {"POP_KA": 1.5, "POP_CL": 2.8, "POP_V": 32.0, "RUV_ADD": 0.3, "RUV_PROP": 0.1}


def _read(tmp_path, theoph_path, text):
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    (tmp_path / "run.mod").write_text(text)
    return read_control_stream(tmp_path / "run.mod")


def _subjects(theoph_path):
    df = pd.read_csv(theoph_path)
    out = []
    for _, rows in df.groupby("ID", sort=False):
        obs = rows[rows.MDV == 0]
        out.append((float(rows.AMT.max()), obs.TIME.to_numpy(float), obs.DV.to_numpy(float)))
    return out


def _conc(dose, t, theta, eta):
    ka, cl, v = theta[0] * np.exp(eta[0]), theta[1] * np.exp(eta[1]), theta[2] * np.exp(eta[2])
    k = cl / v
    return dose * ka / (v * (ka - k)) * (np.exp(-k * t) - np.exp(-ka * t))


def independent_ofv(subjects, theta, omega, variance):
    """FOCE-I with a residual variance ``variance(f, eta, t)`` that may read the ETAs and the time."""
    k = omega.shape[0]
    oinv, total = np.linalg.inv(omega), 0.0
    for dose, t, y in subjects:
        def obj(eta):
            f = _conc(dose, t, theta, eta)
            v = variance(f, eta, t)
            return np.sum((y - f) ** 2 / v + np.log(v)) + eta @ oinv @ eta

        eta = minimize(obj, np.zeros(k), method="BFGS", options={"gtol": 1e-10}).x
        f = _conc(dose, t, theta, eta)
        v = variance(f, eta, t)
        step = 1e-6
        g = np.stack([(_conc(dose, t, theta, eta + step * e) - _conc(dose, t, theta, eta - step * e)) / (2 * step)
                      for e in np.eye(k)], 1)
        h = np.stack([(variance(_conc(dose, t, theta, eta + step * e), eta + step * e, t)
                       - variance(_conc(dose, t, theta, eta - step * e), eta - step * e, t)) / (2 * step)
                      for e in np.eye(k)], 1)
        m = oinv + (g.T / v) @ g + 0.5 * (h.T / v ** 2) @ h
        total += obj(eta) + np.linalg.slogdet(omega)[1] + np.linalg.slogdet(m)[1]
    return total


def test_residual_sds_written_as_thetas_with_sigma_1_fix_are_the_combined_error(tmp_path, theoph_path):
    pm, ds = _read(tmp_path, theoph_path, W_FORM)
    assert pm.error.kind == "general" and pm.sigma_fixed == ("EPS1",)
    a = _ofv(pm, ds, VALUES, [0.4, 0.07, 0.02], {"EPS1": 1.0})
    native = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="combined", data=hp.read_nonmem(theoph_path))
    b = _ofv(native, hp.read_nonmem(theoph_path), {"KA": 1.5, "CL": 2.8, "V": 32.0}, [0.4, 0.07, 0.02],
             {"ADD": 0.3, "PROP": 0.1})
    assert a == pytest.approx(b, rel=1e-9)


def test_the_w_form_fits_to_the_combined_models_minimum(tmp_path, theoph_path):
    pm, ds = _read(tmp_path, theoph_path, W_FORM)
    ours = hp.fit_population(pm, ds, progress=False, pooled_start=False, covariance=False)
    native = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="combined", data=hp.read_nonmem(theoph_path))
    ref = hp.fit_population(native, hp.read_nonmem(theoph_path), progress=False, covariance=False)
    assert ours.estimation.ofv == pytest.approx(ref.estimation.ofv, abs=1e-3)
    assert abs(ours.theta["RUV_PROP"].value) == pytest.approx(ref.sigma["PROP"].sd, rel=1e-2)
    assert ours.sigma["EPS1"].variance == 1.0                                   # FIX
    pred = ours.predict(ds).table
    assert np.isfinite(pred.loc[pred.MDV == 0, "IPRED"]).all()


def test_eta_on_eps_and_an_sd_read_from_a_data_item_agree_with_an_independent_focei(tmp_path, theoph_path):
    pm, ds = _read(tmp_path, theoph_path, ETA_ON_EPS)
    assert pm.error.kind == "general" and pm.n_eta == 4
    omega = np.diag([0.4, 0.07, 0.02, 0.09])
    ours = _ofv(pm, ds, VALUES, list(np.diag(omega)), {"EPS1": 1.0})

    def variance(f, eta, t):
        w = np.sqrt(0.3 ** 2 + 0.1 ** 2 * f ** 2) * np.where(t < 2, 2.0, 1.0)
        return (w * np.exp(eta[3])) ** 2

    theirs = independent_ofv(_subjects(theoph_path), (1.5, 2.8, 32.0), omega, variance)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_two_additive_eps_add_their_variances(tmp_path, theoph_path):
    """Y = F + EPS(1) + EPS(2) used to keep one of them silently; their variances add."""
    text = HEAD + "$ERROR\nY = F + EPS(1) + EPS(2)\n" + THETAS.split("$THETA (0, 0.3)")[0] + \
        "$OMEGA 0.4\n$OMEGA 0.07\n$OMEGA 0.02\n$SIGMA 0.2\n$SIGMA 0.3\n"
    pm, ds = _read(tmp_path, theoph_path, text)
    theta = {k: v for k, v in VALUES.items() if k.startswith("POP")}
    a = _ofv(pm, ds, theta, [0.4, 0.07, 0.02], {"EPS1": math.sqrt(0.2), "EPS2": math.sqrt(0.3)})
    native = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="additive", data=hp.read_nonmem(theoph_path))
    b = _ofv(native, hp.read_nonmem(theoph_path), {"KA": 1.5, "CL": 2.8, "V": 32.0}, [0.4, 0.07, 0.02],
             {"ADD": math.sqrt(0.5)})
    assert a == pytest.approx(b, rel=1e-9)


def test_a_general_error_model_doses_simulates_and_refuses_the_hybrid_up_front(tmp_path, theoph_path, capsys):
    from hybridpk.cli import main

    pm, ds = _read(tmp_path, theoph_path, ETA_ON_EPS)
    df = pd.read_csv(theoph_path)
    df[df.ID == 1].to_csv(tmp_path / "patient.csv", index=False)
    assert main(["map", str(tmp_path / "run.mod"), str(tmp_path / "patient.csv"), "--out",
                 str(tmp_path / "fc.csv")]) == 0, capsys.readouterr().err
    fc = pd.read_csv(tmp_path / "fc.csv")
    assert (fc.PI90_HIGH >= fc.CI90_HIGH - 1e-9).all() and np.isfinite(fc.PI90_HIGH).all()
    fitted = hp.load_model(tmp_path / "run.mod")
    sims = fitted.simulate(ds, n=2, seed=1)
    assert np.isfinite(sims.DV).all() and (sims.DV != sims.IPRED).any()
    capsys.readouterr()
    assert main(["fit", str(tmp_path / "run.mod"), "--hybrid", "vae", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "SD reads ETAs" in err and not (tmp_path / "run").exists()
    with pytest.raises(ModelError, match="hybrid"):
        hp.fit_hybrid(pm, ds)


def test_combined1_error_agrees_with_an_independent_focei(theoph_path):
    """SD = ADD + PROP IPRED (Monolix's and posologyr's combined1; build_model(error="combined1"), a spec's
    kind = "combined1"): the FOCE-I OFV of the independent objective with V = (a + b f)^2."""
    ds = hp.read_nonmem(theoph_path)
    pm = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="combined1", data=ds)
    ours = _ofv(pm, ds, {"KA": 1.5, "CL": 2.8, "V": 32.0}, [0.4, 0.07, 0.02], {"ADD": 0.3, "PROP": 0.1})
    theirs = independent_ofv(_subjects(theoph_path), (1.5, 2.8, 32.0), np.diag([0.4, 0.07, 0.02]),
                             lambda f, eta, t: (0.3 + 0.1 * f) ** 2)
    assert ours == pytest.approx(theirs, rel=1e-6)
    combined = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="combined", data=ds)
    assert abs(_ofv(combined, ds, {"KA": 1.5, "CL": 2.8, "V": 32.0}, [0.4, 0.07, 0.02],
                    {"ADD": 0.3, "PROP": 0.1}) - ours) > 1.0       # a different model, not a relabelling


def test_an_error_model_that_reads_dvid_tells_the_kinds_apart(tmp_path, theoph_path):
    """Two assays of the same concentration (DVID 1 and 2 in one compartment), the second twice as noisy: the
    $ERROR reads DVID, so both kinds are accepted, and the OFV is that of the same SD written on TIME (DVID 2
    are the levels before 2 h). Without DVID in $ERROR the kinds are refused by row."""
    df = pd.read_csv(theoph_path)
    df["DVID"] = np.where((df.EVID == 0) & (df.TIME < 2), 2, 1)
    shutil.copy(theoph_path, tmp_path / "orig.csv")
    df.to_csv(tmp_path / "theoph.csv", index=False)
    head = HEAD.replace("$INPUT ID TIME DV AMT EVID MDV CMT WT", "$INPUT ID TIME DV AMT EVID MDV CMT WT DVID")
    by_dvid = head + """$ERROR
IPRED = F
W = SQRT(THETA(4)**2 + THETA(5)**2*IPRED**2)
IF (DVID.EQ.2) W = 2*W
Y = IPRED + W*EPS(1)
""" + THETAS + "$SIGMA 1 FIX\n"
    by_time = by_dvid.replace("IF (DVID.EQ.2) W = 2*W", "IF (TIME.LT.2) W = 2*W").replace(
        "$INPUT ID TIME DV AMT EVID MDV CMT WT DVID", "$INPUT ID TIME DV AMT EVID MDV CMT WT").replace(
        "$DATA theoph.csv", "$DATA orig.csv")
    (tmp_path / "a.mod").write_text(by_dvid)
    (tmp_path / "b.mod").write_text(by_time)
    pm_a, ds_a = read_control_stream(tmp_path / "a.mod")
    pm_b, ds_b = read_control_stream(tmp_path / "b.mod")
    assert pm_a.reads_dvid and not pm_b.reads_dvid
    a = _ofv(pm_a, ds_a, VALUES, [0.4, 0.07, 0.02], {"EPS1": 1.0})
    b = _ofv(pm_b, ds_b, VALUES, [0.4, 0.07, 0.02], {"EPS1": 1.0})
    assert a == pytest.approx(b, rel=1e-12)
    plain = head + "$ERROR\nY = F + F*EPS(1)\n" + THETAS.split("$THETA (0, 0.3)")[0] + \
        "$OMEGA 0.4\n$OMEGA 0.07\n$OMEGA 0.02\n$SIGMA 0.02\n"
    (tmp_path / "c.mod").write_text(plain)
    pm_c, ds_c = read_control_stream(tmp_path / "c.mod")
    from hybridpk.errors import DatasetError
    from hybridpk.population.focei import Problem

    with pytest.raises(DatasetError, match="DVID 1, 2"):
        Problem(pm_c, ds_c).require_positive_variance(
            {t.name: torch.tensor(t.init, dtype=torch.float64) for t in pm_c.thetas}, {"PROP": torch.tensor(0.1)})


#: the additive part fixed at 0 (a proportional error written in the W form): W = 0 at every dose record, where
#: F = 0, so H = SQRT(...) has an infinite derivative there
W_PROPORTIONAL = HEAD.replace("theoph.csv", "sim.csv") + """$ERROR
IPRED = F
PROP = THETA(4)
ADD = THETA(5)
W = SQRT(PROP**2*IPRED**2 + ADD**2)
Y = F + W*EPS(1)
$THETA (0, 1.2) (0, 4) (0, 35) (0, 0.15) 0 FIX
$OMEGA 0.1 0.1 0.1
$SIGMA 1 FIX
$ESTIMATION METHOD=1 INTERACTION
"""


def test_a_w_form_with_its_additive_part_fixed_at_0_fits_as_the_proportional_model(tmp_path):
    # UserZetsu/nonmem's test_model.mod (GitHub) writes its error so; every ETA gradient was NaN (the dose records'
    # infinite derivative times their zero weight), the EBEs stayed at 0 and the fit stopped after 0 iterations
    # with OFV 4214.7 where NONMEM reports 697.57 at the initial estimates.
    design = hp.make_design(24, [dict(TIME=0, AMT=100, CMT=1)], [0.5, 1, 2, 4, 6, 8, 12, 24], seed=3)
    sim = hp.simulate_population("1cmt_oral", design, dict(KA=1.0, CL=3.0, V=30.0),
                                 dict(KA=0.09, CL=0.09, V=0.04), proportional=0.1, seed=3)
    df = sim.dataset.to_dataframe()[["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT"]].assign(WT=70.0)
    df.to_csv(tmp_path / "sim.csv", index=False)
    (tmp_path / "run.mod").write_text(W_PROPORTIONAL)
    pm, ds = read_control_stream(tmp_path / "run.mod")
    assert pm.error.kind == "general"
    values = {t.name: t.init for t in pm.thetas}
    a = _ofv(pm, ds, values, [0.1, 0.1, 0.1], {"EPS1": 1.0})
    native = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="proportional")
    b = _ofv(native, sim.dataset, {"KA": 1.2, "CL": 4.0, "V": 35.0}, [0.1, 0.1, 0.1], {"PROP": 0.15})
    assert a == pytest.approx(b, rel=1e-9)
    ours = hp.fit_population(pm, ds, progress=False, covariance=False)
    ref = hp.fit_population(native, sim.dataset, progress=False, covariance=False)
    assert ours.estimation.converged
    assert ours.estimation.ofv == pytest.approx(ref.estimation.ofv, abs=1e-3)
    prop = [t for t in ours.theta if t.name == pm.thetas[3].name][0]
    assert prop.value == pytest.approx(ref.sigma["PROP"].sd, rel=1e-2)
