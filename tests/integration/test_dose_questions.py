"""The dose questions (issue 16) against independent closed forms solved by scipy: the interval for a dose
(continuous root), the time to a concentration (exact root, and posologyr's grid semantics). The patient's
MAP parameters come from the answer itself; the independent side solves the question from them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq

import hybridpk as hp
from hybridpk.dosing import estimate_patient, interval_for_dose, time_to_concentration
from hybridpk.errors import HybridPKError
from hybridpk.population import load_model
from tests.reference.specs import IV_1CMT

IV = IV_1CMT

ORAL = """name = "q_oral"
structure = "1cmt_oral"
citation = "test"
route = "oral"

[typical]
KA = 1.1
CL = 3.0
V = 30.0

[iiv]
KA = 0.1
CL = 0.09
V = 0.05

[error]
kind = "combined"
add = 0.1
prop = 0.1
"""


def _model(tmp_path, text):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return load_model(path)


def _patient(addl: int = 0):
    """1000 mg at 0 h (and ADDL more every 12 h), two levels after the first dose."""
    return hp.read_nonmem(pd.DataFrame([
        dict(ID=1, TIME=0.0, AMT=1000.0, DV=0.0, EVID=1, MDV=1, ADDL=addl, II=12.0 if addl else 0.0),
        dict(ID=1, TIME=2.0, AMT=0.0, DV=38.0, EVID=0, MDV=0, ADDL=0, II=0.0),
        dict(ID=1, TIME=10.0, AMT=0.0, DV=24.0, EVID=0, MDV=0, ADDL=0, II=0.0)]))


def _map(rec_or_params, *names):
    p = rec_or_params.map_parameters if hasattr(rec_or_params, "map_parameters") else rec_or_params
    return [p[n]["map"] for n in names]


def _g(x):
    """Accumulation of one exponential at steady state: e^-x / (1 - e^-x)."""
    return math.exp(-x) / -math.expm1(-x)


def _trough_iv(dose, cl, v, tau, dur):
    k = cl / v
    if dur == 0:
        return dose / v * _g(k * tau)
    return dose / dur / cl * -math.expm1(-k * dur) * math.exp(-k * (tau - dur)) / -math.expm1(-k * tau)


def _peak_infusion(dose, cl, v, tau, dur):
    k = cl / v
    return dose / dur / cl * -math.expm1(-k * dur) / -math.expm1(-k * tau)


def _trough_oral(dose, ka, cl, v, tau):
    k = cl / v
    return dose * ka / (v * (ka - k)) * (_g(k * tau) - _g(ka * tau))


@pytest.mark.parametrize("target,dur", [("trough=4:6", 0.0), ("trough=4:6", 1.0), ("peak=35:45", 2.0),
                                        ("auc24=600:700", 0.0)])
def test_the_interval_for_a_dose_is_the_exact_root(tmp_path, target, dur):
    rec = interval_for_dose(_model(tmp_path, IV), _patient(), 1000.0, target, duration=dur)
    cl, v = _map(rec, "CL", "V")
    metric, bounds = target.split("=")
    mid = float(np.mean([float(x) for x in bounds.split(":")]))
    if metric == "trough":
        expected = brentq(lambda t: _trough_iv(1000.0, cl, v, t, dur) - mid, max(dur, 0.5), 168.0, xtol=1e-12)
    elif metric == "peak":
        expected = brentq(lambda t: _peak_infusion(1000.0, cl, v, t, dur) - mid, dur, 168.0, xtol=1e-12)
    else:
        expected = 24.0 * 1000.0 / (cl * mid)
    assert rec.interval == pytest.approx(expected, rel=1e-4)
    assert rec.exposure[metric]["map"] == pytest.approx(mid, rel=1e-4)
    assert rec.dose == 1000.0 and rec.duration == dur and 0.0 <= rec.pta <= 1.0


def test_the_interval_for_an_oral_dose(tmp_path):
    rec = interval_for_dose(_model(tmp_path, ORAL), _patient(), 500.0, "trough=2:3")
    ka, cl, v = _map(rec, "KA", "CL", "V")
    expected = brentq(lambda t: _trough_oral(500.0, ka, cl, v, t) - 2.5, 0.5, 168.0, xtol=1e-12)
    assert rec.interval == pytest.approx(expected, rel=1e-4)


def test_the_interval_rounded_to_a_step_and_refusals(tmp_path):
    model = _model(tmp_path, IV)
    exact = interval_for_dose(model, _patient(), 1000.0, "trough=4:6")
    rounded = interval_for_dose(model, _patient(), 1000.0, "trough=4:6", interval_step=6.0)
    assert rounded.interval % 6.0 == 0 and abs(rounded.interval - exact.interval) < 6.0
    assert rounded.candidates[0]["exact_interval_h"] == pytest.approx(exact.interval, rel=1e-9)
    with pytest.raises(HybridPKError, match="no dosing interval between"):
        interval_for_dose(model, _patient(), 10.0, "trough=400:600")        # unreachable: names both ends
    with pytest.raises(HybridPKError, match="steady-state target"):
        interval_for_dose(model, _patient(), 1000.0, "conc@24=4:6")
    with pytest.raises(HybridPKError, match="interval_step"):
        interval_for_dose(model, _patient(), 1000.0, "trough=4:6", interval_step=0)


@pytest.mark.parametrize("addl", [0, 4])
def test_the_time_to_a_concentration_is_the_exact_root(tmp_path, addl):
    out = time_to_concentration(_model(tmp_path, IV), _patient(addl), 3.0)
    est = time_to_concentration(_model(tmp_path, IV), _patient(addl), 3.0, method="grid")
    from hybridpk.dosing import estimate_patient

    cl, v = _map(estimate_patient(_model(tmp_path, IV), _patient(addl)).parameters(), "CL", "V")

    def conc(t):
        return sum(1000.0 / v * math.exp(-cl / v * (t - 12.0 * j)) for j in range(addl + 1) if t >= 12.0 * j) - 3.0

    expected = brentq(conc, 12.0 * addl + 1e-9, 12.0 * addl + 168.0, xtol=1e-12)
    assert out["map_time_h"] == pytest.approx(expected, rel=1e-6)
    assert out["map_time_after_last_dose_h"] == pytest.approx(expected - 12.0 * addl, rel=1e-6)
    assert out["p05_h"] <= out["map_time_h"] <= out["p95_h"]
    # posologyr's grid: the first of last dose + 0.2, 0.3, ... h strictly below the level
    grid = 12.0 * addl + np.round(np.arange(0.2, 168.0, 0.1), 10)
    first = grid[np.nonzero(np.array([conc(t) for t in grid]) < 0)[0][0]]
    assert est["map_time_h"] == pytest.approx(first, abs=1e-9) and est["method"] == "grid"


def test_the_time_to_a_concentration_after_an_oral_peak(tmp_path):
    """After an oral dose the level first rises through 3 mg/L; the answer is the fall after the peak."""
    model = _model(tmp_path, ORAL)
    out = time_to_concentration(model, _patient(), 3.0)
    from hybridpk.dosing import estimate_patient

    ka, cl, v = _map(estimate_patient(model, _patient()).parameters(), "KA", "CL", "V")
    k = cl / v

    def conc(t):
        return 1000.0 * ka / (v * (ka - k)) * (math.exp(-k * t) - math.exp(-ka * t)) - 3.0

    t_peak = math.log(ka / k) / (ka - k)
    assert out["map_time_h"] == pytest.approx(brentq(conc, t_peak, 500.0, xtol=1e-12), rel=1e-6)


def test_the_cli_forms(tmp_path, capsys):
    """'hybridpk dose ... --dose MG' answers the interval and '--time-below C' the time, with the library's
    numbers (REC.json)."""
    import json

    from hybridpk.cli import main

    _patient(addl=1).to_dataframe().to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "spec.toml").write_text(IV)
    args = [str(tmp_path / "spec.toml"), str(tmp_path / "p.csv")]
    assert main(["dose", *args, "--dose", "1000", "--target", "trough=4:6", "--out", str(tmp_path / "i.json")]) == 0
    lib = interval_for_dose(_model(tmp_path, IV), _patient(addl=1), 1000.0, "trough=4:6")
    rec = json.loads((tmp_path / "i.json").read_text())
    assert rec["interval_h"] == pytest.approx(lib.interval, rel=1e-12)
    assert rec["patient_estimate"]["ofv"] == pytest.approx(lib.estimate["ofv"], rel=1e-12)
    assert len(rec["patient_estimate"]["covariance"]["expected_information_etc"]) == 2
    assert main(["dose", *args, "--time-below", "3", "--out", str(tmp_path / "t.json")]) == 0
    out = json.loads((tmp_path / "t.json").read_text())
    assert out["map_time_h"] == pytest.approx(time_to_concentration(_model(tmp_path, IV), _patient(addl=1),
                                                                    3.0)["map_time_h"], rel=1e-12)
    assert "falls to 3 mg/L" in capsys.readouterr().out


def test_an_a_priori_dose_from_covariates_alone(tmp_path):
    """No dose given and no level: the regimen from the population model (ETA = 0 at the MAP, the posterior
    is the prior), AUC24 = 24 dose / (interval CL) with the typical CL; levels without any dose are refused."""
    from hybridpk.dosing import estimate_patient, recommend_dose

    model = _model(tmp_path, IV)
    first = hp.read_nonmem(pd.DataFrame([dict(ID=1, TIME=0.0, AMT=0.0, DV=0.0, EVID=2, MDV=1)]))
    rec = recommend_dose(model, first, "auc24=400:600", interval=24.0, dose_step=50.0)
    assert _map(rec, "CL", "V") == pytest.approx([3.0, 30.0], rel=1e-12)
    assert rec.start == 0.0 and rec.exposure["auc24"]["map"] == pytest.approx(rec.dose / 3.0, rel=1e-12)
    assert 400 <= rec.exposure["auc24"]["map"] <= 600 and any("a-priori" in w for w in rec.warnings)
    post = estimate_patient(model, first, n_samples=4000)
    assert post.draws.std(0).numpy() == pytest.approx([0.3, math.sqrt(0.05)], rel=0.1)
    levels = hp.read_nonmem(pd.DataFrame([dict(ID=1, TIME=1.0, AMT=0.0, DV=5.0, EVID=0, MDV=0)]))
    with pytest.raises(HybridPKError, match="no dose record"):
        recommend_dose(model, levels, "auc24=400:600")


ORAL_F = ORAL.replace("V = 30.0\n\n[iiv]", "V = 30.0\nF = 0.6\n\n[iiv]")


@pytest.mark.parametrize("cmt", [0, 1, 2])
def test_the_route_of_the_new_doses(tmp_path, cmt):
    """An oral model (F = 0.6) asked for doses into the depot (0, 1: F applies) or IV into the central
    compartment (2: F does not apply, as NONMEM's F1 belongs to the depot): AUC24 = 24 F dose / (interval CL)
    and the steady-state trough of the route's closed form."""
    from hybridpk.dosing import recommend_dose

    model = _model(tmp_path, ORAL_F)
    rec = recommend_dose(model, _patient(), "auc24=300:500", interval=12.0, dose_step=50.0, cmt=cmt)
    ka, cl, v, f = _map(rec, "KA", "CL", "V", "F")
    f = 1.0 if cmt == 2 else f
    assert f == pytest.approx(1.0 if cmt == 2 else 0.6)
    assert rec.exposure["auc24"]["map"] == pytest.approx(24 * f * rec.dose / (12.0 * cl), rel=1e-9)
    assert rec.records.CMT.iloc[0] == cmt
    trough = interval_for_dose(model, _patient(), 500.0, "trough=2:3", cmt=cmt)
    if cmt == 2:
        expected = brentq(lambda t: _trough_iv(500.0, cl, v, t, 0.0) - 2.5, 0.5, 168.0, xtol=1e-12)
    else:
        expected = brentq(lambda t: f * _trough_oral(500.0, ka, cl, v, t) - 2.5, 0.5, 168.0, xtol=1e-12)
    assert trough.interval == pytest.approx(expected, rel=1e-4)


def test_a_compartment_the_model_lacks_is_refused(tmp_path):
    from hybridpk.dosing import recommend_dose

    with pytest.raises(HybridPKError, match=r"cmt = 3.*1 \(DEPOT\), 2 \(CENTRAL\)"):
        recommend_dose(_model(tmp_path, ORAL_F), _patient(), "auc24=300:500", cmt=3)


def _auc_bolus(doses, cl, v, a, b):
    """Closed-form AUC over [a, b] of one-compartment IV boluses (time, amount)."""
    k = cl / v
    total = 0.0
    for t, amt in doses:
        lo, hi = max(a, t), b
        if hi > lo:
            total += amt / v / k * (math.exp(-k * (lo - t)) - math.exp(-k * (hi - t)))
    return total


@pytest.mark.parametrize("window", [(None, None), (0.0, 12.0), (5.0, 30.0), (12.0, 100.0)])
def test_the_auc_of_the_history(tmp_path, window):
    """AUC over a window of a history with ADDL boluses (a bolus inside the window makes the curve jump),
    against the closed form, to 1e-6; the posterior interval brackets the MAP."""
    from hybridpk.dosing import auc, estimate_patient

    model = _model(tmp_path, IV)
    out = auc(model, _patient(addl=2), *window)
    cl, v = _map(estimate_patient(model, _patient(addl=2)).parameters(), "CL", "V")
    a, b = (0.0, 10.0) if window == (None, None) else window      # defaults: first dose to last record
    expected = _auc_bolus([(0.0, 1000.0), (12.0, 1000.0), (24.0, 1000.0)], cl, v, a, b)
    assert (out["start_h"], out["end_h"]) == (a, b)
    assert out["map"] == pytest.approx(expected, rel=1e-6)
    assert out["p05"] <= out["median"] <= out["p95"]


def test_the_auc_of_infusions_and_oral_doses(tmp_path):
    from scipy.integrate import quad

    from hybridpk.dosing import auc, estimate_patient

    infused = _patient().to_dataframe().assign(RATE=[500.0, 0.0, 0.0])          # a 2-h infusion
    ds = hp.read_nonmem(infused)
    model = _model(tmp_path, IV)
    cl, v = _map(estimate_patient(model, ds).parameters(), "CL", "V")
    k = cl / v

    def c_inf(t):
        on = min(t, 2.0)
        return 500.0 / cl * (1 - math.exp(-k * on)) * math.exp(-k * (t - on))

    assert auc(model, ds, 0.5, 20.0)["map"] == pytest.approx(quad(c_inf, 0.5, 20.0, points=[2.0],
                                                                  epsabs=0, epsrel=1e-12)[0], rel=1e-6)
    oral = _model(tmp_path, ORAL)
    ka, cl, v = _map(estimate_patient(oral, _patient()).parameters(), "KA", "CL", "V")
    k = cl / v
    whole = 1000.0 * ka / (v * (ka - k)) * ((1 - math.exp(-k * 48)) / k - (1 - math.exp(-ka * 48)) / ka)
    assert auc(oral, _patient(), 0.0, 48.0)["map"] == pytest.approx(whole, rel=1e-6)
    with pytest.raises(HybridPKError, match="start < end"):
        auc(oral, _patient(), 10.0, 5.0)


def test_map_prints_the_auc_of_the_history(tmp_path, capsys):
    from hybridpk.cli import main
    from hybridpk.dosing import auc

    _patient(addl=2).to_dataframe().to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "spec.toml").write_text(IV)
    assert main(["map", str(tmp_path / "spec.toml"), str(tmp_path / "p.csv"), "--auc", "5:30"]) == 0
    expected = auc(_model(tmp_path, IV), _patient(addl=2), 5.0, 30.0)["map"]
    assert f"AUC 5-30 h of the doses given: MAP {expected:.4g} mg*h/L" in capsys.readouterr().out


def _new_patient():
    """Covariates only: no dose yet, no level (the textbook loading-dose situation)."""
    return hp.read_nonmem(pd.DataFrame([dict(ID=1, TIME=0.0, AMT=0.0, DV=0.0, EVID=2, MDV=1)]))


def test_a_loading_dose_for_a_trough_is_the_textbook_rule(tmp_path):
    """IV bolus, no history: L = D / (1 - e^(-k tau)) puts the first trough at the steady-state trough of D
    every tau (Rowland and Tozer); ours puts it at the target's middle, so L = mid V e^(k tau) exactly."""
    from hybridpk.dosing import loading_dose

    out = loading_dose(_model(tmp_path, IV), _new_patient(), "trough=4:6", interval=12.0, dose_step=1.0)
    k, v = 3.0 / 30.0, 30.0
    assert out.dose_mg == pytest.approx(5.0 * v * math.exp(k * 12.0), abs=0.5)    # whole mg
    first = out.exposure["trough (first interval)"]["map"]
    assert first == pytest.approx(out.dose_mg / v * math.exp(-k * 12.0), rel=1e-9)
    d = out.maintenance.dose
    ss = out.maintenance.exposure["trough"]["map"]
    assert ss == pytest.approx(d / v * _g(k * 12.0), rel=1e-9) and 4 <= ss <= 6
    assert list(out.records.TIME) == [0.0, 12.0] and list(out.records.ADDL) == [0, out.maintenance.regimen.n_doses - 1]


def test_a_loading_dose_for_day_one_auc_with_a_history(tmp_path):
    """Oral model with a dose already given: the loading dose puts the AUC of the first 24 h (history,
    loading dose and the maintenance doses inside the day) at the middle, checked by quad on the closed form."""
    from scipy.integrate import quad

    from hybridpk.dosing import loading_dose

    model = _model(tmp_path, ORAL)
    out = loading_dose(model, _patient(), "auc24=300:400", interval=12.0, dose_step=10.0)
    ka, cl, v = _map(out.maintenance, "KA", "CL", "V")
    k = cl / v
    s = out.maintenance.start
    doses = [(0.0, 1000.0), (s, out.dose_mg), (s + 12.0, out.maintenance.dose)]

    def conc(t):
        return sum(a * ka / (v * (ka - k)) * (math.exp(-k * (t - t0)) - math.exp(-ka * (t - t0)))
                   for t0, a in doses if t > t0)

    expected = quad(conc, s, s + 24.0, points=[s + 12.0], epsabs=0, epsrel=1e-12)[0]
    assert out.exposure["auc24 (first interval)"]["map"] == pytest.approx(expected, rel=1e-6)
    assert abs(expected - 350.0) <= 10.0 / cl      # a 10-mg step adds at most 10 / CL to any AUC
    assert out.exposure["auc24 (first interval)"]["p05"] <= expected <= out.exposure["auc24 (first interval)"]["p95"]


def test_no_loading_dose_when_the_history_suffices(tmp_path):
    from hybridpk.dosing import loading_dose

    out = loading_dose(_model(tmp_path, IV), _patient(addl=8), "trough=1:2", interval=12.0, dose_step=50.0)
    assert out.dose_mg is None and any("no loading dose" in w for w in out.warnings)
    with pytest.raises(HybridPKError, match="steady-state target"):
        loading_dose(_model(tmp_path, IV), _patient(), "conc@24=1:2")


def test_dose_loading_on_the_command_line(tmp_path, capsys):
    import json

    from hybridpk.cli import main
    from hybridpk.dosing import loading_dose

    _new_patient().to_dataframe().to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "spec.toml").write_text(IV)
    assert main(["dose", str(tmp_path / "spec.toml"), str(tmp_path / "p.csv"), "--loading", "--target",
                 "trough=4:6", "--interval", "12", "--dose-step", "50", "--out", str(tmp_path / "l.json")]) == 0
    rec = json.loads((tmp_path / "l.json").read_text())
    lib = loading_dose(_model(tmp_path, IV), _new_patient(), "trough=4:6", interval=12.0, dose_step=50.0)
    assert rec["loading_dose_mg"] == lib.dose_mg and rec["maintenance"]["dose_mg"] == lib.maintenance.dose
    assert f"loading dose {lib.dose_mg:g} mg at t = 0 h" in capsys.readouterr().out


def _independent_posterior(eta, times, dv, dose=1000.0, omega=(0.09, 0.05), add=0.1, prop=0.1):
    """One-compartment IV bolus, CL = 3 e^ETA1, V = 30 e^ETA2, Var = add^2 + (prop f)^2 (FOCE-I): the OFV,
    its per-level terms, g = df/dETA and h = dVar/dETA in closed form."""
    cl, v = 3.0 * math.exp(eta[0]), 30.0 * math.exp(eta[1])
    t = np.asarray(times)
    f = dose / v * np.exp(-cl / v * t)
    g = np.stack([-f * cl / v * t, f * (cl / v * t - 1.0)], 1)     # d f / d ETA_CL, d f / d ETA_V
    var = add ** 2 + (prop * f) ** 2
    h = (2 * prop ** 2 * f)[:, None] * g
    terms = (np.asarray(dv) - f) ** 2 / var + np.log(var)
    oinv = np.diag(1 / np.asarray(omega))
    return terms.sum() + eta @ oinv @ eta, terms, f, var, g, h, oinv


def test_the_estimate_in_full_against_an_independent_computation(tmp_path):
    """'map --out EST.json': the MAP (scipy's minimum of the OFV written here), the OFV and each level's
    term, and the expected-information covariance (NONMEM's ETC) agree to 1e-6; the observed-information
    covariance agrees with the inverse of half the OFV's finite-difference Hessian (1e-5)."""
    import json

    from scipy.optimize import minimize

    from hybridpk.cli import main

    _patient().to_dataframe().to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "spec.toml").write_text(IV)
    assert main(["map", str(tmp_path / "spec.toml"), str(tmp_path / "p.csv"), "--out", str(tmp_path / "e.json")]) == 0
    out = json.loads((tmp_path / "e.json").read_text())
    times, dv = [2.0, 10.0], [38.0, 24.0]

    def ofv(e):
        return _independent_posterior(np.asarray(e), times, dv)[0]

    best = minimize(ofv, np.zeros(2), method="BFGS", options={"gtol": 1e-12}).x
    eta = np.array([out["map"]["ETA_CL"], out["map"]["ETA_V"]])
    assert eta == pytest.approx(best, abs=1e-6)
    total, terms, f, var, g, h, oinv = _independent_posterior(eta, times, dv)
    assert out["ofv"] == pytest.approx(total, rel=1e-9)
    assert [o["CONTRIBUTION"] for o in out["observations"]] == pytest.approx(terms, rel=1e-9)
    assert [o["IPRED"] for o in out["observations"]] == pytest.approx(f, rel=1e-12)
    assert [o["VAR"] for o in out["observations"]] == pytest.approx(var, rel=1e-12)
    info = oinv + (g.T / var) @ g + 0.5 * (h.T / var ** 2) @ h
    etc = np.asarray(out["covariance"]["expected_information_etc"])
    assert etc == pytest.approx(np.linalg.inv(info), rel=1e-6)
    step, unit = 1e-4, np.eye(2) * 1e-4

    def second(i, j):
        a, b = unit[i] + unit[j], unit[i] - unit[j]
        return (ofv(eta + a) - ofv(eta + b) - ofv(eta - b) + ofv(eta - a)) / (4 * step ** 2)

    hess = np.array([[second(i, j) for j in range(2)] for i in range(2)])
    observed = np.asarray(out["covariance"]["observed_information"])
    assert observed == pytest.approx(np.linalg.inv(hess / 2), rel=1e-5)
    # individual shrinkage: posterior variance over OMEGA (was 1 - posterior SD / prior SD, which is near 1 where
    # the levels determine the ETA, the opposite of what shrinkage means and of what the warnings said)
    assert out["shrinkage"]["ETA_CL"] == pytest.approx(observed[0, 0] / 0.09, rel=1e-9)
    assert len(out["forecast"]["TIME"]) == 241 and out["seed"] == 0



def test_the_etc_equals_nonmems_phi_file():
    """NONMEM 7.5.1's .phi for one patient (quoted in InsightRX PKPDmap's tests/testthat/
    test-nonmem-vcov-comparison.R: ADVAN1 TRANS2, CL = 5 EXP(ETA1), V = 50 EXP(ETA2), OMEGA 0.1 0.1, Y = IPRED
    (1 + EPS1) + EPS2 with SIGMA 0.01 0.01, 1000 mg over 1 h, DV 18 and 6 mg/L at 2 and 8 h, $EST METHOD=COND
    INTERACTION MAXEVAL=0 POSTHOC): ETA (0.424754, -0.143394) and ETC ((0.00544459, 0.00161879),
    (0.00161879, 0.0137097)), which map's expected-information covariance reproduces to NONMEM's 6 digits."""
    from hybridpk.dosing.summary import patient_summary
    from hybridpk.population import FittedPopulation, build_model

    pm = build_model("1cmt_iv", iiv=["CL", "V"], error="combined")
    fit = FittedPopulation.from_values(pm, {"CL": 5.0, "V": 50.0}, {"CL": 0.1, "V": 0.1}, {"ADD": 0.1, "PROP": 0.1})
    patient = hp.read_nonmem(pd.DataFrame([
        dict(ID=1, TIME=0.0, DV=0.0, AMT=1000.0, RATE=1000.0, EVID=1, MDV=1),
        dict(ID=1, TIME=2.0, DV=18.0, AMT=0.0, RATE=0.0, EVID=0, MDV=0),
        dict(ID=1, TIME=8.0, DV=6.0, AMT=0.0, RATE=0.0, EVID=0, MDV=0)]))
    out = patient_summary(estimate_patient(fit, patient))
    assert [out["map"]["ETA_CL"], out["map"]["ETA_V"]] == pytest.approx([0.424754, -0.143394], abs=1e-6)
    etc = np.asarray(out["covariance"]["expected_information_etc"])
    assert etc == pytest.approx(np.array([[0.00544459, 0.00161879], [0.00161879, 0.0137097]]), rel=1e-5)


def _day_list(n: int = 6, seed: int = 0) -> pd.DataFrame:
    """n vancomycin patients (1000 mg q12h, a peak and a trough) with varied CRCL and WT, columns in the order
    a ward's export gives them; patient 3 has a negative level (refused)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        crcl, wt = rng.uniform(40, 120), rng.uniform(50, 100)
        rows += [dict(WT=wt, ID=i, TIME=0.0, AMT=1000.0, RATE=1000.0, DV=0.0, EVID=1, MDV=1, CRCL=crcl),
                 dict(WT=wt, ID=i, TIME=11.5, AMT=0.0, RATE=0.0, DV=rng.uniform(5, 20), EVID=0, MDV=0, CRCL=crcl),
                 dict(WT=wt, ID=i, TIME=12.0, AMT=1000.0, RATE=1000.0, DV=0.0, EVID=1, MDV=1, CRCL=crcl),
                 dict(WT=wt, ID=i, TIME=13.5, AMT=0.0, RATE=0.0, DV=rng.uniform(20, 40), EVID=0, MDV=0, CRCL=crcl)]
    df = pd.DataFrame(rows)
    df.loc[(df.ID == 3) & (df.EVID == 0), "DV"] = -1.0
    return df


def test_a_days_list_gets_each_patients_own_answer(tmp_path):
    """One batched call answers every patient as a call with that patient alone does (the MAP exposure to
    1e-6, the regimen exactly); the refused patient is named and does not stop the others."""
    from hybridpk.dosing import for_each_patient, recommend_dose

    ds = hp.read_nonmem(_day_list())
    answers = for_each_patient(recommend_dose, "vancomycin_goti2018", ds, target="auc24=400:600")
    assert [a.id for a in answers] == list(ds.ids)
    assert [a.ok for a in answers] == [True, True, False, True, True, True]
    assert "negative concentrations" in answers[2].error
    for a in answers:
        if a.ok:
            alone = recommend_dose("vancomycin_goti2018", ds.subset([a.id]), "auc24=400:600")
            assert (a.result.dose, a.result.interval) == (alone.dose, alone.interval)
            assert a.result.exposure["auc24"]["map"] == pytest.approx(alone.exposure["auc24"]["map"], rel=1e-6)


def test_dose_and_map_on_a_days_list(tmp_path, capsys):
    import json

    from hybridpk.cli import main

    _day_list().to_csv(tmp_path / "day.csv", index=False)
    assert main(["dose", "vancomycin_goti2018", str(tmp_path / "day.csv"), "--out", str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert [p["ID"] for p in out["patients"]] == [1, 2, 3, 4, 5, 6] and "error" in out["patients"][2]
    assert all(p["dose_mg"] > 0 for p in out["patients"] if "error" not in p)
    printed = capsys.readouterr().out
    assert "1 of 6 patients refused" in printed and "refused: negative concentrations" in printed
    assert main(["map", "vancomycin_goti2018", str(tmp_path / "day.csv"), "--out", str(tmp_path / "f.csv")]) == 0
    forecasts = pd.read_csv(tmp_path / "f.csv")
    assert sorted(forecasts.ID.unique()) == [1, 2, 4, 5, 6] and len(forecasts) == 5 * 241
    assert main(["map", "vancomycin_goti2018", str(tmp_path / "day.csv"), "--plot", str(tmp_path / "x.png")]) == 2


def _history(route: str, addl: int) -> tuple:
    """A dose history (time, amount) x (addl + 1) every 12 h by ``route`` (bolus, infusion over 2 h, oral),
    with two levels: its dataset and its dose list."""
    rate = {"infusion": 500.0}.get(route, 0.0)
    rows = [dict(ID=1, TIME=0.0, AMT=1000.0, RATE=rate, DV=0.0, EVID=1, MDV=1, ADDL=addl, II=12.0 if addl else 0.0)]
    rows += [dict(ID=1, TIME=t, AMT=0.0, RATE=0.0, DV=y, EVID=0, MDV=0, ADDL=0, II=0.0)
             for t, y in ((3.0, 30.0), (10.0, 22.0))]
    return hp.read_nonmem(pd.DataFrame(rows)), [12.0 * j for j in range(addl + 1)]


def _superposed(route, p, doses):
    """The concentration (mg/L) at t of 1000-mg doses at ``doses`` (h): one compartment, closed forms."""
    k = p["CL"] / p["V"]

    def one(s):
        if s <= 0:
            return 0.0
        if route == "bolus":
            return 1000.0 / p["V"] * math.exp(-k * s)
        if route == "infusion":
            on = min(s, 2.0)
            return 500.0 / p["CL"] * -math.expm1(-k * on) * math.exp(-k * (s - on))
        ka = p["KA"]
        return 1000.0 * ka / (p["V"] * (ka - k)) * (math.exp(-k * s) - math.exp(-ka * s))

    return lambda t: sum(one(t - d) for d in doses)


@pytest.mark.parametrize("addl", [0, 3])
@pytest.mark.parametrize("route", ["bolus", "infusion", "oral"])
def test_time_and_auc_for_every_route_single_and_multiple_doses(tmp_path, route, addl):
    """Time to 2 mg/L after the last dose (exact root) and the AUC from the first dose to 12 h after the
    last, against brentq and quad on the superposed closed form, to 1e-6 relative."""
    from scipy.integrate import quad

    from hybridpk.dosing import auc

    model = _model(tmp_path, ORAL if route == "oral" else IV)
    ds, doses = _history(route, addl)
    post = estimate_patient(model, ds)
    names = ("KA", "CL", "V") if route == "oral" else ("CL", "V")
    p = dict(zip(names, _map(post.parameters(), *names)))
    conc = _superposed(route, p, doses)
    last = doses[-1]
    peak = max(np.linspace(last, last + 12.0, 2401), key=conc)
    expected = brentq(lambda t: conc(t) - 2.0, peak, last + 168.0, xtol=1e-12)
    out = time_to_concentration(model, ds, 2.0, posterior=post)
    assert out["map_time_h"] == pytest.approx(expected, rel=1e-6)
    cuts = sorted({*doses, *(d + 2.0 for d in doses)}) if route == "infusion" else doses
    area = quad(conc, 0.0, last + 12.0, points=cuts[1:], limit=200, epsabs=0, epsrel=1e-12)[0]
    assert auc(model, ds, 0.0, last + 12.0, posterior=post)["map"] == pytest.approx(area, rel=1e-6)


def test_the_interval_for_an_oral_peak(tmp_path):
    """The steady-state peak of an oral dose is the maximum of the Bateman superposition (found here by
    scipy's bounded scalar minimiser); the interval that puts it at 15 mg/L, to 1e-4."""
    from scipy.optimize import minimize_scalar

    rec = interval_for_dose(_model(tmp_path, ORAL), _patient(), 300.0, "peak=13:17")
    ka, cl, v = _map(rec, "KA", "CL", "V")
    k = cl / v

    def peak(tau):
        def c(t):
            return 300.0 * ka / (v * (ka - k)) * (math.exp(-k * t) * _g(k * tau) / math.exp(-k * tau)
                                                   - math.exp(-ka * t) * _g(ka * tau) / math.exp(-ka * tau))
        return -minimize_scalar(lambda t: -c(t), bounds=(0.0, tau), method="bounded",
                                options={"xatol": 1e-10}).fun

    expected = brentq(lambda tau: peak(tau) - 15.0, 0.5, 168.0, xtol=1e-10)
    assert rec.interval == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("route", ["bolus", "infusion", "oral"])
def test_the_time_above_a_level(tmp_path, route):
    """Hours above 5 mg/L from the first dose to 48 h of four doses 12 h apart (ADDL), against the crossings
    of the superposed closed form found by brentq on a fine grid (1e-4 relative)."""
    from hybridpk.dosing import time_above

    model = _model(tmp_path, ORAL if route == "oral" else IV)
    ds, doses = _history(route, 3)
    post = estimate_patient(model, ds)
    names = ("KA", "CL", "V") if route == "oral" else ("CL", "V")
    conc = _superposed(route, dict(zip(names, _map(post.parameters(), *names))), doses)
    grid = np.linspace(0.0, 48.0, 96001)
    values = np.array([conc(t) for t in grid]) - 5.0
    hours, inside, prev = 0.0, values[0] > 0, 0.0
    for j in np.nonzero((values[1:] > 0) != (values[:-1] > 0))[0]:
        lo, hi = grid[j], grid[j + 1]
        f = lambda t: conc(t) - 5.0  # noqa: E731
        t = brentq(f, lo, hi, xtol=1e-12) if f(lo) * f(hi) < 0 else lo
        hours += (t - prev) if inside else 0.0
        prev, inside = t, not inside
    hours += (48.0 - prev) if inside else 0.0
    out = time_above(model, ds, 5.0, 0.0, 48.0, posterior=post)
    assert out["map_hours"] == pytest.approx(hours, rel=1e-4)
    assert out["map_fraction"] == pytest.approx(hours / 48.0, rel=1e-4)
    assert out["p05_hours"] <= out["median_hours"] <= out["p95_hours"]


def test_map_prints_the_time_above_a_level(tmp_path, capsys):
    from hybridpk.cli import main
    from hybridpk.dosing import time_above

    _patient(addl=2).to_dataframe().to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "spec.toml").write_text(IV)
    assert main(["map", str(tmp_path / "spec.toml"), str(tmp_path / "p.csv"), "--above", "20", "--auc", "0:36"]) == 0
    expected = time_above(_model(tmp_path, IV), _patient(addl=2), 20.0, 0.0, 36.0)["map_hours"]
    assert f"above 20 mg/L from 0 to 36 h: MAP {expected:.2f} h" in capsys.readouterr().out
