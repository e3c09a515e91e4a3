"""The hybrid on an imported model whose $ERROR writes the residual SD with THETAs (W = SQRT(THETA(4)**2 +
THETA(5)**2*IPRED**2), Y = IPRED + W*EPS(1), $SIGMA 1 FIX), as NONMEM users write it: its likelihood is the
error model's, evaluated at the hybrid prediction (it was refused: "the hybrid's training does not evaluate
yet"). An SD that reads ETAs stays refused (test_nonmem_error.py)."""

from __future__ import annotations

import numpy as np
import torch

import hybridpk as hp
from hybridpk.population import build_model
from hybridpk.residual import TrainConfig, fit_hybrid
from hybridpk.residual.objective import BoundError, gaussian_nll, hybrid_error
from tests.integration.test_nonmem_error import W_FORM, _read

C0 = 0.05


def test_the_w_forms_likelihood_is_the_combined_models(tmp_path, theoph_path):
    """At the same predictions the bound W form gives the native combined model's -log-likelihood (ADD 0.3,
    PROP 0.1, its THETAs), and its gradient (0 at records that are not observations, predicted at 0); below C0
    its variance is that at C0."""
    pm, ds = _read(tmp_path, theoph_path, W_FORM)
    fitted = hp.load_model(tmp_path / "run.mod")
    error = hybrid_error(fitted, C0)
    assert isinstance(error, BoundError) and error.names == pm.error.names
    sd = fitted.sigma.sd_tensors()
    batch = ds.to_batch(covariates=list(pm.covariates))
    obs = batch.is_obs
    gen = torch.Generator().manual_seed(5)
    level = torch.exp(torch.randn(obs.shape, generator=gen, dtype=torch.float64)) + 2 * C0   # above C0
    pred = torch.where(obs, level, torch.zeros_like(level)).requires_grad_(True)
    ours = gaussian_nll(batch, pred, obs, error, sd)
    (grad,) = torch.autograd.grad(ours.sum(), pred)
    native = build_model("1cmt_oral", error="combined", data=ds).error
    pred2 = pred.detach().clone().requires_grad_(True)
    theirs = gaussian_nll(batch, pred2, obs, native, {"ADD": torch.tensor(0.3, dtype=torch.float64),
                                                      "PROP": torch.tensor(0.1, dtype=torch.float64)})
    (grad2,) = torch.autograd.grad(theirs.sum(), pred2)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad2, rtol=1e-12, atol=1e-12)
    assert bool(torch.isfinite(grad).all()) and float(grad[~obs].abs().max()) == 0.0
    low = torch.where(obs, torch.full_like(level, C0 / 10), torch.zeros_like(level))
    v = error.variance_at(batch, low, sd, obs)[obs]
    torch.testing.assert_close(v, torch.full_like(v, 0.3 ** 2 + (0.1 * C0) ** 2), rtol=1e-12, atol=0.0)


def test_the_hybrid_extends_a_w_form_model_and_doses_with_it(tmp_path, theoph_path):
    """fit_hybrid on the W-form stream (a few epochs): trained under the bound error model, then a patient's MAP
    over (ETAs, z), a forecast with intervals and a simulation, all finite."""
    pm, ds = _read(tmp_path, theoph_path, W_FORM)
    hyb = fit_hybrid(pm, ds, config=TrainConfig(epochs=6, warmup_epochs=2, progress=False, form="reservoir"),
                     seed=3, progress=False)
    assert isinstance(hyb.error, BoundError) and np.isfinite(hyb.individual.NLL_HYBRID).all()
    post = hp.estimate_patient(hyb, ds.subset([ds.ids[0]]))
    assert all(np.isfinite(v["map"]) for v in post.parameters().values())
    fc = hp.forecast(post.estimate, post.draws, np.linspace(0.0, 48.0, 25))
    assert np.isfinite(fc.table.PI90_HIGH).all() and (fc.table.PI90_HIGH >= fc.table.CI90_HIGH - 1e-9).all()
    sims = hyb.simulate(ds, n=1, seed=2)
    assert np.isfinite(sims.DV).all() and (sims.DV != sims.IPRED).any()
