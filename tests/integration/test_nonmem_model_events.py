"""NONMEM's model event times as users write enterohepatic recirculation and time-varying absorption: MTIME(n) set
in $PK, MPAST(n) read in $DES or $PK (NONMEM help "MTIME"). Checked against LSODA integrated in pieces that end at
the event times, against hybridpk's native gallbladder model (1cmt_oral_ehc) and against the same model written
with an IF on T, and the derivative in the THETA that sets the event time against a central difference; what
hybridpk does not carry out is refused with its line."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.errors import ModelError
from hybridpk.population import build_model
from hybridpk.population.focei import Problem
from hybridpk.population.nonmem import read_control_stream
from tests.integration.test_nonmem_des import HEAD, THEO_DES, _lsoda, _predictions, _read, _thetas
from tests.integration.test_nonmem_import import THEO_TRANS2, _ofv

#: gallbladder (compartment 3) filled from the central compartment, emptied into the gut from MTIME(1) for 0.5 h
EHC = HEAD + """$SUBROUTINE ADVAN13 TOL=9
$MODEL COMP=(DEPOT DEFDOSE) COMP=(CENTRAL DEFOBS) COMP=(GALLBL)
$PK
KA = THETA(1)*EXP(ETA(1))
CL = THETA(2)*EXP(ETA(2))
V  = THETA(3)*EXP(ETA(3))
KB = THETA(4)
KG = THETA(5)
MTIME(1) = THETA(6)
MTIME(2) = MTIME(1) + 0.5
MTDIFF = 1
S2 = V
$DES
GB = MPAST(1) - MPAST(2)
DADT(1) = -KA*A(1) + GB*KG*A(3)
DADT(2) = KA*A(1) - CL/V*A(2) - KB*A(2)
DADT(3) = KB*A(2) - GB*KG*A(3)
$ERROR
Y = F + EPS(1)
$THETA (0, 1.5) ; POP_KA
$THETA (0, 2.8) ; POP_CL
$THETA (0, 32) ; POP_V
$THETA (0, 0.2) ; POP_KB
$THETA (0, 4) ; POP_KG
$THETA (0, 6) ; POP_TGB
$OMEGA 0.4
$OMEGA 0.07
$OMEGA 0.02
$SIGMA 0.5
$ESTIMATION METHOD=1 INTERACTION
"""

#: absorption that changes at MTIME(1), written in $PK on MPAST(1)
KA_SWITCH = THEO_DES.replace(
    "KA = THETA(1)*EXP(ETA(1))",
    "MTIME(1) = THETA(4)\nKA = (THETA(1)*(1 - MPAST(1)) + THETA(5)*MPAST(1))*EXP(ETA(1))").replace(
    "$THETA (0, 32) ; POP_V\n", "$THETA (0, 32) ; POP_V\n$THETA (0, 1.2) ; POP_TKA\n$THETA (0, 0.3) ; POP_KA2\n")

OM, SD = [0.4, 0.07, 0.02], {"ADD": math.sqrt(0.5)}


def _worst_against_lsoda(ipred, ds, rhs, n_states, split, v):
    worst = 0.0
    for i, (_, rows) in enumerate(ds.to_dataframe().groupby("ID", sort=False)):
        rec = rows.reset_index(drop=True)
        times = sorted({float(t) for t in rec.TIME})
        ref = dict(zip(times, _lsoda(rhs, n_states, float(rows.AMT.max()), times, split=split)[:, 1] / v))
        obs = (rec.MDV == 0).to_numpy()
        ours = ipred[i, :len(rec)].numpy()[obs]
        theirs = np.array([ref[float(t)] for t in rec.TIME[obs]])
        worst = max(worst, float(np.max(np.abs(ours - theirs) / np.maximum(theirs, 1e-3))))
    return worst


def test_gallbladder_emptying_at_a_model_event_time_matches_lsoda(tmp_path, theoph_path):
    pm, ds = _read(tmp_path, theoph_path, EHC)
    assert pm.structural.piecewise_linear       # linear between the event times: matrix exponentials
    values = [1.5, 2.8, 32.0, 0.2, 4.0, 6.0]
    ipred, _ = _predictions(pm, ds, values)
    ka, cl, v, kb, kg, tm = values

    def rhs(t, a):
        gb = kg * a[2] if tm < t <= tm + 0.5 else 0.0
        return [-ka * a[0] + gb, ka * a[0] - (cl / v + kb) * a[1], kb * a[1] - gb]

    assert _worst_against_lsoda(ipred, ds, rhs, 3, [tm, tm + 0.5], v) < 1e-6


def test_the_event_time_stream_gives_the_native_gallbladder_models_ofv(tmp_path, theoph_path):
    """hybridpk's 1cmt_oral_ehc with one meal (MEALII beyond the data) is the same model."""
    pm, ds = _read(tmp_path, theoph_path, EHC)
    a = _ofv(pm, ds, {"POP_KA": 1.5, "POP_CL": 2.8, "POP_V": 32.0, "POP_KB": 0.2, "POP_KG": 4.0, "POP_TGB": 6.0},
             OM, SD)
    data = hp.read_nonmem(theoph_path)
    native = build_model("1cmt_oral_ehc", iiv=["KA", "CL", "V"], error="additive", data=data,
                         fixed={"KGB": 0.2, "KEMPT": 4.0, "TMEAL": 6.0, "MEALII": 1000.0, "TEMPT": 0.5})
    b = _ofv(native, data, {"KA": 1.5, "CL": 2.8, "V": 32.0, "KGB": 0.2, "KEMPT": 4.0, "TMEAL": 6.0,
                            "MEALII": 1000.0, "TEMPT": 0.5}, OM, SD)
    assert a == pytest.approx(b, rel=1e-7)


def test_mpast_gives_the_ofv_of_an_if_on_t(tmp_path, theoph_path):
    """MPAST(1) - MPAST(2) is the IF (T.GE.TGB .AND. T.LT.TGB + 0.5) that NONMEM users wrote before MTIME."""
    written = EHC.replace("GB = MPAST(1) - MPAST(2)", "GB = 0\nIF (T.GE.TGB.AND.T.LT.TGB+0.5) GB = 1") \
                 .replace("MTIME(1) = THETA(6)\nMTIME(2) = MTIME(1) + 0.5\nMTDIFF = 1", "TGB = THETA(6)")
    theta = {"POP_KA": 1.5, "POP_CL": 2.8, "POP_V": 32.0, "POP_KB": 0.2, "POP_KG": 4.0, "POP_TGB": 6.0}
    a = _ofv(*_read(tmp_path, theoph_path, EHC), theta, OM, SD)
    b = _ofv(*_read(tmp_path, theoph_path, written), theta, OM, SD)
    assert a == pytest.approx(b, rel=1e-9)


def test_a_pk_parameter_written_on_mpast_switches_at_the_event_time(tmp_path, theoph_path):
    pm, ds = _read(tmp_path, theoph_path, KA_SWITCH)
    assert pm.structural.piecewise_linear and "KA" not in pm.structural.inputs     # KA moved into $DES
    values = [1.5, 2.8, 32.0, 1.2, 0.3]
    ipred, _ = _predictions(pm, ds, values)
    ka1, cl, v, tm, ka2 = values

    def rhs(t, a):
        ka = ka2 if t > tm else ka1
        return [-ka * a[0], ka * a[0] - cl / v * a[1]]

    assert _worst_against_lsoda(ipred, ds, rhs, 2, [tm], v) < 1e-6


def test_the_derivative_in_the_event_times_theta_is_the_central_difference(tmp_path, theoph_path):
    """The event time is a THETA: the solver's steps end on it, so the prediction is differentiable in it (the
    jump of the rate at MTIME carried to later records), as the FOCE-I search needs."""
    pm, ds = _read(tmp_path, theoph_path, EHC)
    prob = Problem(pm, ds)
    values = [1.5, 2.8, 32.0, 0.2, 4.0, 6.0]
    eta = torch.zeros(ds.n_subjects, pm.n_eta, dtype=torch.float64)
    theta = {k: v.requires_grad_() for k, v in _thetas(pm, values).items()}
    after = (prob.batch.time[0] > 7.0) & prob.obs[0]
    f = prob.predict(theta, eta)[0][after].sum()
    grad, = torch.autograd.grad(f, theta["POP_TGB"])

    def at(tm):
        with torch.no_grad():
            return float(prob.predict(_thetas(pm, values[:5] + [tm]), eta)[0][after].sum())

    h = 1e-4
    assert abs(float(grad)) > 1e-3
    assert float(grad) == pytest.approx((at(6.0 + h) - at(6.0 - h)) / (2 * h), rel=1e-5)


@pytest.mark.parametrize("old, new, construct, keyword", [
    ("MTIME(1) = THETA(4)", "MTIME(1) = THETA(4) + TIME/100", "reads TIME", "MTIME"),
    ("S2 = V", "S2 = V\nIF (MNOW.EQ.1) S2 = V", "MNOW", "MNOW"),
    ("Y = F + EPS(1)", "Y = F + MPAST(1)*EPS(1)", "\\$ERROR reads MPAST\\(1\\)", "MPAST"),
    ("MTIME(1) = THETA(4)\n", "", "MPAST\\(1\\) is read but its MTIME is not set", "MPAST"),
])
def test_what_hybridpk_does_not_do_with_event_times_is_refused_with_its_line(tmp_path, theoph_path, old, new,
                                                                              construct, keyword):
    assert old in KA_SWITCH
    text = KA_SWITCH.replace(old, new)
    with pytest.raises(ModelError, match=construct) as err:
        _read(tmp_path, theoph_path, text)
    line = re.search(r"run.mod line (\d+)", str(err.value))
    assert line and keyword in text.splitlines()[int(line.group(1)) - 1], str(err.value)


def test_event_times_with_a_closed_form_advan_are_refused_with_their_line(tmp_path, theoph_path):
    """ADVAN1-4, 11, 12 would need their parameters to change inside an interval between records."""
    text = THEO_TRANS2.replace("KA = THETA(1)*EXP(ETA(1))",
                               "MTIME(1) = 1.2\nKA = THETA(1)*(1 + MPAST(1))*EXP(ETA(1))")
    with pytest.raises(ModelError, match="a model event time\\) with ADVAN2: .* write the model with \\$DES") as err:
        _read(tmp_path, theoph_path, text)
    line = re.search(r"run.mod line (\d+)", str(err.value))
    assert line and "MTIME" in text.splitlines()[int(line.group(1)) - 1], str(err.value)


def test_an_event_time_that_changes_between_records_is_refused(tmp_path, theoph_path):
    """The IF takes its branch on a whole segment between switches: a switch time read from a data item that
    changes within a subject would be crossed inside a segment (the OFV was silently wrong by 1800 units on an
    EHC dataset whose meal time changed by 0.01 h). One constant within each subject is stepped to."""
    df = pd.read_csv(theoph_path)
    for name, value in (("const", np.where(df.ID > 6, 1.2, 1.3)), ("varying", np.where(df.TIME < 5, 1.2, 1.3))):
        df.assign(TM=value).to_csv(tmp_path / f"{name}.csv", index=False)
    text = KA_SWITCH.replace("MTIME(1) = THETA(4)", "MTIME(1) = TM + 0*THETA(4)").replace(
        "$INPUT ID TIME DV AMT EVID MDV CMT WT", "$INPUT ID TIME DV AMT EVID MDV CMT WT TM")
    values = [1.5, 2.8, 32.0, 1.2, 0.3]
    (tmp_path / "run.mod").write_text(text.replace("theoph.csv", "const.csv"))
    pm, ds = read_control_stream(tmp_path / "run.mod")
    ipred, _ = _predictions(pm, ds, values)
    ka1, cl, v, _, ka2 = values
    for i, (_, rows) in enumerate(ds.to_dataframe().groupby("ID", sort=False)):
        tm = float(rows.TM.iloc[0])
        rec = rows.reset_index(drop=True)
        times = sorted({float(t) for t in rec.TIME})
        ref = dict(zip(times, _lsoda(lambda t, a: [-(ka2 if t > tm else ka1) * a[0],
                                                   (ka2 if t > tm else ka1) * a[0] - cl / v * a[1]],
                                     2, float(rows.AMT.max()), times, split=[tm])[:, 1] / v))
        obs = (rec.MDV == 0).to_numpy()
        np.testing.assert_allclose(ipred[i, :len(rec)].numpy()[obs], [ref[float(t)] for t in rec.TIME[obs]],
                                   rtol=1e-6)
    (tmp_path / "run.mod").write_text(text.replace("theoph.csv", "varying.csv"))
    pm, ds = read_control_stream(tmp_path / "run.mod")
    with pytest.raises(ModelError, match="the switch time MTIME_1 .* changes between a subject's records"):
        _predictions(pm, ds, values)
