"""NONMEM control-stream import beyond pheno: ADVAN2 (TRANS1 and TRANS2) and ADVAN4 TRANS4, checked against
the same models built natively (same OFV at the same parameter values; same fit)."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.population import build_model, fit_population
from hybridpk.population.focei import Problem
from hybridpk.population.nonmem import read_control_stream

THEO_TRANS2 = """$PROBLEM theophylline
$INPUT ID TIME DV AMT EVID MDV CMT WT
$DATA theoph.csv IGNORE=@
$SUBROUTINE ADVAN2 TRANS2
$PK
KA = THETA(1)*EXP(ETA(1))
CL = THETA(2)*EXP(ETA(2))
V = THETA(3)*EXP(ETA(3))
S2 = V
$ERROR
Y = F + EPS(1)
$THETA (0, 1.5) ; POP_KA
$THETA (0, 2.8) ; POP_CL
$THETA (0, 32) ; POP_V
$OMEGA 0.4
$OMEGA 0.07
$OMEGA 0.02
$SIGMA 0.5
$ESTIMATION METHOD=1 INTERACTION
"""

THEO_TRANS1 = THEO_TRANS2.replace("ADVAN2 TRANS2", "ADVAN2 TRANS1").replace(
    "S2 = V", "K = CL/V\nS2 = V")


def _ofv(pm, ds, theta, omega, sd):
    prob = Problem(pm, ds)
    th = {k: torch.tensor(v, dtype=torch.float64) for k, v in theta.items()}
    om = torch.diag(torch.tensor(omega, dtype=torch.float64))
    s = {k: torch.tensor(v, dtype=torch.float64) for k, v in sd.items()}
    eta = prob.ebe(th, torch.linalg.inv(om), s, torch.zeros(ds.n_subjects, len(omega), dtype=torch.float64))
    return float(prob.ofv(th, om, s, eta).detach())


@pytest.mark.parametrize("text", [THEO_TRANS2, THEO_TRANS1], ids=["TRANS2", "TRANS1"])
def test_advan2_import_matches_native_model(tmp_path, theoph_path, text):
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    (tmp_path / "run.mod").write_text(text)
    pm_nm, ds_nm = read_control_stream(tmp_path / "run.mod")
    assert ds_nm.n_subjects == 12 and ds_nm.n_observations == 132
    assert [t.name for t in pm_nm.thetas] == ["POP_KA", "POP_CL", "POP_V"]
    ds = hp.read_nonmem(theoph_path)
    native = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="additive", data=ds)
    sd = {"ADD": math.sqrt(0.5)}
    a = _ofv(pm_nm, ds_nm, {"POP_KA": 1.5, "POP_CL": 2.8, "POP_V": 32.0}, [0.4, 0.07, 0.02], sd)
    b = _ofv(native, ds, {"KA": 1.5, "CL": 2.8, "V": 32.0}, [0.4, 0.07, 0.02], sd)
    assert a == pytest.approx(b, abs=1e-6)


def test_advan2_import_fit_matches_native_fit(tmp_path, theoph_path):
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    (tmp_path / "run.mod").write_text(THEO_TRANS2)
    pm, ds = read_control_stream(tmp_path / "run.mod")
    res = fit_population(pm, ds, progress=False, pooled_start=False, covariance=False)
    assert res.estimation.ofv == pytest.approx(116.8034, abs=0.01)           # the native fit's OFV (tutorial 2)
    assert res.theta["POP_CL"].value == pytest.approx(2.75, rel=0.01)


ADVAN4 = """$PROBLEM two compartments, oral
$INPUT ID TIME DV AMT EVID MDV CMT ADDL II
$DATA sim.csv IGNORE=@
$SUBROUTINE ADVAN4 TRANS4
$PK
CL = THETA(1)*EXP(ETA(1))
V2 = THETA(2)*EXP(ETA(2))
Q = THETA(3)
V3 = THETA(4)
KA = THETA(5)*EXP(ETA(3))
S2 = V2
$ERROR
Y = F + F*EPS(1) + EPS(2)
$THETA (0, 5) (0, 25) (0, 4) (0, 60) (0, 1)
$OMEGA 0.09
$OMEGA 0.09
$OMEGA 0.09
$SIGMA 0.01
$SIGMA 0.0025
"""


def test_advan4_trans4_combined_error_import(tmp_path):
    design = hp.make_design(20, [dict(TIME=0, AMT=500, CMT=1, ADDL=2, II=12)], [0.5, 1, 2, 4, 8, 11.9, 25, 30, 48],
                            seed=2)
    sim = hp.simulate_population("2cmt_oral", design, dict(CL=5.0, V=25.0, Q=4.0, V2=60.0, KA=1.0),
                                 dict(CL=0.09, V=0.09, KA=0.09), proportional=0.1, additive=0.05, seed=2)
    df = sim.dataset.to_dataframe()[["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "ADDL", "II"]]
    df.to_csv(tmp_path / "sim.csv", index=False)
    (tmp_path / "run.mod").write_text(ADVAN4)
    pm, ds = read_control_stream(tmp_path / "run.mod")
    assert pm.structural.name == "2cmt_oral" and pm.error.kind == "combined"
    native = build_model("2cmt_oral", iiv=["CL", "V", "KA"], error="combined")
    sd = {"ADD": 0.05, "PROP": 0.1}
    theta_nm = {"THETA1": 5.0, "THETA2": 25.0, "THETA3": 4.0, "THETA4": 60.0, "THETA5": 1.0}
    names = [t.name for t in pm.thetas]
    theta_nm = dict(zip(names, theta_nm.values()))
    a = _ofv(pm, ds, theta_nm, [0.09, 0.09, 0.09], sd)
    b = _ofv(native, sim.dataset, dict(CL=5.0, V=25.0, Q=4.0, V2=60.0, KA=1.0), [0.09, 0.09, 0.09], sd)
    assert a == pytest.approx(b, abs=1e-6)


def test_pheno_reproduces_nonmems_published_run(pharmpy_examples):
    """pharmpy's bundled pheno run (NONMEM 7, FOCE-I, $COVARIANCE UNCONDITIONAL): the final row of pheno.ext
    (ITERATION -1000000000) and its standard errors (-1000000001). OFV within 0.01, THETA within 0.1%, OMEGA and
    SIGMA within 0.5%, the sandwich standard errors within 1%."""
    import warnings

    import pandas as pd

    ext = pd.read_csv(pharmpy_examples / "pheno.ext", sep=r"\s+", skiprows=1).set_index("ITERATION")
    final, se = ext.loc[-1000000000], ext.loc[-1000000001]
    pm, ds = read_control_stream(pharmpy_examples / "pheno.mod")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit_population(pm, ds, progress=False)
    assert res.estimation.ofv == pytest.approx(final["OBJ"], abs=0.01)
    for k, t in enumerate(res.theta, 1):
        assert t.value == pytest.approx(final[f"THETA{k}"], rel=1e-3)
        assert t.se == pytest.approx(se[f"THETA{k}"], rel=1e-2)
    assert res.omega["ETA_CL"].variance == pytest.approx(final["OMEGA(1,1)"], rel=5e-3)
    assert res.omega["ETA_VC"].variance == pytest.approx(final["OMEGA(2,2)"], rel=5e-3)
    assert res.sigma["SIGMA"].variance == pytest.approx(final["SIGMA(1,1)"], rel=5e-3)
    assert res.omega["ETA_CL"].se == pytest.approx(se["OMEGA(1,1)"], rel=1e-2)
    assert res.sigma["SIGMA"].se == pytest.approx(se["SIGMA(1,1)"], rel=1e-2)


def test_pheno_linear_reproduces_nonmems_published_run(pharmpy_examples, tmp_path):
    """pharmpy's bundled pheno_linear run: a $PRED model (PsN's linearisation of pheno: IPRED = OPRED +
    D_ETA (ETA - OETA) from data items, no THETA) whose residual SD reads the ETAs and data items (NONMEM's
    general form H = dY/dEPS), fitted by FOCE-I. The initial OFV (iteration 0) and the final row of
    pheno_linear.ext: OFV within 0.01, OMEGA and SIGMA within 0.1%."""
    import warnings

    import pandas as pd

    ext = pd.read_csv(pharmpy_examples / "pheno_linear.ext", sep=r"\s+", skiprows=1).set_index("ITERATION")
    final, start = ext.loc[-1000000000], ext.loc[0]
    pm, ds = read_control_stream(pharmpy_examples / "pheno_linear.mod")
    assert pm.structural.name == "PRED" and pm.error.kind == "general" and not pm.thetas
    assert ds.n_observations == 155                                        # IGNORE(MDV.NEN.0) applied
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = fit_population(pm, ds, progress=False, evaluate=True, covariance=False)
        res = fit_population(pm, ds, progress=False)
    assert first.estimation.ofv == pytest.approx(start["OBJ"], abs=1e-4)
    assert res.estimation.ofv == pytest.approx(final["OBJ"], abs=0.01)
    assert res.omega["ETA_1"].variance == pytest.approx(final["OMEGA(1,1)"], rel=1e-3)
    assert res.omega["ETA_2"].variance == pytest.approx(final["OMEGA(2,2)"], rel=1e-3)
    assert res.sigma["EPS1"].variance == pytest.approx(final["SIGMA(1,1)"], rel=1e-3)
    table, df = res.predict(ds).table, ds.to_dataframe()
    expected = df.OPRED - df.D_ETA1 * df.OETA1 - df.D_ETA2 * df.OETA2        # the $PRED at ETA = 0
    assert table.PRED.to_numpy() == pytest.approx(expected.to_numpy(), rel=1e-12)


def test_a_control_stream_serves_as_a_dosing_prior(tmp_path, theoph_path, capsys):
    """'hybridpk map RUN.mod patient.csv': the control stream at its $THETA/$OMEGA/$SIGMA (a run's final
    estimates) is the prior; the patient's MAP equals the native model's at the same values, and a covariate
    outside the control stream's dataset is warned about."""
    from hybridpk.cli import main
    from hybridpk.population import FittedPopulation, load_model
    from hybridpk.population.spec import CovariateEffect

    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    text = THEO_TRANS2.replace("CL = THETA(2)*EXP(ETA(2))", "CL = THETA(2)*EXP(ETA(2))*WT/70")
    (tmp_path / "run.mod").write_text(text)
    prior = load_model(tmp_path / "run.mod")
    assert prior.name == "run" and prior.theta["POP_CL"].value == 2.8
    assert prior.sigma["ADD"].variance == pytest.approx(0.5)
    df = pd.read_csv(theoph_path)
    patient = hp.read_nonmem(df[df.ID == 3])
    wt = CovariateEffect("CL", "WT", "power", reference=70.0, exponent=1.0)
    native = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="additive", covariates=[wt])
    ref = FittedPopulation.from_values(native, {"KA": 1.5, "CL": 2.8, "V": 32.0},
                                       {"KA": 0.4, "CL": 0.07, "V": 0.02}, {"ADD": math.sqrt(0.5)})
    ours, theirs = prior.estimate(patient), ref.estimate(patient)
    assert torch.allclose(ours.eta, theirs.eta, atol=1e-6)
    heavy = df[df.ID == 3].assign(WT=150.0)
    heavy.to_csv(tmp_path / "heavy.csv", index=False)
    assert main(["map", str(tmp_path / "run.mod"), str(tmp_path / "heavy.csv")]) == 0
    out = capsys.readouterr().out
    assert "MAP estimates" in out and "WT" in out and "150" in out


def test_a_pred_model_is_refused_where_it_cannot_answer(pharmpy_examples, tmp_path, capsys):
    """$PRED predicts only its own records: dosing and the hybrid refuse it by name, before any work."""
    from hybridpk.cli import main

    for f in ("pheno_linear.mod", "pheno_linear.dta"):
        shutil.copy(pharmpy_examples / f, tmp_path / f)
    pd.read_csv(pharmpy_examples / "pheno.dta", sep=r"\s+", skiprows=1,
                names=["ID", "TIME", "AMT", "WGT", "APGR", "DV", "FA1", "FA2"]).query("ID == 1").to_csv(
        tmp_path / "patient.csv", index=False)
    assert main(["map", str(tmp_path / "pheno_linear.mod"), str(tmp_path / "patient.csv")]) == 2
    assert "$PRED model" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "pheno_linear.mod"), "--hybrid", "vae", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 2
    assert "$PRED" in capsys.readouterr().err and not (tmp_path / "run").exists()


# Wiczling/theopd (GitHub, model/nonmem/basic): R's Theoph as a bbr project lays it out (the 0-h level before the
# dose record, no EVID column: NONMEM takes a record with MDV=1 and AMT > 0 as a dose; a quoted header skipped by
# IGNORE="), fitted there by NONMEM 7 (FOCE-I, $COV MATRIX=R); its 1.ext and 2.ext final rows and standard errors.
THEOPD = """$PROBLEM theophylline, one compartment, first-order absorption
$INPUT ID BW DOSE TIME DV AMT MDV CMT NUM
$DATA ../nonmemdata.csv
      IGNORE="
$SUBROUTINE ADVAN2 TRANS2
$PK
TCL = THETA(1)
CL  = TCL*EXP(ETA(1))   ; clearance, L/h
TV  = THETA(2)
V   = TV*EXP(ETA(2))    ; volume, L
TKA = THETA(3)
KA  = TKA*EXP(ETA(3))   ; absorption rate constant, 1/h
F1  = 1
S2  = V
$ERROR (OBSERVATION ONLY)
IPRED = F
{y}
$THETA (0, 1) (0, 20) (0, 1)
$OMEGA 0.1 0.1 0.1
$SIGMA {sigma}
$ESTIMATION METHOD=1 INTER MAXEVAL=9999 SIGL=6 NSIG=3
$COVARIANCE MATRIX=R
"""

THEOPD_RUNS = {   # (Y, $SIGMA): (OFV, THETA 1-3, their SEs, OMEGA diagonal, SIGMA diagonal) of the .ext files
    "additive": (("Y = IPRED + EPS(1)", "1"),
                 (116.80342577, (2.75098, 31.8125, 1.59038), (0.229763, 1.48329, 0.305153),
                  (0.0690912, 0.0191687, 0.402446), (0.482255,))),
    "combined": (("Y = IPRED*(1 + EPS(2)) + EPS(1)", "1 0.1"),
                 (104.32208771, (2.78574, 31.9987, 1.47968), (0.215217, 1.45403, 0.282108),
                  (0.0645786, 0.0158248, 0.390667), (0.0759065, 0.0179197))),
}


@pytest.mark.parametrize("error", sorted(THEOPD_RUNS))
def test_theophylline_reproduces_a_published_nonmem_run(tmp_path, theoph_path, error):
    import csv
    import warnings

    (y, sigma), (ofv, theta, theta_se, omega, sigmas) = THEOPD_RUNS[error]
    df = pd.read_csv(theoph_path)
    rows = []
    for _, s in df.groupby("ID", sort=False):
        dose = s[s.EVID == 1].iloc[0]
        for k, (_, r) in enumerate(s[s.EVID == 0].iterrows()):
            rows.append([r.ID, r.WT, round(dose.AMT / r.WT, 2), r.TIME, r.DV, 0, 0, 2])
            if k == 0:   # the dose record after the 0-h level, as that project's data have it
                rows.append([r.ID, r.WT, round(dose.AMT / r.WT, 2), 0, 0, dose.AMT, 1, 1])
    data = pd.DataFrame(rows, columns=["Subject", "Wt", "Dose", "Time", "conc", "AMT", "MDV", "CMT"])
    data["NUM"] = range(1, len(data) + 1)
    data.to_csv(tmp_path / "nonmemdata.csv", index=False, quoting=csv.QUOTE_NONNUMERIC)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "1.ctl").write_text(THEOPD.format(y=y, sigma=sigma))
    pm, ds = read_control_stream(tmp_path / "run" / "1.ctl")
    assert ds.n_subjects == 12 and ds.n_observations == 132
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit_population(pm, ds, progress=False)
    assert res.estimation.ofv == pytest.approx(ofv, abs=0.01)
    for t, value, se in zip(res.theta, theta, theta_se):
        assert t.value == pytest.approx(value, rel=2e-3)
        assert t.se == pytest.approx(se, rel=2e-2)
    assert len(res.omega) == 3 and len(res.sigma.rows) == len(sigmas)
    for entry, value in zip(res.omega, omega):
        assert entry.variance == pytest.approx(value, rel=1e-2)
    for row, value in zip(res.sigma.rows, sigmas):
        assert row.variance == pytest.approx(value, rel=1e-2)
