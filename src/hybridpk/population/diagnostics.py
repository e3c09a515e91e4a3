"""Per-record and per-subject diagnostics of a FOCE-I fit: PRED, IPRED, IWRES, CWRES, shrinkage."""

from __future__ import annotations

import torch


def diagnostics(prob, theta, omega, sd, eta) -> dict:
    """Tensors (N, R) PRED, IPRED, IWRES, CWRES (NaN off observations) and shrinkage (%)."""
    with torch.no_grad():
        n, k = eta.shape
        zero = torch.zeros_like(eta)
        pred = prob.predict(theta, zero)
        ipred = prob.predict(theta, eta)
        obs = prob.obs
        v_i = prob.pm.error.variance(ipred, sd)
        iwres = torch.where(obs, (prob.y - ipred) / torch.sqrt(v_i.clamp(min=1e-300)), torch.full_like(ipred, float("nan")))
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
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype).expand_as(cov)
        cov = cov * mm + eye * (1 - m).unsqueeze(-1)
        resid = torch.where(obs, prob.y - mean, torch.zeros_like(mean))
        chol = torch.linalg.cholesky(cov)
        w = torch.linalg.solve_triangular(chol, resid.unsqueeze(-1), upper=False).squeeze(-1)
        cwres = torch.where(obs, w, cwres)
        eta_shr = {}
        for j, name in enumerate(prob.pm.etas):
            eta_shr[name] = float(100 * (1 - eta[:, j].std() / torch.sqrt(omega[j, j])))
        eps_shr = float(100 * (1 - iwres[obs].std()))
    if prob.pm.error.ltbs:   # fitted on the log scale; PRED/IPRED are reported as concentrations
        pred, ipred = torch.exp(pred), torch.exp(ipred)
    return {"pred": pred, "ipred": ipred, "iwres": iwres, "cwres": cwres,
            "shrinkage": {"eta": eta_shr, "epsilon": eps_shr}}
