"""Per-subject OFV gradients (the S matrix of the sandwich covariance, NONMEM's $COVARIANCE default R^-1 S R^-1):
the subject-weights passes (P backward passes of the weighted OFV gradient, the default) and the N batched backward
passes give the same Jacobian, whose rows sum to the OFV's gradient and equal central differences of each subject's
OFV contribution."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.population import build_model
from hybridpk.population.fit import Packing, per_subject_gradients
from hybridpk.population.focei import Problem

TIMES = (0.5, 2.0, 6.0, 12.0)


def population(n, seed, omega):
    """n subjects, 100 mg IV bolus, 1-cmt (CL 3 L/h, V 30 L), combined error (0.1 mg/L + 12%)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        cl, v = np.array([3.0, 30.0]) * np.exp(rng.multivariate_normal(np.zeros(2), omega))
        rows.append({"ID": i, "TIME": 0.0, "AMT": 100.0, "DV": 0.0, "EVID": 1, "MDV": 1})
        for t in TIMES:
            f = 100.0 / v * np.exp(-cl / v * t)
            rows.append({"ID": i, "TIME": t, "AMT": 0.0, "DV": f + rng.normal(0, np.hypot(0.1, 0.12 * f)),
                         "EVID": 0, "MDV": 0})
    return hp.read_nonmem(pd.DataFrame(rows))


def _case(method, block, solver="auto"):
    ds = population(6, 3, np.array([[0.09, 0.03], [0.03, 0.04]]) if block else np.diag([0.09, 0.04]))
    pm = build_model("1cmt_iv", iiv=["CL", "V"], error="combined", omega_block=block)
    prob = Problem(pm, ds, method=solver, estimation=method)
    pack = Packing(pm, omega=[0.12, 0.05] if not block else None, sigma={"ADD": 0.13, "PROP": 0.15})
    x = torch.tensor(pack.x0(), dtype=torch.float64) + 0.03      # away from any optimum
    theta, om, sd = pack.unpack(x)
    eta = torch.zeros(ds.n_subjects, 2, dtype=torch.float64)
    if method != "FO":
        eta = prob.ebe(theta, torch.linalg.inv(om), sd, eta, tol=1e-12)
    return ds.n_subjects, (lambda xt: prob.ofv(*pack.unpack(xt), eta, per_subject=True)), x


@pytest.mark.parametrize("block", [False, True], ids=["diagonal", "block"])
@pytest.mark.parametrize("method", ["FOCE-I", "FOCE", "FO", "LAPLACE-I"])
def test_weights_and_backward_per_subject_gradients_agree_with_central_differences(method, block):
    n, ofv_i, x = _case(method, block)
    backward = per_subject_gradients(ofv_i, x, mode="backward")
    weights = per_subject_gradients(ofv_i, x, mode="weights")
    assert backward.shape == (n, x.shape[0])
    np.testing.assert_allclose(weights, backward, rtol=1e-8, atol=1e-9)
    xr = x.clone().requires_grad_(True)      # summed over subjects: the gradient the outer search uses
    (total,) = torch.autograd.grad(ofv_i(xr).sum(), xr)
    np.testing.assert_allclose(weights.sum(0), total.numpy(), rtol=1e-10, atol=1e-10)
    # central differences of each subject's contribution; the OFV's gradient holds the Hessian of the EBE
    # re-attachment step constant (its derivative multiplies a gradient that is 0 at the mode), hence 1e-3
    h = 1e-6
    for j in range(x.shape[0]):
        e = torch.zeros_like(x)
        e[j] = h
        fd = (ofv_i(x + e).detach().numpy() - ofv_i(x - e).detach().numpy()) / (2 * h)
        np.testing.assert_allclose(backward[:, j], fd, rtol=1e-3, atol=1e-4)


def test_weights_mode_through_the_ode_solver_agrees():
    """The ODE path (adaptive Dormand-Prince, ETA stencil Hessians) in weights mode."""
    n, ofv_i, x = _case("FOCE-I", False, solver="ode")
    np.testing.assert_allclose(per_subject_gradients(ofv_i, x, mode="weights"),
                               per_subject_gradients(ofv_i, x, mode="backward"), rtol=1e-7, atol=1e-8)
