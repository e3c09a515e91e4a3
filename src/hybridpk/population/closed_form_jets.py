"""The one-, two- and three-compartment closed forms (NONMEM's ADVAN1-4, 11, 12) with their first and second
derivatives in the log-parameters, by second-order forward-mode arithmetic (:mod:`hybridpk.population.jets`), for
the analytic FOCE-I path (:mod:`hybridpk.population.analytic_focei`): two and three compartments, and one
compartment with steady-state doses, a lag, F or IV doses beside oral ones (without those, one compartment has
its derivatives by hand there). Three compartments: :func:`_three_exponents`.

The central concentration after a unit bolus is sum_i c_i e^(-lambda_i t) (Gibaldi & Perrier,
Pharmacokinetics, 2nd ed., 1982, ch. 1-3): one compartment c = 1/V, lambda = CL/V; two, with k10 = CL/V,
k12 = Q/V, k21 = Q/V2, lambda = alpha > beta the roots of s^2 - (k10 + k12 + k21) s + k10 k21 (beta =
k10 k21 / alpha, free of cancellation) and c = (alpha - k21) / ((alpha - beta) V), (k21 - beta) /
((alpha - beta) V). Per exponential rate mu and unit amount, with s the time since the dose:

- bolus: e^(-mu s);
- infusion of duration T at unit rate: (e^(-mu t2) - e^(-mu s)) / mu, t2 = max(s - T, 0), during and after it;
- first-order absorption convolves the bolus response with KA e^(-KA t): sum_i c_i KA / (KA - lambda_i)
  (R(lambda_i) - R(KA)), R the response above;
- a steady-state dose (SS, interval II) adds the doses before it, every II: the bolus response times
  G = 1 / (1 - e^(-mu II)), and an infusion's (dose before the last: complete, T <= II) part
  (e^(-mu (s - T + II)) - e^(-mu (s + II))) / mu G, as hybridpk.solve.closed_form computes them.

Where two exponents meet (alpha = beta, or KA = a lambda: a removable 0/0 of these forms), the caller takes
the general path (:func:`singular`).
"""

from __future__ import annotations

import numpy as np

from .jets import Jet, variables

__all__ = ["PARAMETERS", "Doses", "jet", "singular", "time_function"]

#: the structures' parameters in the order of the log-parameters phi
PARAMETERS = {"1cmt_oral": ("KA", "CL", "V"), "1cmt_iv": ("CL", "V"),
              "2cmt_oral": ("KA", "CL", "V", "Q", "V2"), "2cmt_iv": ("CL", "V", "Q", "V2"),
              "3cmt_oral": ("KA", "CL", "V", "Q", "V2", "Q3", "V3"), "3cmt_iv": ("CL", "V", "Q", "V2", "Q3", "V3")}
#: relative distance below which two exponents count as equal (see :func:`singular`)
NEAR = 1e-7


class Doses:
    """The doses acting at each observation, (N, J, D) arrays: ``tau`` the time since the dose and ``amt`` its
    amount (0 where it does not act), ``duration`` (N, 1, D) its infusion's duration (0: a bolus), ``ss``
    (N, J, D) where it is a steady-state dose, ``ii`` (N, 1, D) its interval (1 where not SS). ``lagged``
    (N, J, D): where an acting dose is delayed by the lag time ALAG (tau = time since the record - ALAG there;
    None: no lag in the model). ``central`` (N, 1, D): for an oral structure, the doses given straight into the
    central compartment (an IV bolus or infusion: no absorption, F or lag; None: none). With a lag, ``acts``
    (N, J, D): where the dose itself has been given (its lagged time passed); a steady-state dose's earlier
    doses act from its record on (``ss``), where ``tau`` may be negative, down to -ALAG."""

    def __init__(self, tau, amt, duration, ss, ii, lagged=None, central=None, acts=None):
        self.tau, self.amt, self.duration, self.ss, self.ii = tau, amt, duration, ss, ii
        self.lagged, self.central, self.acts = lagged, central, acts

    def only(self, which) -> "Doses":
        """These doses with the amounts of those not in ``which`` (N, 1, D) set to 0."""
        lagged = None if self.lagged is None else self.lagged & which
        return Doses(self.tau, np.where(which, self.amt, 0.0), self.duration, self.ss, self.ii, lagged,
                     acts=self.acts)


def _exponents(p, two: bool):
    """[(lambda_i, c_i)] jets (N,) of the unit bolus response from the parameters' jets {name: jet}."""
    cl, v = p["CL"], p["V"]
    if "Q3" in p:
        return _three_exponents(p)
    if not two:
        return [(cl / v, 1.0 / v)]
    k10, k12, k21 = cl / v, p["Q"] / v, p["Q"] / p["V2"]
    s = k10 + k12 + k21
    alpha = 0.5 * (s + (s * s - 4.0 * (k10 * k21)).sqrt())
    beta = (k10 * k21) / alpha
    return [(alpha, (alpha - k21) / ((alpha - beta) * v)), (beta, (k21 - beta) / ((alpha - beta) * v))]


def _three_exponents(p):
    """Three compartments (ADVAN11/12): the rates are the roots of l^3 - a2 l^2 + a1 l - a0 (a2 = k10 + k12 + k13 +
    k21 + k31, a1 = k10 k21 + k10 k31 + k12 k31 + k13 k21 + k21 k31, a0 = k10 k21 k31), by the trigonometric
    solution of the depressed cubic (three real roots), as NONMEM's ADVAN11 computes them; c_i = (k21 - l_i)
    (k31 - l_i) / (V prod_j!=i (l_j - l_i))."""
    cl, v = p["CL"], p["V"]
    k10, k12, k21, k13, k31 = cl / v, p["Q"] / v, p["Q"] / p["V2"], p["Q3"] / v, p["Q3"] / p["V3"]
    a2 = k10 + k12 + k13 + k21 + k31
    a1 = k10 * k21 + k10 * k31 + k12 * k31 + k13 * k21 + k21 * k31
    a0 = k10 * k21 * k31
    q = a1 - a2 * a2 * (1.0 / 3.0)                       # depressed cubic t^3 + q t + r, l = t + a2/3
    r = a1 * a2 * (1.0 / 3.0) - a0 - a2 * a2 * a2 * (2.0 / 27.0)
    m = (q * (-1.0 / 3.0)).sqrt()
    angle = ((r * 1.5) / (q * m)).arccos() * (1.0 / 3.0)   # cos(3 theta) = (3 r / (2 q)) sqrt(-3 / q)
    rates = [(angle - 2.0 * np.pi * j / 3.0).cos() * (2.0 * m) + a2 * (1.0 / 3.0) for j in range(3)]
    out = []
    for i, lam in enumerate(rates):
        den = v
        for j, other in enumerate(rates):
            if j != i:
                den = den * (other - lam)
        out.append((lam, (k21 - lam) * (k31 - lam) / den))
    return out


def _parameters(phi, params, derivatives: bool = True) -> dict:
    """{name: jet (N,)} of the parameters exp(phi) (phi (N, P) in ``params``' order), in the P variables phi, or
    in none (plain values, no derivative arithmetic) without ``derivatives``."""
    n = phi.shape[0]
    logs = (variables(phi) if derivatives
            else [Jet(phi[:, k], np.zeros((n, 0)), np.zeros((n, 0, 0))) for k in range(phi.shape[1])])
    return {name: x.exp() for name, x in zip(params, logs)}


def singular(phi, params) -> bool:
    """Some subject's exponents meet (alpha = beta, or KA = a lambda: KA = CL/V for one compartment), to
    :data:`NEAR` relative."""
    p = _parameters(phi, params, derivatives=False)
    with np.errstate(all="ignore"):
        lam = [rate.v for rate, _ in _exponents(p, "Q" in p)]
    if not all(np.isfinite(x).all() for x in lam):
        return True
    for i in range(len(lam)):
        for j in range(i + 1, len(lam)):
            if (np.abs(lam[i] - lam[j]) <= NEAR * np.maximum(lam[i], lam[j])).any():
                return True
    ka = p["KA"].v if "KA" in p else None
    return ka is not None and any(bool((np.abs(ka - x) <= NEAR * ka).any()) for x in lam)


def time_function(mu, doses: Doses):
    """F(mu) = sum_d amount_d R_d(mu) (N, J) at the observations, with dF/dmu and d2F/dmu2, as a jet in the one
    variable mu (N,), an exponential rate (R the response per unit amount or rate of the module docstring), or,
    with lagged doses (``doses.lagged``), in the two variables (mu, ALAG): the lag shifts the lagged doses' time
    since the dose (dtau/dALAG = -1 there). The per-dose work is done in these variables and summed over the
    doses before the chain rule to the log-parameters (:func:`jet`), so its cost does not grow with their
    number."""
    d = doses
    n = mu.shape[0]
    lag = d.lagged is not None
    if lag:                 # mu and ALAG as variables; tau a jet in ALAG
        m = Jet(mu.reshape(n, 1, 1), np.array([1.0, 0.0]), np.zeros((2, 2)))
        tau = Jet(d.tau, np.stack([np.zeros_like(d.tau), -d.lagged.astype(float)], -1), np.zeros((2, 2)))
    else:
        m = variables(mu[:, None])[0].reshape(n, 1, 1)
        tau = d.tau
    bolus = d.duration <= 0
    with np.errstate(all="ignore"):
        amount = np.where(bolus, d.amt, d.amt / np.where(bolus, 1.0, d.duration))   # an infusion: its rate

    def decay(t):
        return (m * (-t)).exp()

    es = decay(tau)
    out = es * np.where(bolus if d.acts is None else bolus & d.acts, 1.0, 0.0)
    if not bolus.all():
        running = ~bolus & (d.tau > d.duration)      # infusions that have ended: time since the end
        t2 = (tau - d.duration).where(running) if lag else np.where(running, d.tau - d.duration, 0.0)
        out = out + (decay(t2) - es) / m * np.where(bolus, 0.0, 1.0)
    if d.ss.any() and lag:
        # the doses before a lagged steady-state bolus, every II: sum_k>=1 e^(-mu (tau + k II)), from its record on
        if (d.ss & ~bolus).any():
            raise ValueError("steady-state infusions with a lag time are left to the general path")
        geo = 1.0 / (1.0 - (m * (-d.ii)).exp())
        out = out + (decay(tau + d.ii) * geo) * d.ss.astype(float)
    elif d.ss.any():
        steady = d.ss.astype(float)
        geo = 1.0 / (1.0 - (m * (-d.ii)).exp())
        out = out + (es * (geo - 1.0)) * (steady * bolus)
        if not bolus.all():
            after_last = np.where(d.ss, d.tau - d.duration + d.ii, 0.0)    # the infusion before the last: complete
            before_last = np.where(d.ss, d.tau + d.ii, 0.0)
            out = out + ((decay(after_last) - decay(before_last)) / m * geo) * (steady * ~bolus)
    return (out * amount).sum()


def jet(phi, params, doses: Doses, value_only: bool = False):
    """(f (N, J), df/dphi (N, J, P), d2f/dphi2 (N, J, P, P)) (or f alone) at the observations for the
    log-parameters ``phi`` (N, P) of the structure whose parameters are ``params`` (:data:`PARAMETERS`, then
    "ALAG" when ``doses`` are lagged, "F" when the model has a bioavailability): the rates and coefficients as
    jets in phi (N,), each rate's :func:`time_function` composed with its jet (and ALAG's); the doses into the
    dose compartment times F, and, for an oral structure, those straight into the central compartment by the IV
    response."""
    n = phi.shape[0]
    p = _parameters(phi, params, derivatives=not value_only)
    lag = p["ALAG"].reshape(n, 1) if doses.lagged is not None else None

    def at_observations(mu, given):  # F(mu) (N, J) (F(mu, ALAG) with lagged doses) as a jet in phi
        f = time_function(mu.v, given)
        if given.lagged is not None:
            return mu.reshape(n, 1).apply2(lag, f.v, f.g, f.h)
        return mu.reshape(n, 1).apply(f.v, f.g[..., 0], f.h[..., 0, 0])

    terms = _exponents(p, "Q" in p)
    ka = p.get("KA")
    if ka is None:
        parts = [c.reshape(n, 1) * at_observations(lam, doses) for lam, c in terms]
    else:
        oral = doses if doses.central is None else doses.only(~doses.central)
        f_ka = at_observations(ka, oral)
        parts = [(c * ka / (ka - lam)).reshape(n, 1) * (at_observations(lam, oral) - f_ka) for lam, c in terms]
    if "F" in p:                    # the bioavailability of the doses into the dose compartment
        parts = [p["F"].reshape(n, 1) * part for part in parts]
    if ka is not None and doses.central is not None:
        iv = doses.only(doses.central)
        parts += [c.reshape(n, 1) * at_observations(lam, iv) for lam, c in terms]
    total = sum(parts[1:], parts[0])
    if value_only:
        return total.v
    return total.v, total.g, total.h
