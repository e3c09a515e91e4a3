"""A dosing regimen as dose records: what dosing recommends, what a forecast continues, what a batch extends.

A :class:`Regimen` is ``n_doses`` doses of ``dose`` mg every ``interval`` h from ``start`` h, given as
``duration``-h infusions (0: bolus or oral; :data:`MODEL_DURATION`: as the model gives its own doses, the duration
its parameter D sets, NONMEM's RATE = -2 with D1) into compartment ``cmt`` (0: the model's default), optionally at
steady state (SS=1: the system is reset and starts at steady state of the regimen). It is written out as one
NONMEM dose record with ADDL (:meth:`Regimen.records`) and added to a patient's padded tensors without going
back through the CSV reader (:meth:`hybridpk.data.batch.EventBatch.extend`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["MODEL_DURATION", "Regimen"]

#: a Regimen's ``duration`` for doses whose duration the model sets (its parameter D: a control stream's D1), as the
#: data item RATE = -2 says of a dose record (NONMEM help "RATE"); the regimen's records carry RATE = -2
MODEL_DURATION = -2.0


@dataclass(frozen=True)
class Regimen:
    """``n_doses`` doses of ``dose`` (mg) every ``interval`` (h) from ``start`` (h), as ``duration``-h
    infusions (0: bolus/oral; :data:`MODEL_DURATION`: the model's own duration D), into ``cmt`` (0: model
    default); ``steady_state``: NONMEM SS=1."""

    start: float
    dose: float
    interval: float
    n_doses: int = 1
    duration: float = 0.0
    cmt: int = 0
    steady_state: bool = False

    @property
    def model_duration(self) -> bool:
        """True when the doses take the model's own duration (RATE = -2, :data:`MODEL_DURATION`)."""
        return self.duration == MODEL_DURATION

    @property
    def rate(self) -> float:
        """Infusion rate (mg/h) as NONMEM's RATE data item; 0 for a bolus, -2 for the model's own duration."""
        if self.model_duration:
            return MODEL_DURATION
        return self.dose / self.duration if self.duration > 0 else 0.0

    @property
    def how(self) -> str:
        """How the doses are given, for a sentence: ' as 1-h infusions', ' (bolus or oral doses)' ..."""
        if self.model_duration:
            return " (each over the model's own duration D: RATE = -2)"
        return f" as {self.duration:g}-h infusions" if self.duration > 0 else " (bolus or oral doses)"

    def records(self, patient_id) -> pd.DataFrame:
        """The regimen as one NONMEM dose record (ADDL = n_doses - 1), ready to append to a patient's data."""
        return pd.DataFrame([{"ID": patient_id, "TIME": float(self.start), "AMT": float(self.dose),
                              "RATE": self.rate, "ADDL": int(self.n_doses - 1), "II": float(self.interval),
                              "EVID": 1, "MDV": 1, "CMT": int(self.cmt), "DV": 0.0,
                              **({"SS": 1} if self.steady_state else {})}])

    def dose_events(self) -> dict:
        """Every administration as arrays (D,), as ``EventBatch.from_dataset`` derives them from the record:
        time (h), amount, rate (amount/h), duration (h), rate mode, SS flag, II (h), compartment."""
        from .batch import BOLUS, DURATION_MODELLED, RATE_GIVEN

        k = np.arange(self.n_doses)
        amt = np.full(self.n_doses, float(self.dose))
        rate = np.full(self.n_doses, self.rate)
        given = rate > 0
        return {"time": float(self.start) + k * float(self.interval), "amt": amt,
                "rate": np.maximum(rate, 0.0), "duration": np.where(given, amt / np.where(given, rate, 1.0), 0.0),
                "mode": np.where(given, RATE_GIVEN, DURATION_MODELLED if self.model_duration else BOLUS),
                # ADDL doses are plain doses: only the record's own dose carries SS
                "ss": np.where(k == 0, int(self.steady_state), 0), "ii": np.full(self.n_doses, float(self.interval)),
                "cmt": np.full(self.n_doses, int(self.cmt))}
