"""General path: batched torchdiffeq integration, event to event, for any model.

Every subject has its own sorted list of events (records, bolus doses, infusion starts and ends, resets,
model switch times such as meals). Step j integrates all subjects from their event j-1 to their event j in
*local time* s in [0, 1] (dA/ds = dt_j * f), so subjects with different dose and sample times share one
solver call, and no dose discontinuity is ever crossed inside a call. The error norm is the maximum over
subjects and states, which keeps a per-subject error guarantee (torchdiffeq's default RMS norm dilutes one
subject's error by 1/sqrt(N)). Backpropagation goes through the solver (not the adjoint: see
docs in ``shared`` notes: it is slower and inaccurate for PK).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelError
from ._dp5 import march
from ._events import dose_events

# event kinds
RECORD, BOLUS, INF_START, INF_END, RESET, SWITCH, SS_START = range(7)


@dataclass
class SolverContext:
    """What a right-hand side may read besides (t, a, p, rate)."""

    segment_mid: torch.Tensor | None = None     # (N,) midpoint of the current segment (h)
    transit_time: torch.Tensor | None = None    # (N, D) doses entering through a transit chain
    transit_amt: torch.Tensor | None = None


def _max_norm(x):
    return x.abs().max()


class _Segment(torch.nn.Module):
    def __init__(self, model, p, rate, t0, dt, ctx):
        super().__init__()
        self.model, self.p, self.rate, self.t0, self.dt, self.ctx = model, p, rate, t0, dt, ctx

    def forward(self, s, a):
        t = self.t0 + s * self.dt
        return self.dt.unsqueeze(-1) * self.model.rhs(t, a, self.p, self.rate, self.ctx)


def _matrix_exp_step(model, p, a, rate, dt, t_mid):
    """Exact solution of da/dt = A a + rate over dt (N,) h, A = model.system_matrix on the segment: the
    augmented exponential expm([[A dt, rate dt], [0, 0]]) gives e^(A dt) a + (integral of e^(A s) ds) rate
    without inverting A (which is singular, e.g. with KGB = 0 or without elimination)."""
    n, s = a.shape
    mat = model.system_matrix(p, t_mid) * dt.view(n, 1, 1)
    if s == 1:   # one compartment: e^x a + rate dt (e^x - 1)/x, x = A dt, without a matrix exponential
        x = mat[:, 0, :]
        return torch.exp(x) * a + rate * dt.unsqueeze(-1) * _phi1(x)
    if not bool((rate != 0).any()):    # no input: e^(A dt) a
        return (_expm(mat) @ a.unsqueeze(-1)).squeeze(-1)
    top = torch.cat([mat, (rate * dt.unsqueeze(-1)).unsqueeze(-1)], -1)                  # (N, S, S+1)
    aug = torch.cat([top, torch.zeros(n, 1, s + 1, dtype=a.dtype, device=a.device)], -2)  # (N, S+1, S+1)
    e = torch.linalg.matrix_exp(aug)
    return (e[:, :s, :s] @ a.unsqueeze(-1)).squeeze(-1) + e[:, :s, s]


def _expm(mat):
    """exp(mat) of (N, S, S) matrices: a depot and a central compartment (1-cmt oral: [[x, 0], [c, y]]) in closed
    form, [[e^x, 0], [c (e^x - e^y)/(x - y), e^y]] with the divided difference as c e^y phi1(x - y) (exact at
    x = y), which is cheap to differentiate twice (the EBE search's Hessians), unlike torch's matrix exponential;
    other matrices by ``torch.linalg.matrix_exp``."""
    n, s, _ = mat.shape
    if s == 2 and not bool((mat[:, 0, 1] != 0).any()):
        x, c, y = mat[:, 0, 0], mat[:, 1, 0], mat[:, 1, 1]
        ex, ey = torch.exp(x), torch.exp(y)
        return torch.stack([torch.stack([ex, torch.zeros_like(ex)], -1),
                            torch.stack([c * ey * _phi1(x - y), ey], -1)], -2)
    return torch.linalg.matrix_exp(mat)


def _phi1(x):
    """(e^x - 1)/x, 1 at x = 0 (a Taylor polynomial near 0, so that no branch is 0/0 for autograd)."""
    small = x.abs() < 1e-6
    xs = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 + x / 2 + x * x / 6, torch.expm1(xs) / xs)


def _integrate(model, p, a, rate, t0, t1, ctx, rtol, atol, method, max_steps):
    dt = t1 - t0
    if not bool((dt > 0).any()):
        if not dt.requires_grad:
            return a
        # a segment of length 0 whose ends are parameters (a switch time at a dose's time): the same amounts,
        # and the derivative the exact solution has in its length at 0, the right-hand side
        ctx.segment_mid = t0
        return a + dt.unsqueeze(-1) * model.rhs(t0, a, p, rate, ctx)
    ctx.segment_mid = t0 + 0.5 * dt
    if method == "expm":
        return _matrix_exp_step(model, p, a, rate, dt.clamp(min=0), ctx.segment_mid)
    func = _Segment(model, p, rate, t0, dt, ctx)
    grid = torch.tensor([0.0, 1.0], dtype=a.dtype, device=a.device)
    options = {"norm": _max_norm, "max_num_steps": max_steps} if method in ("dopri5", "dopri8", "bosh3") else None
    from torchdiffeq import odeint     # imported here: 0.3 s of scipy.integrate that the other paths never need

    return odeint(func, a, grid, rtol=rtol, atol=atol, method=method, options=options)[-1]


def _cycle(model, p, x, onehot, amt, rate, dur, length, sel, ctx, tol, start):
    """One dose (bolus, or infusion for ``dur`` h) at the times ``start`` (N,) h, then integration to ``length``
    h after it (split at the model's switch times, see :func:`_integrate_split`)."""
    n = x.shape[0]
    zero_t = torch.zeros(n, dtype=x.dtype, device=x.device)
    selm = sel.to(x.dtype).unsqueeze(-1)
    is_inf = dur > 0
    x = x + onehot * torch.where(is_inf, 0 * amt, amt).unsqueeze(-1) * selm
    r_on = onehot * torch.where(is_inf, rate, 0 * rate).unsqueeze(-1) * selm
    t_mid = torch.where(sel & is_inf, torch.minimum(dur, length), zero_t)
    t_end = torch.where(sel, length, zero_t)
    x = _integrate_split(model, p, x, r_on, start, start + t_mid, ctx, tol)
    return _integrate_split(model, p, x, torch.zeros_like(r_on), start + t_mid, start + t_end, ctx, tol)


def _integrate_split(model, p, a, rate, t0, t1, ctx, tol):
    """:func:`_integrate` from ``t0`` to ``t1`` (N,) h in pieces that end at the model's switch times between
    them (meals, IFs on T, model event times), as the event table does between records."""
    switch = model.switch_times(p, t1, t0)
    if switch is not None:      # only those inside the window: the others would be pieces of length 0
        switch = switch[:, ((switch > t0.unsqueeze(-1)) & (switch < t1.unsqueeze(-1))).any(0)]
    if switch is None or switch.shape[1] == 0:
        return _integrate(model, p, a, rate, t0, t1, ctx, *tol)
    t = t0
    for k in torch.argsort(switch.detach(), dim=1).T:
        tk = torch.minimum(torch.maximum(switch.gather(1, k.unsqueeze(1)).squeeze(1), t), t1)
        a = _integrate(model, p, a, rate, t, tk, ctx, *tol)
        t = tk
    return _integrate(model, p, a, rate, t, t1, ctx, *tol)


def _steady_state(model, p, x0, cmt, amt, rate, dur, ii, sel, ctx, tol, lag, dose_time):
    """State at the (un-lagged) time of a steady-state dose record, for subjects ``sel``: the regimen has been
    given every II forever, the last past dose ``II - lag`` h ago. ``dose_time`` (N,): the record's TIME; the
    cycles are integrated in the data's time, so that a model that switches in time (meals, IFs on T, model event
    times) takes the switches of the interval before the dose (the cycle ending at its lagged time), its steady
    state if that interval repeated.

    The trough is the fixed point x = Phi(x) of the dose-cycle map Phi: for a linear model in closed form
    (:func:`_linear_steady_state`), else by Newton's method with a finite-difference Jacobian. The last Newton
    step is taken with the iterate and the Jacobian detached, so its gradient is the implicit-function gradient
    (I - J)^-1 dPhi/dtheta rather than a derivative of the iterations."""
    n, s = x0.shape
    onehot = torch.nn.functional.one_hot(cmt, s).to(x0.dtype)
    eye = torch.eye(s, dtype=x0.dtype, device=x0.device).expand(n, s, s)
    selm = sel.unsqueeze(-1).unsqueeze(-1)

    start = dose_time + lag - ii         # the previous dose of the cycle that ends at the (lagged) dose

    def phi(x):
        return _cycle(model, p, x, onehot, amt, rate, dur, ii, sel, ctx, tol, start)

    if getattr(model, "linear", False) and model.piecewise_linear:
        x = _linear_steady_state(model, p, x0, phi, ii, sel, eye)
    else:
        x = _fixed_point(phi, x0, eye, selm, tol)
    # trough (just before a lagged dose) -> state ``lag`` h earlier = ``II - lag`` h after the previous dose
    if bool((lag[sel] > 0).any()):
        before = _cycle(model, p, x, onehot, amt, rate, dur, ii - lag, sel, ctx, tol, start)
        x = torch.where((sel & (lag > 0)).unsqueeze(-1), before, x)
    return x


def _linear_steady_state(model, p, x0, phi, ii, sel, eye):
    """The steady-state trough of a linear model (one system matrix A for all time): the cycle map is affine,
    Phi(x) = E x + Phi(0) with E = exp(A II), so the trough is (I - E)^-1 Phi(0); subjects not in ``sel`` keep
    ``x0``.
    Exact, differentiable to any order through ``torch.linalg`` (the Newton iteration of :func:`_fixed_point`
    re-attaches only its last step, which leaves second derivatives inexact: EBE searches on steady-state data
    then converged linearly), and one cycle and one matrix exponential instead of about ten cycles."""
    n, s = x0.shape
    a = model.system_matrix(p, None) * torch.where(sel, ii, torch.zeros_like(ii)).view(n, 1, 1)
    e = torch.where(sel.view(n, 1, 1), _expm(a), torch.zeros_like(eye))
    b = phi(torch.zeros_like(x0))                            # the state one cycle after a dose into x = 0
    x = torch.linalg.solve(eye - e, b.unsqueeze(-1)).squeeze(-1)
    return torch.where(sel.unsqueeze(-1), x, x0)


def _fixed_point(phi, x0, eye, selm, tol):
    """The fixed point x = Phi(x) by Newton's method with a finite-difference Jacobian, its last step
    re-attached (see :func:`_steady_state`)."""
    n, s = x0.shape

    def jacobian(x):
        fx = phi(x)
        cols = []
        for j in range(s):
            h = 1e-7 * (x[:, j].abs() + x.abs().amax(-1) + 1e-3)
            xp = x.clone()
            xp[:, j] = xp[:, j] + h
            cols.append((phi(xp) - fx) / h.unsqueeze(-1))
        return torch.where(selm, torch.stack(cols, -1), torch.zeros_like(eye)), fx

    with torch.no_grad():
        x = x0.detach()
        for _ in range(30):
            jac, fx = jacobian(x)
            step = torch.linalg.solve(eye - jac, (x - fx).unsqueeze(-1)).squeeze(-1)
            x = x - step
            if (step.abs() / (x.abs() + tol[1])).max() < 1e-11:
                break
        jac, _ = jacobian(x)
    return x - torch.linalg.solve(eye - jac, (x - phi(x)).unsqueeze(-1)).squeeze(-1)


def solve(model, p: dict, batch, rtol=1e-8, atol=1e-10, method="dp5", max_steps=100_000,
          return_amounts=False, rule="nonmem", step_groups=None):
    """Concentrations (N, R) at every record, and amounts (N, R, S) if asked, by event-to-event integration.

    ``method``: "dp5" (default: hybridpk's batched Dormand-Prince with per-subject steps, see ``_dp5``),
    "expm" (models linear between switch times, see ``CompartmentModel.system_matrix``: each inter-event
    segment is stepped exactly by a matrix exponential; no tolerance involved) or any torchdiffeq method name
    ("dopri5", "bosh3", "rk4", ...), which integrates all subjects together in local time between consecutive
    events. ``step_groups`` (N,) long: subjects that share step-size decisions ("dp5" only; see
    :func:`hybridpk.solve._dp5.march`)."""
    if method == "expm" and (not model.piecewise_linear or getattr(model, "dose_as_input", False)):
        raise ModelError(f"model {model.name} is not linear between switch times (no system_matrix); the "
                         "'expm' solver needs one (use solver='dp5')")
    dtype, device = batch.time.dtype, batch.time.device
    n, r = batch.time.shape
    ar = torch.arange(n, device=device)
    varying = {k for k, v in p.items() if v.dim() == 2}

    def p_at(rec):
        """Parameters (N,) in force at record columns ``rec`` (N,) (the constant ones as they are)."""
        if not varying:
            return p
        return {k: (v[ar, rec] if k in varying else v) for k, v in p.items()}

    if varying:
        dose_rec = record_of_doses(batch)
        ev = dose_events(model, {k: (v.gather(1, dose_rec) if k in varying else v) for k, v in p.items()}, batch)
    else:
        ev = dose_events(model, p, batch)
    d = ev.time.shape[1]
    transit = bool(getattr(model, "dose_as_input", False))
    ctx = SolverContext()
    via_chain = ev.active & (ev.cmt == model.dose_cmt - 1) & (ev.duration == 0) if transit else None
    if transit:
        ctx.transit_time = ev.time
        ctx.transit_amt = torch.where(via_chain, ev.amt, torch.zeros_like(ev.amt))

    # ---- event table (N, E), sorted by (time, key)
    rec_key = batch.row.to(dtype)
    inf_on = ev.active & (ev.duration > 0)
    bol_on = ev.active & (ev.duration == 0)
    if transit:
        bol_on = bol_on & ~via_chain
    t_end = torch.where(batch.record_mask, batch.time, torch.full_like(batch.time, -float("inf"))).max(-1).values
    switch = model.switch_times(p, t_end)
    ss_on = ev.active & (ev.ss > 0)
    if transit and bool((ss_on & via_chain).any()):
        raise ModelError(f"model {model.name}: a steady-state dose (SS=1/2) through its transit chain is not "
                         "supported (its steady state would be computed as a bolus into the dose compartment, "
                         "without the chain); give the past doses explicitly (ADDL with II)")
    parts_t = [batch.time, ev.time, ev.time, ev.time + ev.duration, ev.reset_time, batch.dose_time]
    parts_k = [rec_key, ev.key, ev.key, ev.key, ev.reset_key, ev.key - 0.1]
    parts_kind = [RECORD, BOLUS, INF_START, INF_END, RESET, SS_START]
    parts_on = [batch.record_mask, bol_on, inf_on, inf_on, ev.reset_mask, ss_on]
    parts_idx = [torch.arange(r, device=device)] + [torch.arange(d, device=device)] * 5
    if transit:  # the chain input is smooth but starts abruptly at each dose: make dose times boundaries
        parts_t.append(ev.time)
        parts_k.append(ev.key)
        parts_kind.append(SWITCH)
        parts_on.append(via_chain)
        parts_idx.append(torch.arange(d, device=device))
    if switch is not None:
        k = switch.shape[1]
        parts_t.append(switch)
        parts_k.append(torch.full_like(switch, -1.0))
        parts_kind.append(SWITCH)
        parts_on.append(switch <= t_end.unsqueeze(-1))
        parts_idx.append(torch.arange(k, device=device))
    times = torch.cat(parts_t, 1)
    keys = torch.cat(parts_k, 1)
    valid = torch.cat(parts_on, 1)
    kinds = torch.cat([torch.full(pt.shape, kd, dtype=torch.long, device=device) for pt, kd in
                       zip(parts_t, parts_kind)], 1)
    index = torch.cat([ix.expand(n, -1) for ix in parts_idx], 1)
    big = torch.finfo(dtype).max
    sort_t = torch.where(valid, times.detach(), torch.full_like(times, big))
    order = torch.argsort(keys, dim=1, stable=True)
    order = order.gather(1, torch.argsort(sort_t.gather(1, order), dim=1, stable=True))
    times, valid, kinds, index = (x.gather(1, order) for x in (times, valid, kinds, index))
    n_events = int(valid.sum(1).max().item())
    # padding: stay at the last real time (zero-length segments)
    last = torch.where(valid, times, torch.full_like(times, -float("inf"))).max(1).values
    times = torch.where(valid, times, last.unsqueeze(-1))
    # NONMEM's rule for parameters that change between records: the integration up to a record uses the
    # values computed at that record; every event column j lies in the interval that the first record at or
    # after it ends (events after the last record: that record's values)
    governing = _governing_records(kinds, index, valid, r, rule) if varying else None

    # ---- state and event actions (shared by both marchers)
    first_rec = torch.zeros(n, dtype=torch.long, device=device)
    st = _State(a=model.initial_state(p_at(first_rec), batch.time), n=n, d=d, r=r, model=model, dtype=dtype,
                device=device, return_amounts=return_amounts)
    x0 = st.a
    onehot = torch.nn.functional.one_hot(ev.cmt.clamp(min=0), model.n_states).to(dtype)   # (N, D, S)
    tol = (rtol, atol, "dopri5" if method == "dp5" else method, max_steps)

    def apply_event(a, j, ok):
        """Apply event j (N,) (column of the event table) for the subjects in ``ok``; returns amounts."""
        kind, idx = kinds[ar, j], index[ar, j]
        m_reset = ok & (kind == RESET)
        if m_reset.any():   # EVID 3/4 and SS=1: back to the initial state, infusions stop
            a = torch.where(m_reset.unsqueeze(-1), x0, a)
            st.rate = torch.where(m_reset.unsqueeze(-1), torch.zeros_like(st.rate), st.rate)
            st.alive = st.alive & ~m_reset.unsqueeze(-1)
        didx = idx.clamp(max=d - 1)
        oh = onehot[ar, didx]                                                   # (N, S)
        ss_here = ok & (kind == SS_START)
        if ss_here.any():
            lag = ev.time[ar, didx] - batch.dose_time[ar, didx]
            xss = _steady_state(model, p_at(dose_rec[ar, didx]) if varying else p, x0,
                                ev.cmt[ar, didx].clamp(min=0), ev.amt[ar, didx],
                                ev.rate[ar, didx], ev.duration[ar, didx], ev.ii[ar, didx], ss_here, ctx, tol,
                                lag, batch.dose_time[ar, didx])
            add2 = ss_here & (ev.ss[ar, didx] == 2)
            a = torch.where(add2.unsqueeze(-1), a + xss - x0, torch.where(ss_here.unsqueeze(-1), xss, a))
        zero = torch.zeros(n, dtype=dtype, device=device)
        m_bolus = ok & (kind == BOLUS)
        if m_bolus.any():
            a = a + oh * torch.where(m_bolus, ev.amt[ar, didx], zero).unsqueeze(-1)
        m_start = ok & (kind == INF_START)
        if m_start.any():
            st.rate = st.rate + oh * torch.where(m_start, ev.rate[ar, didx], zero).unsqueeze(-1)
            st.alive = st.alive | (torch.nn.functional.one_hot(didx, d).bool() & m_start.unsqueeze(-1))
        m_end = ok & (kind == INF_END)
        if m_end.any():
            still = st.alive[ar, didx] & m_end
            st.rate = st.rate - oh * torch.where(still, ev.rate[ar, didx], zero).unsqueeze(-1)
            st.alive = st.alive & ~(torch.nn.functional.one_hot(didx, d).bool() & still.unsqueeze(-1))
        m_rec = ok & (kind == RECORD)
        if m_rec.any():
            sel = torch.nn.functional.one_hot(idx.clamp(max=r - 1), r).to(dtype) * m_rec.to(dtype).unsqueeze(-1)
            rec = idx.clamp(max=r - 1)
            c = model.observe(a, p_at(rec), batch.cmt[ar, rec] if model.observes_compartments else None)
            st.rec_c = st.rec_c + sel * torch.where(m_rec, c, torch.zeros_like(c)).unsqueeze(-1)
            if return_amounts:
                st.rec_a = st.rec_a + sel.unsqueeze(-1) * a.unsqueeze(1)
        return a

    if method == "dp5":
        def f(t, y, mid, j):
            ctx.segment_mid = mid
            return model.rhs(t, y, p_at(governing[ar, j]) if varying else p, st.rate, ctx)

        march(f, st.a, times, valid.sum(1), apply_event, rtol, atol, max_steps, groups=step_groups)
    else:  # torchdiffeq or matrix exponentials, all subjects together from their event j-1 to event j
        a = st.a
        t_prev = times[:, 0]
        for j in range(n_events):
            tj = times[:, j]
            pj = p_at(governing[:, j]) if varying else p
            a = _integrate(model, pj, a, st.rate, t_prev, tj, ctx, *tol)
            t_prev = tj
            a = apply_event(a, torch.full((n,), j, dtype=torch.long, device=device), valid[:, j])
    return st.rec_c, st.rec_a


def record_of_doses(batch):
    """(N, D) record column of each dose event: the record it came from (ADDL doses too); a dose without a
    record (a regimen added by ``EventBatch.extend``) takes the last record before it, else the first."""
    same = batch.row.unsqueeze(2) == batch.dose_row.unsqueeze(1)             # (N, R, D)
    r = batch.row.shape[1]
    pos = torch.arange(r, device=batch.row.device).view(1, r, 1)
    before = (batch.row.unsqueeze(2) < batch.dose_row.unsqueeze(1)) & batch.record_mask.unsqueeze(2)
    last_before = torch.where(before, pos, torch.zeros_like(pos)).amax(1)
    return torch.where(same.any(1), same.to(torch.int8).argmax(1), last_before)


def _governing_records(kinds, index, valid, r, rule="nonmem"):
    """(N, E) record column whose parameters hold on the segment that ends at each event column. "nonmem": the
    first record event at or after it in the sorted event table (past the last record, the last record);
    "locf": the last record event before it (before the first record, the first)."""
    n, e = kinds.shape
    is_rec = (kinds == RECORD) & valid
    pos = torch.arange(e, device=kinds.device).expand(n, e)
    if rule == "locf":
        before = torch.where(is_rec, pos, torch.full_like(pos, -1))
        prev = torch.cummax(before, 1).values                      # last record at or before each position
        prev = torch.cat([torch.full_like(prev[:, :1], -1), prev[:, :-1]], 1)          # strictly before
        first = torch.where(is_rec, pos, torch.full_like(pos, e)).min(1, keepdim=True).values.clamp(max=e - 1)
        prev = torch.where(prev < 0, first.expand(n, e), prev)
        return index.gather(1, prev).clamp(max=r - 1)
    at = torch.where(is_rec, pos, torch.full_like(pos, e))
    nxt = torch.flip(torch.cummin(torch.flip(at, [1]), 1).values, [1])               # next record position
    last = torch.where(is_rec, pos, torch.full_like(pos, -1)).max(1, keepdim=True).values.clamp(min=0)
    nxt = torch.where(nxt == e, last.expand(n, e), nxt)
    return index.gather(1, nxt).clamp(max=r - 1)


class _State:
    """Mutable solver state: input rates, live infusions, and the outputs collected at records."""

    def __init__(self, a, n, d, r, model, dtype, device, return_amounts):
        self.a = a
        self.rate = torch.zeros_like(a)
        self.alive = torch.zeros(n, d, dtype=torch.bool, device=device)
        self.rec_c = torch.zeros(n, r, dtype=dtype, device=device)
        self.rec_a = torch.zeros(n, r, model.n_states, dtype=dtype, device=device) if return_amounts else None
