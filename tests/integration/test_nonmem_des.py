"""Control streams that write their own equations: $DES with ADVAN6/13 and the general linear ADVAN5/7, as
NONMEM users write them ($MODEL COMP=(... DEFDOSE) / (... DEFOBS), $DES variables reading A(n) and T, IF
blocks on T, THETAs in $DES, $ERROR on the amount). Checked against the same model through ADVAN2 (a linear
$DES is solved exactly), the native Michaelis-Menten model, and scipy's LSODA at rtol 1e-10 with the equations
written again here; constructs hybridpk cannot carry out are refused with their line."""

from __future__ import annotations

import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.linalg import expm

import hybridpk as hp
from hybridpk.errors import DatasetError, ModelError
from hybridpk.population import build_model
from hybridpk.population.focei import Problem
from hybridpk.population.nonmem import read_control_stream
from tests.integration.test_nonmem_import import THEO_TRANS2, _ofv

HEAD = """$PROBLEM theophylline
$INPUT ID TIME DV AMT EVID MDV CMT WT
$DATA theoph.csv IGNORE=@
"""

THEO_DES = HEAD + """$SUBROUTINE ADVAN13 TOL=9
$MODEL COMP=(DEPOT DEFDOSE) COMP=(CENTRAL DEFOBS)
$PK
KA = THETA(1)*EXP(ETA(1))
CL = THETA(2)*EXP(ETA(2))
V = THETA(3)*EXP(ETA(3))
S2 = V
$DES
DADT(1) = -KA*A(1)
DADT(2) = KA*A(1) - CL/V*A(2)
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

#: Michaelis-Menten elimination, an extra first-order loss from 12 h on (an IF block on T), a THETA read in
#: $DES, $ERROR on the amount
MM_DES = HEAD + """$SUBROUTINE ADVAN13 TOL=9
$MODEL COMP=(DEPOT DEFDOSE) COMP=(CENTRAL DEFOBS)
$PK
KA = THETA(1)*EXP(ETA(1))
VM = THETA(2)*EXP(ETA(2))
V = THETA(3)*EXP(ETA(3))
KM = THETA(4)
$DES
C = A(2)/V
IF (T.GT.12) THEN
  KX = THETA(5)
ELSE
  KX = 0
ENDIF
DADT(1) = -KA*A(1)
DADT(2) = KA*A(1) - VM*C/(KM + C) - KX*A(2)
$ERROR
IPRED = A(2)/V
Y = IPRED + EPS(1)
$THETA (0, 1.5) ; POP_KA
$THETA (0, 40) ; POP_VM
$THETA (0, 32) ; POP_V
$THETA (0, 4) ; POP_KM
$THETA (0, 0.05) ; POP_KX
$OMEGA 0.4
$OMEGA 0.07
$OMEGA 0.02
$SIGMA 0.5
$ESTIMATION METHOD=1 INTERACTION
"""

#: parent (CENTRAL, observed), peripheral and metabolite compartments as NONMEM's general linear model
ADVAN5 = HEAD + """$SUBROUTINE ADVAN5
$MODEL COMP=(DEPOT DEFDOSE) COMP=(CENTRAL DEFOBS) COMP=(PERI) COMP=(META)
$PK
KA = THETA(1)*EXP(ETA(1))
CL = THETA(2)*EXP(ETA(2))
V = THETA(3)*EXP(ETA(3))
K12 = KA
K20 = 0.7*CL/V
K24 = 0.3*CL/V
K23 = THETA(4)
K32 = THETA(5)
K40 = 0.2
S2 = V
$ERROR
Y = F + EPS(1)
$THETA (0, 1.5) (0, 2.8) (0, 32) (0, 0.3) (0, 0.1)
$OMEGA 0.4
$OMEGA 0.07
$OMEGA 0.02
$SIGMA 0.5
"""


def _read(tmp_path, theoph_path, text):
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    (tmp_path / "run.mod").write_text(text)
    return read_control_stream(tmp_path / "run.mod")


def _thetas(pm, values):
    return {t.name: torch.tensor(v, dtype=torch.float64) for t, v in zip(pm.thetas, values)}


def _predictions(pm, ds, values):
    """IPRED (N, R) at ETA = 0 and the given THETAs."""
    prob = Problem(pm, ds)
    with torch.no_grad():
        return prob.predict(_thetas(pm, values), torch.zeros(ds.n_subjects, pm.n_eta, dtype=torch.float64)), prob


def _lsoda(rhs, n_states, dose, times, split=()):
    """Amounts at ``times`` from a bolus ``dose`` into compartment 1 at 0, integrated by LSODA (rtol 1e-10) in
    pieces that end at the discontinuities ``split``."""
    edges = sorted({0.0, *[s for s in split if s < max(times)], float(max(times))})
    y = np.zeros(n_states)
    y[0] = dose
    out = {}
    for a, b in zip(edges[:-1], edges[1:]):
        inside = [t for t in times if a <= t <= b]
        sol = solve_ivp(rhs, (a, b), y, method="LSODA", rtol=1e-10, atol=1e-12, dense_output=True)
        for t in inside:
            out[t] = sol.sol(t)
        y = sol.sol(b)
    return np.array([out[t] for t in times])


@pytest.mark.parametrize("advan", [6, 13])
def test_a_linear_des_is_solved_exactly_and_gives_advan2s_ofv(tmp_path, theoph_path, advan):
    pm, ds = _read(tmp_path, theoph_path, THEO_DES.replace("ADVAN13", f"ADVAN{advan}"))
    assert pm.structural.piecewise_linear and pm.structural.compartments == ("DEPOT", "CENTRAL")
    assert (pm.structural.dose_cmt, pm.structural.obs_cmt) == (1, 2)
    ref_pm, ref_ds = _read(tmp_path, theoph_path, THEO_TRANS2)
    sd = {"ADD": math.sqrt(0.5)}
    a = _ofv(pm, ds, {"POP_KA": 1.5, "POP_CL": 2.8, "POP_V": 32.0}, [0.4, 0.07, 0.02], sd)
    b = _ofv(ref_pm, ref_ds, {"POP_KA": 1.5, "POP_CL": 2.8, "POP_V": 32.0}, [0.4, 0.07, 0.02], sd)
    assert a == pytest.approx(b, rel=1e-9)


def test_a_nonlinear_des_with_if_on_t_matches_lsoda(tmp_path, theoph_path):
    pm, ds = _read(tmp_path, theoph_path, MM_DES)
    assert not pm.structural.piecewise_linear
    values = [1.5, 40.0, 32.0, 4.0, 0.05]
    ipred, prob = _predictions(pm, ds, values)
    ka, vm, v, km, kx = values

    def rhs(t, a):
        c = a[1] / v
        return [-ka * a[0], ka * a[0] - vm * c / (km + c) - (kx if t > 12 else 0.0) * a[1]]

    df = ds.to_dataframe()
    worst = 0.0
    for i, (sid, rows) in enumerate(df.groupby("ID", sort=False)):
        dose = float(rows.AMT.max())
        rec = rows.reset_index(drop=True)
        times = [float(t) for t in rec.TIME]
        ref = _lsoda(rhs, 2, dose, sorted(set(times)), split=[12.0])[:, 1] / v
        ref = dict(zip(sorted(set(times)), ref))
        obs = rec.MDV == 0
        ours = ipred[i, :len(rec)].numpy()[obs.to_numpy()]
        theirs = np.array([ref[t] for t in rec.TIME[obs]])
        worst = max(worst, float(np.max(np.abs(ours - theirs) / np.maximum(theirs, 1e-3))))
    assert worst < 1e-6, worst


def test_a_michaelis_menten_des_gives_the_native_models_ofv(tmp_path, theoph_path):
    """Without the extra loss (THETA(5) fixed at 0) the $DES is hybridpk's 1cmt_oral_mm: same OFV."""
    text = MM_DES.replace("$THETA (0, 0.05) ; POP_KX", "$THETA 0 FIX ; POP_KX")
    pm, ds = _read(tmp_path, theoph_path, text)
    native = build_model("1cmt_oral_mm", iiv=["KA", "VMAX", "V"], error="additive", data=hp.read_nonmem(theoph_path))
    sd = {"ADD": math.sqrt(0.5)}
    om = [0.4, 0.07, 0.02]
    a = _ofv(pm, ds, {"POP_KA": 1.5, "POP_VM": 40.0, "POP_V": 32.0, "POP_KM": 4.0, "POP_KX": 0.0}, om, sd)
    b = _ofv(native, hp.read_nonmem(theoph_path), {"KA": 1.5, "VMAX": 40.0, "V": 32.0, "KM": 4.0}, om, sd)
    assert a == pytest.approx(b, rel=1e-7)


def test_general_linear_advan5_with_a_metabolite_matches_the_matrix_exponential(tmp_path, theoph_path):
    pm, ds = _read(tmp_path, theoph_path, ADVAN5)
    assert pm.structural.compartments == ("DEPOT", "CENTRAL", "PERI", "META") and pm.structural.piecewise_linear
    values = [1.5, 2.8, 32.0, 0.3, 0.1]
    ipred, _ = _predictions(pm, ds, values)
    ka, cl, v, k23, k32 = values
    k = np.array([[-ka, 0, 0, 0],                   # K20 + K24 = CL/V leave the parent
                  [ka, -(cl / v + k23), k32, 0],
                  [0, k23, -k32, 0],
                  [0, 0.3 * cl / v, 0, -0.2]])
    df = ds.to_dataframe()
    for i, (_, rows) in enumerate(df.groupby("ID", sort=False)):
        dose = np.array([rows.AMT.max(), 0, 0, 0])
        rec = rows.reset_index(drop=True)
        obs = (rec.MDV == 0).to_numpy()
        ref = np.array([(expm(k * t) @ dose)[1] / v for t in rec.TIME[obs]])
        np.testing.assert_allclose(ipred[i, :len(rec)].numpy()[obs], ref, rtol=1e-9, atol=1e-12)


def test_des_reads_data_items_per_record(tmp_path, theoph_path):
    """A covariate read in $DES takes each record's value, like one read in $PK: the same OFV either way."""
    in_des = THEO_DES.replace("DADT(2) = KA*A(1) - CL/V*A(2)", "DADT(2) = KA*A(1) - CL*(WT/70)/V*A(2)")
    in_pk = THEO_DES.replace("CL = THETA(2)*EXP(ETA(2))", "CL = THETA(2)*EXP(ETA(2))*(WT/70)")
    sd = {"ADD": math.sqrt(0.5)}
    theta = {"POP_KA": 1.5, "POP_CL": 2.8, "POP_V": 32.0}
    a = _ofv(*_read(tmp_path, theoph_path, in_des), theta, [0.4, 0.07, 0.02], sd)
    b = _ofv(*_read(tmp_path, theoph_path, in_pk), theta, [0.4, 0.07, 0.02], sd)
    assert a == pytest.approx(b, rel=1e-9)


def test_a_des_model_fits_like_advan2(tmp_path, theoph_path):
    pm, ds = _read(tmp_path, theoph_path, THEO_DES)
    res = hp.fit_population(pm, ds, progress=False, pooled_start=False, covariance=False)
    assert res.estimation.ofv == pytest.approx(116.8034, abs=0.01)           # the ADVAN2 fit's OFV
    assert res.theta["POP_CL"].value == pytest.approx(2.75, rel=0.01)


@pytest.mark.parametrize("old, new, construct, keyword", [
    ("$MODEL COMP=(DEPOT DEFDOSE) COMP=(CENTRAL DEFOBS)\n", "", "no \\$MODEL", None),
    ("COMP=(CENTRAL DEFOBS)", "COMP=(CENTRAL DEFOBS INITIALOFF)", "INITIALOFF", "INITIALOFF"),
    ("S2 = V", "S2 = V\nF2 = 0.5", "F2", "F2"),
    ("S2 = V", "S2 = V\nD2 = 2", "D2", "D2"),
    ("$SUBROUTINE ADVAN13 TOL=9", "$SUBROUTINE ADVAN9 TOL=9", "ADVAN9 is not supported", "ADVAN9"),
])
def test_what_a_des_model_cannot_do_is_refused_with_its_line(tmp_path, theoph_path, old, new, construct, keyword):
    assert old in THEO_DES
    text = THEO_DES.replace(old, new)
    with pytest.raises(ModelError, match=construct) as err:
        _read(tmp_path, theoph_path, text)
    line = re.search(r"run.mod line (\d+)", str(err.value))
    if keyword is None:
        assert "run.mod" in str(err.value)
    else:
        assert line and keyword in text.splitlines()[int(line.group(1)) - 1], str(err.value)


def test_the_cli_fits_a_des_control_stream_with_default_options(tmp_path, theoph_path, capsys):
    from hybridpk.cli import main

    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    (tmp_path / "run.mod").write_text(THEO_DES)
    assert main(["fit", str(tmp_path / "run.mod"), "--out", str(tmp_path / "run"), "--quiet"]) == 0, \
        capsys.readouterr().err
    pred = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert np.isfinite(pred.loc[pred.MDV == 0, "IPRED"]).all()


PARENT_METABOLITE = HEAD.replace("WT\n", "WT\n") + """$SUBROUTINE ADVAN5
$MODEL COMP=(DEPOT DEFDOSE) COMP=(CENTRAL DEFOBS) COMP=(META)
$PK
KA = THETA(1)*EXP(ETA(1))
CL = THETA(2)*EXP(ETA(2))
V = THETA(3)*EXP(ETA(3))
VM = THETA(4)
K12 = KA
K23 = 0.4*CL/V
K20 = 0.6*CL/V
K30 = THETA(5)
S2 = V
S3 = VM
$ERROR
IPRED = F
W = THETA(6)*IPRED
IF (CMT.EQ.3) W = THETA(7)*IPRED
Y = IPRED + W*EPS(1)
$THETA (0, 1.5) (0, 2.8) (0, 32) (0, 20) (0, 0.2) (0, 0.1) (0, 0.2)
$OMEGA 0.4
$OMEGA 0.07
$OMEGA 0.02
$SIGMA 1 FIX
"""


def _with_metabolite(theoph_path, tmp_path):
    """theophylline with each level also 'measured' as a metabolite (CMT 3) at the same time."""
    df = pd.read_csv(theoph_path)
    meta = df[df.EVID == 0].assign(CMT=3, DV=lambda d: 0.5 * d.DV + 0.1)
    out = pd.concat([df, meta]).sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")
    out.to_csv(tmp_path / "theoph.csv", index=False)
    return out


def test_records_observe_the_compartment_their_cmt_names(tmp_path, theoph_path):
    """NONMEM's F = A(CMT)/S<CMT>: parent (CMT 2) and metabolite (CMT 3) levels of one model, each with its own
    proportional error (W read from CMT), against the matrix exponential."""
    _with_metabolite(theoph_path, tmp_path)
    (tmp_path / "run.mod").write_text(PARENT_METABOLITE)
    pm, ds = read_control_stream(tmp_path / "run.mod")
    assert pm.structural.observes_compartments and pm.error.kind == "general"
    values = [1.5, 2.8, 32.0, 20.0, 0.2, 0.1, 0.2]
    ipred, _ = _predictions(pm, ds, values)
    ka, cl, v, vm, k30 = values[:5]
    k = np.array([[-ka, 0, 0], [ka, -cl / v, 0], [0, 0.4 * cl / v, -k30]])
    rows = ds.to_dataframe()
    for i, (_, rec) in enumerate(rows.groupby("ID", sort=False)):
        rec = rec.reset_index(drop=True)
        dose = np.array([rec.AMT.max(), 0.0, 0.0])
        for j, r in rec.iterrows():
            if r.EVID == 0:
                a = expm(k * r.TIME) @ dose
                ref = a[1] / v if r.CMT == 2 else a[2] / vm
                assert float(ipred[i, j]) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    prob = Problem(pm, ds)
    th = _thetas(pm, values)
    zero = torch.zeros(ds.n_subjects, pm.n_eta, dtype=torch.float64)
    var = prob.variance(th, zero, ipred, {"EPS1": torch.tensor(1.0, dtype=torch.float64)})
    cmt = prob.batch.cmt
    expected = torch.where(cmt == 3, (0.2 * ipred) ** 2, (0.1 * ipred) ** 2)
    assert torch.allclose(torch.where(prob.obs, var, expected), expected, rtol=1e-12)


def test_a_prediction_written_on_one_amount_does_not_observe_other_compartments(tmp_path, theoph_path):
    """IPRED = A(2)/V is the parent whatever the record's CMT (as in NONMEM): metabolite records are refused
    by row instead of being predicted as the parent."""
    _with_metabolite(theoph_path, tmp_path)
    text = PARENT_METABOLITE.replace("IPRED = F\n", "IPRED = A(2)/V\n")
    (tmp_path / "run.mod").write_text(text)
    pm, ds = read_control_stream(tmp_path / "run.mod")
    assert not pm.structural.observes_compartments
    with pytest.raises(DatasetError, match="compartment 3 \\(META\\)"):
        Problem(pm, ds).predict(_thetas(pm, [1.5, 2.8, 32.0, 20.0, 0.2, 0.1, 0.2]),
                                torch.zeros(ds.n_subjects, pm.n_eta, dtype=torch.float64))
