"""Every model against an independent scipy reference (LSODA, rtol 1e-10) on multiple-dose regimens with
infusions, lag and ADDL; closed form against ODE; steady state against explicitly repeated dosing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.models import get_model
from hybridpk.solve import simulate
from tests.reference.scipy_models import solve_reference

PARAMS = {
    "1cmt_iv": dict(CL=4.0, V=30.0, ALAG=0.0, F=1.0),
    "1cmt_oral": dict(CL=3.0, V=35.0, KA=1.3, ALAG=0.4, F=0.7),
    "2cmt_iv": dict(CL=5.0, V=20.0, Q=8.0, V2=60.0),
    "2cmt_oral": dict(CL=5.0, V=20.0, Q=8.0, V2=60.0, KA=0.9, ALAG=0.3, F=0.8),
    "3cmt_iv": dict(CL=5.0, V=15.0, Q=10.0, V2=40.0, Q3=2.0, V3=120.0),
    "3cmt_oral": dict(CL=5.0, V=15.0, Q=10.0, V2=40.0, Q3=2.0, V3=120.0, KA=2.0, ALAG=0.25, F=0.9),
    "1cmt_iv_mm": dict(V=40.0, VMAX=60.0, KM=3.0),
    "1cmt_oral_mm": dict(V=40.0, VMAX=40.0, KM=2.0, KA=1.1, ALAG=0.5, F=0.9),
    "1cmt_oral_transit": dict(CL=4.0, V=40.0, KA=1.2, MTT=2.0, NN=3.5, F=0.8),
    "tmdd_full": dict(CL=0.2, V=3.0, Q=0.5, V2=2.5, KON=0.8, KOFF=0.1, KINT=0.06, KSYN=0.04, KDEG=0.1),
    "tmdd_qss": dict(CL=0.2, V=3.0, Q=0.5, V2=2.5, KSS=0.2, KINT=0.06, KSYN=0.04, KDEG=0.1),
    "1cmt_oral_ehc": dict(CL=4.0, V=40.0, KA=1.5, KGB=0.3, KEMPT=2.5, TMEAL=3.0, MEALII=6.0, TEMPT=0.75,
                          ALAG=0.2, F=0.9),
}
OBS = [0.0, 0.5, 1.0, 1.7, 3.0, 4.0, 6.5, 12.0, 13.1, 18.0, 24.0, 25.0, 30.0, 36.5, 47.9]


def regimens(model):
    """Three subjects: default-route doses with ADDL; an infusion by RATE into the central compartment
    plus default-route doses; an infusion given by duration (RATE=-2, DUR) plus a bolus into the central."""
    central = model.obs_cmt
    dose = 1 if model.dose_cmt == 1 else model.dose_cmt
    amt = 10.0 if model.name.startswith("tmdd") else 200.0
    return {
        1: [dict(TIME=0.0, AMT=amt, CMT=dose, ADDL=3, II=12.0), dict(TIME=18.0, AMT=amt / 2, CMT=dose)],
        2: [dict(TIME=0.0, AMT=amt, CMT=central, RATE=amt / 1.5), dict(TIME=12.0, AMT=amt, CMT=dose, ADDL=2,
                                                                          II=8.0)],
        3: [dict(TIME=1.0, AMT=amt, CMT=central, RATE=-2, DUR=2.5, ADDL=1, II=24.0),
            dict(TIME=13.1, AMT=amt / 4, CMT=central)],
    }


def dataset(model, regs, obs=OBS):
    rows = []
    for sid, doses in regs.items():
        recs = [dict(ID=sid, TIME=d["TIME"], DV=0.0, EVID=1, MDV=1, AMT=d["AMT"], CMT=d["CMT"],
                     RATE=d.get("RATE", 0.0), DUR=d.get("DUR", 0.0), ADDL=d.get("ADDL", 0), II=d.get("II", 0.0),
                     SS=d.get("SS", 0), _o=0) for d in doses]
        recs += [dict(ID=sid, TIME=t, DV=1.0, EVID=0, MDV=0, AMT=0.0, CMT=model.obs_cmt, RATE=0.0, DUR=0.0,
                      ADDL=0, II=0.0, SS=0, _o=1) for t in obs]
        recs.sort(key=lambda r: (r["TIME"], r["_o"]))   # doses before observations at the same time
        rows += recs
    df = pd.DataFrame(rows).drop(columns="_o")
    return hp.read_nonmem(df)


def check_close(pred, ref, what):
    peak = np.max(np.abs(ref))
    keep = np.abs(ref) > 1e-6 * peak
    rel = np.abs(pred[keep] - ref[keep]) / np.abs(ref[keep])
    assert rel.max() < 1e-6, f"{what}: max relative error {rel.max():.2e}"
    return rel.max()


def reference_by_subject(name, regs, p, obs=OBS):
    return {sid: solve_reference(name, p, doses, obs) for sid, doses in regs.items()}


def obs_matrix(pred, ds):
    b = ds.to_batch()
    return pred.ipred[b.is_obs].reshape(ds.n_subjects, -1).detach().numpy()


@pytest.mark.parametrize("name", list(PARAMS))
def test_model_matches_scipy_reference(name):
    model = get_model(name)
    regs = regimens(model)
    ds = dataset(model, regs)
    ref = reference_by_subject(name, regs, PARAMS[name])
    b = ds.to_batch()
    # closed form (linear models), hybridpk's per-subject dp5, and torchdiffeq's dopri5
    paths = ([("closed_form", None)] if model.linear else []) + [("ode", "dp5"), ("ode", "dopri5")] + \
        ([("ode", "expm")] if model.piecewise_linear else [])
    results = {}
    for method, solver in paths:
        pred = simulate(model, PARAMS[name], b, method=method, solver=solver or "dp5", rtol=1e-10, atol=1e-12)
        got = obs_matrix(pred, ds)
        for i, sid in enumerate(regs):
            check_close(got[i], ref[sid], f"{name} {method} {solver} subject {sid}")
        results[(method, solver)] = got
    for key in paths[1:]:
        check_close(results[paths[0]].ravel(), results[key].ravel(), f"{name} {paths[0]} vs {key}")


@pytest.mark.parametrize("name,infusion", [("1cmt_oral", False), ("2cmt_iv", True), ("2cmt_iv", False),
                                           ("3cmt_iv", True), ("2cmt_oral", False), ("1cmt_iv_mm", False)])
def test_steady_state_equals_explicit_regimen(name, infusion):
    model = get_model(name)
    p = PARAMS[name]
    ss = dict(TIME=0.0, AMT=100.0, CMT=model.dose_cmt, SS=1, II=12.0, ADDL=2)
    if infusion:
        ss.update(RATE=50.0)
    regs = {1: [ss], 2: [dict(TIME=0.0, AMT=100.0, CMT=model.dose_cmt, SS=1, II=8.0)]}
    obs = [0.0, 0.5, 1.0, 2.5, 6.0, 11.9, 12.5, 20.0, 30.0, 40.0]
    ds = dataset(model, regs, obs)
    ref = reference_by_subject(name, regs, p, obs)
    for method in (["closed_form", "ode"] if model.linear else ["ode"]):
        got = obs_matrix(simulate(model, p, ds.to_batch(), method=method, rtol=1e-10, atol=1e-12), ds)
        for i, sid in enumerate(regs):
            check_close(got[i], ref[sid], f"{name} SS {method} subject {sid}")


def test_analytic_one_compartment_formulae():
    """Textbook closed forms (Gibaldi & Perrier): IV bolus, infusion, oral single dose."""
    cl, v, ka = 3.0, 30.0, 1.2
    k = cl / v
    t = np.array([0.25, 1.0, 2.0, 5.0, 10.0, 24.0])
    model = get_model("1cmt_iv")
    ds = dataset(model, {1: [dict(TIME=0.0, AMT=100.0, CMT=1)], 2: [dict(TIME=0.0, AMT=100.0, CMT=1, RATE=50.0)]},
                 list(t))
    got = obs_matrix(simulate(model, dict(CL=cl, V=v), ds.to_batch()), ds)
    np.testing.assert_allclose(got[0], 100 / v * np.exp(-k * t), rtol=1e-12)
    inf = np.where(t <= 2, 50 / cl * (1 - np.exp(-k * t)), 50 / cl * (1 - np.exp(-k * 2)) * np.exp(-k * (t - 2)))
    np.testing.assert_allclose(got[1], inf, rtol=1e-12)
    model = get_model("1cmt_oral")
    ds = dataset(model, {1: [dict(TIME=0.0, AMT=100.0, CMT=1)]}, list(t))
    got = obs_matrix(simulate(model, dict(CL=cl, V=v, KA=ka), ds.to_batch()), ds)
    np.testing.assert_allclose(got[0], 100 * ka / (v * (ka - k)) * (np.exp(-k * t) - np.exp(-ka * t)), rtol=1e-12)


def test_ka_equal_to_elimination_rate_is_finite():
    model = get_model("1cmt_oral")
    ds = dataset(model, {1: [dict(TIME=0.0, AMT=100.0, CMT=1)]}, [1.0, 5.0])
    cl, v = 3.0, 30.0
    ka = torch.tensor([cl / v], dtype=torch.float64, requires_grad=True)
    pred = simulate(model, dict(CL=cl, V=v, KA=ka), ds.to_batch())
    t = np.array([1.0, 5.0])
    exact = 100 / v * 0.1 * t * np.exp(-0.1 * t)        # limit KA -> k: D/V * k t e^{-kt}
    np.testing.assert_allclose(obs_matrix(pred, ds)[0], exact, rtol=1e-6)
    pred.ipred.sum().backward()
    assert torch.isfinite(ka.grad).all()


def test_mass_balance_without_elimination():
    """No elimination: the total amount in the system equals the total dose given so far, at all times."""
    for name, p in [("2cmt_oral", dict(CL=0.0, V=20.0, Q=8.0, V2=60.0, KA=0.9, F=1.0)),
                    ("1cmt_oral_ehc", dict(PARAMS["1cmt_oral_ehc"], CL=0.0, F=1.0, ALAG=0.0))]:
        model = get_model(name)
        regs = {1: [dict(TIME=0.0, AMT=100.0, CMT=1, ADDL=2, II=10.0), dict(TIME=5.0, AMT=50.0, CMT=model.obs_cmt,
                                                                           RATE=25.0)]}
        obs = [0.0, 1.0, 4.0, 6.0, 7.5, 10.0, 15.0, 22.0, 40.0]
        ds = dataset(model, regs, obs)
        b = ds.to_batch()
        pred = simulate(model, p, b, method="ode", return_amounts=True, rtol=1e-10, atol=1e-12)
        total = pred.amounts[b.is_obs].sum(-1).numpy()
        t = np.array(obs)
        given = 100 * (1 + (t >= 10) + (t >= 20)) + 25 * np.clip(t - 5, 0, 2)
        np.testing.assert_allclose(total, given, rtol=1e-9, atol=1e-9)


def test_failed_subject_is_reported_not_poisoning_batch():
    model = get_model("1cmt_oral_mm")
    regs = regimens(model)
    ds = dataset(model, regs)
    b = ds.to_batch()
    p = {k: torch.full((3,), v, dtype=torch.float64) for k, v in PARAMS["1cmt_oral_mm"].items()}
    p["VMAX"][1] = float("nan")
    with pytest.raises(hp.SolverError) as exc:
        simulate(model, p, b)
    assert 2 in exc.value.subjects and "VMAX" in exc.value.subjects[2]
    pred = simulate(model, p, b, throw=False)
    assert pred.ok.tolist() == [True, False, True]
    assert torch.isnan(pred.ipred[1][b.record_mask[1]]).all()
    good = simulate(model, PARAMS["1cmt_oral_mm"], b.select([0, 2]))
    torch.testing.assert_close(pred.ipred[[0, 2]], good.ipred)


def _ehc_levels(doses, start, solver="expm", rtol=1e-10):
    model = get_model("1cmt_oral_ehc")
    b = dataset(model, {1: doses}, [start + x for x in (0.5, 2.0, 6.0, 11.9)]).to_batch()
    return simulate(model, PARAMS["1cmt_oral_ehc"], b, rtol=rtol, atol=rtol * 1e-2, solver=solver).ipred[b.is_obs]


@pytest.mark.parametrize("t0", [0.0, 3.0, 5.0])
def test_ehc_steady_state_has_had_its_meals(t0):
    """A steady-state dose (SS=1, II 12 h) of the EHC model equals 41 doses given explicitly every 12 h, and one
    in the first hours (the meals of its past cycles before time 0) equals one 480 h later. Before, the cycles
    were integrated in their own time 0..II as one segment: the gallbladder never emptied and levels reached 5e9."""
    ss_late = _ehc_levels([dict(TIME=t0 + 480.0, AMT=100.0, CMT=1, SS=1, II=12.0)], t0 + 480.0)
    explicit = _ehc_levels([dict(TIME=t0, AMT=100.0, CMT=1, ADDL=40, II=12.0)], t0 + 480.0)
    torch.testing.assert_close(ss_late, explicit, rtol=1e-7, atol=1e-9)
    ss_early = _ehc_levels([dict(TIME=t0, AMT=100.0, CMT=1, SS=1, II=12.0)], t0)
    torch.testing.assert_close(ss_early, ss_late, rtol=1e-7, atol=1e-9)


def test_ehc_steady_state_by_dormand_prince_equals_the_exact_path():
    ss = [dict(TIME=3.0, AMT=100.0, CMT=1, SS=1, II=12.0)]
    torch.testing.assert_close(_ehc_levels(ss, 3.0, solver="dp5", rtol=1e-8), _ehc_levels(ss, 3.0), rtol=1e-6,
                               atol=1e-8)


def test_a_steady_state_dose_through_a_transit_chain_is_refused():
    """Its steady state was computed as a bolus into the dose compartment, without the chain: 0.90 against 1.10
    mg/L half an hour after the dose (61 doses given explicitly), and another value again at time 0."""
    model = get_model("1cmt_oral_transit")
    b = dataset(model, {1: [dict(TIME=0.0, AMT=100.0, CMT=model.dose_cmt, SS=1, II=12.0)]}, [1.0]).to_batch()
    with pytest.raises(hp.ModelError, match="steady-state dose .* through its transit chain .*ADDL"):
        simulate(model, PARAMS["1cmt_oral_transit"], b)


def test_a_meal_interval_below_its_bound_is_solved_at_the_bound():
    """An estimation's trial point with MEALII -> 0 (the meal times are estimated) stopped a fit with
    'OverflowError: cannot convert float infinity to integer' (unboundedly many meals): MEALII below its lower
    bound acts as the bound, in the switch times and in the emptying alike."""
    model = get_model("1cmt_oral_ehc")
    b = dataset(model, regimens(model)).to_batch()
    p = {k: torch.full((3,), v, dtype=torch.float64) for k, v in PARAMS["1cmt_oral_ehc"].items()}
    at_bound = dict(p, MEALII=torch.full((3,), 0.5, dtype=torch.float64))
    p["MEALII"][1] = 1e-300
    got = simulate(model, p, b, rtol=1e-10, atol=1e-12).ipred
    want = simulate(model, at_bound, b, rtol=1e-10, atol=1e-12).ipred
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("name", [m for m in PARAMS if get_model(m).piecewise_linear])
def test_system_matrix_agrees_with_rhs(name):
    """The matrix the exact (expm) solver steps with is the right-hand side the ODE solvers integrate,
    inside and outside the switched phases (e.g. gallbladder emptying)."""
    from hybridpk.solve.ode import SolverContext

    model = get_model(name)
    gen = torch.Generator().manual_seed(0)
    n = 64
    p = {k: torch.full((n,), float(v), dtype=torch.float64) for k, v in PARAMS[name].items()}
    t = torch.linspace(0.0, 48.0, n, dtype=torch.float64)
    a = torch.rand(n, model.n_states, generator=gen, dtype=torch.float64) * 100
    rate = torch.rand(n, model.n_states, generator=gen, dtype=torch.float64)
    want = model.rhs(t, a, p, rate, SolverContext(segment_mid=t))
    got = (model.system_matrix(p, t) @ a.unsqueeze(-1)).squeeze(-1) + rate
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("name", ["1cmt_oral", "2cmt_oral", "2cmt_iv", "3cmt_iv"])
def test_input_response_equals_infusions(name):
    """The hybrid's input form: the response to a piecewise-constant rate into the dose compartment is
    the same as the model's prediction after the equivalent zero-order infusion records."""
    from hybridpk.solve.closed_form import input_response

    model = get_model(name)
    width = 0.5
    rates = np.random.default_rng(3).uniform(0.0, 20.0, 12)
    starts = width * np.arange(len(rates))
    obs = [0.25, 0.7, 1.0, 2.2, 3.9, 5.0, 6.1, 8.0, 12.0, 24.0]
    rows = [dict(ID=1, TIME=float(s), DV=0.0, AMT=float(r * width), RATE=float(r), EVID=1, MDV=1, CMT=model.dose_cmt)
            for s, r in zip(starts, rates)]
    rows += [dict(ID=1, TIME=t, DV=0.0, AMT=0.0, RATE=0.0, EVID=0, MDV=0, CMT=model.obs_cmt) for t in obs]
    ds = hp.read_nonmem(pd.DataFrame(rows).sort_values("TIME", kind="stable"))
    b = ds.to_batch()
    p = {k: torch.tensor([float(v)], dtype=torch.float64) for k, v in PARAMS[name].items() if k not in ("F", "ALAG")}
    want = simulate(model, p, b, method="ode", rtol=1e-11, atol=1e-13).ipred[b.is_obs]
    pp = {**p, "F": torch.ones(1, dtype=torch.float64), "ALAG": torch.zeros(1, dtype=torch.float64)}
    resp = input_response(model, pp, b.time, torch.tensor(starts[None], dtype=torch.float64), width)
    got = (resp * torch.tensor(rates[None], dtype=torch.float64).unsqueeze(1)).sum(-1)[b.is_obs]
    check_close(got.numpy(), want.numpy(), f"{name} input response")


@pytest.mark.parametrize("start", [0.0, 24.0])
def test_a_transit_chain_with_nn_near_zero_is_one_more_first_order_step(start):
    """NN -> 0 (where the EHC data drive a transit fit): the chain input KTR^(NN+1) s^NN e^(-KTR s) / Gamma(NN+1)
    becomes KTR e^(-KTR s), a first-order transfer before KA. Its s^NN rises with an infinite slope at each dose,
    which the solver once refused as 'step size underflow' for a dose after time 0; now two doses 12 h apart
    match scipy's solution of the three-compartment chain (rtol 1e-11) to 1e-6."""
    import pandas as pd
    import torch
    from scipy.integrate import solve_ivp

    import hybridpk as hp
    from hybridpk.models import get_model
    from hybridpk.solve import simulate

    cl, v, ka, mtt, dose = 2.8, 50.0, 2.4, 0.0556, 500.0
    ktr = 1.0 / mtt
    times = start + np.array([0.1, 0.5, 1.0, 3.0, 12.0, 12.2, 13.0, 20.0])
    rows = [dict(ID=1, TIME=start + s, AMT=dose, DV=0.0, EVID=1, MDV=1, CMT=1) for s in (0.0, 12.0)]
    rows += [dict(ID=1, TIME=t, AMT=0.0, DV=1.0, EVID=0, MDV=0, CMT=2) for t in times]
    ds = hp.read_nonmem(pd.DataFrame(rows).sort_values("TIME", kind="stable"))
    p = {k: torch.tensor([x], dtype=torch.float64) for k, x in
         dict(CL=cl, V=v, KA=ka, MTT=mtt, NN=4e-7, F=1.0).items()}
    ours = simulate(get_model("1cmt_oral_transit"), p, ds.to_batch()).ipred[0]
    ours = ours[ds.to_batch().is_obs[0]].numpy()

    def rhs(t, y):
        return [-ktr * y[0], ktr * y[0] - ka * y[1], ka * y[1] - cl / v * y[2]]

    y, t0, ref = [dose, 0.0, 0.0], start, []
    for seg_end in (start + 12.0, start + 24.0):
        sol = solve_ivp(rhs, (t0, seg_end), y, rtol=1e-11, atol=1e-12, dense_output=True)
        ref += [sol.sol(t)[2] / v for t in times if t0 <= t < seg_end]
        y = sol.y[:, -1] + np.array([dose, 0.0, 0.0])
        t0 = seg_end
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


@pytest.mark.parametrize("name", list(PARAMS))
def test_records_with_no_dose_acting_on_them_are_zero(name):
    """A patient with no dose yet (a-priori dosing: covariate records only), and records that all come before
    the first dose: every structure predicts 0 (the closed forms used to fail with no dose acting on a record)."""
    model = get_model(name)
    obs = [dict(ID=1, TIME=t, DV=0.0, EVID=0, MDV=0, AMT=0.0, CMT=model.obs_cmt) for t in (0.0, 2.0, 5.0)]
    none = pd.DataFrame(obs)
    later = pd.concat([none, pd.DataFrame([dict(ID=1, TIME=6.0, DV=0.0, EVID=1, MDV=1, AMT=100.0,
                                                CMT=model.dose_cmt)])], ignore_index=True)
    for df in (none, later):
        pred = simulate(name, PARAMS[name], hp.read_nonmem(df).to_batch()).ipred
        assert torch.equal(pred[:, :3], torch.zeros_like(pred[:, :3]))
