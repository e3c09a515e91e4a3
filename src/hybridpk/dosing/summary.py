"""One patient's estimate in full: what ``hybridpk map --out EST.json`` writes and ``dose`` puts in REC.json.

Fields (full precision): the MAP point (ETAs, and a hybrid's z), the individual parameters with their 90%
credible intervals, the objective at the MAP and each level's contribution to it, shrinkage, the Laplace
covariance in two forms, and the posterior sampling's effective sample size.

* **Shrinkage** of each ETA: the posterior variance (observed information) over OMEGA's, near 1 where the
  levels say little about it (Phoenix NLME's individual shrinkage; Xu et al., AAPS J 2012;14:927-936).

* **OFV** (population models): -2 log posterior at the MAP without constants, as NONMEM's individual
  objective (the .phi file's OBJ): sum over levels of (DV - IPRED)^2 / VAR + log VAR (M3: -2 log P(below
  LLOQ)) plus ETA' OMEGA^-1 ETA. A censored level is listed with its limit as DV, CENS 1 (below the LLOQ) or -1
  (above an ULOQ) and no IWRES. A hybrid reports its joint objective 2 x (-log p(DV, ETA, z)) up to a
  constant, with the same per-level terms.
* **Observed-information covariance**: the inverse of half the exact Hessian of the OFV at the MAP (the
  Laplace approximation the posterior sampler starts from).
* **Expected-information covariance** (population models): (OMEGA^-1 + sum_j g g' / V_j + 1/2 h h' / V_j^2)^-1
  with g = dIPRED/dETA and h = dVAR/dETA at the MAP (h = 0 without INTERACTION): the first-order
  (Gauss-Newton) Hessian of the conditional objective (Wang, J Pharmacokinet Pharmacodyn 2007; 34:575),
  which is how NONMEM computes the conditional variance of the EBEs it reports as ETC in the .phi file and
  as the SE of the EBEs (Kang, Bae, Houk, Savic, Karlsson; Korean J Physiol Pharmacol 2012; 16:97).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["patient_summary"]


def patient_summary(post) -> dict:
    """The patient's estimate as a JSON-ready dict (see the module docstring); ``post`` a PatientPosterior."""
    est, model = post.estimate, post.model
    names = list(model.point_names)
    n_eta = model.n_eta
    terms = _population_terms(est) if hasattr(est.source, "problem") else _hybrid_terms(est)
    records = est.batch
    keep = (est.obs[0] | (terms["censored"] != 0)).cpu().numpy()
    times = records.time[0].cpu().numpy()[keep]
    censored = terms["censored"].cpu().numpy()[keep]
    observations = [{"TIME": float(t), "DV": float(dv), "IPRED": float(f), "VAR": float(v),
                     "IWRES": None if c_ else float(w), "CONTRIBUTION": float(c), **({"CENS": c_} if c_ else {})}
                    for t, dv, f, v, w, c, c_ in zip(times, terms["y"][keep], terms["ipred"][keep],
                                                     terms["var"][keep], terms["iwres"][keep], terms["data"][keep],
                                                     (int(x) for x in censored))]
    shrink = est.shrinkage()[0] if n_eta else np.zeros(0)
    etc = terms.get("etc")
    return {"model": model.name, "point_names": names,
            "map": {n: float(v) for n, v in zip(names, est.eta[0].tolist())},
            "parameters": post.parameters(), "ofv": terms["ofv"], "ofv_prior_term": terms["prior"],
            "ofv_definition": terms["definition"], "observations": observations,
            "shrinkage": {n: float(s) for n, s in zip(names[:n_eta], shrink)},
            "shrinkage_definition": "posterior variance (observed information) / OMEGA variance, per ETA: near 1, "
                                    "the levels say little about it",
            "covariance": {"names": names, "observed_information": est.cov[0].tolist(),
                           "expected_information_etc": None if etc is None else etc.tolist()},
            "posterior": {"method": "adaptive importance sampling (AMIS) from the Laplace approximation with the prior "
                                    "as defensive component, Pareto-smoothed (PSIS) and resampled",
                          "draws": int(post.draws.shape[0]), "proposals": post.proposals,
                          "effective_sample_size": post.ess, "pareto_k": post.pareto_k}}


def _population_terms(est) -> dict:
    """The fit's own objective terms for the patient (its Problem: LTBS, M3, a general $ERROR)."""
    src, pop = est.source, est.model.population
    prob = src.problem
    eta = src.eta[:1]
    dev = eta.device
    theta, sd, omega = pop.theta.tensors(dev), pop.sigma.sd_tensors(dev), pop.omega.tensor(dev)
    with torch.no_grad():
        f = prob.predict(theta, eta)
        data, v = prob.residual_terms(f, prob.variance(theta, eta, f, sd))
        k = eta.shape[1]
        oinv = torch.linalg.inv(omega) if k else torch.zeros(0, 0, dtype=torch.float64, device=dev)
        prior = float(torch.einsum("nk,kl,nl->n", eta, oinv, eta)[0]) if k else 0.0
        etc = (torch.linalg.inv(prob.fo_hessian(theta, oinv, sd, eta))[0].cpu() if k
               else torch.zeros(0, 0, dtype=torch.float64, device="cpu"))
    cens = torch.where(prob.above, -1, torch.where(prob.cens, 1, 0))[0]      # 1 below the limit, -1 above it
    y = torch.where(prob.cens, prob.lloq, prob.y)[0]        # a censored level: its limit
    return {"y": y.cpu().numpy(), "ipred": f[0].cpu().numpy(), "var": v[0].cpu().numpy(),
            "iwres": ((prob.y - f) / torch.sqrt(v))[0].cpu().numpy(), "data": data[0].cpu().numpy(),
            "censored": cens, "prior": prior, "ofv": float(data[0].sum()) + prior, "etc": etc,
            "definition": "-2 log posterior at the MAP without constants: sum over levels of (DV - IPRED)^2 / VAR "
                          "+ log VAR (+ M3 terms) + ETA' OMEGA^-1 ETA (NONMEM's individual OBJ)"}


def _hybrid_terms(est) -> dict:
    """A hybrid: per-level terms at its prediction, and its joint objective (x 2) as the OFV."""
    model = est.model
    point = est.eta[:1]
    with torch.no_grad():
        f = est.concentrations(est.batch, point)
        v = model.residual_variance(est.batch, point, f)
        obs = est.obs
        if model.population.model.error.ltbs:
            f = model.population.model.error.log_scale(f)
        vv = torch.where(obs, v, torch.ones_like(v))
        r = torch.where(obs, est.y - f, torch.zeros_like(f))
        data = torch.where(obs, r * r / vv + torch.log(vv), torch.zeros_like(vv))
        ofv = 2.0 * float(model._objective(est.batch, point)[0])
    return {"y": est.y[0].cpu().numpy(), "ipred": f[0].cpu().numpy(), "var": v[0].cpu().numpy(),
            "iwres": (r / torch.sqrt(vv))[0].cpu().numpy(), "data": data[0].cpu().numpy(),
            "censored": torch.zeros_like(obs[0], dtype=torch.long), "prior": ofv - float(data[0].sum()),
            "ofv": ofv, "etc": None,
            "definition": "2 x the hybrid's joint objective -log p(DV, ETA, z) up to a constant (its per-level terms "
                          "as for a population model; the rest is the prior of ETA and z)"}
