"""The hybrid's own OMEGA: the ETAs' covariance once the correction carries what the ODE missed.

The population fit's OMEGA was estimated by an ODE that cannot describe, e.g., recirculation: its ETAs
absorbed the misfit. On the EHC example (seed 1) the ODE-only OMEGA of V and KA are 0.24 and 0.56 against
the truth's 0.04 and 0.09. Used as the prior of the hybrid's ETAs, it lets every patient's V and KA follow
the noise of its levels.

The hybrid's OMEGA is estimated on the training patients by the iterative two-stage method (ITS; Steimer JL,
Mallet A, Golmard JL, Boisvieux JF. Drug Metab Rev 1984;15:265-292; NONMEM's METHOD=ITS, Users Guide VII):
each patient's MAP (ETAs with z) under the current OMEGA, then

    OMEGA <- (1/N) sum_i (eta_i eta_i' + C_i),

with C_i the inverse of the Hessian of the patient's -log p(y, eta | z) at its MAP (the conditional
covariance; without it the update would shrink OMEGA by the ETAs' shrinkage). The update keeps the
model's structure: covariances only within its OMEGA blocks, FIX blocks at their values, and blocks tied by
SAME (inter-occasion variability) share their average.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .baseline import ODEBaseline
from .inference import estimate_hybrid, joint_objective

__all__ = ["with_omega", "conditional_covariance", "its_omega"]


def with_omega(population, matrix):
    """``population`` (a FittedPopulation) with OMEGA ``matrix`` (K, K), no standard errors."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    table = replace(population.omega, matrix=tuple(tuple(float(x) for x in row) for row in m.tolist()), se=None)
    return replace(population, omega=table)


def conditional_covariance(vae, baseline, batch, eta, z, error_model, sd):
    """C_i (N, K, K): the inverse Hessian with respect to the ETAs of each patient's -log p(y, eta | z) at
    ``eta`` (N, K), ``z`` fixed (autograd: K + 1 backward passes for all patients at once, as each objective
    depends on its own ETAs only); eigenvalues below 1e-10 of the Hessian are raised to it."""
    n, k = eta.shape
    x = eta.detach().clone().requires_grad_(True)
    obj = joint_objective(vae, baseline, batch, x, z.detach(), error_model, sd)
    grad = torch.autograd.grad(obj.sum(), x, create_graph=True)[0]
    rows = [torch.autograd.grad(grad[:, j].sum(), x, retain_graph=j < k - 1)[0] for j in range(k)]
    hess = torch.stack(rows, 1).detach()
    hess = 0.5 * (hess + hess.transpose(1, 2))
    vals, vecs = torch.linalg.eigh(torch.nan_to_num(hess, nan=0.0))
    vals = vals.clamp(min=1e-10)
    return (vecs / vals.unsqueeze(1)) @ vecs.transpose(1, 2)


def _project(pm, current, s):
    """The update ``s`` (K, K) with the structure of ``pm``'s OMEGA: zero between blocks, FIX blocks kept at
    ``current``, blocks tied by SAME set to their average."""
    k = s.shape[0]
    mask = torch.zeros(k, k, dtype=torch.bool)
    for block in pm.blocks:
        idx = torch.tensor(block)
        mask[idx.unsqueeze(1), idx.unsqueeze(0)] = True
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
    fixed = list(pm.omega_fixed)
    if fixed:
        fi = torch.tensor(fixed)
        out[fi.unsqueeze(1), fi.unsqueeze(0)] = current[fi.unsqueeze(1), fi.unsqueeze(0)]
    return 0.5 * (out + out.T)


def its_omega(vae, population, batch, ipred0, eta0, error_model, sd, *, iterations: int = 2):
    """The hybrid's OMEGA (K, K) and the history of its diagonal, by ``iterations`` ITS steps on the patients of
    ``batch`` (the training patients: ``ipred0``/``eta0`` their ODE-only MAP prediction and ETAs), from the
    population fit's OMEGA (see the module docstring). Models without ETAs, or a non-joint hybrid (whose ETAs
    are the ODE-only ones), keep the population OMEGA."""
    omega = population.omega.tensor()
    history = [torch.diagonal(omega).tolist()]
    if omega.numel() == 0 or not vae.joint:
        return omega, history
    pm = population.model
    for _ in range(int(iterations)):
        base = ODEBaseline(with_omega(population, omega))
        est = estimate_hybrid(vae, batch, ipred0, eta0, error_model, sd, baseline=base)
        cov = conditional_covariance(vae, base, batch, est.eta, est.z, error_model, sd)
        eta = est.eta
        s = (eta.T @ eta + cov.sum(0)) / eta.shape[0]
        omega = _project(pm, omega, s)
        history.append(torch.diagonal(omega).tolist())
    return omega, history
