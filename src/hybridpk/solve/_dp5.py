"""Batched Dormand-Prince 5(4) with *per-subject* time, step size and event pointer.

Each subject marches through its own sorted event list (records, doses, infusion ends, resets, switch
times): a step never crosses the subject's next event (it is clipped to land on it exactly), events are
applied the moment a subject reaches them, and the step size carries over events (no restart). Error
control is per subject: max over states of |err| / (atol + rtol max(|y|, |y_new|)) <= 1. This is the idea
of torchode (per-sample step control) applied to dosing events; all subjects still advance in one
vectorised loop, and gradients flow by backpropagation through the accepted steps.

Steps are taken in each segment's own time: between two events t = t0 + s L with s in [0, 1], and a step is a
fraction of the segment's length L. A subject's steps are the same as in absolute time (the size carries over
into the next segment as h / L); what changes is that an event time that depends on the parameters (a lag, a
modelled duration) stretches the segment's steps instead of moving where the last one is clipped, and its
derivative flows through every step of the segment.

Step groups: subjects given the same group number share their step-size decisions (the error ratio that
accepts or rejects a step is the largest in the group, and a segment starts with the group's smallest step).
Copies of one subject at nearby parameter values (a finite-difference stencil) then take the same steps in
their segments' time, so their solutions are the same smooth function of the parameters, the event times
included, and differences between them are free of the solver's step-selection noise. (In absolute time,
copies whose event times differ took different numbers of steps before an event: their second differences
carried noise of order rtol / h^2, and the EBE search on such a model converged only linearly.)
"""

from __future__ import annotations

import torch

# Dormand & Prince (1980) tableau
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)   # B - B*


def dp5_step(f, t, y, h):
    """One step for every subject: new state (N, S) and error estimate (N, S); h (N,) may be 0."""
    hh = h.unsqueeze(-1)
    k = [f(t, y)]
    for i in range(1, 7):
        yi = y
        for j, a in enumerate(_A[i]):
            if a != 0.0:
                yi = yi + hh * (a * k[j])
        k.append(f(t + _C[i] * h, yi))
    y_new = y
    err = torch.zeros_like(y)
    for j in range(7):
        if _B[j] != 0.0:
            y_new = y_new + hh * (_B[j] * k[j])
        if _E[j] != 0.0:
            err = err + hh * (_E[j] * k[j])
    return y_new, err


def march(f, y, times, n_valid, apply_event, rtol, atol, max_steps=200_000, groups=None):
    """Integrate every subject through its events.

    f(t, y, t_mid, j) -> dy/dt (t (N,), t_mid (N,): midpoint of the current inter-event interval, j (N,): the
    event column that ends it);
    times (N, E) sorted event times; n_valid (N,) number of real events per subject;
    apply_event(y, j, mask) -> y: applies event j (N,) of the subjects in ``mask`` (also changes the
    solver's input rates through closures); groups (N,) long or None: step groups (see the module's
    docstring; a copy whose solution is not finite does not hold its group back). Returns the final state.
    """
    n, e = times.shape
    dev = times.device
    ptr = torch.zeros(n, dtype=torch.long, device=dev)
    t = times[:, 0].clone()
    span = (times.gather(1, (n_valid - 1).clamp(min=0).unsqueeze(1)).squeeze(1) - t).clamp(min=1e-3)
    h = (1e-3 * span).detach()              # the next step's size (h), until a segment starts
    ar = torch.arange(n, device=dev)
    n_groups = int(groups.max()) + 1 if groups is not None else 0
    # the current segment (from one event to the next) in its own time: t = t0 + s L, s in [0, 1]
    t0, length = t, torch.ones_like(t)
    s = torch.zeros_like(t.detach())
    hs = torch.ones_like(s)                 # step size in the segment's time (fraction of L)
    fresh = torch.ones(n, dtype=torch.bool, device=dev)
    for _ in range(max_steps):
        # apply every event the subjects are sitting on
        while True:
            live = ptr < n_valid
            target = times[ar, ptr.clamp(max=e - 1)]
            at = live & (target <= t)
            if not bool(at.any()):
                break
            if times.requires_grad:     # a segment of length 0 between parameter-dependent times: no step, but
                # the derivative the solution has in its length at 0 (the right-hand side)
                gap = torch.where(at, target - t, torch.zeros_like(t))
                y = y + gap.unsqueeze(-1) * f(t, y, t, ptr.clamp(max=e - 1))
                t = torch.where(at, target, t)
            y = apply_event(y, ptr.clamp(max=e - 1), at)
            ptr = ptr + at.long()
            fresh = fresh | at
        live = ptr < n_valid
        if not bool(live.any()):
            return y
        target = times[ar, ptr.clamp(max=e - 1)]
        start = fresh & live
        if bool(start.any()):           # a new segment: the step size carries over, in the new segment's time
            new_len = torch.where(start, target - t, length)
            hs = torch.where(start, h / new_len.detach(), hs)
            if groups is not None:      # a group's copies step alike in their own segments (module docstring)
                shared = torch.full((n_groups,), float("inf"), dtype=hs.dtype, device=dev).scatter_reduce(
                    0, groups, torch.where(start, hs, torch.full_like(hs, float("inf"))), "amin")
                hs = torch.where(start, shared[groups], hs)
            t0 = torch.where(start, t, t0)
            length = new_len
            s = torch.where(start, torch.zeros_like(s), s)
            fresh = fresh & ~start
        clipped = hs >= 1.0 - s
        ds = torch.where(clipped, 1.0 - s, hs)
        step = torch.where(live, ds * length, torch.zeros_like(length))
        mid = t0 + 0.5 * length
        j = ptr.clamp(max=e - 1)
        y_new, err = dp5_step(lambda tt, yy: f(tt, yy, mid, j), t, y, step)
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        ratio = (err.abs() / scale).amax(-1).detach()
        if groups is not None:
            finite = torch.nan_to_num(ratio, nan=0.0, posinf=1e300)
            shared = torch.zeros(n_groups, dtype=ratio.dtype, device=dev).scatter_reduce(
                0, groups, torch.where(live, finite, torch.zeros_like(finite)), "amax", include_self=True)
            ratio = torch.where(torch.isfinite(ratio), shared[groups], ratio)
        ok = live & (ratio <= 1.0)
        y = torch.where(ok.unsqueeze(-1), y_new, y)
        s = torch.where(ok, torch.where(clipped, torch.ones_like(s), s + ds), s)
        t = torch.where(ok, torch.where(clipped, target, t0 + s * length), t)
        factor = torch.clamp(0.9 * ratio.clamp(min=1e-10) ** -0.2, 0.2, 10.0)
        hs_new = ds * factor
        # a step shortened to land on an event should not shrink the next one. Step sizes are decisions,
        # not functions of the parameters: detached, so that gradients follow the solution (and the event
        # times, through the segments' lengths) and do not leak through the step-size controller.
        hs = torch.where(live, torch.where(ok & clipped, torch.maximum(hs, hs_new), hs_new), hs).detach()
        h = (hs * length).detach()
        if bool((live & (h <= 1e-12 * (t.abs() + 1.0))).any()):
            bad = torch.nonzero(live & (h <= 1e-12 * (t.abs() + 1.0))).flatten().tolist()
            raise RuntimeError(f"step size underflow for subject position(s) {bad[:10]} (stiff or extreme "
                               "parameters)")
    raise RuntimeError(f"more than {max_steps} steps; the problem may be stiff")
