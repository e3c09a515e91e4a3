"""Staged hybrid fit: population ODE fit first, then the VAE residual on its individual predictions;
per-patient latent outputs and complexity; saving and loading runs; predictions for new patients."""

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
from .vae import HybridVAE, TrainConfig, scale_from_tensors, scale_to_tensors, train_vae

__all__ = ["HybridFit", "fit_hybrid", "load_hybrid", "predict_hybrid"]


@dataclass(frozen=True)
class HybridFit:
    """A population ODE fit plus its trained VAE residual. ``individual`` adds Z1..ZK, Z1_SD..ZK_SD,
    NLL_ODE / NLL_HYBRID (-2 log-likelihood of the patient's data), COMPLEXITY (NLL_ODE - NLL_HYBRID: how
    much the residual explains; near 0 or negative when the ODE suffices) and RMSE_ODE / RMSE_HYBRID."""

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
                "n_features": int(self.vae.encoder.phi[0].in_features - 2)}
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


def _per_patient(vae, batch, ipred, error_model, sd):
    with torch.no_grad():
        mu, logvar = vae.encode(batch, ipred, batch.is_obs)
        hyb, _ = vae.predict(batch, ipred, mu)
    obs = batch.is_obs

    def nll(pred):
        v = error_model.variance(pred, sd)
        v = torch.where(obs, v, torch.ones_like(v))
        return torch.where(obs, (batch.dv - pred) ** 2 / v + torch.log(v), torch.zeros_like(v)).sum(1)

    def rmse(pred):
        n = obs.sum(1).clamp(min=1)
        return torch.sqrt(torch.where(obs, (batch.dv - pred) ** 2, torch.zeros_like(pred)).sum(1) / n)

    return mu, logvar, hyb, nll(ipred), nll(hyb), rmse(ipred), rmse(hyb)


def fit_hybrid(pm, dataset, *, latent_dim=2, config: TrainConfig | None = None, seed: int = 0,
               progress: bool = True, population=None) -> HybridFit:
    """Fit the population ODE model (FOCE-I), then the VAE residual on its individual predictions.

    ``latent_dim`` an int, or "auto": 1, 2 and 4 are trained and the best held-out ELBO wins.
    ``population`` an existing FitResult of ``pm`` on ``dataset`` (skips the ODE fit).
    """
    from ..dosing.prior import prior_from_fit
    from ..population import fit_population

    fit = population or fit_population(pm, dataset, seed=seed, progress=progress)
    prior = prior_from_fit(fit, pm)
    _, batch, ipred = _baseline(prior, dataset)
    base = config or TrainConfig()
    dims = [1, 2, 4] if latent_dim == "auto" else [int(latent_dim)]
    best, cands = None, {}
    for k in dims:
        cfg = TrainConfig(**{**asdict(base), "latent_dim": k, "seed": seed, "progress": progress, "history": []})
        model, hist = train_vae(batch, ipred, pm.error, prior.sd, cfg)
        cands[str(k)] = float(model.best_val)
        if best is None or model.best_val < best[0].best_val:
            best = (model, hist, cfg)
    model, hist, cfg = best
    mu, logvar, hyb, nll_o, nll_h, rm_o, rm_h = _per_patient(model, batch, ipred, pm.error, prior.sd)
    ind = fit.individual.copy()
    for j in range(model.latent_dim):
        ind[f"Z{j + 1}"] = mu[:, j].numpy()
    for j in range(model.latent_dim):
        ind[f"Z{j + 1}_SD"] = torch.exp(0.5 * logvar[:, j]).numpy()
    ind["NLL_ODE"], ind["NLL_HYBRID"] = nll_o.numpy(), nll_h.numpy()
    ind["COMPLEXITY"] = (nll_o - nll_h).numpy()
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
    vae = HybridVAE(meta["n_features"], meta["latent_dim"], meta["hidden"]).double()
    vae.load_state_dict(ck["state"])
    vae.scale = scale_from_tensors(ck["scale"])
    vae.eval()
    return prior, vae


def predict_hybrid(run_dir, dataset) -> pd.DataFrame:
    """ID, TIME, DV, MDV, PRED, IPRED_ODE, IPRED (hybrid) and Z1..ZK for every record of ``dataset``: new
    patients are encoded from their own observations (records with EVID=2 get predictions only)."""
    prior, vae = load_hybrid(run_dir)
    est, batch, ipred = _baseline(prior, dataset)
    with torch.no_grad():
        mu, _ = vae.encode(batch, ipred, batch.is_obs)
        hyb, _ = vae.predict(batch, ipred, mu)
        pred = est.problem.predict(prior.theta, torch.zeros_like(est.eta))
    m = batch.record_mask
    order = batch.row[m].numpy().argsort()
    df = dataset.to_dataframe()
    out = pd.DataFrame({"ID": df.ID.to_numpy(), "TIME": df.TIME.to_numpy(), "DV": df.DV.to_numpy(),
                        "MDV": df.MDV.to_numpy(), "PRED": pred[m].numpy()[order],
                        "IPRED_ODE": ipred[m].numpy()[order], "IPRED": hyb[m].numpy()[order]})
    pos = {sid: i for i, sid in enumerate(dataset.ids)}
    idx = [pos[s] for s in out.ID]
    for j in range(mu.shape[1]):
        out[f"Z{j + 1}"] = mu[idx, j].numpy()
    return out
