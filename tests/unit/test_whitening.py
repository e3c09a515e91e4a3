"""The hybrid's per-patient searches move the ETAs whitened: ODEBaseline.whiten / unwhiten."""

from __future__ import annotations

import torch

from hybridpk.residual.baseline import _whitening


def test_whitening_factors_omega_and_inverts():
    omega = torch.tensor([[0.09, 0.02, 0.0], [0.02, 0.04, 0.0], [0.0, 0.0, 1e-15]], dtype=torch.float64)
    to_eta, to_u = _whitening(omega)
    torch.testing.assert_close(to_eta @ to_eta.T, omega, rtol=0, atol=1e-16)
    eta = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * omega.diagonal().sqrt()
    u = eta @ to_u
    torch.testing.assert_close(u @ to_eta.T, eta, rtol=1e-12, atol=1e-22)
    # the prior's quadratic form is u'u: 0.5 eta' OMEGA^-1 eta = 0.5 |u|^2
    quad = torch.einsum("ni,ij,nj->n", eta, torch.linalg.inv(omega), eta)
    torch.testing.assert_close((u * u).sum(1), quad, rtol=1e-9, atol=0)
    # no unit step in u moves the 1e-15-variance ETA by more than its SD (3e-8)
    assert float(to_eta[2].abs().max()) < 1e-7


def test_whitening_without_etas():
    to_eta, to_u = _whitening(torch.zeros(0, 0, dtype=torch.float64))
    assert to_eta.shape == (0, 0) and to_u.shape == (0, 0)
