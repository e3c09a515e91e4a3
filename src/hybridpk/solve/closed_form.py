"""Exact solution of linear mammillary models by superposition of analytic unit responses.

The central concentration after a unit bolus into the central compartment is a sum of exponentials
``sum_i c_i exp(-lambda_i t)``; ``lambda_i`` are the eigenvalues of the (symmetrisable) disposition
matrix and ``c_i = prod_j (k_j1 - lambda_i) / (V prod_{m != i} (lambda_m - lambda_i))``. Infusions integrate
it, first-order absorption convolves it with ``KA exp(-KA t)``, and a steady-state dose adds the geometric
series of its past doses, ``exp(-lambda (s + II)) / (1 - exp(-lambda II))`` per exponential. Everything is
vectorised over subjects x records x doses, with times since dose clamped at 0 (no NaN gradients).
"""

from __future__ import annotations

import torch

from ..errors import ModelError
from ._events import applies, applies_ss, dose_events


def disposition(v, k10, pairs):
    """Decay rates (N, M) and coefficients (N, M) of the unit bolus response of the central concentration."""
    if not pairs:
        return k10.unsqueeze(-1), (1.0 / v).unsqueeze(-1)
    if len(pairs) == 1:
        k12, k21 = pairs[0]
        a = k10 + k12 + k21
        b = k10 * k21
        root = torch.sqrt(torch.clamp(a * a - 4 * b, min=0.0))
        l1 = 0.5 * (a + root)
        l2 = b / l1                                     # stable small root
        lam = torch.stack([l1, l2], -1)
    else:
        n = v.shape[0]
        s = v.new_zeros(n, len(pairs) + 1, len(pairs) + 1)
        s[:, 0, 0] = k10 + sum(k1j for k1j, _ in pairs)
        for j, (k1j, kj1) in enumerate(pairs):
            s[:, j + 1, j + 1] = kj1
            off = torch.sqrt(k1j * kj1)
            s[:, 0, j + 1] = -off
            s[:, j + 1, 0] = -off
        lam = torch.linalg.eigvalsh(s)                  # decay rates, ascending
    m = lam.shape[-1]
    coef = []
    for i in range(m):
        num = torch.ones_like(v)
        for _, kj1 in pairs:
            num = num * (kj1 - lam[:, i])
        den = v.clone()
        for k in range(m):
            if k != i:
                den = den * (lam[:, k] - lam[:, i])
        coef.append(num / den)
    return lam, torch.stack(coef, -1)


def _safe_ka(ka, lam):
    """KA nudged by 1e-7 relative where it (nearly) equals a disposition rate, avoiding 0/0 (N, M)."""
    k = ka.unsqueeze(-1)
    close = (k - lam).abs() < 1e-7 * k
    return torch.where(close, k * (1 + 2e-7), k.expand_as(lam))


def _disposition_per_record(v, k10, pairs):
    """:func:`disposition` for parameters given per record (N, R): rates and coefficients (N, R, M)."""
    n, r = v.shape
    flat = [x.reshape(n * r) for x in (v, k10)]
    lam, coef = disposition(*flat, [(a.reshape(n * r), b.reshape(n * r)) for a, b in pairs])
    return lam.reshape(n, r, -1), coef.reshape(n, r, -1)


def concentration(model, p: dict, batch, rec_time=None, rec_key=None):
    """Central concentration (N, R) at the batch's record times (or ``rec_time`` (N, R) with ``rec_key``).

    Parameters may be given per record (N, R) when they are constant between resets (see
    :func:`constant_between_resets`): each record's concentration is then the superposition of the doses since
    the last reset, all under that record's parameters (F and ALAG: each dose's own record's)."""
    per_record = any(v.dim() == 2 for v in p.values())
    if per_record:
        n, r = batch.time.shape
        p = {k: (v if v.dim() == 2 else v.unsqueeze(1).expand(n, r)) for k, v in p.items()}
        from .ode import record_of_doses

        dose_rec = record_of_doses(batch)
        p_dose = {k: v.gather(1, dose_rec) for k, v in p.items()}
    v, k10, pairs, ka = model.mammillary(p)
    ev = dose_events(model, p_dose if per_record else p, batch)
    central = model.obs_cmt - 1
    depot = 0 if ka is not None else -1
    other = ev.active & (ev.cmt != central) & (ev.cmt != depot)
    if other.any():
        raise ModelError(f"the closed form of {model.name} handles doses into the central compartment"
                         + (" or the depot" if ka is not None else "") + "; use method='ode' for doses into "
                         "peripheral compartments")
    if rec_time is None:
        rec_time, rec_key = batch.time, batch.row.to(batch.time.dtype)
    on = applies(ev, rec_time, rec_key)                                   # (N, R, D)
    any_ss = bool((ev.active & (ev.ss > 0)).any())
    on_ss = applies_ss(ev, batch, rec_time, rec_key) if any_ss else torch.zeros_like(on)  # past SS doses
    s_raw = rec_time.unsqueeze(2) - ev.time.unsqueeze(1)
    s = torch.where(on, s_raw, torch.zeros_like(s_raw))
    dur = ev.duration.unsqueeze(1)
    infusion = (dur > 0).expand_as(s)
    after_end = torch.where(infusion & (s > dur), s - dur, torch.zeros_like(s))
    ss = on_ss
    ii = torch.where(ev.ss > 0, ev.ii, torch.ones_like(ev.ii)).unsqueeze(1)

    lam, coef = _disposition_per_record(v, k10, pairs) if per_record else disposition(v, k10, pairs)

    def b(x):                           # (N, M) or per record (N, R, M) -> broadcast over (N, R, D, M)
        return x[:, :, None, :] if x.dim() == 3 else x[:, None, None, :]

    def e(mu, x):                       # mu (N, M) -> (N, 1, 1, M); x (N, R, D) -> (N, R, D, M)
        return torch.exp(-b(mu) * x.unsqueeze(-1))

    zero = torch.zeros_like(s)
    # time since the k-th past dose is s + k II (s may be negative, down to -ALAG, before the lagged dose)
    x_ss_bolus = torch.where(ss, s_raw + ii, zero)
    x_ss_inf = torch.where(ss, (s_raw - dur + ii).clamp(min=0.0), zero)  # all complete: dur + ALAG <= II
    ii_ss = torch.where(ss, ii.expand_as(s), zero)

    any_inf = bool(infusion.any())
    any_bolus = bool((~infusion & on).any())

    def response(mu):
        """Time functions (N, R, D, M) per unit amount (bolus) or unit rate (infusion), decay rates mu.
        Only the parts the batch needs are computed (no steady state, infusion or bolus: skipped)."""
        m = b(mu)
        now = on.unsqueeze(-1)
        es = e(mu, s)
        out = torch.where(now, es, torch.zeros_like(es)) if any_bolus else None
        if any_ss:
            denom = 1.0 - e(mu, ii_ss)
            geo = torch.where(ss.unsqueeze(-1), 1.0 / torch.where(ss.unsqueeze(-1), denom, torch.ones_like(denom)),
                              torch.zeros_like(denom))
            e_ss = e(mu, x_ss_bolus)
            if any_bolus:
                out = out + e_ss * geo
        if any_inf:
            inf = (e(mu, after_end) - es) / m
            if any_ss:
                inf = inf + (e(mu, x_ss_inf) - e_ss) / m * geo
            out = inf if out is None else torch.where(infusion.unsqueeze(-1), inf, out)
        if out is None:                 # no dose acts on any record (none given yet, or all after the records)
            out = torch.zeros(s.shape + mu.shape[-1:], dtype=s.dtype, device=s.device)
        return out

    amount = torch.where(infusion, ev.rate.unsqueeze(1).expand_as(s), ev.amt.unsqueeze(1).expand_as(s))
    amount = torch.where(on | on_ss, amount, torch.zeros_like(amount))
    r_lam = response(lam)                                               # (N, R, D, M)
    into_central = (ev.cmt == central).unsqueeze(1).expand_as(s)
    conc = torch.where(into_central, (r_lam * b(coef)).sum(-1), torch.zeros_like(s))
    if ka is not None:
        kas = _safe_ka(ka, lam)                                          # (N, M) or (N, R, M)
        w = coef * kas / (kas - lam)
        r_ka = torch.stack([response(kas[..., i:i + 1])[..., 0] for i in range(lam.shape[-1])], -1)
        oral = ((r_lam - r_ka) * b(w)).sum(-1)
        conc = conc + torch.where((ev.cmt == depot).unsqueeze(1).expand_as(s), oral, torch.zeros_like(s))
    return (conc * amount).sum(-1)


def constant_between_resets(p: dict, batch) -> bool:
    """True when every parameter given per record (N, R) keeps one value from each reset (EVID 3/4, SS=1) to
    the next (typically: occasions that each start with a reset): the closed form then holds per record."""
    varying = [v.detach() for v in p.values() if v.dim() == 2]
    if not varying:
        return True
    reset = batch.dose_reset | (batch.dose_mask & (batch.dose_ss == 1))
    key = batch.row.to(batch.time.dtype)
    rt = torch.where(reset, batch.dose_time, torch.full_like(batch.dose_time, float("inf")))
    rk = batch.dose_row.to(key.dtype) - 0.75
    after = (batch.time.unsqueeze(2) > rt.unsqueeze(1)) | (
        (batch.time.unsqueeze(2) == rt.unsqueeze(1)) & (key.unsqueeze(2) > rk.unsqueeze(1)))
    segment = (after & reset.unsqueeze(1)).sum(2)                            # resets at or before each record
    pair = batch.record_mask[:, 1:] & batch.record_mask[:, :-1] & (segment[:, 1:] == segment[:, :-1])
    return all(bool(((v[:, 1:] == v[:, :-1]) | ~pair).all()) for v in varying)


def input_response(model, p: dict, rec_time, starts, width: float):
    """Concentration (N, R, G) in the observed compartment at ``rec_time`` (N, R) h per unit rate (amount/h)
    given into the model's dose compartment (the depot of oral models, without F or ALAG) during
    [starts, starts + width) (``starts`` (N, G) h): the exact response of a linear model to a piecewise-
    constant input, so that C(t) = sum_g response[..., g] * rate_g."""
    v, k10, pairs, ka = model.mammillary(p)
    lam, coef = disposition(v, k10, pairs)
    s = (rec_time.unsqueeze(2) - starts.unsqueeze(1)).clamp(min=0.0)       # time since the interval began
    after = (s - width).clamp(min=0.0)                                      # time since it ended

    def integral(mu):   # int_{after}^{s} exp(-mu x) dx, (N, R, G, M)
        m = mu[:, None, None, :]
        return (torch.exp(-m * after.unsqueeze(-1)) - torch.exp(-m * s.unsqueeze(-1))) / m

    r_lam = integral(lam)
    if ka is None or model.dose_cmt != 1:
        return (r_lam * coef[:, None, None, :]).sum(-1)
    kas = _safe_ka(ka, lam)
    w = coef * kas / (kas - lam)
    r_ka = torch.stack([integral(kas[:, i:i + 1])[..., 0] for i in range(lam.shape[-1])], -1)
    return ((r_lam - r_ka) * w[:, None, None, :]).sum(-1)
