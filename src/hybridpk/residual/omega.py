"""The hybrid's own OMEGA and SIGMA: the ETAs' covariance and the residual error once the correction carries
what the ODE missed.

The population fit's OMEGA was estimated by an ODE that cannot describe, e.g., recirculation: its ETAs
absorbed the misfit. On the EHC example (seed 1) the ODE-only OMEGA of V and KA are 0.24 and 0.56 against
the truth's 0.04 and 0.09. Used as the prior of the hybrid's ETAs, it lets every patient's V and KA follow
the noise of its levels.

The hybrid's OMEGA is estimated on the training patients by the iterative two-stage method (ITS; Steimer JL,
Mallet A, Golmard JL, Boisvieux JF. Drug Metab Rev 1984;15:265-292; NONMEM's METHOD=ITS, Users Guide VII):
each patient's MAP (ETAs with z) under the current OMEGA, then

    OMEGA <- (1/N) sum_i (eta_i eta_i' + C_i),

with C_i the inverse of the Hessian of the patient's -log p(y, eta | z) at its MAP (the conditional
covariance; without it the update would shrink OMEGA by the ETAs' shrinkage). Before it, the THETA step of
ITS: for each ETA that acts on one structural parameter as P = TV exp(ETA) (MU-referenced; found numerically,
:func:`exponential_etas`), TV moves to the patients' mean, log TV <- log TV + mean_i eta_i (the hybrid's
log-shift of that typical value), and the ETAs are centred, which leaves every patient's prediction as it was
and puts the prior of a new patient's ETAs where the training patients are. Measured on the EHC dosing
benchmark (seed 1): the ODE-only fit's typical values carry its misfit (CL 4.31 L/h, V 63 L, KA 2.35 /h against
the truth's 4, 40, 1.2), joint training moves them to 4.39, 43.5, 1.35, and the training patients' mean ETAs under
the hybrid's OMEGA were then -0.043, -0.041, -0.018. The update keeps the
model's structure: covariances only within its OMEGA blocks, FIX blocks at their values, and blocks tied by
SAME (inter-occasion variability) share their average.

SIGMA likewise: the ODE-only fit's residual error also absorbed the misfit (EHC seed 1: ADD 0.16 mg/L against
the truth's 0.05). With ``TrainConfig.learn_sigma`` training learns the SDs with the networks
(:mod:`.training`), but as a joint MAP over the ETAs too, which does not discount the ETAs' degrees of freedom
(on data the ODE describes it ends below FOCE-I's: tests/unit/test_hybrid_omega.py); the ITS step starts from
them and corrects that. Its M-step maximises the residual-error likelihood of the observations at the MAP
predictions f_ij, with each squared residual replaced by its expectation under the ETAs' conditional
distribution, (y_ij - f_ij)^2 + J_ij C_i J_ij' (J_ij = df_ij/deta: the first-order term, as the FO/FOCE
linearisation writes it). FIX residual-error parameters are kept; log-transform-both-sides and a general $ERROR
keep the population fit's SIGMA. Measured on the EHC example (seed 1, reservoir form, the truth's OMEGA and
SIGMA given to the hybrid): recirculating patients 1.08x the true-structure model (1.23x with the ODE-only
OMEGA and SIGMA), the others 0.92x ODE-only.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .baseline import ODEBaseline
from .inference import estimate_hybrid, joint_objective
from .objective import free_sigma

__all__ = ["with_omega", "conditional_covariance", "its_omega", "its_sigma"]


def with_omega(population, matrix, sd: dict | None = None):
    """``population`` (a FittedPopulation) with OMEGA ``matrix`` (K, K) and, when given, the residual error SDs
    ``sd`` {kind: SD}; no standard errors."""
    m = torch.as_tensor(matrix, dtype=torch.float64, device="cpu")
    table = replace(population.omega, matrix=tuple(tuple(float(x) for x in row) for row in m.tolist()), se=None)
    out = replace(population, omega=table)
    if sd is not None:
        rows = tuple(replace(r, sd=float(sd.get(r.kind, r.sd)), se_sd=None) for r in population.sigma.rows)
        out = replace(out, sigma=replace(population.sigma, rows=rows))
    return out


def conditional_covariance(vae, baseline, batch, eta, z, error_model, sd, floor: float = 1e-10):
    """C_i (N, K, K): the inverse Hessian with respect to the ETAs of each patient's -log p(y, eta | z) at
    ``eta`` (N, K), ``z`` fixed (autograd: K + 1 backward passes for all patients at once, as each objective
    depends on its own ETAs only). Eigenvalues of the Hessian below 1e-10 are raised to 1e-10, and those that
    are not positive (no mode there: the search did not reach one) to ``floor``.

    :func:`its_omega` gives the smallest precision of the ETAs' prior as ``floor``, 1 / the largest eigenvalue
    of OMEGA, as the dosing posterior's Laplace covariance has it where the data make the Hessian indefinite
    (:class:`~hybridpk.dosing.model.HybridDosing`): a direction without curvature from the data is as wide as
    the prior, not 1e10. With 1e10 there, nlme's Indometh (6 subjects, 2-cmt IV, two ETAs of variance 1e-12 and
    1e-19 in which the joint search does not converge, Hessians with eigenvalues down to -137) gave the hybrid
    an OMEGA of 5e7 and 3e9 and a proportional SD of 2e4. Where the Hessian is positive definite nothing
    changes (the EHC examples: the same OMEGA and SIGMA to every digit)."""
    n, k = eta.shape
    x = eta.detach().clone().requires_grad_(True)
    obj = joint_objective(vae, baseline, batch, x, z.detach(), error_model, sd)
    grad = torch.autograd.grad(obj.sum(), x, create_graph=True)[0]
    rows = [torch.autograd.grad(grad[:, j].sum(), x, retain_graph=j < k - 1)[0] for j in range(k)]
    hess = torch.stack(rows, 1).detach()
    hess = 0.5 * (hess + hess.transpose(1, 2))
    vals, vecs = torch.linalg.eigh(torch.nan_to_num(hess, nan=0.0))
    vals = torch.where(vals > 0, vals.clamp(min=1e-10), torch.full_like(vals, max(float(floor), 1e-10)))
    return (vecs / vals.unsqueeze(1)) @ vecs.transpose(1, 2)


def _project(pm, current, s):
    """The update ``s`` (K, K) with the structure of ``pm``'s OMEGA: zero between blocks and where a banded block
    holds a covariance at 0, FIX blocks kept at ``current``, blocks tied by SAME set to their average."""
    k = s.shape[0]
    mask = torch.zeros(k, k, dtype=torch.bool)
    for block in pm.blocks:
        idx = torch.tensor(block)
        mask[idx.unsqueeze(1), idx.unsqueeze(0)] = True
    for r, c in pm.omega_zeros:
        mask[r, c] = mask[c, r] = False
    out = torch.where(mask, s, torch.zeros_like(s))
    parent = {tuple(b): tuple(src) for b, src in pm.omega_same}
    tied: dict = {}
    for b in parent:
        root = b
        while root in parent:
            root = parent[root]
        tied.setdefault(root, [root]).append(b)
    for group in tied.values():
        avg = sum(out[list(g)][:, list(g)] for g in group) / len(group)
        for g in group:
            gi = torch.tensor(g)
            out[gi.unsqueeze(1), gi.unsqueeze(0)] = avg
    if pm.omega_zeros:   # zeros put into a positive definite matrix may leave it indefinite: the covariances
        # shrunk toward 0 until it is not (the diagonal alone is positive definite)
        diagonal = torch.diag(torch.diagonal(out))
        for _ in range(60):
            if bool(torch.linalg.cholesky_ex(0.5 * (out + out.T)).info == 0):
                break
            out = diagonal + 0.5 * (out - diagonal)
    fixed = list(pm.omega_fixed)
    if fixed:
        fi = torch.tensor(fixed)
        out[fi.unsqueeze(1), fi.unsqueeze(0)] = current[fi.unsqueeze(1), fi.unsqueeze(0)]
    return 0.5 * (out + out.T)


def _jacobian(vae, baseline, batch, eta, z):
    """(predictions f (N, R), J = df/deta (N, R, K)) of the hybrid at ``eta`` (N, K), ``z`` fixed: one backward
    pass per record column (each prediction depends on its own patient's ETAs only)."""
    x = eta.detach().clone().requires_grad_(True)
    pred, _ = vae.predict_at(batch, z.detach(), baseline, x, None)
    cols = [torch.autograd.grad(pred[:, r].sum(), x, retain_graph=True, allow_unused=True)[0]
            for r in range(pred.shape[1])]
    jac = torch.stack([c if c is not None else torch.zeros_like(x) for c in cols], 1)
    return pred.detach(), jac.detach()


def its_sigma(pm, batch, pred, expected_sq, sd: dict, floor: float = 0.0) -> dict:
    """The residual-error SDs {kind: SD} that maximise sum over observations of -log N with variance
    Var(f_ij) = error model at the predictions ``pred`` (N, R) and squared residuals ``expected_sq`` (N, R)
    (see the module docstring); FIX parameters keep their ``sd`` value. Log-transform-both-sides and general
    error models return ``sd`` unchanged."""
    err = pm.error
    free = free_sigma(err, sd, pm.sigma_fixed)
    if not free:
        return dict(sd)
    obs = batch.is_obs
    log_sd = torch.tensor([math.log(float(sd[k])) for k in free], dtype=torch.float64, requires_grad=True)

    def objective():
        cur = {k: (torch.exp(log_sd[free.index(k)]) if k in free
                   else torch.as_tensor(float(sd[k]), dtype=torch.float64)) for k in err.names}
        v = torch.where(obs, torch.clamp(err.variance(pred, cur), min=max(floor, 1e-300)), torch.ones_like(pred))
        return torch.where(obs, 0.5 * (expected_sq / v + torch.log(v)), torch.zeros_like(v)).sum()

    opt = torch.optim.LBFGS([log_sd], lr=1.0, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except (IndexError, RuntimeError, ValueError):
        return dict(sd)
    out = dict(sd)
    found = log_sd.detach()
    if torch.isfinite(found).all():
        out.update({k: float(torch.exp(found[free.index(k)])) for k in free})
    return out


def exponential_etas(baseline, batch, tol: float = 1e-9) -> list:
    """(ETA index, typical-value shift index) pairs of the ETAs that act on one shiftable structural parameter
    as P = TV exp(ETA) (MU-referenced, exponential IIV), found numerically on ``batch``: moving the ETA by d
    moves log P by exactly d and no other parameter, at two ETA points, and no other ETA acts on P so. Only for
    these is a shift of the typical value the same model as a shift of the ETA's mean."""
    k = baseline.n_eta
    if k == 0 or not baseline.names:
        return []
    gen = torch.Generator().manual_seed(0)
    n = batch.time.shape[0]
    points = [torch.zeros(n, k, dtype=torch.float64), 0.3 * torch.randn(n, k, generator=gen, dtype=torch.float64)]
    step = 0.25
    pairs = []
    with torch.no_grad():
        for i in range(k):
            found = None
            for eta in points:
                moved = eta.clone()
                moved[:, i] += step
                p0, p1 = baseline.parameters(batch, eta), baseline.parameters(batch, moved)
                hits = []
                for name in p0:
                    if torch.equal(p0[name], p1[name]):
                        continue
                    d = torch.log(p1[name]) - torch.log(p0[name])
                    exact = bool(torch.isfinite(d).all()) and float((d - step).abs().max()) < tol
                    hits.append(name if exact else None)     # None: moves, but not as TV exp(ETA)
                if len(hits) != 1 or hits[0] is None or hits[0] not in baseline.names:
                    found = None
                    break
                if found not in (None, hits[0]):
                    found = None
                    break
                found = hits[0]
            if found is not None:
                pairs.append((i, baseline.names.index(found)))
    # one ETA per typical value: ETAs that share a parameter (e.g. inter-occasion ones) are left alone
    targets = [j for _, j in pairs]
    return [(i, j) for i, j in pairs if targets.count(j) == 1]


def its_omega(vae, population, batch, ipred0, eta0, error_model, sd, *, iterations: int = 2, sigma: bool = True,
              theta: bool = True):
    """The hybrid's OMEGA (K, K), its residual error SDs {kind: SD} and the history of both, by ``iterations``
    ITS steps on the patients of ``batch`` (the training patients: ``ipred0``/``eta0`` their ODE-only MAP
    prediction and ETAs), from the population fit's OMEGA and the residual error SDs ``sd`` (see the module
    docstring; :func:`~hybridpk.residual.hybrid.fit_hybrid` gives those training ended with; ``sigma=False``
    keeps ``sd``). Models without ETAs, or a non-joint hybrid (whose ETAs are
    the ODE-only ones), keep both."""
    omega = population.omega.tensor()
    sd = {k: float(v) for k, v in sd.items()}
    history = [{"omega": torch.diagonal(omega).tolist(), "sigma": dict(sd)}]
    if omega.numel() == 0 or not vae.joint:
        return omega, sd, history
    pm = population.model
    pairs = exponential_etas(ODEBaseline(population), batch) if theta and vae.log_shift.numel() else []
    for _ in range(int(iterations)):
        base = ODEBaseline(with_omega(population, omega))
        sd_t = {k: torch.tensor(v, dtype=torch.float64) for k, v in sd.items()}
        est = estimate_hybrid(vae, batch, ipred0, eta0, error_model, sd_t, baseline=base)
        prior_floor = 1.0 / float(torch.linalg.eigvalsh(omega).max().clamp(min=1e-300))   # OMEGA^-1's smallest
        cov = conditional_covariance(vae, base, batch, est.eta, est.z, error_model, sd_t, floor=prior_floor)
        eta = est.eta
        if theta and pairs:      # THETA step: the typical value moves to the patients' mean, the ETAs centre
            shift = torch.zeros(eta.shape[1], dtype=eta.dtype)
            mean = eta.mean(0)
            with torch.no_grad():
                for i, j in pairs:
                    vae.log_shift[j] += mean[i].to(vae.log_shift.dtype)
                    shift[i] = mean[i]
            eta = eta - shift
        s = (eta.T @ eta + cov.sum(0)) / eta.shape[0]
        omega = _project(pm, omega, s)
        if sigma:
            pred, jac = _jacobian(vae, base, batch, eta, est.z)
            expected = (batch.dv - pred) ** 2 + torch.einsum("nrk,nkl,nrl->nr", jac, cov, jac)
            sd = its_sigma(pm, batch, pred, expected, sd, vae.variance_floor(error_model, sd_t))
        history.append({"omega": torch.diagonal(omega).tolist(), "sigma": dict(sd)})
    return omega, sd, history
