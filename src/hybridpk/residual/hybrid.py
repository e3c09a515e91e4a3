"""Hybrid fit: population ODE fit first, then the VAE residual (trained jointly with each patient's ETAs by
default, or staged on the ODE-only ones); per-patient latent outputs and complexity; saving and loading
runs; estimates and predictions for new patients."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import HybridPKError
from ..io import atomic_write_bytes, atomic_write_text
from .baseline import ODEBaseline
from .inference import estimate_hybrid, predict_with
from .vae import HybridVAE, TrainConfig, gaussian_nll, scale_from_tensors, scale_to_tensors, train_vae

__all__ = ["HybridFit", "fit_hybrid", "hybrid_predict", "load_hybrid", "predict_hybrid"]


@dataclass(frozen=True)
class HybridFit:
    """A population ODE fit plus its trained VAE residual. ``individual`` adds Z1..ZK (refined latent means),
    Z1_SD..ZK_SD (the encoder's SDs), NLL_ODE / NLL_HYBRID (-2 log-likelihood of the patient's data under
    the ODE-only fit and the hybrid), COMPLEXITY (NLL_ODE - NLL_HYBRID: how much the residual explains;
    near 0 or negative when the ODE suffices), HYBRID_WEIGHT (Akaike weight of the hybrid against ODE-only
    for this patient; log-residual predictions average the two with it) and RMSE_ODE / RMSE_HYBRID (mg/L, of the
    observations, for the ODE-only and the final prediction)."""

    population: object
    vae: HybridVAE = field(repr=False)
    config: TrainConfig = field(repr=False)
    history: list = field(repr=False)
    individual: pd.DataFrame = field(repr=False)
    latent_dim: int = 2
    candidates: dict = field(default_factory=dict)

    def summary(self) -> dict:
        ind = self.individual
        return {"latent_dim": self.latent_dim, "epochs_run": len(self.history),
                "validation_neg_elbo": float(getattr(self.vae, "best_val", float("nan"))),
                "latent_dim_candidates": self.candidates,
                "nll_ode_total": float(ind.NLL_ODE.sum()), "nll_hybrid_total": float(ind.NLL_HYBRID.sum()),
                "rmse_ode": float(np.sqrt((ind.RMSE_ODE ** 2).mean())),
                "rmse_hybrid": float(np.sqrt((ind.RMSE_HYBRID ** 2).mean())),
                "config": {k: v for k, v in asdict(self.config).items() if k != "history"}}

    def save(self, run_dir) -> Path:
        run = Path(run_dir)
        self.population.save(run)
        buf = io.BytesIO()
        torch.save({"state": self.vae.state_dict(), "scale": scale_to_tensors(self.vae.scale)}, buf)
        atomic_write_bytes(run / "vae.pt", buf.getvalue())
        meta = {"latent_dim": self.latent_dim, "hidden": self.config.hidden,
                "n_features": int(self.vae.encoder.phi[0].in_features - 2), "joint": self.vae.joint,
                "n_shift": int(self.vae.log_shift.numel()), "l2_residual": self.config.l2_residual,
                "prior_weight": self.vae.prior_weight,
                "residual": self.vae.residual}
        atomic_write_text(run / "vae.json", json.dumps(meta, indent=2))
        atomic_write_text(run / "individual.csv", self.individual.to_csv(index=False))
        summary = json.loads((run / "summary.json").read_text())
        summary["residual"] = {"kind": "vae", **self.summary()}
        atomic_write_text(run / "summary.json", json.dumps(summary, indent=2, default=float))
        return run


def _baseline(prior, dataset):
    """Individual ODE predictions at every record with MAP ETAs under the population prior."""
    from ..dosing.posterior import map_estimate
    from ..solve import simulate

    est = map_estimate(prior, dataset)
    b = est.problem.batch
    with torch.no_grad():
        p = prior.pm.individual(prior.theta, est.eta, est.problem.cov)
        ipred = simulate(prior.pm.structural, p, b).ipred
    return est, b, ipred


def hybrid_predict(prior, vae, dataset, design=None, refine: bool = True, ode_fit=None):
    """Estimates for the patients of ``dataset`` from their own observations (ODE-only MAP ETAs, then the
    encoder's z refined to the joint MAP of z and, for joint models, the ETAs), and predictions at every
    record of ``design`` (default: ``dataset`` itself; e.g. ``dataset.prediction_design(times)``; same
    patients in the same order). Returns a dict: ``estimate`` (HybridEstimate), ``batch`` (of ``design``),
    ``ipred`` (final: the hybrid, or for the log residual its Akaike-weighted average with ODE-only), ``hybrid`` (the hybrid alone), ``ode`` (ODE-only),
    ``ode_map`` (the ODE-only MAPEstimate), each prediction (N, R) in mg/L. ``ode_fit``: the result of
    ``_baseline(prior, dataset)`` when the caller has it already (skips the ODE-only MAP)."""
    est, batch, ipred0 = ode_fit or _baseline(prior, dataset)
    base = ODEBaseline(prior)
    h = estimate_hybrid(vae, batch, ipred0, est.eta, prior.pm.error, prior.sd, baseline=base,
                        l2=vae.l2_residual, refine=refine)
    if design is not None:
        batch = design.to_batch(covariates=list(prior.pm.covariates))
        if list(design.ids) != list(dataset.ids):
            raise HybridPKError("the prediction design must hold the same patients, in the same order, as the data")
    pred, hyb, ode = predict_with(vae, h, batch, base)
    return {"estimate": h, "batch": batch, "ipred": pred, "hybrid": hyb, "ode": ode, "ode_map": est}


def _per_patient(prior, vae, dataset, ode_fit):
    out = hybrid_predict(prior, vae, dataset, ode_fit=ode_fit)
    batch, h = out["batch"], out["estimate"]
    obs = batch.is_obs

    def nll(pred):   # -2 log-likelihood
        return 2 * gaussian_nll(batch, pred, obs, prior.pm.error, prior.sd)

    def rmse(pred):
        n = obs.sum(1).clamp(min=1)
        return torch.sqrt(torch.where(obs, (batch.dv - pred) ** 2, torch.zeros_like(pred)).sum(1) / n)

    return h, nll(out["ode"]), nll(out["hybrid"]), rmse(out["ode"]), rmse(out["ipred"])


def fit_hybrid(pm, dataset, *, latent_dim=None, config: TrainConfig | None = None, seed: int = 0,
               progress: bool = True, population=None) -> HybridFit:
    """Fit the population ODE model (FOCE-I), then the VAE residual on its individual predictions.

    ``latent_dim`` an int, or "auto": 1, 2 and 4 are trained and the best held-out ELBO wins; None: the
    config's (default 2).
    ``population`` an existing FitResult of ``pm`` on ``dataset`` (skips the ODE fit).
    """
    from ..dosing.prior import prior_from_fit
    from ..population import fit_population

    fit = population or fit_population(pm, dataset, seed=seed, progress=progress)
    prior = prior_from_fit(fit, pm)
    est, batch, ipred = _baseline(prior, dataset)
    base = config or TrainConfig()
    dims = [1, 2, 4] if latent_dim == "auto" else [int(base.latent_dim if latent_dim is None else latent_dim)]
    best, cands = None, {}
    for k in dims:
        cfg = TrainConfig(**{**asdict(base), "latent_dim": k, "seed": seed, "progress": progress, "history": []})
        model, hist = train_vae(batch, ipred, pm.error, prior.sd, cfg,
                                baseline=ODEBaseline(prior) if cfg.joint else None,
                                eta0=est.eta if cfg.joint else None)
        cands[str(k)] = float(model.best_val)
        if best is None or model.best_val < best[0].best_val:
            best = (model, hist, cfg)
    model, hist, cfg = best
    h, nll_o, nll_h, rm_o, rm_h = _per_patient(prior, model, dataset, (est, batch, ipred))
    ind = fit.individual.copy()
    for j in range(model.latent_dim):
        ind[f"Z{j + 1}"] = h.z[:, j].numpy()
    for j in range(model.latent_dim):
        ind[f"Z{j + 1}_SD"] = h.z_sd[:, j].numpy()
    ind["NLL_ODE"], ind["NLL_HYBRID"] = nll_o.numpy(), nll_h.numpy()
    ind["COMPLEXITY"] = (nll_o - nll_h).numpy()
    ind["HYBRID_WEIGHT"] = h.weight.numpy()
    ind["RMSE_ODE"], ind["RMSE_HYBRID"] = rm_o.numpy(), rm_h.numpy()
    return HybridFit(population=fit, vae=model, config=cfg, history=hist, individual=ind,
                     latent_dim=model.latent_dim, candidates=cands if len(dims) > 1 else {})


def load_hybrid(run_dir):
    """(Prior, HybridVAE) from a run folder; the weights load with ``torch.load(weights_only=True)``."""
    from ..dosing.prior import load_prior

    run = Path(run_dir)
    if not (run / "vae.pt").is_file():
        raise HybridPKError(f"{run} holds no VAE residual (vae.pt); fit with --residual vae")
    prior = load_prior(run)
    meta = json.loads((run / "vae.json").read_text())
    ck = torch.load(run / "vae.pt", weights_only=True, map_location="cpu")
    vae = HybridVAE(meta["n_features"], meta["latent_dim"], meta["hidden"], meta.get("joint", False),
                    meta.get("n_shift", 0), meta.get("residual", "log")).double()
    state = dict(ck["state"])
    state.setdefault("log_shift", torch.zeros(0, dtype=torch.float64))   # runs saved before joint training
    state.setdefault("mix_logit", torch.tensor(-float(meta["latent_dim"]), dtype=torch.float64))
    vae.load_state_dict(state)
    vae.scale = scale_from_tensors(ck["scale"])
    vae.l2_residual = meta.get("l2_residual", 0.0)
    vae.prior_weight = meta.get("prior_weight", 1.0)   # runs saved before it was recorded used the full prior
    vae.eval()
    return prior, vae


def predict_hybrid(run_dir, dataset) -> pd.DataFrame:
    """ID, TIME, DV, MDV, PRED, IPRED_ODE, IPRED_HYBRID, IPRED, HYBRID_WEIGHT and Z1..ZK for every record of
    ``dataset``: new patients are encoded from their own observations (records with EVID=2 get predictions
    only). IPRED is the final prediction: IPRED_HYBRID, or for the log residual the Akaike-weighted average
    of the hybrid and the ODE-only predictions (mg/L)."""
    prior, vae = load_hybrid(run_dir)
    out = hybrid_predict(prior, vae, dataset)
    est, batch, h = out["ode_map"], out["batch"], out["estimate"]
    with torch.no_grad():
        pred = est.problem.predict(prior.theta, torch.zeros_like(est.eta))
    df = dataset.to_dataframe()
    table = pd.DataFrame({"ID": df.ID.to_numpy(), "TIME": df.TIME.to_numpy(), "DV": df.DV.to_numpy(),
                          "MDV": df.MDV.to_numpy(), "PRED": batch.to_rows(pred), "IPRED_ODE": batch.to_rows(out["ode"]),
                          "IPRED_HYBRID": batch.to_rows(out["hybrid"]), "IPRED": batch.to_rows(out["ipred"])})
    idx = batch.subject_of_rows()
    table["HYBRID_WEIGHT"] = h.weight[idx].numpy()
    for j in range(h.z.shape[1]):
        table[f"Z{j + 1}"] = h.z[idx, j].numpy()
    return table
