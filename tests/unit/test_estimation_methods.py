"""FO, FOCE (without interaction), FOCE-I and LAPLACE against independent implementations of NONMEM's objectives
(Wang, J Pharmacokinet Pharmacodyn 2007;34:575-93), written here in numpy/scipy. FO and FOCE as the linearised
objectives: the model linearised at ETA = 0 (FO) or at the mode of the objective whose residual variance is taken
at ETA = 0 (FOCE),

    OFV_i = log|C_i| + e_i' C_i^-1 e_i,  C_i = G OMEGA G' + diag V(f(theta, 0)),  e_i = y - f(eta_i) + G eta_i

hybridpk computes FOCE in its Laplacian form (log|OMEGA| + log|OMEGA^-1 + G'V^-1 G| + ...), so agreement
checks the algebra as well as the code. Each is checked with a diagonal OMEGA and with an OMEGA block (CL and V
correlated), which every formula takes as a full matrix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import minimize

import hybridpk as hp
from hybridpk.population import FittedPopulation, build_model, fit_population
from hybridpk.population.focei import Problem

DOSE, TIMES = 100.0, np.array([0.5, 2.0, 6.0, 12.0])
THETA = {"CL": 3.0, "V": 30.0}
OMEGA = np.diag([0.09, 0.04])
OMEGA_BLOCK = np.array([[0.09, 0.03], [0.03, 0.04]])
SD = {"additive": {"ADD": 0.2}, "proportional": {"PROP": 0.15}, "combined": {"ADD": 0.1, "PROP": 0.12}}


def conc(theta, eta, t):
    cl, v = theta[0] * np.exp(eta[0]), theta[1] * np.exp(eta[1])
    return DOSE / v * np.exp(-cl / v * t)


def jac(theta, eta, t, h=1e-6):
    return np.stack([(conc(theta, eta + h * e, t) - conc(theta, eta - h * e, t)) / (2 * h) for e in np.eye(2)], 1)


def variance(f, sd):
    return sd.get("ADD", 0.0) ** 2 + (sd.get("PROP", 0.0) * f) ** 2


def subject_ofv(y, theta, omega, sd, method):
    zero = np.zeros(2)
    v0 = variance(conc(theta, zero, TIMES), sd)
    if method == "FO":
        eta = zero
    else:
        oinv = np.linalg.inv(omega)
        res = minimize(lambda e: np.sum((y - conc(theta, e, TIMES)) ** 2 / v0) + e @ oinv @ e, zero,
                       method="BFGS", options={"gtol": 1e-12})
        eta = res.x
    g = jac(theta, eta, TIMES)
    c = g @ omega @ g.T + np.diag(v0)
    e = y - conc(theta, eta, TIMES) + g @ eta
    return np.linalg.slogdet(c)[1] + e @ np.linalg.solve(c, e)


def population(n, seed, sd, omega=OMEGA):
    rng = np.random.default_rng(seed)
    rows, ys = [], []
    for i in range(1, n + 1):
        eta = rng.multivariate_normal(np.zeros(2), omega)
        f = conc([THETA["CL"], THETA["V"]], eta, TIMES)
        y = f + rng.normal(0, np.sqrt(variance(f, sd)))
        ys.append(y)
        rows.append({"ID": i, "TIME": 0.0, "AMT": DOSE, "DV": 0.0, "EVID": 1, "MDV": 1})
        rows += [{"ID": i, "TIME": t, "AMT": 0.0, "DV": d, "EVID": 0, "MDV": 0} for t, d in zip(TIMES, y)]
    return hp.read_nonmem(pd.DataFrame(rows)), ys


def _at_trial_values(error, method, block=False):
    """5 simulated subjects and hybridpk's OFV of ``method`` at trial values away from the truth (where the
    methods differ most), with what the independent objectives need; ``block``: CL and V correlated."""
    truth = OMEGA_BLOCK if block else OMEGA
    ds, ys = population(5, 1, SD[error], truth)
    pm = build_model("1cmt_iv", iiv=["CL", "V"], error=error, omega_block=block)
    theta, omega, sd = {"CL": 2.4, "V": 36.0}, truth * 1.5, {k: 1.3 * v for k, v in SD[error].items()}
    fitted = FittedPopulation.from_values(pm, theta, omega, sd)
    prob = Problem(pm, ds, estimation=method)
    th, om, s = fitted.theta.tensors(), fitted.omega.tensor(), fitted.sigma.sd_tensors()
    eta = prob.ebe(th, torch.linalg.inv(om), s, torch.zeros(5, 2, dtype=torch.float64), tol=1e-12)
    return {"ds": ds, "ys": ys, "pm": pm, "prob": prob, "eta": eta, "ofv": float(prob.ofv(th, om, s, eta).detach()),
            "theta": theta, "omega": omega, "sd": sd, "th": th, "om": om, "s": s}


@pytest.mark.parametrize("block", [False, True], ids=["diagonal", "block"])
@pytest.mark.parametrize("error", ["additive", "proportional", "combined"])
@pytest.mark.parametrize("method", ["FO", "FOCE"])
def test_the_ofv_agrees_with_an_independent_linearised_objective(method, error, block):
    case = _at_trial_values(error, method, block)
    ds, ys, pm, eta, ours = case["ds"], case["ys"], case["pm"], case["eta"], case["ofv"]
    theta, omega, sd, th, om, s = case["theta"], case["omega"], case["sd"], case["th"], case["om"], case["s"]
    ref = sum(subject_ofv(y, [theta["CL"], theta["V"]], omega, sd, method) for y in ys)
    assert ours == pytest.approx(ref, rel=1e-6)
    plain = Problem(pm, ds)
    focei = float(plain.ofv(th, om, s, plain.ebe(th, torch.linalg.inv(om), s, eta)).detach())
    if error != "additive":   # with a proportional part the methods are different objectives
        assert abs(focei - ours) > 1e-3


def focei_subject_ofv(y, theta, omega, sd):
    """FOCE-I (Wang 2007) in NONMEM's Laplacian form: obj_i = sum (y - f)^2 / V + log V + eta' OMEGA^-1 eta at its
    mode, plus log|OMEGA| + log|OMEGA^-1 + sum_j g g' / V + 1/2 h h' / V^2|, g = df/deta, h = dV/deta."""
    oinv = np.linalg.inv(omega)

    def obj(e):
        f = conc(theta, e, TIMES)
        v = variance(f, sd)
        return np.sum((y - f) ** 2 / v + np.log(v)) + e @ oinv @ e

    eta = minimize(obj, np.zeros(2), method="BFGS", options={"gtol": 1e-12}).x
    f, g = conc(theta, eta, TIMES), jac(theta, eta, TIMES)
    v = variance(f, sd)
    h = 2 * sd.get("PROP", 0.0) ** 2 * f[:, None] * g
    m = oinv + (g.T / v) @ g + 0.5 * (h.T / v ** 2) @ h
    return obj(eta) + np.linalg.slogdet(omega)[1] + np.linalg.slogdet(m)[1]


@pytest.mark.parametrize("block", [False, True], ids=["diagonal", "block"])
@pytest.mark.parametrize("error", ["additive", "proportional", "combined"])
def test_focei_agrees_with_an_independent_implementation(error, block):
    case = _at_trial_values(error, "FOCE-I", block)
    theta, omega, sd = case["theta"], case["omega"], case["sd"]
    ref = sum(focei_subject_ofv(y, [theta["CL"], theta["V"]], omega, sd) for y in case["ys"])
    assert case["ofv"] == pytest.approx(ref, rel=1e-6)


def independent_total(ys, error, method):
    """The independent OFV as a function of (log CL, log V, log OMEGA diagonal, log SDs)."""
    kinds = list(SD[error])

    def total(x):
        theta, omega = np.exp(x[:2]), np.diag(np.exp(x[2:4]))
        sd = dict(zip(kinds, np.exp(x[4:])))
        return sum(subject_ofv(y, theta, omega, sd, method) for y in ys)

    return total


@pytest.mark.parametrize("method", ["FO", "FOCE"])
def test_the_fit_is_a_minimum_of_the_independent_objective(method):
    """The fitted estimates, in the independent objective: the same OFV, and a stationary point of it (central
    differences in log parameters). FO: also the independent objective's own minimum (scipy BFGS, from elsewhere)."""
    error = "proportional"
    ds, ys = population(10, 4, SD[error])
    pm = build_model("1cmt_iv", iiv=["CL", "V"], error=error)
    fit = fit_population(pm, ds, estimation=method, progress=False, covariance=False)
    assert fit.estimation.method == method
    x_hat = np.log([fit.theta["CL"].value, fit.theta["V"].value, *np.diag(fit.omega.tensor().numpy()),
                    fit.sigma.rows[0].sd])
    total = independent_total(ys, error, method)
    assert total(x_hat) == pytest.approx(fit.estimation.ofv, abs=1e-6)
    h = 1e-4
    grad = [(total(x_hat + h * e) - total(x_hat - h * e)) / (2 * h) for e in np.eye(len(x_hat))]
    assert np.abs(grad).max() < 5e-3, grad
    if method == "FO":
        res = minimize(total, np.log([3.6, 24.0, 0.1, 0.1, 0.2]), method="BFGS", options={"gtol": 1e-5})
        assert res.fun == pytest.approx(fit.estimation.ofv, abs=1e-4)
        np.testing.assert_allclose(np.exp(x_hat), np.exp(res.x), rtol=2e-3)
    focei = fit_population(pm, ds, progress=False, covariance=False)
    assert abs(focei.estimation.ofv - fit.estimation.ofv) > 1e-2     # not FOCE-I under another name


def laplace_subject_ofv(y, theta, omega, sd, interaction):
    """NONMEM's LAPLACE (Wang 2007, eq. 10): obj_i at its mode + log|OMEGA| + log|H/2|, H the exact Hessian of
    obj_i = sum (y - f)^2 / V + log V + eta' OMEGA^-1 eta, here by central second differences."""
    oinv = np.linalg.inv(omega)
    v0 = variance(conc(theta, np.zeros(2), TIMES), sd)

    def obj(e):
        f = conc(theta, e, TIMES)
        v = variance(f, sd) if interaction else v0
        return np.sum((y - f) ** 2 / v + np.log(v)) + e @ oinv @ e

    eta = minimize(obj, np.zeros(2), method="BFGS", options={"gtol": 1e-12}).x
    h, k = 1e-4, len(eta)
    hess = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            ei, ej = h * np.eye(k)[i], h * np.eye(k)[j]
            hess[i, j] = (obj(eta + ei + ej) - obj(eta + ei - ej) - obj(eta - ei + ej)
                          + obj(eta - ei - ej)) / (4 * h * h)
    return obj(eta) + np.linalg.slogdet(omega)[1] + np.linalg.slogdet(hess / 2)[1]


@pytest.mark.parametrize("block", [False, True], ids=["diagonal", "block"])
@pytest.mark.parametrize("error", ["additive", "proportional", "combined"])
@pytest.mark.parametrize("method", ["LAPLACE-I", "LAPLACE"])
def test_laplace_agrees_with_an_independent_implementation_and_its_gradient_is_exact(method, error, block):
    from hybridpk.population.fit import Packing

    case = _at_trial_values(error, method, block)
    ds, ys, pm, prob, eta, ours = case["ds"], case["ys"], case["pm"], case["prob"], case["eta"], case["ofv"]
    theta, omega, sd, th, om, s = case["theta"], case["omega"], case["sd"], case["th"], case["om"], case["s"]
    ref = sum(laplace_subject_ofv(y, [theta["CL"], theta["V"]], omega, sd, method == "LAPLACE-I") for y in ys)
    assert ours == pytest.approx(ref, rel=1e-6)
    focei = Problem(pm, ds, estimation="FOCE-I" if method == "LAPLACE-I" else "FOCE")
    assert abs(float(focei.ofv(th, om, s, eta).detach()) - ours) > 1e-4        # not FOCE under another name
    # the OFV gradient (through the re-attached EBEs and the exact Hessian) against central differences
    pack = Packing(pm, omega=omega if block else np.diag(omega), sigma=sd)
    x0 = pack.x0(theta)

    def ofv(xv, grad=False):
        x = torch.tensor(xv, dtype=torch.float64, requires_grad=grad)
        t, o, sdx = pack.unpack(x)
        e = prob.ebe(t, torch.linalg.inv(o.detach()), sdx, eta, tol=1e-12)
        val = prob.ofv(t, o, sdx, e)
        return torch.autograd.grad(val, x)[0].numpy() if grad else float(val.detach())

    g = ofv(x0, grad=True)
    fd = [(ofv(x0 + 1e-5 * e) - ofv(x0 - 1e-5 * e)) / 2e-5 for e in np.eye(len(x0))]
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-4)


def test_fo_refuses_below_lloq_observations():
    ds, _ = population(3, 2, SD["additive"])
    df = ds.to_dataframe()
    df["LLOQ"] = 0.5
    df["BLQ"] = ((df.EVID == 0) & (df.TIME == 12.0)).astype(int)
    pm = build_model("1cmt_iv", iiv=["CL", "V"], error="additive")
    with pytest.raises(hp.HybridPKError, match="M3"):
        fit_population(pm, hp.read_nonmem(df), estimation="FO", progress=False, covariance=False)


def test_a_stalled_search_stops_and_says_why(monkeypatch):
    """The outer search ends when the best OFV fell by less than STALL_OFV over STALL_ITERATIONS iterations (here
    made to trigger at once): the fit is reported converged with that reason, after STALL_ITERATIONS + 1."""
    import hybridpk.population.fit as fit_module

    ds, _ = population(8, 5, SD["proportional"])
    pm = build_model("1cmt_iv", iiv=["CL", "V"], error="proportional")
    monkeypatch.setattr(fit_module, "STALL_ITERATIONS", 3)
    monkeypatch.setattr(fit_module, "STALL_OFV", 1e9)
    fit = fit_population(pm, ds, progress=False, covariance=False, pooled_start=False)
    assert fit.estimation.iterations == 4 and fit.estimation.converged
    assert fit.estimation.message == "the OFV fell by less than 1e+09 over the last 3 iterations"


def test_importance_resampling_leaves_proposals_beyond_the_limit_unevaluated():
    """Proposals with an ETA beyond ``limit`` get weight 0 without being evaluated (an ODE model's draws with KA
    e^10 took the solver minutes per batch); inside the limit the weights are the same, so a posterior well inside
    it is sampled as without the limit (same mean, SD and effective sample size)."""
    from hybridpk.population.estimates import importance_resample

    mean = torch.tensor([0.2, -0.1], dtype=torch.float64)
    cov = torch.tensor([[0.04, 0.01], [0.01, 0.09]], dtype=torch.float64)
    prec = torch.linalg.inv(cov)
    seen = []

    def log_post(d):
        seen.append(d.abs().max(0).values)
        r = d - mean
        return -0.5 * torch.einsum("nk,kl,nl->n", r, prec, r)

    limit = torch.tensor([2.0, 2.8], dtype=torch.float64)     # |mean| + 6 proposal SDs: the nearest allowed
    draws, ess = importance_resample(mean, cov, log_post, 2000, seed=3, limit=limit)
    assert all(bool((s <= limit).all()) for s in seen)
    seen.clear()
    free, ess_free = importance_resample(mean, cov, log_post, 2000, seed=3)
    assert any(bool((s > limit).any()) for s in seen)          # the unlimited proposals do reach beyond it
    np.testing.assert_allclose(draws.mean(0).numpy(), mean.numpy(), atol=0.02)
    np.testing.assert_allclose(draws.std(0).numpy(), free.std(0).numpy(), rtol=0.1)
    assert ess == pytest.approx(ess_free, rel=0.05)
    # a mode beyond the limit keeps its neighbourhood: draws around it, finite weights
    far = torch.tensor([2.0, -0.1], dtype=torch.float64)
    moved, ess_far = importance_resample(far, cov, lambda d: log_post(d + mean - far), 500, seed=1, limit=limit)
    assert ess_far > 100 and abs(float(moved[:, 0].mean()) - 2.0) < 0.05
