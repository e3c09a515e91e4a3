"""ETA derivatives of ODE-solved models by a stencil solved in one call with shared step sizes (focei module
docstring), checked against automatic differentiation through the solver (the exact derivatives of the same
discrete solution, computed the slow way), and the per-subject stopping of the EBE search."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.population import build_model
from hybridpk.population.fit import Packing
from hybridpk.population.focei import Problem


def _problem(model="1cmt_oral_mm", seed=0, n=6, error="combined"):
    typical = {"1cmt_oral_mm": dict(V=30.0, VMAX=20.0, KM=2.0, KA=1.2),
               "1cmt_oral_transit": dict(CL=3.0, V=30.0, KA=1.5, MTT=1.5, NN=3.0)}[model]
    design = hp.make_design(n, [dict(TIME=0, AMT=300, CMT=1, ADDL=1, II=12)], [0.5, 1, 2, 4, 8, 11.9, 14, 24],
                            jitter=0.2, seed=seed)
    sim = hp.simulate_population(model, design, typical, {k: 0.09 for k in list(typical)[:3]},
                                 proportional=0.1, additive=0.05, seed=seed)
    pm = build_model(model, error=error, data=sim.dataset, initial=typical)
    prob = Problem(pm, sim.dataset)
    pack = Packing(pm)
    return prob, pack


def _at(pack, x=None):
    theta, om, sd = pack.unpack(torch.tensor(pack.x0() if x is None else x, dtype=torch.float64,
                                             requires_grad=True))
    return theta, om, sd


def _autograd(prob, fn):
    """Run ``fn`` with the stencil switched off: derivatives by automatic differentiation through the solver."""
    prob.stencil = False
    try:
        return fn()
    finally:
        prob.stencil = True


@pytest.mark.parametrize("model", ["1cmt_oral_mm", "1cmt_oral_transit"])
def test_stencil_gradient_and_hessian_match_automatic_differentiation(model):
    prob, pack = _problem(model)
    assert prob.stencil
    theta, om, sd = _at(pack)
    td, sdd = {k: v.detach() for k, v in theta.items()}, {k: v.detach() for k, v in sd.items()}
    oinv = torch.linalg.inv(om).detach()
    eta = 0.3 * torch.randn(prob.batch.n_subjects, prob.pm.n_eta, generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64)
    obj, grad, hess = prob.stencil_derivatives(td, oinv, sdd, eta)
    obj_ad, grad_ad, hess_ad = _autograd(prob, lambda: prob.exact_hessian(td, oinv, sdd, eta))
    assert torch.allclose(obj, obj_ad, rtol=1e-10)
    assert float((grad - grad_ad).abs().max()) < 1e-6 * float(grad_ad.abs().max())
    assert float((hess - hess_ad).abs().max()) < 1e-5 * float(hess_ad.abs().max())


def test_copies_of_a_subject_take_the_same_steps():
    """P copies at one ETA point give the same predictions (to rounding: vectorised arithmetic may round a
    copy differently by an ulp); at nearby points their central differences
    match the derivative by automatic differentiation to 1e-7 even with a step of 1e-6, which only a shared
    step sequence allows (independent step control leaves noise of order rtol / h = 1e-2)."""
    prob, pack = _problem()
    theta, _, _ = _at(pack)
    td = {k: v.detach() for k, v in theta.items()}
    n, k = prob.batch.n_subjects, prob.pm.n_eta
    eta = torch.full((n, k), 0.1, dtype=torch.float64)
    with torch.no_grad():
        same = prob.predict_points(td, eta.expand(4, n, k).clone())
    assert float((same - same[0]).abs().max()) < 1e-12
    h = 1e-6
    e0 = torch.zeros(k, dtype=torch.float64)
    e0[1] = h                                            # ETA on V
    with torch.no_grad():
        f = prob.predict_points(td, torch.stack([eta + e0, eta - e0]))
    fd = (f[0] - f[1]) / (2 * h)
    e = eta.clone().requires_grad_(True)
    (ad,) = torch.autograd.grad(prob.predict(td, e)[prob.obs].sum(), e)
    assert float(fd[prob.obs].sum()) == pytest.approx(float(ad[:, 1].sum()), rel=1e-7)


def _zero_order(t, dose, d, cl, v):
    """1-compartment concentration after ``dose`` given over ``d`` h (the zero-order input's own solution)."""
    k = cl / v
    during = dose / d / cl * (1 - np.exp(-k * np.minimum(t, d)))
    return np.where(t <= d, during, during * np.exp(-k * (t - d)))


def _lagged_oral(t, dose, lag, cl, v, ka=1.3):
    """1-compartment first-order absorption of ``dose`` given at 0 with a lag of ``lag`` h (its own solution)."""
    k, s = cl / v, np.clip(t - lag, 0.0, None)
    return dose * ka / (v * (ka - k)) * (np.exp(-k * s) - np.exp(-ka * s))


@pytest.mark.parametrize("model, name, value, exact, rate", [
    ("1cmt_iv", "D", 2.3, _zero_order, -2.0), ("1cmt_oral", "ALAG", 0.4, _lagged_oral, 0.0)])
def test_copies_whose_event_times_differ_take_the_same_steps(model, name, value, exact, rate):
    """Three copies of a subject at a modelled duration (a lag) of value - h, value, value + h (h = 1e-4), solved as
    one step group by Dormand-Prince (rtol 1e-8): the second difference of their levels is the exact solution's to
    1e-5 of its largest value. The copies take the same steps in their segments' own time (the _dp5 module); in
    absolute time they took different numbers of steps before the moved event, and the second difference was off
    by 7e-4 (lag) to 5e-3 (duration)."""
    times = [0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0]
    rows = [dict(ID=1, TIME=0.0, AMT=100.0, RATE=rate, DV=0.0, EVID=1, MDV=1)]
    rows += [dict(ID=1, TIME=t, AMT=0.0, RATE=0.0, DV=1.0, EVID=0, MDV=0) for t in times]
    batch = hp.read_nonmem(pd.DataFrame(rows)).to_batch().select(torch.zeros(3, dtype=torch.long))
    h = 1e-4
    values = torch.tensor([value - h, value, value + h], dtype=torch.float64)
    p = {"CL": torch.full((3,), 3.0, dtype=torch.float64), "V": torch.full((3,), 30.0, dtype=torch.float64),
         "KA": torch.full((3,), 1.3, dtype=torch.float64), name: values}
    if model == "1cmt_iv":
        del p["KA"]
    c = hp.simulate(model, p, batch, method="ode", solver="dp5",
                    step_groups=torch.zeros(3, dtype=torch.long)).ipred[:, 1:].numpy()
    ref = np.array([exact(np.array(times), 100.0, x, 3.0, 30.0) for x in values.tolist()])
    np.testing.assert_allclose(c, ref, rtol=1e-7, atol=1e-9)
    second, second_ref = c[2] - 2 * c[1] + c[0], ref[2] - 2 * ref[1] + ref[0]
    assert np.abs(second - second_ref).max() < 1e-5 * np.abs(second_ref).max()


@pytest.mark.slow
def test_ofv_and_its_gradient_are_the_same_with_the_stencil():
    """Opt-in (about 50 s): the whole FOCE-I OFV and its gradient through the EBEs agree between the stencil and
    automatic differentiation; the per-subject derivatives are compared in the default suite (the test below)."""
    prob, pack = _problem()
    x = pack.x0() + 0.05
    n, k = prob.batch.n_subjects, prob.pm.n_eta

    def ofv_and_grad():
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        theta, om, sd = pack.unpack(xt)
        eta = prob.ebe(theta, torch.linalg.inv(om), sd, torch.zeros(n, k, dtype=torch.float64))
        ofv = prob.ofv(theta, om, sd, eta)
        (g,) = torch.autograd.grad(ofv, xt)
        return float(ofv.detach()), g.numpy(), eta

    ofv, g, eta = ofv_and_grad()
    ofv_ad, g_ad, eta_ad = _autograd(prob, ofv_and_grad)
    assert ofv == pytest.approx(ofv_ad, rel=1e-9)
    np.testing.assert_allclose(g, g_ad, rtol=1e-5, atol=1e-6 * np.abs(g_ad).max())
    assert float((eta - eta_ad).abs().max()) < 1e-5


def test_the_ebe_search_stops_each_subject_at_its_mode_without_spinning():
    """1cmt_oral_ehc on theophylline at its initial estimates: some subjects' objectives are flat or kinked in
    the meal ETAs (no recirculation in the data), so no step lowers them. Each such subject stops once neither
    the Newton direction nor the gradient helps; before, the search re-tried them for all 100 iterations
    (about 2000 objective evaluations)."""
    ds = hp.read_nonmem(hp.data.bundled.bundled_dataset("theoph"))
    pm = build_model("1cmt_oral_ehc", error="combined", data=ds)
    prob = Problem(pm, ds)
    pack = Packing(pm)
    theta, om, sd = _at(pack)
    calls = {"n": 0}
    objective = prob.objective

    def counted(*a, **kw):
        calls["n"] += 1
        return objective(*a, **kw)

    prob.objective = counted
    oinv = torch.linalg.inv(om)
    zero = torch.zeros(ds.n_subjects, pm.n_eta, dtype=torch.float64)
    eta = prob.ebe(theta, oinv, sd, zero)
    assert calls["n"] < 400, calls
    obj = prob.objective(theta, oinv, sd, eta)
    assert torch.isfinite(obj).all() and bool((obj <= prob.objective(theta, oinv, sd, zero) + 1e-9).all())


def test_gauss_newton_derivatives_match_the_first_order_hessian_and_the_stencil_gradient():
    """The EBE search's cheap steps (2K + 1 solves): obj_i and its gradient as the full stencil gives them, and
    the Hessian 2 (OMEGA^-1 + sum g g'/V + 1/2 h h'/V^2) as fo_hessian computes it."""
    prob, pack = _problem()
    theta, om, sd = _at(pack)
    td, sdd = {k: v.detach() for k, v in theta.items()}, {k: v.detach() for k, v in sd.items()}
    oinv = torch.linalg.inv(om).detach()
    eta = 0.2 * torch.randn(prob.batch.n_subjects, prob.pm.n_eta, generator=torch.Generator().manual_seed(2),
                            dtype=torch.float64)
    obj, grad, hess = prob.gauss_newton_derivatives(td, oinv, sdd, eta)
    obj_s, grad_s, _ = prob.stencil_derivatives(td, oinv, sdd, eta)
    with torch.no_grad():
        fo = 2 * prob.fo_hessian(td, oinv, sdd, eta)
    assert torch.allclose(obj, obj_s, rtol=1e-12)
    assert float((grad - grad_s).abs().max()) < 1e-9 * float(grad_s.abs().max())
    assert float((hess - fo).abs().max()) < 1e-5 * float(fo.abs().max())
