"""Banded OMEGA blocks (NONMEM's $OMEGA BLOCK(n) with covariances given as 0, held at 0): the parametrisation
leaves the Cholesky factor's entries out where the covariances are held, which gives those covariances exactly 0
for every parameter value and reaches every positive definite matrix with the band (hybridpk.population.omega);
the hybrid's OMEGA update keeps the zeros and stays positive definite."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hybridpk.population.omega import OmegaBlocks, band_zeros_problem
from hybridpk.residual.omega import _project

#: ETA 1-3 a band (ETA 1 with 3 held at 0), ETA 4 alone
BAND = np.array([[0.16, 0.048, 0.0, 0.0], [0.048, 0.09, 0.03, 0.0], [0.0, 0.03, 0.04, 0.0], [0.0, 0.0, 0.0, 0.25]])


def test_the_band_is_reached_and_its_zero_is_exact_for_any_parameters():
    om = OmegaBlocks([(0, 1, 2)], 4, zeros=[(0, 2)])
    assert om.n_params == 4 + 2 and om.offdiagonal() == [(1, 0), (2, 1)]
    back = om.unpack(torch.tensor(om.x0(BAND), dtype=torch.float64))
    np.testing.assert_allclose(back.numpy(), BAND, rtol=1e-12, atol=1e-15)
    for seed in range(5):
        x = torch.randn(om.n_params, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        m = om.unpack(x)
        assert float(m[2, 0]) == 0.0 and float(m[0, 2]) == 0.0 and float(m[3, 1]) == 0.0
        assert float(torch.linalg.eigvalsh(m).min()) > 0 and torch.equal(m, m.T)
        # every estimated covariance moves with the parameters, the held one does not
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(om.unpack(x)[2, 0], x, allow_unused=True, materialize_grads=True)
        assert float(g.abs().max()) == 0.0


def test_zeros_must_lead_their_row_and_stay_in_a_block():
    assert band_zeros_problem([(0, 1, 2)], [(2, 0)]) is None
    assert band_zeros_problem([(0, 1, 2)], [(2, 0), (2, 1)]) is None           # ETA 3 uncorrelated in the block
    assert "do not lead" in band_zeros_problem([(0, 1, 2)], [(2, 1)])
    assert "not inside one OMEGA block" in band_zeros_problem([(0, 1), (2,)], [(2, 0)])
    with pytest.raises(ValueError, match="do not lead"):
        OmegaBlocks([(0, 1, 2)], 3, zeros=[(2, 1)])


def test_the_hybrids_omega_update_keeps_the_band_positive_definite():
    """An update whose covariances, with the held one set to 0, are no longer positive definite (correlations 0.9,
    0.9 and 0.8 -> 0): shrunk toward the diagonal until it is; the held covariance stays 0."""
    sd = torch.tensor([0.4, 0.3, 0.2], dtype=torch.float64)
    corr = torch.tensor([[1.0, 0.9, 0.8], [0.9, 1.0, 0.9], [0.8, 0.9, 1.0]], dtype=torch.float64)
    s = corr * sd[:, None] * sd[None, :]
    pm = SimpleNamespace(blocks=((0, 1, 2),), omega_same=(), omega_fixed=(), omega_zeros=((2, 0),))
    zeroed = s.clone()
    zeroed[2, 0] = zeroed[0, 2] = 0.0
    assert float(torch.linalg.eigvalsh(zeroed).min()) < 0
    out = _project(pm, torch.eye(3, dtype=torch.float64), s)
    assert float(out[2, 0]) == 0.0 and float(torch.linalg.eigvalsh(out).min()) > 0
    torch.testing.assert_close(torch.diagonal(out), torch.diagonal(s))
    assert 0 < float(out[1, 0]) / float(s[1, 0]) < 1
