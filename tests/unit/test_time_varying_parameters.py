"""Parameters that change between records (NONMEM: the values computed at a record hold over the interval that
record ends), checked against scipy's solve_ivp integrating the same rule interval by interval, and against the
closed form when the per-record values are all equal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.integrate import solve_ivp

import hybridpk as hp
from hybridpk.solve import simulate


def _records():
    """Two subjects: oral doses (one at steady state), records whose CL changes every few hours."""
    rows = []
    for sid, ss in ((1, 0), (2, 1)):
        rows.append(dict(ID=sid, TIME=0.0, AMT=100.0, EVID=1, MDV=1, DV=0.0, SS=ss, II=12.0 if ss else 0.0,
                         CLX=4.0 if sid == 1 else 2.5))
        for t, clx in ((0.5, 4.0), (1.0, 5.0), (2.0, 5.0), (4.0, 2.0), (6.0, 2.0), (8.0, 7.0)):
            rows.append(dict(ID=sid, TIME=t, AMT=0.0, EVID=0, MDV=0, DV=1.0, SS=0, II=0.0,
                             CLX=clx * (1.0 if sid == 1 else 0.7)))
        rows.append(dict(ID=sid, TIME=12.0, AMT=50.0, EVID=1, MDV=1, DV=0.0, SS=0, II=0.0, CLX=3.0))
        for t, clx in ((13.0, 3.0), (16.0, 6.0), (24.0, 1.0)):
            rows.append(dict(ID=sid, TIME=t, AMT=0.0, EVID=0, MDV=0, DV=1.0, SS=0, II=0.0, CLX=clx))
    return pd.DataFrame(rows)


def _scipy_oral(df, ka, v):
    """Concentrations by solve_ivp (rtol 1e-11) with NONMEM's rule: the interval (t_prev, t_k] with record k's
    CL; a steady-state dose's history with its own record's CL (found by integrating 60 dosing intervals)."""
    out = []
    for _, d in df.groupby("ID", sort=False):
        d = d.reset_index(drop=True)
        a = np.zeros(2)

        def rhs(_t, y, cl):
            return [-ka * y[0], ka * y[0] - cl / v * y[1]]

        def advance(y, t0, t1, cl):
            if t1 <= t0:
                return y
            return solve_ivp(rhs, (t0, t1), y, args=(cl,), rtol=1e-11, atol=1e-13, method="LSODA").y[:, -1]

        t_prev = 0.0
        for _, r in d.iterrows():
            a = advance(a, t_prev, r.TIME, r.CLX)
            t_prev = r.TIME
            if r.EVID == 1:
                if r.SS == 1:
                    y = np.zeros(2)
                    for _ in range(60):
                        y = advance(y + np.array([r.AMT, 0.0]), 0.0, r.II, r.CLX)
                    a = y
                a = a + np.array([r.AMT, 0.0])
            out.append(a[1] / v)
    return np.array(out)


def test_per_record_parameters_follow_nonmem_interval_rule_like_scipy():
    df = _records()
    ds = hp.read_nonmem(df, covariates=["CLX"])
    batch = ds.to_batch(covariates=["CLX"])
    cl = batch.cov[..., 0]                                      # (N, R): CL at every record
    p = {"CL": cl, "V": torch.tensor([30.0, 30.0], dtype=torch.float64),
         "KA": torch.tensor([1.3, 1.3], dtype=torch.float64)}
    pred = simulate("1cmt_oral", p, batch)
    got = batch.to_rows(pred.ipred)
    want = _scipy_oral(df, 1.3, 30.0)
    obs = (df.EVID == 0).to_numpy()
    np.testing.assert_allclose(got[obs], want[obs], rtol=1e-7, atol=1e-10)
    # the same through the general ODE solver (dp5), and gradients reach every record's CL
    cl_req = cl.clone().requires_grad_(True)
    dp5 = simulate("1cmt_oral", {**p, "CL": cl_req}, batch, method="ode", solver="dp5")
    np.testing.assert_allclose(batch.to_rows(dp5.ipred.detach())[obs], want[obs], rtol=1e-6, atol=1e-9)
    (g,) = torch.autograd.grad(dp5.ipred.sum(), cl_req)
    assert bool((g[batch.is_obs] != 0).any()) and torch.isfinite(g).all()


@pytest.mark.parametrize("model, params", [
    ("1cmt_oral", {"CL": 3.0, "V": 30.0, "KA": 1.1}),
    ("2cmt_iv", {"CL": 3.0, "V": 30.0, "Q": 5.0, "V2": 60.0}),
    ("3cmt_oral", {"CL": 3.0, "V": 30.0, "Q": 5.0, "V2": 60.0, "Q3": 1.0, "V3": 100.0, "KA": 0.9}),
])
def test_per_record_values_that_do_not_change_give_the_closed_form(model, params):
    df = _records().drop(columns=["CLX"])
    batch = hp.read_nonmem(df).to_batch()
    n, r = batch.time.shape
    closed = simulate(model, params, batch).ipred
    per_record = {k: torch.full((n, r), v, dtype=torch.float64) for k, v in params.items()}
    expm = simulate(model, per_record, batch, method="ode")
    torch.testing.assert_close(expm.ipred, closed, rtol=1e-9, atol=1e-12)
    auto = simulate(model, per_record, batch)                 # constant: the closed form, per record
    assert auto.method == "closed_form"
    torch.testing.assert_close(auto.ipred, closed, rtol=1e-12, atol=1e-14)


def test_occasions_that_start_with_a_reset_keep_the_closed_form():
    """Parameters that change only at resets (EVID 4 with SS=1 starting each occasion, as in pharmpy's moxo
    example): the closed form per record equals the exact integration."""
    rows = []
    for sid in (1, 2):
        for occ, t0 in ((1, 0.0), (2, 40.0)):
            rows.append(dict(ID=sid, TIME=t0, AMT=100.0 * occ, EVID=1 if occ == 1 else 4, MDV=1, DV=0.0,
                             SS=0 if occ == 1 else 1, II=0.0 if occ == 1 else 12.0, OCC=occ))
            rows += [dict(ID=sid, TIME=t0 + t, AMT=0.0, EVID=0, MDV=0, DV=1.0, SS=0, II=0.0, OCC=occ)
                     for t in (0.5, 1.0, 3.0, 8.0)]
    ds = hp.read_nonmem(pd.DataFrame(rows), covariates=["OCC"])
    batch = ds.to_batch(covariates=["OCC"])
    occ2 = batch.cov[..., 0] == 2
    p = {"CL": torch.where(occ2, 5.0, 3.0).double() * torch.tensor([[1.0], [1.4]], dtype=torch.float64),
         "V": torch.tensor([30.0, 25.0], dtype=torch.float64),
         "KA": torch.where(occ2, 0.7, 2.0).double(), "ALAG": torch.where(occ2, 0.3, 0.1).double()}
    closed = simulate("1cmt_oral", p, batch)
    assert closed.method == "closed_form"
    exact = simulate("1cmt_oral", p, batch, method="ode")
    torch.testing.assert_close(closed.ipred, exact.ipred, rtol=1e-8, atol=1e-11)
    # a change without a reset is not closed-form: the ODE path is taken (and forcing the closed form refuses)
    p_shift = {**p, "CL": torch.where(batch.time > 2.0, 4.0, 3.0).double()}
    assert simulate("1cmt_oral", p_shift, batch).method == "ode"
    with pytest.raises(hp.errors.ModelError, match="without a reset"):
        simulate("1cmt_oral", p_shift, batch, method="closed_form")




def test_the_one_compartment_step_is_the_matrix_exponential():
    """A one-state segment is solved as e^x a + rate dt (e^x - 1)/x (x = A dt) instead of a matrix exponential:
    the same values and gradients as expm of the augmented matrix, also where x is 0 or tiny."""
    from hybridpk.models import get_model
    from hybridpk.solve.ode import _matrix_exp_step

    model = get_model("1cmt_iv")
    cl = torch.tensor([3.0, 1e-9, 0.0, 2.0, 50.0], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([30.0, 30.0, 10.0, 1e-3, 5.0], dtype=torch.float64)
    a = torch.tensor([[100.0], [5.0], [1.0], [0.0], [3.0]], dtype=torch.float64)
    rate = torch.tensor([[0.0], [10.0], [2.0], [7.0], [1.0]], dtype=torch.float64)
    dt = torch.tensor([2.0, 1.0, 0.5, 1e-7, 0.1], dtype=torch.float64)
    ours = _matrix_exp_step(model, {"CL": cl, "V": v}, a, rate, dt, None)
    mat = model.system_matrix({"CL": cl, "V": v}, None) * dt.view(-1, 1, 1)
    aug = torch.zeros(5, 2, 2, dtype=torch.float64)
    aug = aug + torch.nn.functional.pad(mat, (0, 1, 0, 1))
    aug = aug + torch.nn.functional.pad((rate * dt.unsqueeze(-1)).unsqueeze(-1), (1, 0, 0, 1))
    e = torch.linalg.matrix_exp(aug)
    ref = (e[:, :1, :1] @ a.unsqueeze(-1)).squeeze(-1) + e[:, :1, 1]
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    g_ours = torch.autograd.grad(ours.sum(), cl, retain_graph=True)[0]
    g_ref = torch.autograd.grad(ref.sum(), cl)[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)
