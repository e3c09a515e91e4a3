"""Doses whose duration (rate) is a model parameter, RATE = -2 (-1) with D1 (R1) in $PK, in models solved as ODEs:
zero-order or sequential zero-first-order absorption into a $DES model (NONMEM help "RATE": with RATE = -2 the dose
lasts D1 h at AMT*F1/D1 per hour; with RATE = -1 it runs at R1 per hour for AMT*F1/R1 h). They were refused
('... and a model solved in closed form'). Checked against ADVAN2's closed form with the same D1, against LSODA
integrated in pieces that end where the input stops, the derivative in the THETA of D1 against a central difference
(both ODE solvers: Dormand-Prince and matrix exponentials), and a steady-state dose against the explicit doses."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.integrate import solve_ivp

import hybridpk as hp
from hybridpk.errors import ModelError
from hybridpk.population.focei import Problem
from hybridpk.solve import simulate
from tests.integration.test_nonmem_des import HEAD, THEO_DES, _thetas
from tests.integration.test_nonmem_des import _read as _read_stream
from tests.integration.test_nonmem_import import THEO_TRANS2, _ofv

#: theophylline with a RATE column: every dose RATE = -2 (or -1), its duration (rate) a THETA
INPUT = HEAD.replace("CMT WT", "CMT WT RATE").replace("theoph.csv", "theoph_rate.csv")
D1 = "S2 = V\nD1 = THETA(4)*EXP(ETA(4))"
D1_THETA = "$THETA (0, 32) ; POP_V\n$THETA (0, 1.5) ; POP_D1\n"
D1_OMEGA = "$OMEGA 0.02\n$OMEGA 0.1\n"

#: sequential zero-first-order absorption: the dose enters the depot over D1 h, then first-order to the central
SEQ_DES = THEO_DES.replace(HEAD, INPUT).replace("S2 = V", D1).replace("$THETA (0, 32) ; POP_V\n", D1_THETA) \
    .replace("$OMEGA 0.02\n", D1_OMEGA)
SEQ_ADVAN2 = THEO_TRANS2.replace(HEAD, INPUT).replace("S2 = V", D1).replace("$THETA (0, 32) ; POP_V\n", D1_THETA) \
    .replace("$OMEGA 0.02\n", D1_OMEGA)

#: the same input with Michaelis-Menten elimination: no closed form, Dormand-Prince
MM_DES = SEQ_DES.replace("DADT(2) = KA*A(1) - CL/V*A(2)", "C = A(2)/V\nDADT(2) = KA*A(1) - CL*6*C/(6 + C)")
assert all(INPUT in text and D1 in text for text in (SEQ_DES, SEQ_ADVAN2, MM_DES))    # the streams read RATE

VALUES = [1.5, 2.8, 32.0, 1.5]
OM, SD = [0.4, 0.07, 0.02, 0.1], {"ADD": math.sqrt(0.5)}


def _read(tmp_path, theoph_path, text, rate=-2.0):
    df = pd.read_csv(theoph_path)
    df["RATE"] = np.where(df.EVID == 1, rate, 0.0)
    df.to_csv(tmp_path / "theoph_rate.csv", index=False)
    return _read_stream(tmp_path, theoph_path, text)


def _lsoda_ipred(ds, rhs, v, duration_of):
    """IPRED at each subject's records: the dose enters compartment 1 at AMT/duration per hour over [0, duration],
    LSODA (rtol 1e-10) in two pieces split where the input stops."""
    out = []
    for _, rows in ds.to_dataframe().groupby("ID", sort=False):
        dose = float(rows.AMT.max())
        d = duration_of(dose)
        times = sorted({float(t) for t in rows.TIME})
        y, levels = np.zeros(2), {}
        for a, b, rate in ((0.0, d, dose / d), (d, max(times), 0.0)):
            sol = solve_ivp(lambda t, x: rhs(t, x, rate), (a, b), y, method="LSODA", rtol=1e-10, atol=1e-12,
                            dense_output=True)
            levels.update({t: sol.sol(t)[1] / v for t in times if a <= t <= b})
            y = sol.sol(b)
        out.append(np.array([levels[float(t)] for t in rows.TIME]))
    return out


def _ipred(pm, ds, values, theta_grad=None):
    prob = Problem(pm, ds)
    theta = _thetas(pm, values)
    if theta_grad is not None:
        theta[theta_grad].requires_grad_()
    return prob.predict(theta, torch.zeros(ds.n_subjects, pm.n_eta, dtype=torch.float64)), prob, theta


@pytest.mark.parametrize("extra", ["", "\nALAG1 = 0.3\nF1 = 0.8"], ids=["D1", "D1-ALAG1-F1"])
def test_zero_order_input_into_a_linear_des_gives_advan2s_ofv(tmp_path, theoph_path, extra):
    """The linear $DES (matrix exponentials) with D1 and ADVAN2's closed form with D1: the same OFV with EBEs; with a
    lag and a bioavailability too (NONMEM: F1 scales the amount, the input lasts D1 h from the lagged dose time)."""
    pm, ds = _read(tmp_path, theoph_path, SEQ_DES.replace(D1, D1 + extra))
    assert pm.structural.piecewise_linear and pm.label("D") == "D1"
    ref_pm, ref_ds = _read(tmp_path, theoph_path, SEQ_ADVAN2.replace(D1, D1 + extra))
    theta = dict(zip(["POP_KA", "POP_CL", "POP_V", "POP_D1"], VALUES))
    a, b = _ofv(pm, ds, theta, OM, SD), _ofv(ref_pm, ref_ds, theta, OM, SD)
    assert np.isfinite(a) and a == pytest.approx(b, rel=1e-8)


@pytest.mark.parametrize("rate", [-2.0, -1.0], ids=["D1", "R1"])
def test_zero_order_input_into_a_nonlinear_des_matches_lsoda(tmp_path, theoph_path, rate):
    text = MM_DES if rate == -2.0 else MM_DES.replace("D1 = THETA(4)", "R1 = THETA(4)").replace("1.5) ; POP_D1",
                                                                                               "150) ; POP_D1")
    pm, ds = _read(tmp_path, theoph_path, text, rate=rate)
    assert not pm.structural.piecewise_linear
    values = VALUES if rate == -2.0 else VALUES[:3] + [150.0]
    ka, cl, v, dpar = values
    ipred, _, _ = _ipred(pm, ds, values)

    def rhs(t, a, input_rate):
        c = a[1] / v
        return [input_rate - ka * a[0], ka * a[0] - cl * 6 * c / (6 + c)]

    ref = _lsoda_ipred(ds, rhs, v, (lambda dose: dpar) if rate == -2.0 else (lambda dose: dose / dpar))
    obs = ds.to_dataframe().groupby("ID", sort=False).MDV.apply(lambda m: (m == 0).to_numpy()).tolist()
    worst = max(float(np.max(np.abs(ipred[i, :len(r)].detach().numpy()[o] - r[o]) / np.maximum(r[o], 1e-3)))
                for i, (r, o) in enumerate(zip(ref, obs)))
    assert worst < 1e-6


@pytest.mark.parametrize("text", [SEQ_DES, MM_DES], ids=["expm", "dp5"])
def test_the_derivative_in_d1s_theta_is_the_central_difference(tmp_path, theoph_path, text):
    """d(IPRED)/d(THETA of D1) by autograd: the solver's steps end where the input stops, and that time carries
    its derivative (the jump of the input rate) to later records. Against a central difference of the solution."""
    pm, ds = _read(tmp_path, theoph_path, text)
    ipred, prob, theta = _ipred(pm, ds, VALUES, theta_grad="POP_D1")
    obs = prob.obs
    grad = torch.autograd.grad(ipred[obs].sum(), theta["POP_D1"])[0].item()
    h = 1e-5
    up = _ipred(pm, ds, VALUES[:3] + [VALUES[3] + h])[0][obs].sum().item()
    down = _ipred(pm, ds, VALUES[:3] + [VALUES[3] - h])[0][obs].sum().item()
    fd = (up - down) / (2 * h)
    assert abs(fd) > 1.0                        # the duration matters to these levels
    assert grad == pytest.approx(fd, rel=1e-5)


def test_the_ebe_searchs_hessian_in_the_eta_of_d1_carries_no_step_noise(tmp_path, theoph_path):
    """The EBE search's stencil Hessian (central differences at 1e-4 in ETA, all points in one Dormand-Prince call
    with shared steps) of the Michaelis-Menten stream, whose ETA(4) moves where each dose's input stops, equals the
    same stencil solved at rtol 1e-12 to 1e-6 of its largest entry. The copies whose input stops at different times
    took different numbers of steps before it: noise of 2e-5 to 3e-4, and the search took 58 Newton iterations
    instead of 20 (45.6 s against 11.8 s)."""
    pm, ds = _read(tmp_path, theoph_path, MM_DES)
    theta = _thetas(pm, VALUES)
    omega_inv = torch.linalg.inv(torch.diag(torch.tensor(OM, dtype=torch.float64)))
    sd = {k: torch.tensor(v, dtype=torch.float64) for k, v in SD.items()}
    eta = torch.tensor([[1.5, 0.14, -0.03, -0.78], [1.47, 0.69, 0.09, -1.09], [0.56, 0.56, 0.21, -0.35],
                        [0.18, 0.21, -0.05, -0.65]], dtype=torch.float64)      # near the modes of 4 subjects
    four = ds.subset([ds.ids[i] for i in (0, 1, 6, 9)])
    hessians = [Problem(pm, four, rtol=rtol, atol=rtol / 100).stencil_derivatives(theta, omega_inv, sd, eta)[2]
                for rtol in (1e-8, 1e-12)]
    scale = hessians[1].abs().amax((1, 2))
    assert float(((hessians[0] - hessians[1]).abs().amax((1, 2)) / scale).max()) < 1e-6
    assert float(hessians[1][:, 3, 3].min()) > 1.0      # the ETA of D1 is informed


def test_a_des_with_d1_fits_as_advan2_with_d1(tmp_path, theoph_path):
    """hybridpk's default fit of the $DES stream with D1 and of ADVAN2 with D1 (theophylline, every dose RATE = -2):
    the same OFV and estimates (the $DES search differentiates through where the input stops); the individual
    duration is reported under the stream's name, D1."""
    fits = []
    for text in (SEQ_DES, SEQ_ADVAN2):
        pm, ds = _read(tmp_path, theoph_path, text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits.append(hp.fit_population(pm, ds, progress=False, covariance=False))
    des, advan2 = fits
    assert des.estimation.ofv == pytest.approx(advan2.estimation.ofv, abs=1e-5)
    for name in ("POP_KA", "POP_CL", "POP_V", "POP_D1"):
        assert des.theta[name].value == pytest.approx(advan2.theta[name].value, rel=1e-4)
    assert des.theta["POP_D1"].value < 1.0          # moved from 1.5 h (0.28 h)
    assert "D" in des.estimate(ds).parameters.columns and des.model.label("D") == "D1"


def test_a_native_ode_model_takes_the_duration_as_a_theta(tmp_path, theoph_path):
    """hybridpk fit DATA --model 1cmt_oral_mm --init D=1.5 (the duration was taken by the closed forms only): D is a
    THETA, the run says its doses take a modelled duration, and its predictions are the $DES stream's with D1."""
    pm, ds = _read(tmp_path, theoph_path, MM_DES)
    native = hp.build_model("1cmt_oral_mm", iiv=["KA", "VMAX", "V", "D"], error="additive",
                            initial={"KA": 1.5, "VMAX": 6 * 2.8, "KM": 6.0, "V": 32.0, "D": 1.5})
    assert "D" in [t.name for t in native.thetas] and native.recipe["modelled_input"] == ["duration (D)"]
    ours, _, _ = _ipred(native, ds, [{"KA": 1.5, "VMAX": 6 * 2.8, "KM": 6.0, "V": 32.0, "D": 1.5}[t.name]
                                     for t in native.thetas])
    theirs, prob, _ = _ipred(pm, ds, VALUES)
    torch.testing.assert_close(ours[prob.obs], theirs[prob.obs], rtol=1e-6, atol=1e-9)


def _steady_state_batch(ss: bool):
    times = [24.0 * 20 + t for t in (0.5, 1.0, 2.0, 3.0, 6.0, 11.0)] if not ss else [0.5, 1.0, 2.0, 3.0, 6.0, 11.0]
    dose = dict(ID=1, TIME=0.0, AMT=200.0, RATE=-2.0, EVID=1, MDV=1, DV=0.0, II=12.0)
    dose.update(SS=1, ADDL=0) if ss else dose.update(SS=0, ADDL=40)
    rows = [dose] + [dict(ID=1, TIME=t, AMT=0.0, RATE=0.0, EVID=0, MDV=0, DV=1.0, II=0.0, SS=0, ADDL=0)
                     for t in times]
    return hp.read_nonmem(pd.DataFrame(rows)).to_batch()


@pytest.mark.parametrize("solver", ["dp5", "dopri5"])
def test_a_steady_state_dose_with_a_modelled_duration_is_the_limit_of_explicit_doses(solver):
    """1cmt_oral_mm, 200 mg every 12 h entering the depot over D = 2.5 h (RATE = -2): SS = 1 at 0 gives the levels
    of the 41st explicit dose (at 480 h) in its interval."""
    p = {"KA": 1.2, "VMAX": 60.0, "KM": 2.0, "V": 30.0, "D": 2.5}
    ss = simulate("1cmt_oral_mm", p, _steady_state_batch(True), solver=solver).ipred[0, 1:]
    explicit = simulate("1cmt_oral_mm", p, _steady_state_batch(False), solver=solver).ipred[0, 1:]
    torch.testing.assert_close(ss, explicit, rtol=1e-5, atol=0)


def test_a_des_without_d1_still_refuses_rate_minus_two(tmp_path, theoph_path):
    pm, ds = _read(tmp_path, theoph_path, THEO_DES.replace(HEAD, INPUT))
    with pytest.raises(ModelError, match="needs the rate R or the duration D"):
        Problem(pm, ds).predict(_thetas(pm, VALUES[:3]), torch.zeros(ds.n_subjects, pm.n_eta, dtype=torch.float64))
