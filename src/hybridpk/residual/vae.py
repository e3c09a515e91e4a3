"""The hybrid model: ODE baseline (individual predictions of a population fit) plus a latent-conditioned
residual: a learnt input rate into the dose compartment carried by the linear structural model ("input"),
a hidden reservoir compartment that takes up drug from the central compartment and releases it into the
dose compartment on a learnt schedule ("reservoir", e.g. enterohepatic recirculation), or a factor
exp(r(t)) on the prediction ("log").

Training maximises the ELBO: the residual-error likelihood of the population model evaluated at the hybrid
prediction, minus beta * KL(q(z | patient) || N(0, I)) with beta warmed up from 0, minus an L2 penalty on
the residual that keeps it at zero where the ODE already fits. In joint mode (the default of the hybrid fit)
every patient's ETAs are free parameters too, starting at the ODE-only MAP, with their OMEGA prior term
-log p(ETA) in the objective, and log-shifts of the typical values are learnt with the networks. Minibatches of patients, gradient
clipping, NaN guard, early stopping on held-out patients, seeded; checkpoints are written atomically as
tensors only (loaded with ``torch.load(weights_only=True)``) and training resumes from them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_write_bytes
from ..solve.closed_form import concentration, input_response
from .features import fit_scale, input_features, input_grid, record_features
from .networks import ResidualDecoder, SetEncoder, mlp

__all__ = ["HybridVAE", "TrainConfig", "train_vae"]

#: how the residual enters: "log" IPRED exp(r(t)); "input" a signed input rate into the dose compartment;
#: "reservoir" a hidden compartment filled from the central one and emptied into the dose compartment
RESIDUALS = ("log", "input", "reservoir")


class _Drained:
    """A linear structural model with extra first-order elimination ``k_in`` (N,) 1/h from the central
    compartment (the reservoir's uptake), for the closed form."""

    def __init__(self, model, k_in):
        self._model, self._k_in = model, k_in

    def mammillary(self, p):
        v, k10, pairs, ka = self._model.mammillary(p)
        return v, k10 + self._k_in, pairs, ka

    def __getattr__(self, name):
        return getattr(self._model, name)


class HybridVAE(nn.Module):
    """Encoder q(z | patient) plus the residual decoder. ``joint``: trained with each patient's ETAs
    re-estimated together with z (the ODE baseline is then recomputed from those ETAs at prediction)."""

    def __init__(self, n_features: int, latent_dim: int, hidden: int = 64, joint: bool = False, n_shift: int = 0,
                 residual: str = "log"):
        super().__init__()
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {', '.join(RESIDUALS)}, not {residual!r}")
        if residual != "log" and not joint:
            raise ValueError(f"the {residual} residual needs joint training (it is propagated with the patient's "
                             "ETAs)")
        self.latent_dim, self.joint, self.residual = latent_dim, bool(joint), residual
        #: predictions average hybrid and ODE-only with the Akaike weight (log residual: it fits noise where
        #: the ODE suffices) or are the hybrid alone (input, reservoir: held-out patients the ODE describes
        #: get a near-zero residual under the latent prior; with the input residual averaging measured worse on
        #: every patient group)
        self.average = residual == "log"
        #: joint training also moves the baseline's typical values: log-scale shifts of its structural parameters
        self.log_shift = nn.Parameter(torch.zeros(n_shift if joint else 0))
        #: log prior odds of "needs the residual" against "ODE-only" for a patient: -latent_dim, the Akaike
        #: penalty of the latents (fixed: learnt, it drifts towards the hybrid, whose training patients'
        #: fits profit from their own free ETAs and z)
        self.register_buffer("mix_logit", torch.tensor(-float(latent_dim)))
        self.encoder = SetEncoder(n_features, latent_dim, hidden)
        self.l2_residual = 0.0   # set by training: the refinement reuses its penalty ...
        self.prior_weight = 1.0  # ... and its weight of the latent prior (beta)
        if residual == "log":
            self.decoder = ResidualDecoder(n_features, latent_dim, hidden)
        elif residual == "input":   # a rate into the dose compartment, on a time grid: no log-IPRED feature
            self.decoder = ResidualDecoder(n_features - 1, latent_dim, hidden)
        else:   # reservoir: the release schedule is the population's (dosing history, covariates) ...
            self.decoder = ResidualDecoder(n_features - 1, 0, hidden)
            # ... and z sets the uptake: log of its rate relative to the patient's k10 (a small MLP, so that
            # the latent prior can cover patients without uptake as well as those with)
            self.uptake = mlp(latent_dim, 16, 1, layers=1)
            nn.init.zeros_(self.uptake[-1].weight)
            nn.init.zeros_(self.uptake[-1].bias)
        self.scale = {}

    def features(self, batch, ipred):
        return record_features(batch, ipred, self.scale)

    def encode(self, batch, ipred, mask):
        """(mu, log sigma^2) of z (N, K) from the observations in ``mask``, read against the ODE-only
        individual prediction ``ipred``."""
        x, _ = self.features(batch, ipred)
        c0 = self.scale["c0"]
        resid = torch.where(mask, torch.log(batch.dv.clamp(min=0) + c0) - torch.log(ipred.clamp(min=0) + c0),
                            torch.zeros_like(ipred))
        return self.encoder(x, resid, mask)

    def predict(self, batch, ipred, z, params=None, structural=None):
        """Hybrid concentration (N, R) and the residual r (N, R) in log space.

        residual "log": IPRED * exp(r(t)). residual "input": IPRED plus the response of the structural
        model (its individual ``params``) to a learnt input rate into the dose compartment,
        u(t) = (last dose) * g(z, t) / T (mg/h), constant on grid intervals of ``input_dt`` h: drug that
        re-enters (e.g. enterohepatic recirculation) or, negative, extra elimination; concentrations are
        clamped at 0. residual "reservoir": see ``_reservoir``. r = log(pred + c0) - log(IPRED + c0)."""
        if self.residual == "log":
            x, gate = self.features(batch, ipred)
            r = self.decoder(z, x) * gate
            return ipred * torch.exp(r), r
        if params is None or structural is None or not structural.linear:
            raise ValueError(f"the {self.residual} residual needs a linear structural model and its individual "
                             "parameters")
        dt = float(self.scale["input_dt"])
        starts = input_grid(batch, dt)                                                          # (N, G)
        x, amt, gate = input_features(batch, starts, dt, self.scale)
        if self.residual == "reservoir":
            pred = self._reservoir(batch, z, params, structural, starts, x, gate)
        else:
            rate = amt * self.decoder(z, x) * gate / self.scale["t"]                            # (N, G) mg/h
            resp = input_response(structural, params, batch.time, starts, dt)                  # (N, R, G)
            pred = (ipred + (resp * rate.unsqueeze(1)).sum(-1) * batch.record_mask).clamp(min=0.0)
        c0 = self.scale["c0"]
        return pred, torch.log(pred + c0) - torch.log(ipred.clamp(min=0) + c0)

    def _reservoir(self, batch, z, params, structural, starts, x, gate):
        """Concentration (N, R) of the structural model extended by a hidden reservoir compartment H: drug
        moves from the central compartment into it at k_in A_central (k_in = k10 exp(a(z) - 3) 1/h, set by
        the patient's z) and returns into the dose compartment at k_out(t) H (k_out >= 0 1/h, the population's
        release schedule, a function of the dosing history and covariates, constant on the grid intervals of
        ``input_dt`` h: e.g. a gallbladder emptying at meals). Mass is conserved and no amount goes negative.
        The release is a piecewise-constant input, exact through the structural model's closed form; the
        central amount that fills the reservoir is taken at each interval's midpoint (second order in the
        interval width), which makes the coupled system one lower-triangular (G, G) solve per patient.
        ``starts`` (N, G) h, ``x`` (N, G, F) and ``gate`` (N, G): the grid and its decoder features."""
        dt = float(self.scale["input_dt"])
        v, k10, _, _ = structural.mammillary(params)
        k_in = k10 * torch.exp(self.uptake(z).squeeze(-1) - 3.0)                            # (N,) 1/h
        g = starts.shape[1]
        # fraction released per interval, k_out dt, capped at 600 / G: exp(cumulative) stays finite
        cap = math.log(600.0 / g * self.scale["t"] / dt)
        kd = torch.exp(self.decoder(z[:, :0], x).clamp(max=cap)) * (dt / self.scale["t"]) * gate   # (N, G)
        keep = torch.exp(-kd)                                         # reservoir fraction kept over an interval
        # w_g = int_0^dt exp(-k_out s) ds
        w = torch.where(kd > 1e-9, -torch.expm1(-kd) / (kd / dt).clamp(min=1e-300), torch.full_like(kd, dt))
        cum = torch.cumsum(kd, 1)
        drained = _Drained(structural, k_in)
        # midpoints first, then the records (a midpoint on a dose time comes after the dose)
        times = torch.cat([starts + 0.5 * dt, batch.time], 1)
        keys = torch.cat([torch.full_like(starts, float(batch.time.shape[1] + 1)), batch.row.to(starts.dtype)], 1)
        conc = concentration(drained, params, batch, times, keys)                           # (N, G + R) mg/L
        c_mid, c_rec = conc[:, :g], conc[:, g:]
        r_rec = input_response(drained, params, batch.time, starts, dt)                     # (N, R, G)
        # at the midpoints the response depends only on the lag in intervals (Toeplitz; padding intervals sit
        # after the last record and reach no record)
        ar = torch.arange(g, device=kd.device)
        lag = ar.unsqueeze(1) - ar.unsqueeze(0)
        r_lag = input_response(drained, params, starts[:, :1] + (ar + 0.5) * dt, starts[:, :1], dt)[..., 0]
        r_mid = torch.where(lag >= 0, r_lag[:, lag.clamp(min=0)], torch.zeros_like(r_lag[:, lag]))  # (N, G, G)
        # reservoir at the start of interval g: H_g = k_in sum_{h<g} A_h w_h exp(-(cum_{g-1} - cum_h)); released
        # during g: (1 - keep_g) H_g + k_in A_g (dt - w_g), with A the central amount at the midpoints
        fill = w * torch.exp(cum)                                     # per unit k_in A_h, scaled by exp(cum_h)
        drain = (1 - keep) * torch.exp(kd - cum)                      # (1 - keep_g) exp(-cum_{g-1})
        x_mat = r_mid * drain.unsqueeze(1)
        later = torch.cat([x_mat.flip(-1).cumsum(-1).flip(-1)[..., 1:], torch.zeros_like(x_mat[..., :1])], -1)
        coupling = later * fill.unsqueeze(1) + r_mid * (dt - w).unsqueeze(1)                # (N, G, G)
        eye = torch.eye(g, dtype=kd.dtype, device=kd.device)
        # causal: the amount at a midpoint depends on releases up to it, so the system is lower triangular
        system = eye - (v * k_in / dt)[:, None, None] * coupling
        amount = torch.linalg.solve_triangular(system, (v.unsqueeze(1) * c_mid).unsqueeze(-1), upper=False)[..., 0]
        before = torch.cumsum(fill * amount, 1) - fill * amount
        rate = k_in.unsqueeze(1) * (drain * before + (dt - w) * amount) / dt                 # (N, G) mg/h
        return (c_rec + (r_rec * rate.unsqueeze(1)).sum(-1) * batch.record_mask).clamp(min=0.0)

    def predict_at(self, batch, z, baseline=None, eta=None, ipred=None):
        """``predict`` for a joint model at the patients' ETAs ``eta`` (the baseline's IPRED and individual
        parameters recomputed from them), else on the given ODE prediction ``ipred``."""
        if baseline is not None and self.joint:
            ipred, params = baseline.ipred_and_params(batch, eta, self.log_shift)
            return self.predict(batch, ipred, z, params, baseline.structural)
        return self.predict(batch, ipred, z)


@dataclass
class TrainConfig:
    latent_dim: int = 2
    hidden: int = 64
    epochs: int = 1500
    lr: float = 3e-3
    batch_size: int = 64
    warmup_epochs: int = 100
    beta: float = 0.3
    l2_residual: float = 0.3
    min_epochs: int = 1000      # no early stopping before (the residual is often found only after a plateau)
    val_fraction: float = 0.2
    patience: int = 300
    clip: float = 5.0
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    progress: bool = True
    fourier: int = 6            # Fourier features of time since dose / first dose (0: raw times only)
    joint: bool = True          # re-estimate each patient's ETAs (and the typical values) together with z
    mixture: bool = False       # each patient is ODE-only or hybrid (prior odds exp(-latent_dim)), see _neg_elbo
    # "input": a learnt input rate into the dose compartment, propagated by the (linear) structural model;
    # "reservoir": a hidden compartment filled from the central one (rate per patient, from z) and emptied
    # into the dose compartment on a learnt schedule; "log": IPRED exp(r(t));
    # "auto": input for linear structural models with joint training, else log
    residual: str = "auto"
    # input / reservoir residual: rates constant on this many intervals of the observed span (None: 96 for
    # the input residual; 48 for the reservoir, whose cost grows with their square)
    intervals: int | None = None
    history: list = field(default_factory=list)


def residual_penalty(r, mask, l2):
    """Per-patient L2 penalty (N,) on the residual r (N, R) at the observations in ``mask``."""
    return l2 * torch.where(mask, r * r, torch.zeros_like(r)).sum(1)


def gaussian_nll(batch, pred, mask, error_model, sd):
    """-log-likelihood (up to a constant) of the observations in ``mask`` under the residual-error model at
    the prediction ``pred`` (N, R), per patient (N,)."""
    v = torch.where(mask, error_model.variance(pred, sd), torch.ones_like(pred))
    return torch.where(mask, 0.5 * ((batch.dv - pred) ** 2 / v + torch.log(v)), torch.zeros_like(v)).sum(1)


def ode_only_objective(batch, ipred, mask, error_model, sd, baseline=None, eta=None):
    """-log p(y | ODE-only) per patient (N,) at the ODE-only prediction ``ipred`` (plus -log p(ETA) when the
    ETAs are given: joint mode), the alternative of the mixture objective."""
    out = gaussian_nll(batch, ipred, mask, error_model, sd)
    return out + baseline.eta_penalty(eta) if baseline is not None else out


def _neg_elbo(model, batch, ipred, mask, error_model, sd, beta, l2, gen=None, baseline=None, eta=None,
              ode_objective=None):
    """-ELBO per patient (N,) with its NLL and KL parts. With ``baseline`` (joint mode) the ODE prediction is
    recomputed at the patients' current ETAs ``eta`` (N, K), and -log p(ETA) is added. With
    ``ode_objective`` (N,) (mixture mode) the patient's data are explained either by the ODE alone or by the
    hybrid, with prior probability pi = sigmoid(mix_logit) of the hybrid (the Akaike odds of the predictions'
    weights): -log((1 - pi) exp(-ode_objective) + pi exp(-hybrid -ELBO)). The networks then learn mostly from
    the patients the ODE cannot describe: better when only part of the population deviates (EHC), worse when
    every patient deviates a little (TMDD)."""
    mu, logvar = model.encode(batch, ipred, mask)
    # noise drawn on the CPU generator (reproducible on every device), then moved
    eps = torch.randn(mu.shape, generator=gen, dtype=mu.dtype).to(mu.device) if gen is not None else \
        torch.zeros_like(mu)
    z = mu + torch.exp(0.5 * logvar) * eps
    pred, r = model.predict_at(batch, z, baseline, eta, ipred)
    eta_pen = baseline.eta_penalty(eta) if baseline is not None else 0.0
    nll = gaussian_nll(batch, pred, mask, error_model, sd)
    kl = 0.5 * (mu ** 2 + torch.exp(logvar) - 1.0 - logvar).sum(1)
    pen = residual_penalty(r, mask, l2)
    out = nll + beta * kl + pen + eta_pen
    if ode_objective is not None:
        rho = model.mix_logit
        out = -torch.logsumexp(torch.stack([nn.functional.logsigmoid(rho) - out,
                                            nn.functional.logsigmoid(-rho) - ode_objective]), 0)
    return out, nll, kl


def scale_to_tensors(scale: dict) -> dict:
    """The normalising constants as tensors only (so files load with ``torch.load(weights_only=True)``)."""
    return {k: (v if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64)) for k, v in scale.items()}


def scale_from_tensors(scale: dict) -> dict:
    return {k: (v if v.dim() else float(v)) for k, v in scale.items()}


def _save(path, model, opt, epoch, best, state_extra):
    buf = io.BytesIO()
    scale = scale_to_tensors(model.scale)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": torch.tensor(epoch),
                "best": torch.tensor(best), "scale": scale, **state_extra}, buf)
    atomic_write_bytes(path, buf.getvalue())


def train_vae(batch, ipred, error_model, sd, config: TrainConfig | None = None, baseline=None, eta0=None):
    """Train a HybridVAE on a population (``batch`` with the ODE-only individual prediction ``ipred`` (N, R)
    at every record). Joint mode: pass ``baseline`` (an ODEBaseline) and the ODE-only MAP ETAs ``eta0``
    (N, K): each patient's ETAs then start there and are estimated together with the networks (the held-out
    patients' ETAs from their own -ELBO, without training the networks on it), so that the residual learns
    what the ODE cannot explain at its best individual fit rather than at the ODE-only fit, which the
    unexplained structure distorts.

    Returns (model, history): the model back on the CPU (trained on ``cfg.device``); history lists (epoch, train
    -ELBO per patient, validation -ELBO per patient).
    """
    cfg = config or TrainConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    n = batch.n_subjects
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(cfg.val_fraction * n))) if n > 4 else 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    joint = baseline is not None
    if joint and (eta0 is None or eta0.shape != (n, baseline.n_eta)):
        raise ValueError("joint training needs eta0 of shape (N subjects, number of ETAs)")
    residual = cfg.residual
    if residual == "auto":
        residual = "input" if (joint and baseline.structural.linear) else "log"
    intervals = cfg.intervals or (48 if residual == "reservoir" else 96)
    scale = fit_scale(batch.select(tr_idx), ipred[tr_idx], cfg.fourier, intervals)
    x, _ = record_features(batch.select(tr_idx[:1]), ipred[tr_idx[:1]], scale)
    model = HybridVAE(x.shape[-1], cfg.latent_dim, cfg.hidden, joint, len(baseline.names) if joint else 0,
                      residual).double()
    model.scale = scale
    device = torch.device(cfg.device)
    model.to(device)
    sd = {k: v.detach().to(device) for k, v in sd.items()}
    btr, ptr = batch.select(tr_idx).to(device), ipred[tr_idx].to(device)
    bva, pva = (batch.select(val_idx).to(device), ipred[val_idx].to(device)) if n_val else (None, None)
    etr = eva = None
    if joint:
        eta0 = eta0.detach().to(device)
        etr = nn.Parameter(eta0[tr_idx].clone())
        eva = nn.Parameter(eta0[val_idx].clone()) if n_val else None
    o_tr = o_va = None
    if cfg.mixture:
        with torch.no_grad():
            o_tr = ode_only_objective(btr, ptr, btr.is_obs, error_model, sd, baseline, eta0[tr_idx] if joint else None)
            o_va = ode_only_objective(bva, pva, bva.is_obs, error_model, sd, baseline,
                                      eta0[val_idx] if joint else None) if n_val else None
    opt = torch.optim.Adam(list(model.parameters()) + ([etr] if joint else []), lr=cfg.lr)
    opt_val = torch.optim.Adam([eva], lr=cfg.lr) if (joint and n_val) else None
    start, best, best_state, bad = 0, math.inf, None, 0
    history = []
    if cfg.checkpoint and Path(cfg.checkpoint).is_file():   # resume
        ck = torch.load(cfg.checkpoint, weights_only=True, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if joint:
            with torch.no_grad():
                etr.copy_(ck["eta_train"])
                if n_val:
                    eva.copy_(ck["eta_val"])
                    opt_val.load_state_dict(ck["optimizer_val"])
        start, best = int(ck["epoch"]) + 1, float(ck["best"])
        best_state = ck.get("best_model")
        gen.manual_seed(cfg.seed + start)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=start, desc="VAE", unit="epoch", leave=False, mininterval=1.0)
    ntr = len(tr_idx)
    for epoch in range(start, cfg.epochs):
        beta = cfg.beta * min(1.0, (epoch + 1) / max(1, cfg.warmup_epochs))
        order = torch.randperm(ntr, generator=gen)
        model.train()
        total = 0.0
        for i in range(0, ntr, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            b = btr.select(idx)
            loss, _, _ = _neg_elbo(model, b, ptr[idx], b.is_obs, error_model, sd, beta, cfg.l2_residual, gen,
                                   baseline, etr[idx] if joint else None, o_tr[idx] if cfg.mixture else None)
            loss = loss.sum() / len(idx)
            if not torch.isfinite(loss):      # NaN guard: skip the step
                continue
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        if opt_val is not None:   # held-out patients: their ETAs follow their own -ELBO; the networks do not
            vloss = _neg_elbo(model, bva, pva, bva.is_obs, error_model, sd, cfg.beta, 0.0, None, baseline, eva,
                              o_va)[0]
            val = float(vloss.detach().mean())
            opt_val.zero_grad()
            (grad,) = torch.autograd.grad(vloss.sum(), [eva])
            if bool(torch.isfinite(grad).all()):
                eva.grad = grad
                opt_val.step()
        else:
            with torch.no_grad():
                val = float(_neg_elbo(model, bva, pva, bva.is_obs, error_model, sd, cfg.beta, 0.0,
                                      ode_objective=o_va)[0].mean()) \
                    if n_val else total / ntr
        history.append((epoch, total / ntr, val))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train=f"{total / ntr:.3f}", val=f"{val:.3f}")
        if epoch >= cfg.warmup_epochs and val < best - 1e-6:
            best, bad = val, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch >= cfg.warmup_epochs:
            bad += 1
        if cfg.checkpoint and (epoch % 20 == 0 or epoch == cfg.epochs - 1):
            extra = {"best_model": best_state} if best_state else {}
            if joint:
                extra["eta_train"] = etr.detach().clone()
                if n_val:
                    extra.update(eta_val=eva.detach().clone(), optimizer_val=opt_val.state_dict())
            _save(cfg.checkpoint, model, opt, epoch, best, extra)
        if bad >= cfg.patience and epoch + 1 >= cfg.min_epochs:
            break
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.best_val = best
    model.l2_residual = cfg.l2_residual   # the refinement's objective: the training's (beta-)ELBO
    model.prior_weight = cfg.beta
    model.to("cpu")   # trained on cfg.device; inference (per-patient MAP, predictions) runs with the data, on the CPU
    return model, history
