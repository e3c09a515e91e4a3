"""The limits a dose recommendation must respect, checked once for the library and the CLI alike.

Each problem names the argument (with its CLI flag), the value and what is allowed; all problems are
listed at once. A recommendation made under valid limits is always a positive whole number of dose steps,
at most the maximum dose, with infusions that end before the next dose starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ..data.regimen import MODEL_DURATION
from ..errors import HybridPKError

__all__ = ["Limits", "check_limits", "record_doses", "record_dose_step", "median_record_dose", "START_HORIZON_H",
           "FALLBACK_DOSE_STEP"]

#: how far after the patient's last record a new regimen may start (h)
START_HORIZON_H = 168.0

#: the dose step (mg) taken when neither the caller, the model nor the patient's record gives one (a record
#: without a dose: a priori dosing)
FALLBACK_DOSE_STEP = 250.0

#: the "round" dose steps, times a power of ten, that :func:`record_dose_step` chooses from
_ROUND_STEPS = (1.0, 2.0, 2.5, 5.0)


def record_doses(df: pd.DataFrame) -> pd.Series:
    """The amounts (mg) of the doses in a patient's record ``df``: AMT of its dose records (EVID 1 or 4) with
    AMT > 0."""
    return df.loc[df.EVID.isin([1, 4]) & (df.AMT > 0), "AMT"].astype(float)


def median_record_dose(df: pd.DataFrame) -> float | None:
    """The median of :func:`record_doses` (mg); None when the record holds no dose."""
    amt = record_doses(df)
    return None if amt.empty else float(amt.median())


def record_dose_step(df: pd.DataFrame) -> float | None:
    """The dose step (mg) that suits the doses in a patient's record: the largest of 1, 2, 2.5 or 5 times a
    power of ten that is at most a quarter of the median dose (AMT of the dose records, EVID 1 or 4, AMT > 0),
    so that the recommended dose can move in steps of 25% or finer around what the patient has been given
    (1000 mg: 250; 500 mg: 100; 100 mg: 25; a neonate's 3.5 mg of phenobarbital: 0.5). The median, not the
    largest, so that a loading dose does not set it. None when the record holds no dose."""
    median = median_record_dose(df)
    if median is None:
        return None
    quarter = median / 4.0
    power = 10.0 ** math.floor(math.log10(quarter))
    return max(k * power for k in _ROUND_STEPS if k * power <= quarter * (1 + 1e-12))


@dataclass(frozen=True)
class Limits:
    """Valid limits of one recommendation: candidate ``intervals`` (h), infusion ``duration`` (h, 0: bolus or
    oral, MODEL_DURATION: the model's own), ``dose_step`` (mg), ``max_dose`` (mg, a whole number of steps; None:
    no cap), ``start`` (h), ``n_doses`` of the recommended regimen."""

    intervals: tuple
    duration: float
    dose_step: float
    max_dose: float | None
    start: float
    n_doses: int

    @property
    def top(self) -> float:
        """The largest allowed dose (mg): max_dose rounded down to a whole number of steps, or inf."""
        return math.inf if self.max_dose is None else math.floor(self.max_dose / self.dose_step + 1e-9) * self.dose_step


def _number(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def check_limits(df: pd.DataFrame, *, intervals, duration, dose_step, max_dose, start, n_doses) -> Limits:
    """Limits for the patient whose records are ``df``, or a HybridPKError listing every invalid one.
    ``dose_step`` None: :func:`record_dose_step` of ``df`` (:data:`FALLBACK_DOSE_STEP` for a record without a
    dose)."""
    problems = []
    if dose_step is None:
        dose_step = record_dose_step(df) or FALLBACK_DOSE_STEP

    def bad(name, flag, value, allowed):
        problems.append(f"{name} ({flag}) = {value!r}: {allowed}")

    step = _number(dose_step)
    if step is None or step <= 0:
        bad("dose_step", "--dose-step", dose_step, "doses are whole multiples of it, so it must be a number > 0 (mg)")
    cap = None
    if max_dose is not None:
        cap = _number(max_dose)
        if cap is None or cap <= 0 or (step is not None and step > 0 and cap < step):
            bad("max_dose", "--max-dose", max_dose, "the largest single dose must be a number of at least one dose "
                "step (mg)" + (f", here {step:g}" if step and step > 0 else ""))
    taus = []
    for tau in intervals:
        t = _number(tau)
        if t is None or t <= 0:
            bad("interval", "--interval", tau, "the dosing interval must be a number > 0 (h)")
        else:
            taus.append(t)
    dur = _number(duration)
    if dur is None or (dur < 0 and dur != MODEL_DURATION):    # MODEL_DURATION: the model's D1 (RATE = -2)
        bad("duration", "--duration", duration, "the infusion duration must be a number >= 0 (h; 0 for a bolus or "
            "oral dose)")
    elif taus and dur > min(taus):
        bad("duration", "--duration", duration, f"an infusion longer than the dosing interval ({min(taus):g} h) would "
            "overlap the next dose; use a duration <= the interval")
    doses = df[df.EVID.isin([1, 4])]
    first = float(doses.TIME.min()) if len(doses) else float(df.TIME.min())
    last = float(df.TIME.max())
    t0 = _number(start)
    if t0 is None or t0 < first or t0 > last + START_HORIZON_H:
        bad("start", "--start", start, f"the first new dose must come within or after the patient's records: between "
            f"{first:g} h (the first dose) and {last + START_HORIZON_H:g} h ({START_HORIZON_H:g} h after the last "
            "record)")
    if not isinstance(n_doses, int) or n_doses < 1:
        bad("n_doses", "-", n_doses, "the regimen needs a whole number of doses >= 1")
    if problems:
        raise HybridPKError("cannot recommend a dose with these limits:\n  - " + "\n  - ".join(problems))
    return Limits(tuple(taus), dur, step, cap, t0, n_doses)
