"""Dose events as the solver sees them: F, ALAG, infusion rate/duration, reset cut-offs and record order.

Ordering rule (same in every path): events at the same time happen in data-row order; a dose applies to
its own record and to later rows at the same time; ADDL doses keep the row of the record they came from,
so they act before records at the same time that come after it. A reset (EVID 3/4, SS=1) removes the
contribution of every earlier dose from records at or after the reset's row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.batch import BOLUS, DURATION_GIVEN, DURATION_MODELLED, RATE_GIVEN, RATE_MODELLED
from ..errors import ModelError
from ..models.base import DOSE_PARAMETERS   # D (h) and R (amount/h) of doses with RATE = -2/-1, NONMEM's D1/R1


@dataclass
class DoseEvents:
    """Effective dose events, shape (N, D): time (h, after ALAG), amount (after F), compartment index
    (0-based), rate (amount/h) and duration (h; 0 for a bolus), order key, steady-state flag and II,
    ``cut_time``/``cut_key``: the first reset after the dose (inf if none), ``active``: real doses."""

    time: torch.Tensor
    amt: torch.Tensor
    cmt: torch.Tensor
    rate: torch.Tensor
    duration: torch.Tensor
    key: torch.Tensor
    ss: torch.Tensor
    ii: torch.Tensor
    cut_time: torch.Tensor
    cut_key: torch.Tensor
    reset_time: torch.Tensor
    reset_key: torch.Tensor
    reset_mask: torch.Tensor
    active: torch.Tensor
    default_route: torch.Tensor


def _describe_rows(batch, mask) -> str:
    rows = (batch.dose_row[mask] + 1).unique().tolist()[:8]
    return ", ".join(str(r) for r in rows)


def dose_events(model, p: dict, batch) -> DoseEvents:
    """Apply the model's bioavailability and lag to the batch's doses and resolve infusions. Doses with RATE = -2
    (-1) into the default dose compartment take their duration (rate) from the parameter D (R) when ``p`` has it
    (NONMEM's D1, R1): the closed forms' infusion terms are differentiable in the duration, and the ODE paths'
    segments end at the infusions' ends, which carry their derivative in D (R) through the solver."""
    n_states = model.n_states
    cmt = batch.dose_cmt
    active = batch.dose_mask
    bad = active & (cmt > n_states)
    if bad.any():
        raise ModelError(f"dose into compartment {int(cmt[bad].max())} but model {model.name} has {n_states} "
                         f"compartments ({', '.join(model.compartments)}); data rows {_describe_rows(batch, bad)}")
    idx = torch.where(cmt == 0, torch.full_like(cmt, model.dose_cmt), cmt) - 1
    default = idx == (model.dose_cmt - 1)
    mode = batch.dose_mode
    dpar, rpar = (p.get(k) for k in DOSE_PARAMETERS)
    allowed = [BOLUS, RATE_GIVEN, DURATION_GIVEN] + ([DURATION_MODELLED] if dpar is not None else []) + \
        ([RATE_MODELLED] if rpar is not None else [])
    unsupported = active & (~torch.isin(mode, torch.tensor(allowed, device=mode.device)) | ((mode < 0) & ~default))
    if unsupported.any():
        raise ModelError("RATE=-1/-2 (modelled rate or duration) without a DUR column needs the rate R or the "
                         "duration D of the doses into the dose compartment (a control stream's R1/D1; hybridpk fit "
                         f"--init D=2); model {model.name} has "
                         f"{'neither' if dpar is None and rpar is None else 'them, but not for these doses'}: give "
                         f"the rate or the duration in the data (rows {_describe_rows(batch, unsupported)})")
    ones = torch.ones_like(batch.dose_amt)
    fpar = p.get("F") if model.bioavailability else None
    lag = p.get("ALAG") if model.lag else None
    # F and ALAG: one value per subject (N,), or per dose (N, D) when parameters change between records
    f = torch.where(default, _per_dose(fpar) * ones, ones) if fpar is not None else ones
    shift = torch.where(default, _per_dose(lag) * ones, 0 * ones) if lag is not None else 0 * ones
    amt = batch.dose_amt * f
    time = batch.dose_time + shift
    # NONMEM: with RATE given, F changes the duration; with the duration given, F changes the rate
    rate_given = mode == RATE_GIVEN
    dur_given = mode == DURATION_GIVEN
    safe_rate = torch.where(rate_given, batch.dose_rate, ones)
    safe_dur = torch.where(dur_given, batch.dose_duration, ones)
    if dpar is not None or rpar is not None:    # the modelled duration (rate) of doses into the dose compartment
        dur_modelled, rate_modelled = active & (mode == DURATION_MODELLED), active & (mode == RATE_MODELLED)
        if dpar is not None:
            dur_given = dur_given | dur_modelled
            safe_dur = torch.where(dur_modelled, _per_dose(dpar) * ones, safe_dur)
        if rpar is not None:
            rate_given = rate_given | rate_modelled
            safe_rate = torch.where(rate_modelled, _per_dose(rpar) * ones, safe_rate)
    duration = torch.where(rate_given, amt / safe_rate, torch.where(dur_given, safe_dur, 0 * ones))
    rate = torch.where(rate_given, safe_rate, torch.where(dur_given, amt / safe_dur, 0 * ones))
    ss = batch.dose_ss
    ii = batch.dose_ii
    too_long = active & (ss > 0) & (duration + shift > ii)
    if too_long.any():
        raise ModelError("a steady-state infusion lasts longer than its dosing interval II (duration + lag > II); "
                         f"this is not supported (rows {_describe_rows(batch, too_long)})")
    key = batch.dose_row.to(time.dtype) - 0.5
    # resets: EVID 3/4 records and SS=1 doses restart the system at their (record) time
    reset_mask = batch.dose_reset | (active & (ss == 1))
    inf = torch.full_like(time, float("inf"))
    reset_time = torch.where(reset_mask, batch.dose_time, inf)
    reset_key = torch.where(reset_mask, batch.dose_row.to(time.dtype) - 0.75, inf)
    # for each dose, the first reset strictly after it (in (time, key) order)
    if bool(reset_mask.any()):
        later = (reset_time.unsqueeze(1) > batch.dose_time.unsqueeze(2)) | (
            (reset_time.unsqueeze(1) == batch.dose_time.unsqueeze(2)) & (reset_key.unsqueeze(1) > key.unsqueeze(2)))
        later = later & reset_mask.unsqueeze(1)
        big = torch.full_like(later, float("inf"), dtype=time.dtype)
        cand_t = torch.where(later, reset_time.unsqueeze(1).expand_as(later), big)
        cut_time = cand_t.min(-1).values
        cand_k = torch.where(later & (cand_t == cut_time.unsqueeze(-1)), reset_key.unsqueeze(1).expand_as(later), big)
        cut_key = cand_k.min(-1).values
    else:
        cut_time = cut_key = inf
    return DoseEvents(time=time, amt=amt, cmt=idx, rate=rate, duration=duration, key=key, ss=ss, ii=ii,
                      cut_time=cut_time, cut_key=cut_key, reset_time=reset_time, reset_key=reset_key,
                      reset_mask=reset_mask, active=active, default_route=default)


def _per_dose(v):
    return v if v.dim() == 2 else v.unsqueeze(-1)


def applies(ev: DoseEvents, rec_time, rec_key):
    """(N, R, D) mask: dose d has been given by record r and no reset came between."""
    td, kd = ev.time.unsqueeze(1), ev.key.unsqueeze(1)
    tr, kr = rec_time.unsqueeze(2), rec_key.unsqueeze(2)
    after = (tr > td) | ((tr == td) & (kr > kd))
    if bool(ev.reset_mask.any()):
        after = after & ((tr < ev.cut_time.unsqueeze(1)) | ((tr == ev.cut_time.unsqueeze(1))
                                                             & (kr < ev.cut_key.unsqueeze(1))))
    return after & ev.active.unsqueeze(1)


def applies_ss(ev: DoseEvents, batch, rec_time, rec_key):
    """(N, R, D) mask: record r comes after the (un-lagged) record of steady-state dose d, before any reset."""
    td, kd = batch.dose_time.unsqueeze(1), ev.key.unsqueeze(1)
    tr, kr = rec_time.unsqueeze(2), rec_key.unsqueeze(2)
    after = (tr > td) | ((tr == td) & (kr > kd))
    before_cut = (tr < ev.cut_time.unsqueeze(1)) | ((tr == ev.cut_time.unsqueeze(1)) & (kr < ev.cut_key.unsqueeze(1)))
    return after & before_cut & (ev.active & (ev.ss > 0)).unsqueeze(1)
