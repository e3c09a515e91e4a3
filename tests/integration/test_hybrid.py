"""Hybrid model (ODE baseline + VAE correction): reproducibility, checkpoints, CLI, and the EHC example."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from hybridpk.cli import main
from hybridpk.errors import HybridPKError
from hybridpk.residual import HybridFit, ODEBaseline, TrainConfig, estimate_hybrid, fit_hybrid, load_run, train_vae
from hybridpk.residual.hybrid import _ode_only
from hybridpk.solve.examples import simulate_ehc_population
from tests.integration.ehc import fitted_ehc_population


@pytest.fixture(scope="module")
def ehc_small():
    return fitted_ehc_population(80, seed=3)


def test_same_seed_same_result(ehc_small):
    ds, _, pm, fit = ehc_small
    cfg = TrainConfig(epochs=40, warmup_epochs=10, screen_epochs=15, progress=False)    # form selection included
    a = fit_hybrid(pm, ds, population=fit, config=cfg, seed=5, progress=False)
    b = fit_hybrid(pm, ds, population=fit, config=cfg, seed=5, progress=False)
    for (k, v), (_, w) in zip(a.vae.state_dict().items(), b.vae.state_dict().items()):
        assert torch.equal(v, w), k
    pd.testing.assert_frame_equal(a.individual, b.individual)
    c = fit_hybrid(pm, ds, population=fit, config=cfg, seed=6, progress=False)
    assert not a.individual.Z1.equals(c.individual.Z1)


def test_checkpoint_is_tensors_only_and_training_resumes(ehc_small, tmp_path):
    ds, _, pm, fit = ehc_small
    _, batch, ipred = _ode_only(fit, ds)
    sd = fit.sigma.sd_tensors()
    ck = tmp_path / "vae.ckpt"
    cfg = TrainConfig(epochs=41, warmup_epochs=5, progress=False, checkpoint=str(ck))
    _, first = train_vae(batch, ipred, pm.error, sd, cfg)
    saved = torch.load(ck, weights_only=True)             # no pickled code
    assert int(saved["epoch"]) == 40
    cfg2 = TrainConfig(epochs=60, warmup_epochs=5, progress=False, checkpoint=str(ck))
    _, hist = train_vae(batch, ipred, pm.error, sd, cfg2)
    # resumed after the saved epoch: the history is the whole training's, its first 41 epochs the saved ones
    assert [h[0] for h in hist] == list(range(len(hist))) and 41 < len(hist) <= 60
    assert hist[:41] == first


def test_joint_training_with_an_omega_at_its_boundary(ehc_small):
    # nlme's Indometh (6 subjects, 2-cmt IV) fits ETA variances of 1e-10 and 1e-15. Adam moved the joint ETAs by
    # about its learning rate per step whatever their variance, so such an ETA's prior term reached 1e9 within
    # ten epochs; whitened (u = ETA on the prior's scale) they move in steps of their own size.
    from dataclasses import replace

    from hybridpk.residual.omega import with_omega

    ds, _, pm, fit = ehc_small
    omega = fit.omega.tensor().clone()
    omega[1, 1] = 1e-15
    tiny = replace(with_omega(fit, omega), estimation=None)      # the ODE-only EBEs under that OMEGA
    est, batch, ipred = _ode_only(tiny, ds)
    base = ODEBaseline(tiny)
    cfg = TrainConfig(epochs=10, warmup_epochs=5, progress=False, joint=True, form="log")
    _, hist = train_vae(batch, ipred, pm.error, tiny.sigma.sd_tensors(), cfg, baseline=base, eta0=est.eta)
    train = [h[1] for h in hist]
    assert max(train) < train[0] + 5.0, train            # -ELBO per patient never jumps


def test_joint_checkpoint_resumes_with_the_etas(ehc_small, tmp_path):
    ds, _, pm, fit = ehc_small
    est, batch, ipred = _ode_only(fit, ds)
    sd = fit.sigma.sd_tensors()
    ck = tmp_path / "vae.ckpt"
    base = ODEBaseline(fit)
    cfg = TrainConfig(epochs=21, warmup_epochs=5, progress=False, checkpoint=str(ck), joint=True)
    model, _ = train_vae(batch, ipred, pm.error, sd, cfg, baseline=base, eta0=est.eta)
    saved = torch.load(ck, weights_only=True)
    # the split train_vae makes (seeded): the saved ETAs started at the ODE-only MAP and have moved
    perm = torch.randperm(ds.n_subjects, generator=torch.Generator().manual_seed(cfg.seed))
    n_val = len(saved["u_val"])
    assert saved["u_train"].shape == (ds.n_subjects - n_val, 3)
    # the checkpoint holds them whitened (u ~ N(0, I) under OMEGA)
    eta_train, eta_val = base.unwhiten(saved["u_train"]), base.unwhiten(saved["u_val"])
    for got, start in ((eta_train, est.eta[perm[n_val:]]), (eta_val, est.eta[perm[:n_val]])):
        moved = (got - start).abs().max(1).values
        assert float(moved.max()) > 1e-3 and float(moved.max()) < 1.0
    assert model.log_shift.shape == (3,)
    cfg2 = TrainConfig(epochs=30, warmup_epochs=5, progress=False, checkpoint=str(ck), joint=True)
    _, hist = train_vae(batch, ipred, pm.error, sd, cfg2, baseline=base, eta0=est.eta)
    assert [h[0] for h in hist] == list(range(30))        # epochs 21-29 run after the saved ones
    with pytest.raises(ValueError, match="eta0"):
        train_vae(batch, ipred, pm.error, sd, cfg2, baseline=base)


def test_zero_correction_gives_back_the_ode_only_map(ehc_small):
    """With a decoder that outputs 0 the hybrid is the ODE model: refining (z, ETAs) jointly must return the
    ODE-only MAP ETAs and z = 0 (an independent check of the refinement), and the prediction the ODE one."""
    ds, _, pm, fit = ehc_small
    from hybridpk.residual import HybridVAE
    from hybridpk.residual.features import fit_scale, record_features

    _, batch, ipred = _ode_only(fit, ds)
    scale = fit_scale(batch, ipred, 6)
    x, _ = record_features(batch, ipred, scale)
    vae = HybridVAE(x.shape[-1], 2, 16, joint=True, n_shift=3).double()
    vae.scale = scale
    with torch.no_grad():
        vae.encoder.rho[-1].bias.fill_(0.3)          # a deliberately wrong starting z
    out = HybridFit(population=fit, vae=vae, config=TrainConfig(), individual=pd.DataFrame()).predict(ds)
    h = out.estimates
    assert float(h.z.abs().max()) < 1e-5
    assert float((h.eta - h.eta_ode).abs().max()) < 1e-5
    torch.testing.assert_close(out.hybrid, out.ode, rtol=1e-6, atol=1e-9)
    assert bool((h.weight < 0.5).all())             # no gain in fit, two more parameters: ODE-only preferred


def test_refinement_never_worsens_a_patient(ehc_small):
    ds, _, pm, fit = ehc_small
    est, batch, ipred = _ode_only(fit, ds)
    hyb = fit_hybrid(pm, ds, population=fit, config=TrainConfig(epochs=60, warmup_epochs=10, progress=False,
                                                                form="input"), seed=1, progress=False)
    kw = dict(baseline=ODEBaseline(fit), l2=0.3)
    sd = fit.sigma.sd_tensors()
    a = estimate_hybrid(hyb.vae, batch, ipred, est.eta, pm.error, sd, refine=False, **kw)
    b = estimate_hybrid(hyb.vae, batch, ipred, est.eta, pm.error, sd, refine=True, **kw)
    assert bool((b.objective <= a.objective + 1e-9).all())
    assert float((a.objective - b.objective).sum()) > 0.1


def test_complexity_and_latent_outputs_are_reported(ehc_small):
    ds, truth, pm, fit = ehc_small
    hyb = fit_hybrid(pm, ds, population=fit, config=TrainConfig(epochs=60, warmup_epochs=10, form="input"), seed=0,
                     progress=False)
    ind = hyb.individual
    assert {"Z1", "Z2", "Z1_SD", "Z2_SD", "COMPLEXITY", "NLL_ODE", "NLL_HYBRID", "RMSE_ODE", "RMSE_HYBRID",
            "HYBRID_WEIGHT"} <= set(ind.columns)
    np.testing.assert_allclose(ind.COMPLEXITY, ind.NLL_ODE - ind.NLL_HYBRID)
    assert (ind.Z1_SD > 0).all() and ind.HYBRID_WEIGHT.between(0, 1).all()


@pytest.mark.parametrize("form", ["auto", "reservoir"])
def test_cli_fit_vae_and_predict_new_patients(tmp_path, capsys, form):
    ds, truth = simulate_ehc_population(60, seed=11)
    path = tmp_path / "ehc.csv"
    ds.to_dataframe().to_csv(path, index=False)
    run = tmp_path / "run"
    assert main(["fit", str(path), "--model", "1cmt_oral", "--error", "combined", "--hybrid", "vae",
                 "--hybrid-form", form, "--epochs", "60", "--out", str(run), "--quiet", "--no-covariance",
                 "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "hybrid" in out
    s = json.loads((run / "summary.json").read_text())
    assert s["hybrid"]["kind"] == "vae" and s["hybrid"]["latent_dim"] == 2
    chosen = [c["form"] for c in s["hybrid"]["candidates"] if c["chosen"]] if form == "auto" else [form]
    assert len(chosen) == 1 and json.loads((run / "vae.json").read_text())["form"] == chosen[0]
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
    # the dosing functions use the hybrid: the patient's posterior is over the ETAs and z
    from hybridpk.dosing import estimate_patient

    post = estimate_patient(run, new.subset([1]), n_samples=200)
    assert post.draws.shape == (200, 5) and post.model.point_names[-2:] == ("Z1", "Z2")
    assert not any("not used" in w for w in post.warnings)


def test_old_flag_names_are_refused_with_the_new_ones(capsys):
    assert main(["fit", "ehc", "--model", "1cmt_oral", "--residual", "vae", "--out", "x"]) == 2
    assert "--residual was renamed --hybrid" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["input", "reservoir", "elimination", "log"])
def test_saved_joint_run_predicts_what_the_fitted_model_does(ehc_small, tmp_path, form):
    ds, _, pm, fit = ehc_small
    from dataclasses import replace

    hyb = fit_hybrid(pm, ds, population=fit, config=TrainConfig(epochs=30, warmup_epochs=5, progress=False,
                                                                form=form),
                     seed=4, progress=False)
    hyb.save(tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    vae = loaded.vae
    assert isinstance(loaded, HybridFit)
    assert vae.joint and vae.log_shift.numel() == 3 and vae.l2 == TrainConfig.l2_correction
    assert vae.form_name == hyb.vae.form_name == form
    torch.testing.assert_close(vae.log_shift, hyb.vae.log_shift)
    new, _ = simulate_ehc_population(5, seed=42)
    assert vae.mix_logit == hyb.vae.mix_logit
    # same population model for both: the saved network must reproduce the in-memory one exactly
    a = replace(loaded, vae=hyb.vae.eval()).predict(new)
    b = loaded.predict(new)
    torch.testing.assert_close(a.ipred, b.ipred, rtol=0, atol=0)
    torch.testing.assert_close(a.estimates.z, b.estimates.z, rtol=0, atol=0)
    # the population model read back from the run (JSON round trip of THETA, OMEGA, SIGMA) gives the same
    # predictions up to the refinement's convergence
    c = hyb.predict(new)
    torch.testing.assert_close(c.ipred, b.ipred, rtol=1e-5, atol=1e-8)
    pd.testing.assert_frame_equal(loaded.individual, hyb.individual, check_dtype=False)
    # simulation from the generative model (ETAs from OMEGA, z from N(0, I)): seeded, non-negative
    sim = loaded.simulate(new, n=2, seed=7)
    pd.testing.assert_frame_equal(sim, hyb.simulate(new, n=2, seed=7))
    assert {"REP", "IPRED", "DV", "Z1", "Z2", "ETA_CL"} <= set(sim.columns) and (sim.IPRED >= 0).all()
    assert len(sim) == 2 * len(new) and not sim.DV.equals(loaded.simulate(new, n=2, seed=8).DV)
    # a run of an older format is refused with what to do, not misread
    meta = json.loads((tmp_path / "run" / "vae.json").read_text())
    (tmp_path / "run" / "vae.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(HybridPKError, match="refit"):
        load_run(tmp_path / "run")


def test_latent_dimension_from_the_config_or_the_argument(ehc_small):
    ds, _, pm, fit = ehc_small
    cfg = TrainConfig(epochs=5, warmup_epochs=2, min_epochs=5, latent_dim=3, progress=False)
    assert fit_hybrid(pm, ds, population=fit, config=cfg, progress=False).vae.latent_dim == 3
    assert fit_hybrid(pm, ds, population=fit, config=cfg, latent_dim=1, progress=False).vae.latent_dim == 1
