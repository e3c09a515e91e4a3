"""The analytic path of FOCE-I (hybridpk.population.analytic_focei: the ADVAN1-4 closed forms' own derivatives, in
numpy) against the general path (automatic differentiation through the closed form, focei.Problem): the same
EBEs, per-subject OFVs and gradients at parameter values away from the optimum, the same fit, and the general
path wherever the analytic one does not cover the model or data."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
import hybridpk.population.fit as fit_module
from hybridpk.population import analytic_focei, build_model, fit_population
from hybridpk.population.analytic_focei import AnalyticFOCEI, analytic_problem, analytic_reason
from hybridpk.population.fit import Packing, _analytic_at, per_subject_gradients
from hybridpk.population.focei import Problem


def _multiple_doses(tmp_path, seed: int = 4, n: int = 14):
    """1-cmt oral, 100 mg at 0 h then every 12 h (ADDL=2 on some subjects, separate dose records on the others,
    one subject with a second dose level), 6-9 samples each in 0.5-40 h, 10% proportional + 0.05 mg/L noise;
    WT (kg; CL ~ (WT/70)^0.75, V ~ WT/70) and SEX (0/1; CL 20% lower for 1) as baseline covariates."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        wt, sex = round(float(rng.uniform(45, 110)), 1), int(rng.integers(0, 2))
        ka = 1.2 * math.exp(rng.normal(0, 0.3))
        cl = 3.0 * (wt / 70) ** 0.75 * (0.8 if sex else 1.0) * math.exp(rng.normal(0, 0.3))
        v = 30 * wt / 70 * math.exp(rng.normal(0, 0.2))
        amt = 150.0 if i == n else 100.0
        if i % 2:
            rows.append(dict(ID=i, TIME=0.0, AMT=amt, DV=0.0, EVID=1, MDV=1, ADDL=2, II=12.0, WT=wt, SEX=sex))
        else:
            rows += [dict(ID=i, TIME=t, AMT=amt, DV=0.0, EVID=1, MDV=1, ADDL=0, II=0.0, WT=wt, SEX=sex)
                     for t in (0.0, 12.0, 24.0)]
        times = np.sort(rng.uniform(0.5, 40.0, rng.integers(6, 10)))
        k = cl / v
        for t in times:
            c = sum(amt * ka / (v * (ka - k)) * (math.exp(-k * (t - td)) - math.exp(-ka * (t - td)))
                    for td in (0.0, 12.0, 24.0) if t > td)
            rows.append(dict(ID=i, TIME=round(float(t), 3), AMT=0.0,
                             DV=round(c * (1 + 0.1 * rng.normal()) + 0.05 * rng.normal(), 5), EVID=0, MDV=0, ADDL=0,
                             II=0.0, WT=wt, SEX=sex))
    df = pd.DataFrame(rows).sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False])
    path = tmp_path / "md.csv"
    df[["ID", "TIME", "AMT", "DV", "EVID", "MDV", "ADDL", "II", "WT", "SEX"]].to_csv(path, index=False)
    return hp.read_nonmem(path)


def _iv_doses(tmp_path, seed: int = 5, n: int = 16):
    """1-cmt IV: 200 mg at 0 and 12 h as a bolus (RATE=0), a 1-h infusion (RATE=200) or a 0.5-h infusion given by
    its duration (RATE=-2, DUR=0.5), by subject; 5-8 levels in 0.1-30 h, some during an infusion, and a level at
    12 h on the record after the dose (it sees the dose) and on the one before it (a trough that does not)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        wt = round(float(rng.uniform(45, 110)), 1)
        cl, v = 4.0 * (wt / 70) ** 0.75 * math.exp(rng.normal(0, 0.3)), 40 * math.exp(rng.normal(0, 0.2))
        rate, dur = ((0.0, 0.0), (200.0, 0.0), (-2.0, 0.5))[i % 3]
        times = sorted(set(np.round(rng.uniform(0.1, 30.0, rng.integers(5, 9)), 2).tolist()) - {12.0})
        for td in (0.0, 12.0):
            if td == 12.0 and i % 2:
                rows.append(dict(ID=i, TIME=12.0, AMT=0.0, RATE=0.0, DUR=0.0, EVID=0, MDV=0, WT=wt))  # trough
            rows.append(dict(ID=i, TIME=td, AMT=200.0, RATE=rate, DUR=dur, EVID=1, MDV=1, WT=wt))
            if td == 12.0 and not i % 2:
                rows.append(dict(ID=i, TIME=12.0, AMT=0.0, RATE=0.0, DUR=0.0, EVID=0, MDV=0, WT=wt))  # after it
        rows += [dict(ID=i, TIME=t, AMT=0.0, RATE=0.0, DUR=0.0, EVID=0, MDV=0, WT=wt) for t in times]
        for r in rows:
            if r["ID"] == i and r["EVID"] == 0:
                t = r["TIME"]
                c = sum(200 / v * math.exp(-cl / v * (t - td)) for td in (0.0, 12.0) if t > td)
                r["DV"] = round(max(c, 0.05) * math.exp(0.1 * rng.normal()), 4)
            elif r["ID"] == i:
                r["DV"] = 0.0
    df = pd.DataFrame(rows).sort_values(["ID", "TIME"], kind="stable")
    path = tmp_path / "iv.csv"
    df[["ID", "TIME", "AMT", "RATE", "DUR", "DV", "EVID", "MDV", "WT"]].to_csv(path, index=False)
    return hp.read_nonmem(path)


CASES = [("additive", ["KA", "CL", "V"], False, ()), ("proportional", ["CL", "V"], False, ()),
         ("combined", ["KA", "CL", "V"], True, ()), ("combined", ["V", "KA"], False, ()),
         ("proportional", ["CL"], False, ()),
         ("combined", ["KA", "CL", "V"], [["CL", "V"]], ("CL~WT", "V~WT:linear", "CL~SEX:categorical:1")),
         ("proportional", ["KA", "CL"], False, ("CL~WT:maturation:60",)),
         ("additive", ["CL", "V"], False, ("KA~WT:exponential", "V~WT:power:70:1"))]
CASES = [("1cmt_oral", *c) for c in CASES] + [
    ("1cmt_iv", "combined", ["CL", "V"], True, ("CL~WT",)), ("1cmt_iv", "proportional", ["CL"], False, ()),
    ("1cmt_iv", "additive", ["V", "CL"], False, ("V~WT:linear",)),
    ("2cmt_oral", "combined", ["KA", "CL", "V", "Q", "V2"], False, ("CL~WT",)),
    ("2cmt_oral", "proportional", ["CL", "V2"], [["CL", "V2"]], ()),
    ("2cmt_iv", "combined", ["CL", "V", "V2"], True, ("CL~WT", "V~WT:linear")),
    ("2cmt_iv", "additive", ["Q", "CL"], False, ()),
    ("3cmt_iv", "combined", ["CL", "V", "V2", "V3"], True, ("CL~WT",)),
    ("3cmt_oral", "proportional", ["KA", "CL", "V", "Q3"], False, ())]
#: the structural parameters (log scale): the random points move them by 0.25, covariate coefficients by 0.01
STRUCTURAL = ("KA", "CL", "V", "Q", "V2", "Q3", "V3")


@pytest.mark.parametrize("model, error, iiv, block, covariates", CASES)
def test_ofv_ebes_and_gradients_equal_the_general_paths(tmp_path, monkeypatch, model, error, iiv, block, covariates):
    """At two random points per model (every OFV term, EBE search and implicit-gradient term is away from its
    optimum there): per-subject OFV, EBEs, gradients with respect to the estimation vector and the per-subject
    gradients (the S matrix's) of the general path, whose g = df/deta is a central difference (hence the
    1e-7-level tolerance, not 1e-12)."""
    monkeypatch.setattr(analytic_focei, "analytic_problem", lambda *a: (None, "the reference"))
    ds = _multiple_doses(tmp_path) if model.endswith("_oral") else _iv_doses(tmp_path)
    pm = build_model(model, iiv=iiv, error=error, omega_block=block, covariates=covariates, data=ds)
    prob, pack = Problem(pm, ds), Packing(pm)
    rng = np.random.default_rng(len(iiv) + 10 * bool(block) + 100 * len(covariates))
    # 0.25 on the log scale of KA, CL, V, OMEGA and the SDs; covariate coefficients 0.01 (a linear effect of 0.25
    # per kg would make V negative)
    scale = np.full(len(pack.x0()), 0.25)
    scale[[i for i, t in enumerate(pack.free) if t.name not in STRUCTURAL]] = 0.01
    assert analytic_reason(pm, prob) is None
    for _ in range(2):
        _assert_both_paths_agree(pm, prob, pack, pack.x0() + rng.normal(0.0, 1.0, len(pack.x0())) * scale,
                                 per_subject=True)


def _steady_state_doses(tmp_path, oral: bool, seed: int = 6, n: int = 16):
    """TDM-style records, by subject: a steady-state dose (SS=1, II 12 h) then one more; a steady-state 1-h
    infusion (IV data; an oral SS=1 dose otherwise); a dose with a steady-state dose added 24 h later (SS=2, II
    24 h); a dose, then a reset-and-dose (EVID 4) at 24 h. 4-7 levels in 0.5-40 h, one a trough on the record
    before a dose at the same time. The levels are noisy values of a rough 1-cmt curve: both paths are
    compared on the same data, whatever they are."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        wt = round(float(rng.uniform(45, 110)), 1)
        kind = i % 4
        doses = {0: [dict(TIME=0.0, SS=1, II=12.0, ADDL=1)],
                 1: [dict(TIME=0.0, SS=1, II=12.0, RATE=0.0 if oral else 200.0)],
                 2: [dict(TIME=0.0), dict(TIME=24.0, SS=2, II=24.0)],
                 3: [dict(TIME=0.0), dict(TIME=24.0, EVID=4)]}[kind]
        times = sorted(set(np.round(rng.uniform(0.5, 40.0, rng.integers(4, 8)), 1).tolist()) - {24.0})
        if kind >= 2:
            rows.append(dict(ID=i, TIME=24.0, AMT=0.0, EVID=0, MDV=0, WT=wt))       # the trough before the dose
        for d in doses:
            rows.append({"ID": i, "AMT": 200.0, "EVID": 1, "MDV": 1, "WT": wt, "SS": 0, "II": 0.0, "ADDL": 0,
                         "RATE": 0.0, **d})
        rows += [dict(ID=i, TIME=t, AMT=0.0, EVID=0, MDV=0, WT=wt) for t in times]
    df = pd.DataFrame(rows).fillna({"SS": 0, "II": 0.0, "ADDL": 0, "RATE": 0.0})
    df["DV"] = np.where(df.EVID == 0, np.round(200 / 35 * np.exp(-0.1 * (df.TIME % 12)) * (2 + rng.normal(0, 0.1,
                                                                                                      len(df))), 4), 0)
    df = df.sort_values(["ID", "TIME"], kind="stable")
    df[["ID", "TIME", "AMT", "RATE", "SS", "II", "ADDL", "DV", "EVID", "MDV", "WT"]].to_csv(tmp_path / "ss.csv",
                                                                                           index=False)
    return hp.read_nonmem(tmp_path / "ss.csv")


@pytest.mark.parametrize("model, error, iiv", [("1cmt_iv", "combined", ["CL", "V"]),
                                               ("1cmt_oral", "proportional", ["KA", "CL", "V"]),
                                               ("2cmt_iv", "additive", ["CL", "V", "V2"]),
                                               ("2cmt_oral", "combined", ["KA", "CL", "Q"])])
def test_steady_state_doses_and_resets_equal_the_general_paths(tmp_path, monkeypatch, model, error, iiv):
    """Steady-state doses (SS=1 and 2, boluses and an infusion), a reset-and-dose (EVID 4) and a trough before a
    dose, by jets (one compartment as well): the same EBEs, OFVs and gradients as the general path at two random
    points."""
    monkeypatch.setattr(analytic_focei, "analytic_problem", lambda *a: (None, "the reference"))
    ds = _steady_state_doses(tmp_path, oral=model.endswith("_oral"))
    pm = build_model(model, iiv=iiv, error=error, covariates=("CL~WT",), data=ds)
    prob, pack = Problem(pm, ds), Packing(pm)
    assert analytic_reason(pm, prob) is None
    rng = np.random.default_rng(len(iiv))
    scale = np.full(len(pack.x0()), 0.25)
    scale[[i for i, t in enumerate(pack.free) if t.name not in STRUCTURAL]] = 0.01
    for _ in range(2):
        engine, _ = _assert_both_paths_agree(pm, prob, pack, pack.x0() + rng.normal(0.0, 1.0, len(pack.x0())) * scale,
                                             per_subject=True)
    assert engine.steady_state and not engine.by_hand


def _assert_both_paths_agree(pm, prob, pack, xv, per_subject: bool = False):
    """At the estimation vector ``xv``, from ETA = 0: the EBEs, per-subject OFVs, the OFV gradient and (with
    ``per_subject``) the S matrix's per-subject gradients of the analytic path equal the general path's
    (``prob``, on which the caller has turned the analytic path off)."""
    x = torch.tensor(xv, dtype=torch.float64, requires_grad=True)
    theta, omega, sd = pack.unpack(x)
    engine, why = analytic_problem(pm, prob, theta)
    assert engine is not None, why
    zero = torch.zeros(prob.batch.n_subjects, pm.n_eta, dtype=torch.float64)
    eta_t = prob.ebe(theta, torch.linalg.inv(omega).detach(), sd, zero)
    ofv_t = prob.ofv(theta, omega, sd, eta_t, per_subject=True)
    (grad_t,) = torch.autograd.grad(ofv_t.sum(), x)
    assert prob.analytic(theta) is None           # the reference is the general path throughout
    ofv_a, grad_a, eta_a, _ = _analytic_at(engine, pack, xv, zero)
    np.testing.assert_allclose(eta_a.numpy(), eta_t.numpy(), atol=1e-8)
    np.testing.assert_allclose(ofv_a, ofv_t.detach().numpy(), rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(grad_a, grad_t.numpy(), rtol=1e-6, atol=1e-5)
    if per_subject:
        subjects_t = per_subject_gradients(lambda xt: prob.ofv(*pack.unpack(xt), eta_t, per_subject=True), x)
        _, subjects_a, _, _ = _analytic_at(engine, pack, xv, zero, per_subject=True)
        np.testing.assert_allclose(subjects_a, subjects_t, rtol=1e-6, atol=1e-5)
    return engine, eta_a


def test_sparse_subjects_and_subjects_without_levels(tmp_path, monkeypatch):
    """Data shaped as users shape them: columns in another order, one to three levels per subject, two subjects
    with none (their EBEs are 0), a subject whose KA is close to its CL/V: the same EBEs, OFVs and gradients."""
    rng = np.random.default_rng(12)
    rows = []
    for i in range(1, 23):
        wt = float(rng.uniform(40, 120))
        ka = 0.12 if i == 5 else 1.2 * math.exp(rng.normal(0, 0.4))
        cl, v = 3 * (wt / 70) ** 0.75 * math.exp(rng.normal(0, 0.3)), 30 * math.exp(rng.normal(0, 0.2))
        rows.append(dict(ID=i, TIME=0.0, AMT=500.0, DV=".", EVID=1, MDV=1, WT=wt))
        for t in np.sort(rng.uniform(0.3, 48, 0 if i % 11 == 0 else int(rng.integers(1, 4)))):
            k = cl / v
            c = 500 * ka / (v * (ka - k)) * (math.exp(-k * t) - math.exp(-ka * t))
            rows.append(dict(ID=i, TIME=round(float(t), 2), AMT=0.0, DV=round(c * math.exp(rng.normal(0, 0.15)), 4),
                             EVID=0, MDV=0, WT=wt))
    pd.DataFrame(rows)[["WT", "DV", "ID", "EVID", "AMT", "MDV", "TIME"]].to_csv(tmp_path / "sparse.csv", index=False)
    ds = hp.read_nonmem(tmp_path / "sparse.csv")
    pm = build_model("1cmt_oral", error="combined", covariates=["CL~WT"], data=ds)
    monkeypatch.setattr(analytic_focei, "analytic_problem", lambda *a: (None, "the reference"))
    prob, pack = Problem(pm, ds), Packing(pm)
    engine, eta = _assert_both_paths_agree(pm, prob, pack, pack.x0())
    none = [i for i, n in enumerate(engine.mask.sum(1)) if n == 0]
    assert len(none) == 2 and np.abs(eta.numpy()[none]).max() == 0.0


def _fits_by_both_paths(pm, ds, monkeypatch):
    """(the fit by the analytic path, the fit with the general path forced), both converged to the same OFV
    (1e-5)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = fit_population(pm, ds, progress=False)
        monkeypatch.setattr(analytic_focei, "analytic_problem", lambda *a: (None, "forced by the test"))
        general = fit_population(pm, ds, progress=False)
    assert fast.estimation.derivatives == fit_module.ANALYTIC
    assert general.estimation.derivatives == "automatic (torch): forced by the test"
    assert fast.estimation.converged and general.estimation.converged
    assert abs(fast.estimation.ofv - general.estimation.ofv) < 1e-5
    return fast, general


def test_fit_equals_the_general_paths_fit(tmp_path, monkeypatch):
    """The whole fit (combined error, one OMEGA block, a power and a categorical covariate effect): the estimates,
    their standard errors and the OFV of the analytic path equal those of the same fit with the general path
    forced; summary.json says which it was. (40 subjects: with 24 the ADD SD runs to 0 and the S matrix is
    singular, which both paths report alike.)"""
    ds = _multiple_doses(tmp_path, seed=7, n=40)
    pm = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="combined", omega_block=[["CL", "V"]],
                     covariates=["CL~WT", "CL~SEX:categorical:1"], data=ds)
    fast, general = _fits_by_both_paths(pm, ds, monkeypatch)
    for a, b in zip(fast.theta, general.theta):
        assert a.se is not None and b.se is not None
        assert a.value == pytest.approx(b.value, rel=1e-4) and a.se == pytest.approx(b.se, rel=1e-3)
    np.testing.assert_allclose(fast.omega.tensor().numpy(), general.omega.tensor().numpy(), rtol=1e-3, atol=1e-7)
    for a, b in zip(fast.sigma, general.sigma):
        assert a.sd == pytest.approx(b.sd, rel=1e-4)
    fast.save(tmp_path / "run")
    assert hp.load_run(tmp_path / "run").estimation.derivatives == fit_module.ANALYTIC


def _two_compartment_iv(tmp_path, n: int = 30, seed: int = 3):
    """2-cmt IV (CL ~ (WT/70)^0.75, V, Q, V2 log-normal), 300 mg at 0 and 12 h as a bolus or a 1-h infusion by
    subject, 8 levels in 0.1-36 h, 10% proportional noise; the amounts by the matrix exponential of the ODE
    system (scipy), independently of hybridpk's closed forms."""
    from scipy.linalg import expm

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        wt = round(float(rng.uniform(45, 110)), 1)
        cl, v = 4.0 * (wt / 70) ** 0.75 * math.exp(rng.normal(0, 0.3)), 20 * math.exp(rng.normal(0, 0.2))
        q, v2 = 6.0 * math.exp(rng.normal(0, 0.3)), 40 * math.exp(rng.normal(0, 0.2))
        a = np.array([[-(cl + q) / v, q / v2], [q / v, -q / v2]])        # d(central, peripheral)/dt = a @ amounts
        dur = (0.0, 1.0)[i % 2]
        rows += [dict(ID=i, TIME=td, AMT=300.0, RATE=300.0 / dur if dur else 0.0, DV=0.0, EVID=1, MDV=1, WT=wt)
                 for td in (0.0, 12.0)]
        for t in np.unique(np.round(rng.uniform(0.1, 36.0, 8), 2)):
            amount = np.zeros(2)
            for td in (0.0, 12.0):
                if t <= td:
                    continue
                if dur == 0:
                    amount += expm(a * (t - td)) @ np.array([300.0, 0.0])
                else:       # the (part of the) infusion given by t, then decay
                    end = min(t - td, dur)
                    given = np.linalg.solve(a, (expm(a * end) - np.eye(2)) @ np.array([300.0 / dur, 0.0]))
                    amount += expm(a * (t - td - end)) @ given
            rows.append(dict(ID=i, TIME=float(t), AMT=0.0, RATE=0.0,
                             DV=round(amount[0] / v * math.exp(0.1 * rng.normal()), 5), EVID=0, MDV=0, WT=wt))
    df = pd.DataFrame(rows).sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")
    df.to_csv(tmp_path / "two.csv", index=False)
    return hp.read_nonmem(tmp_path / "two.csv")


def test_two_compartment_fit_equals_the_general_paths_fit(tmp_path, monkeypatch):
    """ADVAN3 with boluses and infusions, four ETAs and a covariate effect: the analytic path's (jets) estimates,
    standard errors and OFV equal the general path's, and recover the simulation's typical values."""
    ds = _two_compartment_iv(tmp_path)
    pm = build_model("2cmt_iv", iiv=["CL", "V", "Q", "V2"], error="combined", covariates=["CL~WT"], data=ds)
    fast, general = _fits_by_both_paths(pm, ds, monkeypatch)
    for a, b in zip(fast.theta, general.theta):
        assert a.value == pytest.approx(b.value, rel=1e-5) and a.se == pytest.approx(b.se, rel=1e-4)
    truth = dict(CL=4.0, V=20.0, Q=6.0, V2=40.0)
    for name, value in truth.items():
        assert fast.theta[name].value == pytest.approx(value, rel=0.25), name


def test_theophylline_fit_takes_the_analytic_path(theoph_path):
    """The bundled theophylline data with the model of test_population_fit's nlmixr2 comparison takes the
    analytic path, so that comparison (OFV and estimates against nlmixr2's published fit) checks it."""
    ds = hp.read_nonmem(theoph_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(build_model("1cmt_oral", error="additive"), ds, progress=False)
    assert fit.estimation.derivatives == fit_module.ANALYTIC


@pytest.mark.parametrize("change, reason", [
    (dict(method="ode"), "ODE solver"),
    (dict(estimation="FOCE"), "estimation method FOCE"),
    (dict(model="1cmt_oral_mm"), "structural model 1cmt_oral_mm"),
    (dict(error="combined1"), "error model combined1"),
])
def test_what_it_does_not_cover_takes_the_general_path(theoph_path, change, reason):
    ds = hp.read_nonmem(theoph_path)
    opts = dict(model="1cmt_oral", error="additive")
    estimation, method = change.pop("estimation", "FOCE-I"), change.pop("method", "auto")
    opts.update(change)
    pm = build_model(opts.pop("model"), data=ds, **opts)
    prob, pack = Problem(pm, ds, estimation=estimation, method=method), Packing(pm)
    engine, why = analytic_problem(pm, prob, pack.unpack(torch.tensor(pack.x0(), dtype=torch.float64))[0])
    assert engine is None and reason in why


def test_infusions_take_the_general_path(tmp_path):
    df = pd.DataFrame(dict(ID=[1, 1, 1, 2, 2, 2], TIME=[0, 1, 4, 0, 2, 6], AMT=[100, 0, 0, 100, 0, 0],
                           RATE=[50, 0, 0, 50, 0, 0], DV=[0, 1.5, 1.2, 0, 2.0, 1.0], EVID=[1, 0, 0, 1, 0, 0],
                           MDV=[1, 0, 0, 1, 0, 0]))
    df.to_csv(tmp_path / "inf.csv", index=False)
    ds = hp.read_nonmem(tmp_path / "inf.csv")
    pm = build_model("1cmt_oral", error="additive")
    assert "infusions" in analytic_reason(pm, Problem(pm, ds))


def test_predictions_that_disagree_send_the_fit_to_the_general_path(tmp_path, monkeypatch):
    """The guard before the analytic path is used: predictions off by 1e-6 relative are refused."""
    ds = _multiple_doses(tmp_path)
    pm = build_model("1cmt_oral", error="combined")
    prob, pack = Problem(pm, ds), Packing(pm)
    theta, _, _ = pack.unpack(torch.tensor(pack.x0(), dtype=torch.float64))
    assert analytic_problem(pm, prob, theta)[0] is not None
    original = AnalyticFOCEI.predict
    monkeypatch.setattr(AnalyticFOCEI, "predict", lambda self, phi: original(self, phi) * (1 + 1e-6))
    engine, why = analytic_problem(pm, prob, theta)
    assert engine is None and "differ" in why


def test_ka_equal_to_k_is_left_to_the_general_path(tmp_path):
    """Where a subject's KA equals its CL/V the closed form is 0/0 (the general path takes the limit): the
    analytic evaluation declines and the fit's evaluation goes to the general path."""
    ds = _multiple_doses(tmp_path)
    pm = build_model("1cmt_oral", error="additive", initial={"KA": 0.1, "CL": 3.0, "V": 30.0})
    prob, pack = Problem(pm, ds), Packing(pm)
    theta, _, _ = pack.unpack(torch.tensor(pack.x0(), dtype=torch.float64))
    engine, _ = analytic_problem(pm, prob, {**theta, "KA": theta["KA"] * 1.01})
    assert engine is not None
    assert _analytic_at(engine, pack, pack.x0(), torch.zeros(ds.n_subjects, pm.n_eta, dtype=torch.float64)) is None


def test_map_estimates_equal_the_general_paths(tmp_path, monkeypatch):
    """The EBE searches and Laplace covariances of map_estimate (used by predict, map and dose) go through the
    analytic path too: the same modes, objectives, covariances and Newton decrements. (At a fit whose OMEGA is
    near singular, e.g. a full block on 14 subjects, the prior term eta' OMEGA^-1 eta alone differs by 1e-8
    between two summation orders, and the modes by as much: a well-conditioned fit is the test.)"""
    from hybridpk.population.estimates import map_estimate

    ds = _multiple_doses(tmp_path, seed=7, n=24)
    pm = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="combined", omega_block=[["CL", "V"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pm, ds, progress=False, covariance=False)
    fast = map_estimate(fit, ds)
    assert fast.problem.analytic(fit.theta.tensors()) is not None
    monkeypatch.setattr(analytic_focei, "analytic_problem", lambda *a: (None, "the reference"))
    general = map_estimate(fit, ds)
    assert general.problem.analytic(fit.theta.tensors()) is None
    np.testing.assert_allclose(fast.eta.numpy(), general.eta.numpy(), atol=1e-8)
    np.testing.assert_allclose(fast.objective.numpy(), general.objective.numpy(), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(fast.cov.numpy(), general.cov.numpy(), rtol=1e-6, atol=1e-10)
    assert (fast.decrement < 1e-12).all()


def test_derived_parameters_equal_the_general_paths(tmp_path, monkeypatch):
    """A parameter computed from others (``CL = K * V``, IIV on K and V: log CL takes both ETAs) is log-affine in
    the ETAs, so the analytic path takes it: the same EBEs, OFVs and gradients as the general path at two random
    points."""
    monkeypatch.setattr(analytic_focei, "analytic_problem", lambda *a: (None, "the reference"))
    ds = _multiple_doses(tmp_path)
    pm = build_model("1cmt_oral", derived={"CL": "K * V"}, initial={"K": 0.1}, error="combined", data=ds)
    prob, pack = Problem(pm, ds), Packing(pm)
    rng = np.random.default_rng(3)
    for _ in range(2):
        engine, _ = _assert_both_paths_agree(pm, prob, pack, pack.x0() + rng.normal(0.0, 0.25, len(pack.x0())),
                                             per_subject=True)
    cl = engine.params.index("CL")
    assert sorted(engine.place[cl]) == [0.0, 1.0, 1.0]        # log CL = log K + log V: both ETAs


#: a control stream written the way NONMEM users write them: a power covariate effect and an IF block on the
#: subject's weight, MU referencing, a full OMEGA block, combined error in $ERROR (theophylline data, WT per subject)
THEO_MU = """$PROBLEM theophylline, MU referencing
$INPUT ID TIME DV AMT EVID MDV CMT WT
$DATA theoph.csv IGNORE=@
$SUBROUTINE ADVAN2 TRANS2
$PK
TVCL = THETA(2)*(WT/70)**THETA(4)
IF (WT.GT.75) THEN
  TVCL = TVCL*THETA(5)
ENDIF
MU_1 = LOG(THETA(1))
MU_2 = LOG(TVCL)
MU_3 = LOG(THETA(3))
KA = EXP(MU_1 + ETA(1))
CL = EXP(MU_2 + ETA(2))
V = EXP(MU_3 + ETA(3))
S2 = V
$ERROR
IPRED = F
Y = IPRED + IPRED*EPS(1) + EPS(2)
$THETA (0, 1.5) ; POP_KA
$THETA (0, 2.8) ; POP_CL
$THETA (0, 32) ; POP_V
$THETA 0.75 ; CL_WT
$THETA (0, 1, 3) ; CL_HEAVY
$OMEGA BLOCK(2) 0.4 0.01 0.07
$OMEGA 0.02
$SIGMA 0.01
$SIGMA 0.1
$ESTIMATION METHOD=1 INTERACTION
"""
#: ADVAN2 TRANS1 (K from CL and V in $PK: log K takes two ETAs) and an ETA on V scaled by a constant
THEO_K = THEO_MU.replace("ADVAN2 TRANS2", "ADVAN2 TRANS1").replace(
    "V = EXP(MU_3 + ETA(3))", "V = EXP(MU_3 + 0.5*ETA(3))\nK = CL/V")


def _control_stream(folder, theoph_path, text):
    import shutil

    from hybridpk.population.nonmem import read_control_stream

    shutil.copy(theoph_path, folder / "theoph.csv")
    (folder / "run.mod").write_text(text)
    return read_control_stream(folder / "run.mod")


@pytest.mark.parametrize("text", [THEO_MU, THEO_K, "pheno"], ids=["MU", "TRANS1", "pheno"])
def test_imported_control_streams_equal_the_general_paths(tmp_path, theoph_path, pharmpy_examples, monkeypatch,
                                                          text):
    """An imported model whose $PK gives log-affine ETAs takes the analytic path (pharmpy's pheno.mod: ADVAN1 with
    an IF block on APGR and proportional error; the MU-referenced and TRANS1 streams above): the same EBEs, OFVs
    and gradients as the general path at two random points."""
    from hybridpk.population.nonmem import read_control_stream

    if text == "pheno":
        pm, ds = read_control_stream(pharmpy_examples / "pheno.mod")
    else:
        pm, ds = _control_stream(tmp_path, theoph_path, text)
    monkeypatch.setattr(analytic_focei, "analytic_problem", lambda *a: (None, "the reference"))
    prob, pack = Problem(pm, ds), Packing(pm)
    assert analytic_reason(pm, prob) is None
    rng = np.random.default_rng(5)
    scale = np.full(len(pack.x0()), 0.2)
    scale[[i for i, t in enumerate(pack.free) if t.name in ("CL_WT", "COVAPGR")]] = 0.02
    for _ in range(2):
        engine, _ = _assert_both_paths_agree(pm, prob, pack, pack.x0() + rng.normal(0.0, 1.0, len(pack.x0())) * scale,
                                             per_subject=True)
    if text == THEO_K:
        k_row = np.round(engine.place, 12)
        assert k_row[engine.params.index("V")].tolist() == [0.0, 0.0, 0.5]


def test_pheno_fit_takes_the_analytic_path_with_nonmems_result(pharmpy_examples, monkeypatch):
    """pharmpy's pheno.mod fitted as the file says, by the analytic path: NONMEM's OFV (pheno.lst, 586.27605) and
    the same estimates and standard errors as the fit with the general path forced. The same estimate: within a
    relative 1e-6, or, for a THETA the data determine loosely, within 1e-5 of its SE, a step that moves the OFV by
    about 1e-10, below the 1e-6 rounding at which the general path's search stops (on an AMD EPYC the two
    searches end 4.2e-6 SE apart on COVAPGR, whose SE is 53% of it: a relative 2.2e-6, OFVs 1.4e-9 apart)."""
    from hybridpk.population.nonmem import read_control_stream

    pm, ds = read_control_stream(pharmpy_examples / "pheno.mod")
    lst = (pharmpy_examples / "pheno.lst").read_text()
    assert "586.27605" in lst
    fast, general = _fits_by_both_paths(pm, ds, monkeypatch)
    assert fast.estimation.ofv == pytest.approx(586.27605, abs=1e-3)
    for a, b in zip(fast.theta, general.theta):
        assert abs(a.value - b.value) <= max(1e-6 * abs(b.value), 1e-5 * b.se) and a.se == pytest.approx(b.se, rel=1e-5)
    np.testing.assert_allclose(fast.omega.tensor().numpy(), general.omega.tensor().numpy(), rtol=1e-5)


@pytest.mark.parametrize("old, new, reason", [
    ("V = EXP(MU_3 + ETA(3))", "V = EXP(MU_3 + ETA(3)*THETA(4))", "exponent depends on a THETA"),
    ("V = EXP(MU_3 + ETA(3))", "V = EXP(MU_3) + ETA(3)", "other than as exp(ETA)"),
    ("V = EXP(MU_3 + ETA(3))", "V = EXP(MU_3 + ETA(3)*WT/70)", "other than as exp(ETA)"),
    ("S2 = V", "S2 = V\nF1 = 0.0", "F of 0"),
    ("S2 = V", "S2 = V\nALAG1 = 0.0", "ALAG of 0"),
])
def test_imported_parameter_maps_it_does_not_cover_take_the_general_path(tmp_path, theoph_path, old, new, reason):
    """$PK that is not log-affine in the ETAs with constant coefficients, or that has a bioavailability or a lag
    time of 0 (no log), is left to the general path, which fits it as written."""
    assert old in THEO_MU
    pm, ds = _control_stream(tmp_path, theoph_path, THEO_MU.replace(old, new))
    prob, pack = Problem(pm, ds), Packing(pm)
    theta, _, _ = pack.unpack(torch.tensor(pack.x0(), dtype=torch.float64))
    engine, why = analytic_problem(pm, prob, theta)
    assert engine is None and reason in why


@pytest.mark.parametrize("model, iiv", [("1cmt_oral", ["KA", "CL", "V", "ALAG"]), ("2cmt_oral", ["CL", "V", "ALAG"]),
                                        ("1cmt_iv", ["CL", "V", "ALAG"])])
def test_a_lag_time_equals_the_general_paths(tmp_path, monkeypatch, model, iiv):
    """A lag time (ALAG estimated, log-normal IIV): which dose acts on which level moves with each subject's
    ALAG (levels at 0.5 h and lags around 0.3 h put some levels before and some after their lagged dose); oral
    doses and IV boluses and infusions: the same EBEs, OFVs and gradients as the general path at two random
    points, by the jets in (exponent, ALAG)."""
    monkeypatch.setattr(analytic_focei, "analytic_problem", lambda *a: (None, "the reference"))
    ds = _multiple_doses(tmp_path) if model.endswith("_oral") else _iv_doses(tmp_path)
    pm = build_model(model, iiv=iiv, error="combined", initial={"ALAG": 0.3}, covariates=("CL~WT",), data=ds)
    prob, pack = Problem(pm, ds), Packing(pm)
    rng = np.random.default_rng(len(iiv))
    scale = np.full(len(pack.x0()), 0.25)
    scale[[i for i, t in enumerate(pack.free) if t.name not in STRUCTURAL + ("ALAG",)]] = 0.01
    for _ in range(2):
        engine, _ = _assert_both_paths_agree(pm, prob, pack, pack.x0() + rng.normal(0.0, 1.0, len(pack.x0())) * scale,
                                             per_subject=True)
    assert engine.params[-1] == "ALAG" and engine.lag is not None and not engine.by_hand
    lagged = engine._doses(np.log(np.full((engine.n, len(engine.params)), 0.3)))
    assert lagged.lagged.any() and (lagged.tau[lagged.lagged] > 0).all()


def test_a_lag_time_fit_equals_the_general_paths_fit(theoph_path, monkeypatch):
    """Theophylline with an absorption lag (ALAG with IIV): the whole fit by the analytic path equals the fit with
    the general path forced (estimates, standard errors, OFV). (With IIV on KA as well, subject 5's posterior has
    two modes 10.7 OFV units apart, each search keeps the one its warm starts lead to, and the two fits end 9.4
    apart, the analytic one lower; at the same EBEs their OFVs agree to 1e-8: a lag makes the objective
    multi-modal, not the paths different.)"""
    ds = hp.read_nonmem(theoph_path)
    pm = build_model("1cmt_oral", iiv=["CL", "V", "ALAG"], error="additive", initial={"ALAG": 0.2}, data=ds)
    fast, general = _fits_by_both_paths(pm, ds, monkeypatch)
    for a, b in zip(fast.theta, general.theta):
        assert a.value == pytest.approx(b.value, rel=1e-4) and a.se == pytest.approx(b.se, rel=1e-3)


@pytest.mark.parametrize("model", ["1cmt_oral", "2cmt_oral", "1cmt_iv"])
def test_a_lag_time_with_steady_state_doses_equals_the_general_paths(tmp_path, monkeypatch, model):
    """A lag time with steady-state doses (SS=1 with ADDL, SS=2 added at 24 h, a reset; lags around 2-4 h, so
    that levels fall between an SS dose's record and its lagged time, where only its earlier doses act): the same
    EBEs, OFVs and gradients as the general path at two random points. Steady-state infusions with a lag are left
    to the general path. (ALAG without IIV here: with an ETA on it, subject 10's mode under 2cmt_oral lies on a
    kink, its lagged SS dose's time equal to a level's to 6e-10 h, where the general path's central-difference
    df/deta straddles the kink; the analytic and automatic derivatives agree there, from one side.)"""
    monkeypatch.setattr(analytic_focei, "analytic_problem", lambda *a: (None, "the reference"))
    ds = _steady_state_doses(tmp_path, oral=model.endswith("_oral"))
    pm = build_model(model, error="combined", iiv=["CL", "V"] if model == "1cmt_iv" else ["KA", "CL", "V"],
                     initial={"ALAG": 3.0}, data=ds)
    prob, pack = Problem(pm, ds), Packing(pm)
    theta, _, _ = pack.unpack(torch.tensor(pack.x0(), dtype=torch.float64))
    if model == "1cmt_iv":        # the data's SS 1-h infusion
        engine, why = analytic_problem(pm, prob, theta)
        assert engine is None and "steady-state infusions" in why
        return
    rng = np.random.default_rng(2)
    for _ in range(2):
        engine, _ = _assert_both_paths_agree(pm, prob, pack, pack.x0() + rng.normal(0.0, 0.25, len(pack.x0())),
                                             per_subject=True)
    doses = engine._doses(np.log(np.full((engine.n, len(engine.params)), 3.0)))
    between = doses.ss & ~doses.acts & engine.mask[..., None]
    assert between.sum() >= 2        # levels after an SS dose's record, before its lagged time


def _oral_and_iv(tmp_path, seed: int = 8, n: int = 24):
    """An absolute-bioavailability design: 1-cmt, F 0.6, each subject an oral dose (CMT 1) at 0 h and an IV dose
    into the central compartment (CMT 2) at 24 h, a bolus or a 1-h infusion (RATE) by subject; 8 levels in
    0.5-48 h, 10% proportional + 0.02 mg/L noise; the levels by the closed form written here."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        ka, cl, v = (x * math.exp(rng.normal(0, 0.25)) for x in (1.0, 3.0, 30.0))
        f, k, dur = 0.6 * math.exp(rng.normal(0, 0.1)), cl / v, (0.0, 1.0)[i % 2]
        rows.append(dict(ID=i, TIME=0.0, AMT=200.0, RATE=0.0, CMT=1, DV=0.0, EVID=1, MDV=1))
        rows.append(dict(ID=i, TIME=24.0, AMT=100.0, RATE=100.0 / dur if dur else 0.0, CMT=2, DV=0.0, EVID=1, MDV=1))
        for t in np.unique(np.round(rng.uniform(0.5, 48.0, 8), 2)):
            c = f * 200 * ka / (v * (ka - k)) * (math.exp(-k * t) - math.exp(-ka * t))
            if t > 24:
                s = t - 24
                c += (100 / v * math.exp(-k * s) if dur == 0 else
                      100 / dur / (v * k) * ((1 - math.exp(-k * min(s, dur))) * math.exp(-k * max(s - dur, 0.0))))
            rows.append(dict(ID=i, TIME=float(t), AMT=0.0, RATE=0.0, CMT=2, DV=round(c * (1 + 0.1 * rng.normal())
                                                                                       + 0.02 * rng.normal(), 5),
                             EVID=0, MDV=0))
    df = pd.DataFrame(rows).sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")
    df.to_csv(tmp_path / "f.csv", index=False)
    return hp.read_nonmem(tmp_path / "f.csv")


@pytest.mark.parametrize("iiv, lag", [(["KA", "CL", "V", "F"], False), (["CL", "V"], True)])
def test_oral_and_iv_doses_with_bioavailability_equal_the_general_paths(tmp_path, monkeypatch, iiv, lag):
    """An oral structure with IV doses into the central compartment (boluses and infusions) and F estimated (with
    IIV, or without and a lag time as well): the same EBEs, OFVs and gradients as the general path at two random
    points; F scales the depot's doses only."""
    monkeypatch.setattr(analytic_focei, "analytic_problem", lambda *a: (None, "the reference"))
    ds = _oral_and_iv(tmp_path)
    pm = build_model("1cmt_oral", iiv=iiv, error="combined", initial={"F": 0.5, **({"ALAG": 0.2} if lag else {})},
                     data=ds)
    prob, pack = Problem(pm, ds), Packing(pm)
    rng = np.random.default_rng(len(iiv))
    for _ in range(2):
        engine, _ = _assert_both_paths_agree(pm, prob, pack, pack.x0() + rng.normal(0.0, 0.2, len(pack.x0())),
                                             per_subject=True)
    assert "F" in engine.params and engine.doses.central.any() and not engine.by_hand


def test_absolute_bioavailability_fit_equals_the_general_paths_fit(tmp_path, monkeypatch):
    """The whole fit of the oral + IV design (F without IIV): the analytic path's estimates, standard errors and OFV
    equal the general path's, and F is recovered (0.6, within 15%)."""
    ds = _oral_and_iv(tmp_path, n=30)
    pm = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="combined", initial={"F": 0.5}, data=ds)
    fast, general = _fits_by_both_paths(pm, ds, monkeypatch)
    for a, b in zip(fast.theta, general.theta):
        assert a.value == pytest.approx(b.value, rel=1e-4) and a.se == pytest.approx(b.se, rel=1e-3)
    assert fast.theta["F"].value == pytest.approx(0.6, rel=0.15)


def test_bioavailability_with_infusions_takes_the_general_path(tmp_path):
    """F on IV doses given as infusions changes their duration or rate (NONMEM's rule, which the solvers
    follow): left to the general path."""
    ds = _iv_doses(tmp_path)
    pm = build_model("1cmt_iv", iiv=["CL", "V"], error="combined", initial={"F": 0.8}, data=ds)
    prob, pack = Problem(pm, ds), Packing(pm)
    engine, why = analytic_problem(pm, prob, pack.unpack(torch.tensor(pack.x0(), dtype=torch.float64))[0])
    assert engine is None and "F with infusions" in why


def test_three_compartment_fit_equals_the_general_paths_fit(tmp_path, monkeypatch):
    """ADVAN11 (rates by the trigonometric cubic) on 40 subjects simulated by scipy's matrix exponential (IIV on CL,
    V, Q, V2; Q3 and V3 without; 10 levels each, log-spaced over 0.1-168 h so that the slow phase is seen): the
    analytic path's estimates, standard errors and OFV equal the general path's (eigenvalues), and the typical
    values are recovered within 25%."""
    from scipy.linalg import expm

    rng = np.random.default_rng(3)
    rows = []
    for i in range(1, 41):
        cl, v, q, v2 = (x * math.exp(rng.normal(0, s)) for x, s in ((4.0, 0.3), (20.0, 0.2), (6.0, 0.3), (40.0, 0.2)))
        q3, v3 = 1.5, 100.0
        a = np.array([[-(cl + q + q3) / v, q / v2, q3 / v3], [q / v, -q / v2, 0.0], [q3 / v, 0.0, -q3 / v3]])
        rows.append(dict(ID=i, TIME=0.0, AMT=300.0, DV=0.0, EVID=1, MDV=1))
        for t in np.unique(np.round(np.exp(rng.uniform(math.log(0.1), math.log(168.0), 10)), 2)):
            central = (expm(a * t) @ np.array([300.0, 0.0, 0.0]))[0]
            rows.append(dict(ID=i, TIME=float(t), AMT=0.0, DV=round(central / v * math.exp(0.1 * rng.normal()), 5),
                             EVID=0, MDV=0))
    pd.DataFrame(rows).to_csv(tmp_path / "three.csv", index=False)
    ds = hp.read_nonmem(tmp_path / "three.csv")
    pm = build_model("3cmt_iv", iiv=["CL", "V", "Q", "V2"], error="proportional", data=ds)
    fast, general = _fits_by_both_paths(pm, ds, monkeypatch)
    for a, b in zip(fast.theta, general.theta):
        assert a.se is not None and b.se is not None
        assert a.value == pytest.approx(b.value, rel=1e-4) and a.se == pytest.approx(b.se, rel=1e-3)
    for name, value in dict(CL=4.0, V=20.0, Q=6.0, V2=40.0, Q3=1.5, V3=100.0).items():
        assert fast.theta[name].value == pytest.approx(value, rel=0.25), name
