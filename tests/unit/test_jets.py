"""Second-order forward-mode jets (hybridpk.population.jets) against torch's autograd Hessian, and the
two-compartment closed forms' singular points."""

from __future__ import annotations

import numpy as np
import torch

from hybridpk.population import closed_form_jets
from hybridpk.population.jets import variables


def test_jets_equal_autograd_on_every_operation():
    """f = exp(-x0 x1) / sqrt(x0 + x2) - 3 / (x1 - x2 + 4) + 2 x0 x2 + 1, at 50 random points: value, gradient and
    Hessian to rounding."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 2.0, (50, 3))

    def f(a, b, c):
        return (-(a * b)).exp() / (a + c).sqrt() - 3.0 / (b - c + 4.0) + 2.0 * a * c + 1.0

    got = f(*variables(x))

    def reference(v):
        a, b, c = v
        return torch.exp(-a * b) / torch.sqrt(a + c) - 3.0 / (b - c + 4.0) + 2.0 * a * c + 1.0

    for i in range(len(x)):
        xi = torch.tensor(x[i], dtype=torch.float64)
        value = reference(xi)
        grad = torch.autograd.functional.jacobian(reference, xi)
        hess = torch.autograd.functional.hessian(reference, xi)
        np.testing.assert_allclose(got.v[i], value.item(), rtol=1e-14)
        np.testing.assert_allclose(got.g[i], grad.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got.h[i], hess.numpy(), rtol=1e-11, atol=1e-13)


def test_a_function_of_two_jets_and_where_equal_autograd():
    """apply2 (a function of two inner jets, here g(u, w) = exp(-u w) with u = x0 x1 and w = sqrt(x1 + x2)) and
    where (the jet kept where a condition holds, 0 elsewhere) at 50 random points: value, gradient and Hessian."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0.2, 2.0, (50, 3))
    a, b, c = variables(x)
    u, w = a * b, (b + c).sqrt()
    e = np.exp(-u.v * w.v)
    grad = np.stack([-w.v * e, -u.v * e], -1)
    hess = np.stack([np.stack([w.v * w.v * e, (u.v * w.v - 1) * e], -1),
                     np.stack([(u.v * w.v - 1) * e, u.v * u.v * e], -1)], -2)
    keep = x[:, 0] > 1.0
    got = u.apply2(w, e, grad, hess).where(keep)

    def reference(v):
        return torch.exp(-(v[0] * v[1]) * torch.sqrt(v[1] + v[2]))

    for i in range(len(x)):
        xi = torch.tensor(x[i], dtype=torch.float64)
        on = float(keep[i])
        np.testing.assert_allclose(got.v[i], on * reference(xi).item(), rtol=1e-14)
        np.testing.assert_allclose(got.g[i], on * torch.autograd.functional.jacobian(reference, xi).numpy(),
                                   rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got.h[i], on * torch.autograd.functional.hessian(reference, xi).numpy(),
                                   rtol=1e-11, atol=1e-13)


def test_cos_and_arccos_equal_autograd():
    """cos(arccos(x0 x1 / 4) / 3 + x2) (the trigonometric roots of the three-compartment cubic) at 50 random
    points: value, gradient and Hessian."""
    rng = np.random.default_rng(2)
    x = rng.uniform(0.2, 1.8, (50, 3))
    a, b, c = variables(x)
    got = ((a * b * 0.25).arccos() * (1.0 / 3.0) + c).cos()

    def reference(v):
        return torch.cos(torch.arccos(v[0] * v[1] * 0.25) / 3.0 + v[2])

    for i in range(len(x)):
        xi = torch.tensor(x[i], dtype=torch.float64)
        np.testing.assert_allclose(got.v[i], reference(xi).item(), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(got.g[i], torch.autograd.functional.jacobian(reference, xi).numpy(),
                                   rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got.h[i], torch.autograd.functional.hessian(reference, xi).numpy(),
                                   rtol=1e-10, atol=1e-13)


def test_three_compartment_rates_and_coefficients_equal_the_eigenvalue_solution():
    """ADVAN11's rates by the trigonometric cubic and their coefficients equal hybridpk.solve.closed_form's
    (eigenvalues of the symmetrised rate matrix) at random parameters; rates that meet are singular."""
    from hybridpk.solve.closed_form import disposition

    rng = np.random.default_rng(0)
    names = closed_form_jets.PARAMETERS["3cmt_iv"]
    phi = np.log(np.array([[4.0, 20.0, 6.0, 40.0, 2.0, 80.0]]) * np.exp(rng.normal(0, 0.3, (20, 6))))
    terms = closed_form_jets._exponents(closed_form_jets._parameters(phi, names), True)
    lam, coef = np.stack([r.v for r, _ in terms], 1), np.stack([c.v for _, c in terms], 1)
    p = {k: torch.tensor(np.exp(phi[:, i])) for i, k in enumerate(names)}
    v = p["V"]
    lam_t, coef_t = disposition(v, p["CL"] / v, [(p["Q"] / v, p["Q"] / p["V2"]), (p["Q3"] / v, p["Q3"] / p["V3"])])
    order = np.argsort(lam, 1)
    np.testing.assert_allclose(np.take_along_axis(lam, order, 1), lam_t.numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.take_along_axis(coef, order, 1), coef_t.numpy(), rtol=1e-10, atol=1e-15)
    assert not closed_form_jets.singular(phi, names)
    # ADVAN12 with KA at the middle rate is singular (KA / (KA - lambda)); 1% away it is not
    oral = closed_form_jets.PARAMETERS["3cmt_oral"]
    middle = np.sort(lam[0])[1]
    assert closed_form_jets.singular(np.log([[middle, *np.exp(phi[0])]]), oral)
    assert not closed_form_jets.singular(np.log([[1.01 * middle, *np.exp(phi[0])]]), oral)


def test_two_compartment_singular_points():
    """KA at alpha or beta (ADVAN4's 0/0) is singular; 1% away it is not."""
    cl, v, q, v2 = 4.0, 20.0, 6.0, 40.0
    k10, k12, k21 = cl / v, q / v, q / v2
    s = k10 + k12 + k21
    alpha = 0.5 * (s + np.sqrt(s * s - 4 * k10 * k21))
    beta = k10 * k21 / alpha
    for ka in (alpha, beta):
        phi = np.log([[ka, cl, v, q, v2]])
        assert closed_form_jets.singular(phi, closed_form_jets.PARAMETERS["2cmt_oral"])
        assert not closed_form_jets.singular(np.log([[1.01 * ka, cl, v, q, v2]]),
                                             closed_form_jets.PARAMETERS["2cmt_oral"])
    assert not closed_form_jets.singular(np.log([[cl, v, q, v2]]), closed_form_jets.PARAMETERS["2cmt_iv"])
