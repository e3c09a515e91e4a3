"""Per-record and per-subject diagnostics of a FOCE-I fit: PRED, IPRED, IWRES, CWRES, shrinkage, ETABAR.

CWRES are the conditional weighted residuals of Hooker, Staatz and Karlsson (Pharm Res 2007;24:2187-97) as
NONMEM's $TABLE writes them for a FOCE-I run: the model linearised at each subject's EBE (population mean
IPRED - G ETA, covariance G OMEGA G' + the residual variance at IPRED, i.e. with interaction), each subject's
residual vector weighted by the symmetric inverse square root of that covariance (not a Cholesky factor:
the two differ record by record). Checked against NONMEM's pheno.tab (pharmpy's example) at NONMEM's
estimates: max |difference| 5e-5.

Shrinkage and ETABAR are NONMEM's, as its .lst prints them (checked against pharmpy's pheno.lst):

- ETASHRINKSD = 100 (1 - SD(EBE) / sqrt(OMEGA)), the SD with divisor N over every subject (NONMEM's default
  ETASTYPE=0), and EPSSHRINKSD = 100 (1 - sqrt(mean(IWRES^2))) over every observation (Savic & Karlsson, AAPS J
  2009;11:558-69), as NONMEM 7.5.1 prints them in pheno.lst (7.5.0 divided the ETAs' SD by N - 1: pharmpy's
  pheno_linear.lst);
- EBVSHRINKSD = 100 (1 - sqrt(1 - mean(ETC_ii / OMEGA_ii))), ETC each subject's conditional covariance of the
  ETAs as NONMEM's .phi gives it: the inverse of half the first-order Hessian of its objective, OMEGA^-1 +
  sum_j (g g'/V + 1/2 h h'/V^2) (checked: within 5e-6 of pheno.phi's ETC; the exact Hessian's inverse is up to 47%
  off), or of the exact one for LAPLACE;
- ETABAR, "the arithmetic mean of the ETA-estimates", its SE = SD(EBE) / sqrt(N) (the same SD) and the P value
  "for the null hypothesis that the true mean is 0", two-sided from the normal distribution (NONMEM help, ETABAR). A
  small P value says the EBEs are not centred on the typical value: a misspecified model, or an estimation whose
  typical value went where the data are not (e.g. FOCE without INTERACTION taking the residual variance at PRED).
"""

from __future__ import annotations

import math

import torch


def diagnostics(prob, theta, omega, sd, eta) -> dict:
    """Tensors (N, R) PRED, IPRED, IWRES, CWRES (NaN off observations), the residual variance at IPRED
    ("variance") and, for FOCE and LAPLACE without INTERACTION, the one their objective takes at PRED
    ("variance_at_pred"; else None), shrinkage (%) and ETABAR (see the module's docstring), and per subject as
    NONMEM's .phi: "obj" (N,) its contribution to the OFV (they sum to it) and "etc" (N, K, K) the conditional
    covariance of its ETAs (None without ETAs)."""
    with torch.no_grad():
        n, k = eta.shape
        zero = torch.zeros_like(eta)
        pred = prob.predict(theta, zero)
        ipred = prob.predict(theta, eta)
        obs = prob.obs
        v_i = prob.pm.residual_variance(theta, eta, prob.batch, ipred, sd)
        iwres = torch.where(obs, (prob.y - ipred) / torch.sqrt(v_i.clamp(min=1e-300)),
                            torch.full_like(ipred, float("nan")))
        cwres = torch.full_like(ipred, float("nan"))
        if k:
            g = prob.jacobian(theta, eta)                                   # (N, R, K)
            mean = ipred - (g * eta.unsqueeze(1)).sum(-1)                   # linearised population mean
            cov = g @ omega @ g.transpose(1, 2)                             # (N, R, R)
            cov = cov + torch.diag_embed(v_i)
        else:
            mean = pred
            cov = torch.diag_embed(v_i)
        m = obs.to(ipred.dtype)
        mm = m.unsqueeze(-1) * m.unsqueeze(-2)
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
        cov = torch.where(mm > 0, cov, torch.zeros_like(cov)) + eye * (1 - m).unsqueeze(-1)   # NaN off obs: 0
        resid = torch.where(obs, prob.y - mean, torch.zeros_like(mean))
        cwres = torch.where(obs, _inverse_sqrt(cov, resid), cwres)
        eta_shr = {name: float(100 * (1 - eta[:, j].std(correction=0) / torch.sqrt(omega[j, j]))) if n > 1
                   else float("nan") for j, name in enumerate(prob.pm.etas)}      # one subject: undefined
        eps_shr = float(100 * (1 - iwres[obs].pow(2).mean().sqrt()))
        etabar = {name: _etabar(eta[:, j]) for j, name in enumerate(prob.pm.etas)}
        without_interaction = k and not prob.interaction and prob.estimation != "FO"
        v_pred = prob.pm.residual_variance(theta, zero, prob.batch, pred, sd) if without_interaction else None
    etc = conditional_covariance(prob, theta, omega, sd, eta) if k else None
    ebv = _ebv_shrinkage(etc, omega, prob.pm.etas) if k else {}
    with torch.enable_grad():       # FOCE re-attaches the EBEs by a Newton step (autograd)
        obj = prob.ofv({a: v.detach() for a, v in theta.items()}, omega.detach(),
                       {a: v.detach() for a, v in sd.items()}, eta.detach(), per_subject=True).detach()
    if prob.pm.error.ltbs:   # fitted on the log scale; PRED/IPRED are reported as concentrations
        pred, ipred = torch.exp(pred), torch.exp(ipred)
    return {"pred": pred, "ipred": ipred, "iwres": iwres, "cwres": cwres, "variance": v_i, "variance_at_pred": v_pred,
            "shrinkage": {"eta": eta_shr, "epsilon": eps_shr, "ebv": ebv}, "etabar": etabar, "obj": obj, "etc": etc}


def conditional_covariance(prob, theta, omega, sd, eta):
    """Each subject's conditional covariance of its ETAs (N, K, K), NONMEM's ETC (module docstring): the inverse
    of half the first-order Hessian of its objective at ``eta``, or of the exact one for LAPLACE; NaN where that
    Hessian is singular."""
    theta, sd = {a: v.detach() for a, v in theta.items()}, {a: v.detach() for a, v in sd.items()}
    omega, eta = omega.detach(), eta.detach()
    oinv = torch.linalg.inv(omega)
    if prob.laplace:        # its own graph, by double backward
        info = prob.exact_hessian(theta, oinv, sd, eta)[2] / 2
    else:
        with torch.no_grad():
            info = prob.fo_hessian(theta, oinv, sd, eta)
    etc, bad = torch.linalg.inv_ex(info)
    return torch.where((bad != 0)[:, None, None], torch.full_like(etc, float("nan")), etc)


def _ebv_shrinkage(etc, omega, names) -> dict:
    """NONMEM's EBVSHRINKSD (%) of each ETA (``names``), from the subjects' conditional covariances ``etc`` (N, K, K);
    NaN where a subject's is."""
    ratio = torch.diagonal(etc, dim1=1, dim2=2).mean(0) / torch.diagonal(omega.detach())
    return {name: float(100 * (1 - torch.sqrt((1 - ratio[j]).clamp(min=0)))) for j, name in enumerate(names)}


def _etabar(eta) -> dict:
    """NONMEM's ETABAR, SE, N and P VAL of one ETA's EBEs (N,); SE and P are None for one subject (no spread)
    and P is 1 for an ETA whose EBEs are all 0 (one the data do not inform)."""
    n, mean = int(eta.numel()), float(eta.mean())
    if n < 2:
        return {"etabar": mean, "se": None, "n": n, "p": None}
    se = float(eta.std(correction=0)) / math.sqrt(n)
    p = math.erfc(abs(mean) / (se * math.sqrt(2.0))) if se > 0 else (1.0 if mean == 0 else 0.0)
    return {"etabar": mean, "se": se, "n": n, "p": p}


def _inverse_sqrt(cov, resid):
    """cov^(-1/2) resid per subject, with the symmetric square root (eigendecomposition), as NONMEM weights
    its residuals. ``cov`` (N, R, R) symmetric positive definite, ``resid`` (N, R)."""
    w, q = torch.linalg.eigh(cov)
    if bool((w <= 0).any()):
        raise torch.linalg.LinAlgError("the covariance of a subject's observations is not positive definite")
    return (q @ (w.rsqrt().unsqueeze(-1) * (q.transpose(1, 2) @ resid.unsqueeze(-1)))).squeeze(-1)
