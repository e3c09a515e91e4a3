"""The two-compartment closed forms (NONMEM's ADVAN3 and ADVAN4) with their first and second derivatives in the
log-parameters, by second-order forward-mode arithmetic (:mod:`hybridpk.population.jets`), for the analytic
FOCE-I path (:mod:`hybridpk.population.analytic_focei`).

With k10 = CL/V, k12 = Q/V, k21 = Q/V2, the exponents alpha > beta are the roots of
s^2 - (k10 + k12 + k21) s + k10 k21 (beta = k10 k21 / alpha, free of cancellation), and per unit dose
(Gibaldi & Perrier, Pharmacokinetics, 2nd ed., 1982, ch. 2-3; NONMEM's ADVAN3/ADVAN4):

- IV bolus: (A e^(-alpha t) + B e^(-beta t)) / V, A = (alpha - k21) / (alpha - beta), B = (k21 - beta) /
  (alpha - beta);
- infusion of duration T at rate 1/T: (A/alpha (e^(-alpha t2) - e^(-alpha t)) + B/beta (e^(-beta t2) -
  e^(-beta t))) / (T V) with t2 = max(t - T, 0), during and after it alike;
- first-order absorption: KA/V (A' e^(-alpha t) + B' e^(-beta t) + C' e^(-KA t)), A' = (k21 - alpha) /
  ((KA - alpha)(beta - alpha)), B' = (k21 - beta) / ((KA - beta)(alpha - beta)), C' = (k21 - KA) /
  ((alpha - KA)(beta - KA)).

Where alpha and beta meet, or KA meets either (a removable 0/0 of these forms), the caller takes the general
path (:func:`singular`).
"""

from __future__ import annotations

import numpy as np

from .jets import Jet, variables

__all__ = ["PARAMETERS", "jet", "singular"]

#: the structures' parameters in the order of the log-parameters phi
PARAMETERS = {"2cmt_iv": ("CL", "V", "Q", "V2"), "2cmt_oral": ("KA", "CL", "V", "Q", "V2")}
#: relative distance below which two exponents count as equal (see :func:`singular`)
NEAR = 1e-7


def _exponents(cl, v, q, v2):
    """(alpha, beta, k21) jets (N,) from the parameters' jets."""
    k10, k12, k21 = cl / v, q / v, q / v2
    s = k10 + k12 + k21
    disc = (s * s - 4.0 * (k10 * k21)).sqrt()
    alpha = 0.5 * (s + disc)
    return alpha, (k10 * k21) / alpha, k21


def _numbers(phi, oral: bool):
    """(KA or None, alpha, beta) as arrays (N,) from the log-parameters (N, P)."""
    p = np.exp(phi)
    ka = p[:, 0] if oral else None
    cl, v, q, v2 = (p[:, 1:] if oral else p).T
    k10, k12, k21 = cl / v, q / v, q / v2
    s = k10 + k12 + k21
    alpha = 0.5 * (s + np.sqrt(s * s - 4 * k10 * k21))
    return ka, alpha, k10 * k21 / alpha


def singular(phi, oral: bool) -> bool:
    """Some subject's exponents meet (alpha = beta, or KA = alpha or beta), to :data:`NEAR` relative."""
    ka, alpha, beta = _numbers(phi, oral)
    if (alpha - beta <= NEAR * alpha).any():
        return True
    return bool(oral and ((np.abs(ka - alpha) <= NEAR * ka) | (np.abs(ka - beta) <= NEAR * ka)).any())


def jet(phi, tau, amt, duration, oral: bool, value_only: bool = False):
    """(f (N, J), df/dphi (N, J, P), d2f/dphi2 (N, J, P, P)) (or f alone) at the observations for the
    log-parameters ``phi`` (N, P) (:data:`PARAMETERS` order), ``tau`` (N, J, D) the time since each dose (0 before
    it), ``amt`` (N, J, D) its amount (0 before it), ``duration`` (N, 1, D) its infusion duration (0: a bolus)."""
    n = phi.shape[0]
    logs = (variables(phi) if not value_only       # no derivatives: jets in no variables, plain arithmetic
            else [Jet(phi[:, k], np.zeros((n, 0)), np.zeros((n, 0, 0))) for k in range(phi.shape[1])])
    p = [x.exp() for x in logs]
    ka = p[0] if oral else None
    cl, v, q, v2 = p[1:] if oral else p
    alpha, beta, k21 = _exponents(cl, v, q, v2)

    def per_subject(x):      # (N,) -> (N, 1, 1), to meet the (N, J, D) arrays
        return x.reshape(n, 1, 1)

    def decay(rate, t):     # e^(-rate t), (N, J, D)
        return (per_subject(rate) * (-t)).exp()

    if oral:
        unit = per_subject(ka / v * ((k21 - alpha) / ((ka - alpha) * (beta - alpha)))) * decay(alpha, tau) \
            + per_subject(ka / v * ((k21 - beta) / ((ka - beta) * (alpha - beta)))) * decay(beta, tau) \
            + per_subject(ka / v * ((k21 - ka) / ((alpha - ka) * (beta - ka)))) * decay(ka, tau)
        total = (unit * amt).sum()
    else:
        a = (alpha - k21) / (alpha - beta) / v
        b = (k21 - beta) / (alpha - beta) / v
        bolus = duration <= 0
        with np.errstate(all="ignore"):
            dose_b = np.where(bolus, amt, 0.0)
            dose_i = np.where(bolus, 0.0, amt / np.where(bolus, 1.0, duration))      # the infusion's rate
        t2 = np.where(bolus, 0.0, np.maximum(tau - duration, 0.0))
        after_bolus = per_subject(a) * decay(alpha, tau) + per_subject(b) * decay(beta, tau)
        infused = per_subject(a / alpha) * (decay(alpha, t2) - decay(alpha, tau)) \
            + per_subject(b / beta) * (decay(beta, t2) - decay(beta, tau))
        total = (after_bolus * dose_b + infused * dose_i).sum()
    if value_only:
        return total.v
    return total.v, total.g, total.h
