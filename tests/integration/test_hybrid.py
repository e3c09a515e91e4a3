"""Hybrid model (ODE baseline + VAE residual): reproducibility, checkpoints, CLI, and the EHC example."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from hybridpk.cli import main
from hybridpk.population import build_model, fit_population
from hybridpk.residual import TrainConfig, fit_hybrid, train_vae
from hybridpk.solve.examples import simulate_ehc_population


@pytest.fixture(scope="module")
def ehc_small():
    ds, truth = simulate_ehc_population(80, seed=3)
    pm = build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pm, ds, progress=False, covariance=False)
    return ds, truth, pm, fit


def test_same_seed_same_result(ehc_small):
    ds, _, pm, fit = ehc_small
    cfg = TrainConfig(epochs=40, warmup_epochs=10, progress=False)
    a = fit_hybrid(pm, ds, population=fit, config=cfg, seed=5, progress=False)
    b = fit_hybrid(pm, ds, population=fit, config=cfg, seed=5, progress=False)
    for (k, v), (_, w) in zip(a.vae.state_dict().items(), b.vae.state_dict().items()):
        assert torch.equal(v, w), k
    pd.testing.assert_frame_equal(a.individual, b.individual)
    c = fit_hybrid(pm, ds, population=fit, config=cfg, seed=6, progress=False)
    assert not a.individual.Z1.equals(c.individual.Z1)


def test_checkpoint_is_tensors_only_and_training_resumes(ehc_small, tmp_path):
    ds, _, pm, fit = ehc_small
    from hybridpk.dosing.prior import prior_from_fit
    from hybridpk.residual.hybrid import _baseline

    prior = prior_from_fit(fit, pm)
    _, batch, ipred = _baseline(prior, ds)
    ck = tmp_path / "vae.ckpt"
    cfg = TrainConfig(epochs=41, warmup_epochs=5, progress=False, checkpoint=str(ck))
    train_vae(batch, ipred, pm.error, prior.sd, cfg)
    saved = torch.load(ck, weights_only=True)             # no pickled code
    assert int(saved["epoch"]) == 40
    cfg2 = TrainConfig(epochs=60, warmup_epochs=5, progress=False, checkpoint=str(ck))
    _, hist = train_vae(batch, ipred, pm.error, prior.sd, cfg2)
    assert hist[0][0] == 41 and hist[-1][0] <= 59          # resumed after the saved epoch


def test_joint_checkpoint_resumes_with_the_etas(ehc_small, tmp_path):
    ds, _, pm, fit = ehc_small
    from hybridpk.dosing.prior import prior_from_fit
    from hybridpk.residual import ODEBaseline
    from hybridpk.residual.hybrid import _baseline

    prior = prior_from_fit(fit, pm)
    est, batch, ipred = _baseline(prior, ds)
    ck = tmp_path / "vae.ckpt"
    base = ODEBaseline(prior)
    cfg = TrainConfig(epochs=21, warmup_epochs=5, progress=False, checkpoint=str(ck), joint=True)
    model, _ = train_vae(batch, ipred, pm.error, prior.sd, cfg, baseline=base, eta0=est.eta)
    saved = torch.load(ck, weights_only=True)
    # the split train_vae makes (seeded): the saved ETAs started at the ODE-only MAP and have moved
    perm = torch.randperm(ds.n_subjects, generator=torch.Generator().manual_seed(cfg.seed))
    n_val = len(saved["eta_val"])
    assert saved["eta_train"].shape == (ds.n_subjects - n_val, 3)
    for got, start in ((saved["eta_train"], est.eta[perm[n_val:]]), (saved["eta_val"], est.eta[perm[:n_val]])):
        moved = (got - start).abs().max(1).values
        assert float(moved.max()) > 1e-3 and float(moved.max()) < 1.0
    assert model.log_shift.shape == (3,)
    cfg2 = TrainConfig(epochs=30, warmup_epochs=5, progress=False, checkpoint=str(ck), joint=True)
    _, hist = train_vae(batch, ipred, pm.error, prior.sd, cfg2, baseline=base, eta0=est.eta)
    assert hist[0][0] == 21
    with pytest.raises(ValueError, match="eta0"):
        train_vae(batch, ipred, pm.error, prior.sd, cfg2, baseline=base)


def test_zero_residual_gives_back_the_ode_only_map(ehc_small):
    """With a decoder that outputs 0 the hybrid is the ODE model: refining (z, ETAs) jointly must return the
    ODE-only MAP ETAs and z = 0 (an independent check of the refinement), and the prediction the ODE one."""
    ds, _, pm, fit = ehc_small
    from hybridpk.dosing.prior import prior_from_fit
    from hybridpk.residual import HybridVAE, hybrid_predict
    from hybridpk.residual.features import fit_scale, record_features
    from hybridpk.residual.hybrid import _baseline

    prior = prior_from_fit(fit, pm)
    _, batch, ipred = _baseline(prior, ds)
    scale = fit_scale(batch, ipred, 6)
    x, _ = record_features(batch, ipred, scale)
    vae = HybridVAE(x.shape[-1], 2, 16, joint=True, n_shift=3).double()
    vae.scale = scale
    with torch.no_grad():
        vae.encoder.rho[-1].bias.fill_(0.3)          # a deliberately wrong starting z
    out = hybrid_predict(prior, vae, ds)
    h = out["estimate"]
    assert float(h.z.abs().max()) < 1e-5
    assert float((h.eta - h.eta_ode).abs().max()) < 1e-5
    torch.testing.assert_close(out["hybrid"], out["ode"], rtol=1e-6, atol=1e-9)
    assert bool((h.weight < 0.5).all())             # no gain in fit, two more parameters: ODE-only preferred


def test_refinement_never_worsens_a_patient(ehc_small):
    ds, _, pm, fit = ehc_small
    from hybridpk.dosing.prior import prior_from_fit
    from hybridpk.residual import ODEBaseline, estimate_hybrid
    from hybridpk.residual.hybrid import _baseline

    prior = prior_from_fit(fit, pm)
    est, batch, ipred = _baseline(prior, ds)
    hyb = fit_hybrid(pm, ds, population=fit, config=TrainConfig(epochs=60, warmup_epochs=10, progress=False),
                     seed=1, progress=False)
    kw = dict(baseline=ODEBaseline(prior), l2=0.3)
    a = estimate_hybrid(hyb.vae, batch, ipred, est.eta, pm.error, prior.sd, refine=False, **kw)
    b = estimate_hybrid(hyb.vae, batch, ipred, est.eta, pm.error, prior.sd, refine=True, **kw)
    assert bool((b.objective <= a.objective + 1e-9).all())
    assert float((a.objective - b.objective).sum()) > 0.1


def test_complexity_and_latent_outputs_are_reported(ehc_small):
    ds, truth, pm, fit = ehc_small
    hyb = fit_hybrid(pm, ds, population=fit, config=TrainConfig(epochs=60, warmup_epochs=10), seed=0,
                     progress=False)
    ind = hyb.individual
    assert {"Z1", "Z2", "Z1_SD", "Z2_SD", "COMPLEXITY", "NLL_ODE", "NLL_HYBRID", "RMSE_ODE", "RMSE_HYBRID",
            "HYBRID_WEIGHT"} <= set(ind.columns)
    np.testing.assert_allclose(ind.COMPLEXITY, ind.NLL_ODE - ind.NLL_HYBRID)
    assert (ind.Z1_SD > 0).all() and ind.HYBRID_WEIGHT.between(0, 1).all()


@pytest.mark.parametrize("residual", ["auto", "reservoir"])
def test_cli_fit_vae_and_predict_new_patients(tmp_path, capsys, residual):
    ds, truth = simulate_ehc_population(60, seed=11)
    path = tmp_path / "ehc.csv"
    ds.to_dataframe().to_csv(path, index=False)
    run = tmp_path / "run"
    assert main(["fit", str(path), "--model", "1cmt_oral", "--error", "combined", "--residual", "vae",
                 "--vae-residual", residual, "--epochs", "60", "--out", str(run), "--quiet", "--no-covariance",
                 "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "hybrid" in out
    s = json.loads((run / "summary.json").read_text())
    assert s["residual"]["kind"] == "vae" and s["residual"]["latent_dim"] == 2
    assert json.loads((run / "vae.json").read_text())["residual"] == ("input" if residual == "auto" else residual)
    assert torch.load(run / "vae.pt", weights_only=True)["state"]
    new, _ = simulate_ehc_population(4, seed=99)
    df = new.to_dataframe()
    extra = pd.DataFrame({"ID": [1, 2], "TIME": [30.0, 30.0], "DV": 0.0, "AMT": 0.0, "EVID": 2, "MDV": 1, "CMT": 2})
    df = pd.concat([df, extra]).sort_values(["ID", "TIME"], kind="stable")
    df.to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", str(run), str(tmp_path / "new.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    p = pd.read_csv(tmp_path / "p.csv")
    assert len(p) == len(df) and {"IPRED", "IPRED_ODE", "IPRED_HYBRID", "HYBRID_WEIGHT", "Z1", "Z2"} <= set(p.columns)
    assert (p.IPRED >= 0).all() and (p[p.TIME == 0].IPRED == 0).all()
    # the dosing functions say that they use the run's ODE part only
    from hybridpk.dosing import estimate_patient, load_prior

    prior = load_prior(run)
    _, _, _, warns = estimate_patient(prior, new.subset([1]), n_samples=200)
    assert any("VAE residual is not used" in w for w in warns)


@pytest.mark.parametrize("residual", ["input", "reservoir", "log"])
def test_saved_joint_run_predicts_what_the_fitted_model_does(ehc_small, tmp_path, residual):
    ds, _, pm, fit = ehc_small
    from hybridpk.dosing.prior import prior_from_fit
    from hybridpk.residual import hybrid_predict, load_hybrid

    hyb = fit_hybrid(pm, ds, population=fit, config=TrainConfig(epochs=30, warmup_epochs=5, progress=False,
                                                                residual=residual),
                     seed=4, progress=False)
    hyb.save(tmp_path / "run")
    prior, vae = load_hybrid(tmp_path / "run")
    assert vae.joint and vae.log_shift.numel() == 3 and vae.l2_residual == TrainConfig.l2_residual
    assert vae.residual == hyb.vae.residual == residual
    torch.testing.assert_close(vae.log_shift, hyb.vae.log_shift)
    new, _ = simulate_ehc_population(5, seed=42)
    torch.testing.assert_close(vae.mix_logit, hyb.vae.mix_logit)
    # same prior for both: the saved network must reproduce the in-memory one exactly
    a = hybrid_predict(prior, hyb.vae.eval(), new)
    b = hybrid_predict(prior, vae, new)
    torch.testing.assert_close(a["ipred"], b["ipred"], rtol=0, atol=0)
    torch.testing.assert_close(a["estimate"].z, b["estimate"].z, rtol=0, atol=0)
    # the prior read back from the run (JSON round trip of THETA, OMEGA, SIGMA) gives the same predictions up
    # to the refinement's convergence
    c = hybrid_predict(prior_from_fit(fit, pm), hyb.vae, new)
    torch.testing.assert_close(c["ipred"], b["ipred"], rtol=1e-5, atol=1e-8)
    if residual != "log":
        return
    # a run saved before joint training existed (no log_shift, no joint flag, log residual) still loads, as a
    # staged model
    old = tmp_path / "run"
    ck = torch.load(old / "vae.pt", weights_only=True)
    ck["state"].pop("log_shift")
    torch.save(ck, old / "vae.pt")
    meta = json.loads((old / "vae.json").read_text())
    for key in ("joint", "n_shift", "l2_residual", "residual"):
        meta.pop(key)
    (old / "vae.json").write_text(json.dumps(meta))
    _, staged = load_hybrid(old)
    assert not staged.joint and staged.log_shift.numel() == 0


def test_latent_dimension_from_the_config_or_the_argument(ehc_small):
    ds, _, pm, fit = ehc_small
    cfg = TrainConfig(epochs=5, warmup_epochs=2, min_epochs=5, latent_dim=3, progress=False)
    assert fit_hybrid(pm, ds, population=fit, config=cfg, progress=False).vae.latent_dim == 3
    assert fit_hybrid(pm, ds, population=fit, config=cfg, latent_dim=1, progress=False).vae.latent_dim == 1


def test_mixture_training_learns_from_the_patients_the_ode_cannot_describe(ehc_small):
    """Mixture objective: -log((1 - pi) exp(-ODE objective) + pi exp(-hybrid -ELBO)) with pi = sigmoid(-K);
    checked against its definition, and a mixture fit runs end to end."""
    ds, _, pm, fit = ehc_small
    from hybridpk.dosing.prior import prior_from_fit
    from hybridpk.residual import ODEBaseline
    from hybridpk.residual.hybrid import _baseline
    from hybridpk.residual.vae import _neg_elbo, ode_only_objective

    prior = prior_from_fit(fit, pm)
    est, batch, ipred = _baseline(prior, ds)
    hyb = fit_hybrid(pm, ds, population=fit, seed=2, progress=False,
                     config=TrainConfig(epochs=20, warmup_epochs=5, min_epochs=20, mixture=True, progress=False))
    vae, base = hyb.vae, ODEBaseline(prior)
    assert float(vae.mix_logit) == -2.0 and hyb.individual.HYBRID_WEIGHT.between(0, 1).all()
    o = ode_only_objective(batch, ipred, batch.is_obs, pm.error, prior.sd, base, est.eta)
    plain = _neg_elbo(vae, batch, ipred, batch.is_obs, pm.error, prior.sd, 0.3, 0.3, None, base, est.eta)[0]
    mixed = _neg_elbo(vae, batch, ipred, batch.is_obs, pm.error, prior.sd, 0.3, 0.3, None, base, est.eta, o)[0]
    pi = 1 / (1 + np.exp(2.0))
    expected = -np.log((1 - pi) * np.exp(-o.detach().numpy()) + pi * np.exp(-plain.detach().numpy()))
    np.testing.assert_allclose(mixed.detach().numpy(), expected, rtol=1e-10)
