"""Population simulation: reproducible, honours IIV, covariates and residual error."""

from __future__ import annotations

import numpy as np
import pytest

import hybridpk as hp
from hybridpk.errors import ModelError


def _design(n=200):
    return hp.make_design(n, [dict(TIME=0, AMT=100, CMT=1, ADDL=2, II=12)], [0.5, 1, 2, 4, 8, 12.5, 24, 30],
                          covariates={"WT": lambda rng, k: rng.uniform(40, 110, k)}, jitter=0.2, seed=3)


def test_same_seed_same_dataset_and_different_seed_differs():
    design = _design(20)
    kw = dict(typical=dict(CL=3.0, V=30.0, KA=1.2), omega=dict(CL=0.09, V=0.04), proportional=0.1)
    a = hp.simulate_population("1cmt_oral", design, seed=5, **kw)
    b = hp.simulate_population("1cmt_oral", design, seed=5, **kw)
    c = hp.simulate_population("1cmt_oral", design, seed=6, **kw)
    assert a.dataset == b.dataset
    assert not a.dataset.to_dataframe().DV.equals(c.dataset.to_dataframe().DV)


def test_iiv_covariate_and_residual_error_are_as_specified():
    design = _design(400)
    sim = hp.simulate_population("1cmt_oral", design, dict(CL=3.0, V=30.0, KA=1.2), dict(CL=0.09),
                                 proportional=0.1, covariates={"CL": ("WT", 70.0, 0.75)}, seed=11)
    par = sim.parameters
    wt = design.to_dataframe().groupby("ID").WT.first().loc[par.ID].to_numpy()
    eta = np.log(par.CL.to_numpy() / (3.0 * (wt / 70) ** 0.75))
    np.testing.assert_allclose(eta, sim.etas.ETA_CL.to_numpy(), rtol=1e-10)
    assert 0.07 < eta.var() < 0.11
    np.testing.assert_allclose(par.V, 30.0)             # no IIV on V
    df = sim.dataset.to_dataframe()
    obs = sim.dataset.observation_mask
    ratio = df.DV.to_numpy()[obs] / sim.ipred.IPRED.to_numpy()[obs] - 1
    assert 0.09 < ratio.std() < 0.11
    assert sim.dataset.n_doses == 3 * 400


def test_unknown_parameter_is_refused():
    with pytest.raises(ModelError, match="no parameter"):
        hp.simulate_population("1cmt_oral", _design(3), dict(CL=3.0, V=30.0, KA=1.0, VMAX=3.0))
