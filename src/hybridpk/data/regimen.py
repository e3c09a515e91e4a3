"""A dosing regimen as dose records: what dosing recommends, what a forecast continues, what a batch extends.

A :class:`Regimen` is ``n_doses`` doses of ``dose`` mg every ``interval`` h from ``start`` h, given as
``duration``-h infusions (0: bolus or oral) into compartment ``cmt`` (0: the model's default), optionally at
steady state (SS=1: the system is reset and starts at steady state of the regimen). It is written out as one
NONMEM dose record with ADDL (:meth:`Regimen.records`) and added to a patient's padded tensors without going
back through the CSV reader (:meth:`hybridpk.data.batch.EventBatch.extend`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["Regimen"]


@dataclass(frozen=True)
class Regimen:
    """``n_doses`` doses of ``dose`` (mg) every ``interval`` (h) from ``start`` (h), as ``duration``-h
    infusions (0: bolus/oral), into ``cmt`` (0: model default); ``steady_state``: NONMEM SS=1."""

    start: float
    dose: float
    interval: float
    n_doses: int = 1
    duration: float = 0.0
    cmt: int = 0
    steady_state: bool = False

    @property
    def rate(self) -> float:
        """Infusion rate (mg/h) as NONMEM's RATE data item; 0 for a bolus."""
        return self.dose / self.duration if self.duration > 0 else 0.0

    def records(self, patient_id) -> pd.DataFrame:
        """The regimen as one NONMEM dose record (ADDL = n_doses - 1), ready to append to a patient's data."""
        return pd.DataFrame([{"ID": patient_id, "TIME": float(self.start), "AMT": float(self.dose),
                              "RATE": self.rate, "ADDL": int(self.n_doses - 1), "II": float(self.interval),
                              "EVID": 1, "MDV": 1, "CMT": int(self.cmt), "DV": 0.0,
                              **({"SS": 1} if self.steady_state else {})}])

    def dose_events(self) -> dict:
        """Every administration as arrays (D,), as ``EventBatch.from_dataset`` derives them from the record:
        time (h), amount, rate (amount/h), duration (h), rate mode, SS flag, II (h), compartment."""
        from .batch import BOLUS, RATE_GIVEN

        k = np.arange(self.n_doses)
        amt = np.full(self.n_doses, float(self.dose))
        rate = np.full(self.n_doses, self.rate)
        given = rate > 0
        return {"time": float(self.start) + k * float(self.interval), "amt": amt,
                "rate": np.maximum(rate, 0.0), "duration": np.where(given, amt / np.where(given, rate, 1.0), 0.0),
                "mode": np.where(given, RATE_GIVEN, BOLUS),
                # ADDL doses are plain doses: only the record's own dose carries SS
                "ss": np.where(k == 0, int(self.steady_state), 0), "ii": np.full(self.n_doses, float(self.interval)),
                "cmt": np.full(self.n_doses, int(self.cmt))}
