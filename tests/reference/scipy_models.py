"""Independent reference solutions with scipy.integrate.solve_ivp (LSODA, rtol 1e-10).

The right-hand sides are written here again in numpy, from the model equations, without importing
hybridpk's model code; dose records are expanded here too (ADDL, lag, F, infusions). Steady state is
reproduced by *giving the regimen explicitly* for many intervals before the SS dose.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.integrate import solve_ivp
from scipy.special import gammaln


def _mm(p, c):
    return p["VMAX"] * c / (p["KM"] + c)


def rhs_linear(n_per, oral):
    def f(t, a, p, rate, extra):
        k10 = p["CL"] / p["V"]
        c = 1 if oral else 0
        d = np.zeros_like(a)
        if oral:
            d[0] = -p["KA"] * a[0]
            d[c] += p["KA"] * a[0]
        d[c] -= k10 * a[c]
        for j, (q, vp) in enumerate([("Q", "V2"), ("Q3", "V3")][:n_per]):
            flow = p[q] / p["V"] * a[c] - p[q] / p[vp] * a[c + 1 + j]
            d[c] -= flow
            d[c + 1 + j] += flow
        return d + rate
    return f


def rhs_iv_mm(t, a, p, rate, extra):
    return np.array([-_mm(p, a[0] / p["V"])]) + rate


def rhs_oral_mm(t, a, p, rate, extra):
    return np.array([-p["KA"] * a[0], p["KA"] * a[0] - _mm(p, a[1] / p["V"])]) + rate


def rhs_transit(t, a, p, rate, extra):
    ktr = (p["NN"] + 1) / p["MTT"]
    inp = 0.0
    for td, amt in extra["chain"]:
        s = t - td
        if s > 0:
            inp += amt * math.exp((p["NN"] + 1) * math.log(ktr) + p["NN"] * math.log(s) - ktr * s
                                  - gammaln(p["NN"] + 1))
    return np.array([inp - p["KA"] * a[0], p["KA"] * a[0] - p["CL"] / p["V"] * a[1]]) + rate


def rhs_tmdd_full(t, a, p, rate, extra):
    c = a[0] / p["V"]
    r, rc = a[2], a[3]
    kon_term = p["KON"] * c * r - p["KOFF"] * rc
    dist = p["Q"] * c - p["Q"] / p["V2"] * a[1]
    return np.array([-p["CL"] * c - kon_term * p["V"] - dist, dist, p["KSYN"] - p["KDEG"] * r - kon_term,
                     kon_term - p["KINT"] * rc]) + rate


def qss_free(ctot, rtot, kss):
    b = ctot - rtot - kss
    return 0.5 * (b + math.sqrt(b * b + 4 * kss * ctot))


def rhs_tmdd_qss(t, a, p, rate, extra):
    ctot = a[0] / p["V"]
    c = qss_free(ctot, a[2], p["KSS"])
    cplx = ctot - c
    dist = p["Q"] * c - p["Q"] / p["V2"] * a[1]
    return np.array([-p["CL"] * c - p["KINT"] * cplx * p["V"] - dist, dist,
                     p["KSYN"] - p["KDEG"] * a[2] - (p["KINT"] - p["KDEG"]) * cplx]) + rate


def rhs_ehc(t, a, p, rate, extra):
    tm = extra["mid"]
    since = tm - p["TMEAL"]
    on = 1.0 if (since >= 0 and (since % p["MEALII"]) < p["TEMPT"]) else 0.0
    release = p["KEMPT"] * a[2] * on
    return np.array([release - p["KA"] * a[0], p["KA"] * a[0] - p["CL"] / p["V"] * a[1] - p["KGB"] * a[1],
                     p["KGB"] * a[1] - release]) + rate


# name -> (rhs, n_states, dose compartment index, observed index, observe function, initial state)
MODELS = {
    "1cmt_iv": (rhs_linear(0, False), 1, 0, 0),
    "1cmt_oral": (rhs_linear(0, True), 2, 0, 1),
    "2cmt_iv": (rhs_linear(1, False), 2, 0, 0),
    "2cmt_oral": (rhs_linear(1, True), 3, 0, 1),
    "3cmt_iv": (rhs_linear(2, False), 3, 0, 0),
    "3cmt_oral": (rhs_linear(2, True), 4, 0, 1),
    "1cmt_iv_mm": (rhs_iv_mm, 1, 0, 0),
    "1cmt_oral_mm": (rhs_oral_mm, 2, 0, 1),
    "1cmt_oral_transit": (rhs_transit, 2, 0, 1),
    "tmdd_full": (rhs_tmdd_full, 4, 0, 0),
    "tmdd_qss": (rhs_tmdd_qss, 3, 0, 0),
    "1cmt_oral_ehc": (rhs_ehc, 3, 0, 1),
}


def _initial(name, p, n):
    x = np.zeros(n)
    if name.startswith("tmdd"):
        x[2] = p["KSYN"] / p["KDEG"]
    return x


def _observe(name, a, p, obs):
    if name == "tmdd_qss":
        return qss_free(a[0] / p["V"], a[2], p["KSS"])
    return a[obs] / p["V"]


def expand_doses(rows, name, p, ss_cycles=300):
    """rows: dicts with TIME, AMT, CMT (1-based, 0 default), RATE, DUR, ADDL, II, SS. Returns dose tuples
    (time, amt, cmt index, duration, rate) with F/ALAG applied and SS regimens written out explicitly."""
    rhs, n, dose_idx, obs = MODELS[name]
    out = []
    for r in rows:
        cmt = dose_idx if r.get("CMT", 0) in (0, dose_idx + 1) else r["CMT"] - 1
        default = cmt == dose_idx
        f = p.get("F", 1.0) if default else 1.0
        lag = p.get("ALAG", 0.0) if default and name != "1cmt_oral_transit" else 0.0
        amt = r["AMT"] * f
        rate, dur = r.get("RATE", 0.0), r.get("DUR", 0.0)
        if rate > 0:
            dur = amt / rate
        elif rate == -2:
            rate = amt / dur
        else:
            dur = 0.0
        times = [r["TIME"] + k * r.get("II", 0.0) for k in range(int(r.get("ADDL", 0)) + 1)]
        if r.get("SS", 0) == 1:
            times = [r["TIME"] - k * r["II"] for k in range(ss_cycles, 0, -1)] + times
        out += [(t + lag, amt, cmt, dur, rate) for t in times]
    return out


def solve_reference(name, p, dose_rows, obs_times, ss_start=None):
    """Concentrations at ``obs_times`` (sorted); a dose at the same time as an observation comes first."""
    rhs, n, dose_idx, obs = MODELS[name]
    doses = expand_doses(dose_rows, name, p)
    chain = name == "1cmt_oral_transit"
    extra = {"chain": [(t, a) for t, a, c, d, r in doses if chain and c == dose_idx and d == 0]}
    events = set()
    for t, a, c, d, r in doses:
        events.add(t)
        if d > 0:
            events.add(t + d)
    if name == "1cmt_oral_ehc":
        k = 0
        while p["TMEAL"] + k * p["MEALII"] <= max(obs_times) + 1:
            events.add(p["TMEAL"] + k * p["MEALII"])
            events.add(p["TMEAL"] + k * p["MEALII"] + p["TEMPT"])
            k += 1
    t0 = min(min(events), min(obs_times))
    grid = sorted(e for e in events | set(obs_times) if e >= t0)
    a = _initial(name, p, n)
    out = {}
    t_prev = t0
    for t in grid:
        if t > t_prev:
            rate = np.zeros(n)
            for td, amt, c, d, r in doses:
                if d > 0 and td <= t_prev and td + d >= t:
                    rate[c] += r
            extra["mid"] = 0.5 * (t_prev + t)
            sol = solve_ivp(lambda tt, y: rhs(tt, y, p, rate, extra), (t_prev, t), a, method="LSODA",
                            rtol=1e-10, atol=1e-13)
            assert sol.success, sol.message
            a = sol.y[:, -1]
            t_prev = t
        for td, amt, c, d, r in doses:
            if td == t and d == 0 and not (chain and c == dose_idx):
                a = a.copy()
                a[c] += amt
        if t in obs_times:
            out[t] = _observe(name, a, p, obs)
    return np.array([out[t] for t in obs_times])
