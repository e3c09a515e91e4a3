"""Per-record inputs of the hybrid's networks, computed from an EventBatch (all tensors (N, R, .))."""

from __future__ import annotations

import math

import torch


def first_dose_time(batch):
    """Time of each subject's first dose (N,) h; inf for subjects without doses."""
    return torch.where(batch.dose_mask, batch.dose_time, torch.full_like(batch.dose_time, float("inf"))).min(1).values


def dose_context(batch, times=None):
    """Time since the last dose (h), its amount (mg), time since the first dose (h) and a gate that is 1 once
    the first dose has been given, at every record (or at ``times`` (N, G) h): tensors (N, R)."""
    times = batch.time if times is None else times
    t = times.unsqueeze(-1)                                         # (N, R, 1)
    td = batch.dose_time.unsqueeze(1)                               # (N, 1, D)
    given = batch.dose_mask.unsqueeze(1) & (td <= t)
    since = torch.where(given, t - td, torch.full_like(t - td, float("inf")))
    tsd, last = since.min(-1)
    amt = batch.dose_amt.gather(1, last.clamp(min=0)) * 1.0
    any_dose = given.any(-1)
    tsd = torch.where(any_dose, tsd, torch.zeros_like(tsd))
    tfd = torch.where(any_dose, times - first_dose_time(batch).unsqueeze(-1), torch.zeros_like(times))
    amt = torch.where(any_dose, amt, torch.zeros_like(amt))
    return tsd, amt, tfd, any_dose.to(batch.time.dtype)


def fourier(t, base: float, n: int):
    """sin and cos of 2 pi t / P for n periods P spaced geometrically from base/8 to 4 base (n = 6: a factor
    2 apart): lets the decoder's MLP draw sharp features in time (secondary peaks) that it learns poorly
    from raw t."""
    if n <= 0:
        return []
    frac = torch.arange(n, dtype=t.dtype, device=t.device) / max(n - 1, 1)
    periods = base * 2.0 ** (-3.0 + 5.0 * frac)
    ang = 2 * math.pi * t.unsqueeze(-1) / periods
    return [torch.sin(ang), torch.cos(ang)]


def _stack_features(batch, tsd, amt, tfd, scale: dict, extra=()):
    """(N, G, F): scaled time since last dose, time since first dose, dose, the ``extra`` columns (N, G),
    Fourier features of both times, and the baseline covariates. The time since the first dose is held at
    ``scale["tfd_max"]``, the latest the training data reached (runs saved before it: not held): the networks
    never saw later times, and a correction that followed them there would make the hybrid's prediction of a
    long regimen drift (EHC dosing benchmark, 96-interval reservoir: AUC24 x CL / dose 1.05 after 10 doses,
    0.39 after 40) instead of settling at a steady state."""
    n_f = int(scale.get("n_fourier", 0))
    if "tfd_max" in scale:    # beyond the training's span the time since the first dose is held at its end
        tfd = tfd.clamp(max=float(scale["tfd_max"]))
    feats = [tsd / scale["t"], tfd / scale["t"], amt / scale["dose"], *extra,
             *fourier(tsd, scale["t"], n_f), *fourier(tfd, scale["t"], n_f)]
    if batch.cov_baseline.shape[1]:
        cov = (batch.cov_baseline - scale["cov_mean"]) / scale["cov_sd"]
        feats.append(cov.unsqueeze(1).expand(-1, tsd.shape[1], -1))
    return torch.cat([f.unsqueeze(-1) if f.dim() == 2 else f for f in feats], -1)


def record_features(batch, ipred, scale: dict):
    """Decoder inputs (N, R, F): scaled time since last dose, time since first dose (each also as Fourier
    features), dose, log IPRED, and the baseline covariates; ``scale`` holds the normalising constants learnt
    on the training data."""
    tsd, amt, tfd, gate = dose_context(batch)
    logc = torch.log(ipred.clamp(min=0) + scale["c0"])
    return _stack_features(batch, tsd, amt, tfd, scale, [(logc - scale["logc_mean"]) / scale["logc_sd"]]), gate


def input_grid(batch, dt: float):
    """Intervals of width ``dt`` h on which the input decoder's rate is constant: starts (N, G) from each
    patient's first dose up to its last record (padding starts sit at the last record: zero effect)."""
    rec = torch.where(batch.record_mask, batch.time, torch.full_like(batch.time, -float("inf"))).max(1).values
    first = first_dose_time(batch)
    first = torch.where(torch.isfinite(first), first, rec)
    span = (rec - first).clamp(min=0.0)
    g = max(1, int(math.ceil(float(span.max()) / dt)))
    starts = first.unsqueeze(1) + dt * torch.arange(g, dtype=batch.time.dtype, device=batch.time.device)
    return torch.minimum(starts, rec.unsqueeze(1)).detach()


def input_features(batch, starts, dt: float, scale: dict):
    """Input-decoder inputs (N, G, F - 1) at the midpoints of the grid intervals (the record features without
    log IPRED), the amount of the last dose (N, G) (mg) and the after-first-dose gate (N, G)."""
    tsd, amt, tfd, gate = dose_context(batch, starts + 0.5 * dt)
    return _stack_features(batch, tsd, amt, tfd, scale), amt, gate


def dose_gaps(batch):
    """Every positive interval (h) between a patient's successive non-zero doses, all patients together (1-D)."""
    given = batch.dose_mask & (batch.dose_amt > 0)
    t = torch.sort(torch.where(given, batch.dose_time, torch.full_like(batch.dose_time, float("inf"))), 1).values
    gaps = t[:, 1:] - t[:, :-1]
    return gaps[torch.isfinite(gaps) & (gaps > 0)]


def aligned_width(batch, width: float) -> float:
    """The grid-interval width (h) nearest to ``width`` that divides the training batch's most frequent
    interval tau between successive doses, or, when ``width`` is wider than tau, the nearest whole multiple
    of tau (``width`` itself without repeated doses). Cells that start at every dose of that regimen (or at
    every k-th) sample its rates at the same phases after each dose: a rate learnt as a function of
    the time since the last dose (a meal-timed release) is then periodic on the grid, and a steady state
    predicted for that regimen is the same however many doses are simulated. (With a width that does not
    divide it, the cells drift in phase against the doses and the amount a narrow release puts out per
    dosing interval changes from one interval to the next: measured on the EHC dosing benchmark, a predicted
    AUC24 at "steady state" 0.93-1.22x dose / CL depending on the number of doses simulated.)

    A multiple of tau keeps the grid at about the intended number of intervals over the observed span (at most
    1.5 times as many) when the records span many dosing intervals: TDM records of months (R's
    nlme::Quinidine: 8095 h at 6-h dosing) would otherwise get one cell per dosing interval, 1350 cells, and
    the reservoir form, whose cost grows with the square of the grid, took more than 18 s per training epoch
    and 6 GB there."""
    gaps = dose_gaps(batch)
    if not gaps.numel():
        return width
    tau = float(torch.mode(torch.round(gaps * 1e6) / 1e6).values)
    if width > tau:
        return tau * max(1, round(width / tau))
    return tau / max(1, round(tau / width))


def fit_scale(batch, ipred, n_fourier: int = 0, intervals: int = 96) -> dict:
    """Normalising constants from the training batch (and the number of Fourier time features); the input
    and reservoir forms' grid has ``intervals`` intervals over the observed span."""
    obs = batch.is_obs
    dv = batch.dv[obs]
    c0 = float(0.05 * dv.median()) if len(dv) else 0.05
    logc = torch.log(ipred[obs].clamp(min=0) + c0)
    tsd, amt, tfd, _ = dose_context(batch)
    cov = batch.cov_baseline
    if cov.shape[1] == 0 or cov.shape[0] < 2:
        cov_mean, cov_sd = cov.mean(0) if cov.shape[0] else cov.sum(0), torch.ones(cov.shape[1], dtype=cov.dtype)
    else:
        cov_mean, cov_sd = cov.mean(0), cov.std(0).clamp(min=1e-6)
    return {"c0": c0, "t": float(tsd[obs].median().clamp(min=1.0)), "dose": float(batch.dose_amt.max().clamp(min=1e-9)),
            "logc_mean": float(logc.mean()), "logc_sd": float(logc.std().clamp(min=1e-3)),
            "cov_mean": cov_mean, "cov_sd": cov_sd, "n_fourier": int(n_fourier),
            # grid forms: rates constant on intervals of about 1/intervals of the observed span (aligned_width)
            "input_dt": aligned_width(batch, float(tfd[obs].max().clamp(min=1.0)) / intervals) if len(dv) else 0.25,
            # the reservoir form's fill: the central amount averaged over each interval at this many points
            "fill_points": 8,
            # the latest time since the first dose the networks saw (features are held there beyond it)
            **({"tfd_max": float(tfd[obs].max())} if len(dv) else {})}
