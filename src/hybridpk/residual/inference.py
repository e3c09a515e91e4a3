"""Individual estimates of a hybrid model: the encoder's amortised guess of z with the ODE-only MAP ETAs,
optionally refined to the patient's joint MAP of (z, ETAs) (semi-amortised inference), and hybrid
predictions on any records from them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .objective import correction_penalty, gaussian_nll, ode_only_objective

__all__ = ["HybridEstimate", "Curves", "estimate_hybrid", "predict_with", "joint_objective", "guarded_lbfgs"]


@dataclass(frozen=True)
class HybridEstimate:
    """Per patient (N rows): latent mean ``z`` (N, K) after refinement and the encoder's SD ``z_sd``; ETAs
    ``eta`` under the hybrid and ``eta_ode`` of the ODE-only fit; the objectives (-log joint density up to a
    constant) of both fits; and ``weight``, the posterior probability of the hybrid against ODE-only, with
    the model's prior log-odds (the Akaike penalty -K of the K latents). With the log form predictions
    average the two with it, so a patient the ODE already describes keeps the ODE prediction instead of a
    correction fitted to noise. ``ode``: the ODE-only IndividualEstimates (MAP under the population model)
    they start from, ``ipred_ode`` its prediction (N, R) at the patients' records; ``refined`` (N,) True where
    the refined (MAP) point replaced the encoder's guess (all False without refinement), ``refine_failure``
    the refinement optimiser's error, if it failed ("" otherwise)."""

    z: torch.Tensor
    z_sd: torch.Tensor
    eta: torch.Tensor
    eta_ode: torch.Tensor
    objective: torch.Tensor
    objective_ode: torch.Tensor
    weight: torch.Tensor
    ode: object = field(default=None, repr=False)
    ipred_ode: object = field(default=None, repr=False)
    refined: object = field(default=None, repr=False)
    refine_failure: str = ""

    @property
    def n_unrefined(self) -> int:
        """Patients that kept the encoder's estimate: the refinement did not lower their objective, or the
        optimiser failed (``refine_failure`` says how) before it could."""
        return 0 if self.refined is None else int((~self.refined).sum())

    def with_ode(self, ode, ipred_ode) -> "HybridEstimate":
        return replace(self, ode=ode, ipred_ode=ipred_ode)


def _objective(model, baseline, batch, ipred0, eta, z, error_model, sd, l2):
    """Per-patient -log p(y, eta, z) (N,) of the hybrid model, with the training's correction penalty and its
    weight of the latent prior."""
    pred, r = model.predict_at(batch, z, baseline, eta, ipred0)
    floor = model.variance_floor(error_model, sd)
    out = gaussian_nll(batch, pred, batch.is_obs, error_model, sd, floor) + correction_penalty(r, batch.is_obs, l2) \
        + model.prior_weight * 0.5 * (z * z).sum(1)
    if baseline is not None:
        out = out + baseline.eta_penalty(eta)
    return out


def joint_objective(model, baseline, batch, eta, z, error_model, sd, l2: float | None = None, z_prior=None):
    """Per-patient -log p(y, eta, z) (N,) up to a constant, with the ODE prediction recomputed at ``eta`` for
    every model (joint or not): the residual-error likelihood at the hybrid prediction, the correction
    penalty, the latent prior (with the training's weight) and -log p(eta). For joint models it is the
    objective of the per-patient MAP; for the others it treats the ETAs as unknown too, as the generative
    model (``HybridFit.simulate``) does. The posterior over (ETAs, z) that dosing samples is exp(-this).
    ``z_prior`` (mean (K,), precision (K, K)): a Gaussian prior of z in place of the training's weighted
    N(0, I) (the trained latent distribution, see :class:`~hybridpk.residual.coverage.TrainingCoverage`)."""
    l2 = model.l2 if l2 is None else l2
    ipred = None if model.joint else baseline.ipred(batch, eta)
    pred, r = model.predict_at(batch, z, baseline, eta, ipred)
    floor = model.variance_floor(error_model, sd)
    if z_prior is None:
        z_pen = model.prior_weight * 0.5 * (z * z).sum(1)
    else:
        dz = z - z_prior[0]
        z_pen = 0.5 * torch.einsum("ni,ij,nj->n", dz, z_prior[1], dz)
    return (gaussian_nll(batch, pred, batch.is_obs, error_model, sd, floor) + correction_penalty(r, batch.is_obs, l2)
            + z_pen + baseline.eta_penalty(eta))


def estimate_hybrid(model, batch, ipred0, eta0, error_model, sd, *, baseline=None, l2: float | None = None,
                    refine: bool = True, max_iter: int = 200) -> HybridEstimate:
    """Estimates for every patient of ``batch`` from its observations. ``ipred0``/``eta0``: the ODE-only MAP
    prediction (N, R) and ETAs (N, n_eta); ``baseline`` the ODEBaseline (needed for joint models); ``l2``
    the correction penalty (default: the training's). With ``refine`` the encoder's guess starts a MAP over
    z (and the ETAs, whitened, for joint models) of each patient (L-BFGS; patients are independent, so their
    objectives are summed; a patient keeps the encoder's guess where the refinement did not lower its
    objective). The optimiser is guarded (:func:`guarded_lbfgs`): a failure keeps each patient's best point and is
    reported in ``refine_failure``, never raised."""
    l2 = model.l2 if l2 is None else l2
    with torch.no_grad():
        mu, logvar = model.encode(batch, ipred0, batch.is_obs)
    joint = baseline is not None and model.joint
    k = mu.shape[1]

    def split(v):      # the search moves the ETAs whitened (ODEBaseline.whiten: on the prior's scale)
        return (v[:, :k], baseline.unwhiten(v[:, k:])) if joint else (v, eta0)

    def objective(v):
        zz, ee = split(v)
        return _objective(model, baseline, batch, ipred0, ee, zz, error_model, sd, l2)

    start = torch.cat([mu, baseline.whiten(eta0)], 1) if joint else mu.clone()
    x_final, refined, failure = start, torch.zeros(start.shape[0], dtype=torch.bool, device=start.device), ""
    if refine:
        x, failure = guarded_lbfgs(objective, start, max_iter)
        with torch.no_grad():
            before, after = objective(start), objective(x)
            refined = torch.isfinite(after) & (after <= before)
            x_final = torch.where(refined.unsqueeze(1), x, start)
    with torch.no_grad():
        z, eta = split(x_final)
        obj = objective(x_final)
        obj_ode = ode_only_objective(batch, ipred0, batch.is_obs, error_model, sd, baseline, eta0,
                                     model.variance_floor(error_model, sd))
        weight = torch.sigmoid(obj_ode - obj + model.mix_logit)
    return HybridEstimate(z=z.detach(), z_sd=torch.exp(0.5 * logvar), eta=eta.detach(), eta_ode=eta0.detach(),
                          objective=obj, objective_ode=obj_ode, weight=torch.nan_to_num(weight, nan=0.0),
                          refined=refined, refine_failure=failure)


def guarded_lbfgs(objective, start, max_iter: int):
    """L-BFGS (strong Wolfe line search) on the sum of the patients' objectives from ``start`` (N, P), guarded:
    (x (N, P), "") when it runs through; when it fails (an error inside the line search, e.g. on a
    non-finite objective) (each patient's best finite point evaluated so far, the error), so that no
    optimiser failure reaches the user and no patient ends worse than it started."""
    x = start.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    best_x = start.detach().clone()
    best_f = torch.full((start.shape[0],), float("inf"), dtype=start.dtype, device=start.device)

    def closure():
        opt.zero_grad()
        per = objective(x)
        with torch.no_grad():
            better = torch.isfinite(per) & (per < best_f)
            best_f.copy_(torch.where(better, per, best_f))
            best_x.copy_(torch.where(better.unsqueeze(1), x, best_x))
        loss = per.sum()
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except (IndexError, RuntimeError, ValueError) as exc:
        return best_x, f"{type(exc).__name__}: {exc}"
    return x.detach(), ""


@dataclass(frozen=True)
class Curves:
    """Predictions (N, R) mg/L at every record of a batch: ``final`` (the hybrid, or for the log form its
    Akaike-weighted average with ODE-only), ``hybrid`` (the hybrid alone) and ``ode`` (ODE-only)."""

    final: torch.Tensor
    hybrid: torch.Tensor
    ode: torch.Tensor


def predict_with(model, est: HybridEstimate, batch, baseline=None, ipred0=None, average: bool | None = None
                 ) -> Curves:
    """The curves of the patients of ``est`` at every record of ``batch`` (the same patients in the same order,
    e.g. on a dense grid). The final prediction is the Akaike-weighted average of the hybrid and ODE-only
    ones (``average=False``: the hybrid alone; default: the form's ``average``, True for the log form only).
    Without a ``baseline``, ``ipred0`` is the ODE-only prediction on ``batch`` (models trained without joint
    ETAs)."""
    with torch.no_grad():
        ode = baseline.ipred(batch, est.eta_ode) if baseline is not None else ipred0
        hyb, _ = model.predict_at(batch, est.z, baseline, est.eta, ode)
        if not (model.average if average is None else average):
            return Curves(hyb, hyb, ode)
        w = est.weight.to(hyb.dtype).unsqueeze(1)
        return Curves(w * hyb + (1 - w) * ode, hyb, ode)
