"""torch.autograd.gradcheck through both solver paths, for every parameter."""

from __future__ import annotations

import pytest
import torch

from hybridpk.models import get_model
from hybridpk.solve import simulate
from tests.unit.test_solve_reference import PARAMS, dataset


def _check(name, method, regs, obs, names=None, atol=1e-5, rtol=1e-3):
    """Analytical gradients (backprop through the solver) against central finite differences. The ODE path
    uses gradcheck's fast mode (a random projection of the Jacobian), as each solve is costly."""
    model = get_model(name)
    ds = dataset(model, regs, obs)
    b = ds.to_batch()
    names = names or [k for k in PARAMS[name] if k not in ("F",)]
    base = PARAMS[name]

    def f(*values):
        p = dict(base)
        p.update({k: v.expand(b.n_subjects) for k, v in zip(names, values)})
        return simulate(model, p, b, method=method, rtol=1e-11, atol=1e-13).ipred[b.is_obs]

    inputs = tuple(torch.tensor([base[k]], dtype=torch.float64, requires_grad=True) for k in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=atol, rtol=rtol, fast_mode=method == "ode")


# one subject: oral doses with ADDL and an infusion into the central compartment (oral models), or an
# infusion by duration with ADDL and a bolus (IV models)
ORAL = {1: [dict(TIME=0.0, AMT=100.0, CMT=1, ADDL=1, II=12.0), dict(TIME=3.0, AMT=100.0, CMT=2, RATE=40.0)]}
IV = {1: [dict(TIME=0.0, AMT=100.0, CMT=1, RATE=-2, DUR=1.5, ADDL=1, II=12.0), dict(TIME=5.5, AMT=50.0, CMT=1)]}
OBS = [1.0, 5.0, 13.0, 20.0]


def _directional(name, regs, obs, names, method="ode", solver="auto"):
    """d/de loss(theta + e u) by central differences against the autograd gradient . u (random u, weights)."""
    model = get_model(name)
    b = dataset(model, regs, obs).to_batch()
    gen = torch.Generator().manual_seed(1)
    theta = torch.tensor([PARAMS[name][k] for k in names], dtype=torch.float64)
    u = torch.randn(len(names), generator=gen, dtype=torch.float64) * theta
    w = torch.rand(int(b.is_obs.sum()), generator=gen, dtype=torch.float64)

    def loss(th):
        p = dict(PARAMS[name])
        p.update({k: th[i].expand(b.n_subjects) for i, k in enumerate(names)})
        return (simulate(model, p, b, method=method, rtol=1e-11, atol=1e-13, solver=solver).ipred[b.is_obs]
                * w).sum()

    th = theta.clone().requires_grad_(True)
    loss(th).backward()
    eps = 1e-5
    with torch.no_grad():
        numeric = (loss(theta + eps * u) - loss(theta - eps * u)) / (2 * eps)
    analytic = (th.grad * u).sum()
    assert abs(analytic - numeric) <= 1e-5 * abs(numeric) + 1e-8, (float(analytic), float(numeric))


@pytest.mark.parametrize("name", ["1cmt_oral", "2cmt_oral", "3cmt_iv", "2cmt_iv", "1cmt_oral_mm", "1cmt_iv_mm",
                                  "1cmt_oral_transit", "tmdd_full", "tmdd_qss", "1cmt_oral_ehc"])
def test_ode_gradient_matches_finite_differences(name):
    model = get_model(name)
    regs = ORAL if model.obs_cmt == 2 else IV
    names = [k for k in PARAMS[name] if k != "F"]      # the EHC meal times too (a meal at an infusion's start)
    _directional(name, regs, OBS, names)


@pytest.mark.parametrize("solver", ["expm", "dp5"])
def test_gradient_through_meal_times(solver):
    """The EHC model differentiated through its meal times on the exact path (matrix exponentials between meal
    switches) and by Dormand-Prince, with a meal starting at an infusion's start (a segment of length 0 whose
    end is a parameter)."""
    assert PARAMS["1cmt_oral_ehc"]["TMEAL"] == ORAL[1][1]["TIME"]
    _directional("1cmt_oral_ehc", ORAL, OBS, [k for k in PARAMS["1cmt_oral_ehc"] if k != "F"], solver=solver)


def test_ode_steady_state_gradient_matches_finite_differences():
    regs = {1: [dict(TIME=0.0, AMT=100.0, CMT=1, SS=1, II=12.0, RATE=50.0)]}
    _directional("2cmt_iv", regs, [0.5, 3.0, 11.0], ["CL", "V", "Q", "V2"])


@pytest.mark.parametrize("name", ["1cmt_oral", "2cmt_oral", "3cmt_iv", "2cmt_iv"])
@pytest.mark.parametrize("method", ["closed_form", pytest.param("ode", marks=pytest.mark.slow)])
def test_gradcheck_linear(name, method):
    regs = ORAL if get_model(name).obs_cmt == 2 else IV
    _check(name, method, regs, OBS)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["1cmt_oral_mm", "1cmt_oral_transit", "tmdd_qss", "1cmt_oral_ehc"])
def test_gradcheck_nonlinear(name):
    model = get_model(name)
    regs = ORAL if model.obs_cmt == 2 else IV
    _check(name, "ode", regs, OBS)


@pytest.mark.parametrize("method", ["closed_form", pytest.param("ode", marks=pytest.mark.slow)])
def test_gradcheck_steady_state(method):
    regs = {1: [dict(TIME=0.0, AMT=100.0, CMT=1, SS=1, II=12.0, RATE=50.0)]}
    _check("2cmt_iv", method, regs, [0.5, 3.0, 11.0], ["CL", "V", "Q", "V2"])


def test_closed_form_exponential_of_a_depot_and_central_compartment():
    """The 1-cmt oral system's exp(A dt) in closed form (solve.ode._expm) against torch's matrix exponential,
    with KA = K exactly and 1e-9 apart (the divided difference's 0/0), and its first and second derivatives
    finite (gradgradcheck) where KA = K."""
    from hybridpk.solve.ode import _expm

    ka = torch.tensor([1.3, 0.5, 0.5, 0.5 + 1e-9, 2e-7, 4.0], dtype=torch.float64)
    k = torch.tensor([0.1, 0.5, 0.5 - 1e-9, 0.5, 1e-7, 0.02], dtype=torch.float64)
    dt = torch.tensor([2.0, 3.0, 7.0, 0.5, 5.0, 30.0], dtype=torch.float64)
    a = torch.zeros(6, 2, 2, dtype=torch.float64)
    a[:, 0, 0], a[:, 1, 0], a[:, 1, 1] = -ka * dt, ka * dt, -k * dt
    torch.testing.assert_close(_expm(a), torch.linalg.matrix_exp(a), rtol=1e-12, atol=1e-14)

    def e21(ka_, k_):
        m = torch.zeros(1, 2, 2, dtype=torch.float64)
        m[0, 0, 0], m[0, 1, 0], m[0, 1, 1] = -ka_ * 2.0, ka_ * 2.0, -k_ * 2.0
        return _expm(m)[0, 1, 0]

    at = (torch.tensor(0.5, dtype=torch.float64, requires_grad=True),
          torch.tensor(0.5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradgradcheck(e21, at)


@pytest.mark.parametrize("name,names", [("1cmt_oral", ["CL", "V", "KA"]), ("2cmt_iv", ["CL", "V", "Q", "V2"])])
def test_second_derivatives_through_a_steady_state_dose(name, names):
    """The exact (matrix-exponential) path with a steady-state dose: the Hessian of a weighted sum of predictions
    by double backpropagation against central differences of the gradient. The EBE search's Newton steps use
    such Hessians; the steady state by a Newton iteration re-attached at its last step gave first derivatives
    only (EBE searches on steady-state data converged linearly: quinidine, 49 iterations against 7)."""
    model = get_model(name)
    dose = dict(TIME=0.0, AMT=100.0, CMT=1, SS=1, II=12.0) | ({} if model.obs_cmt == 2 else dict(RATE=50.0))
    b = dataset(model, {1: [dose, dict(TIME=24.0, AMT=100.0, CMT=1)]}, [0.5, 3.0, 11.0, 26.0]).to_batch()
    base = PARAMS[name]
    w = torch.linspace(0.5, 1.5, int(b.is_obs.sum()), dtype=torch.float64)

    def loss(th):
        p = dict(base)
        p.update({k: th[i].expand(1) for i, k in enumerate(names)})
        return (simulate(model, p, b, method="ode", solver="expm").ipred[b.is_obs] * w).sum()

    def grad(th, create_graph=False):
        th = th if th.requires_grad else th.clone().requires_grad_(True)
        return torch.autograd.grad(loss(th), th, create_graph=create_graph)[0]

    theta = torch.tensor([base[k] for k in names], dtype=torch.float64, requires_grad=True)
    g = grad(theta, create_graph=True)
    hess = torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(len(names))])
    eps = 1e-5 * theta.detach()
    numeric = torch.stack([(grad(theta.detach() + eps[i] * torch.eye(len(names))[i])
                            - grad(theta.detach() - eps[i] * torch.eye(len(names))[i])) / (2 * eps[i])
                           for i in range(len(names))])
    torch.testing.assert_close(hess, numeric, rtol=1e-5, atol=1e-9)
