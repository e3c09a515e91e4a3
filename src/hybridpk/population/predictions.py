"""What every fitted model's ``predict`` returns: one table per record plus the tensors behind it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

__all__ = ["Predictions"]


@dataclass(frozen=True)
class Predictions:
    """Predictions of a fitted model at every record of a design, from each patient's own observations.

    ``table`` has one row per record in the design's order: ID, TIME, DV, MDV, PRED (typical patient,
    ETA = 0), IPRED (the model's individual prediction) and, per model kind, the ETAs (population models) or
    IPRED_ODE, IPRED_HYBRID, HYBRID_WEIGHT and Z1.. (hybrid models); concentrations in the data's units.
    The tensors (N, R) on the padded ``batch`` of the design: ``pred``, ``ipred``, and for hybrid models
    ``ode`` (ODE-only) and ``hybrid`` (the hybrid alone). ``estimates`` are the patients' individual
    estimates the predictions come from.
    """

    table: pd.DataFrame
    batch: object = field(repr=False)
    pred: object = field(repr=False)
    ipred: object = field(repr=False)
    estimates: object = field(repr=False)
    ode: object = field(default=None, repr=False)
    hybrid: object = field(default=None, repr=False)

    def to_dataframe(self) -> pd.DataFrame:
        return self.table.copy()

    def __len__(self) -> int:
        return len(self.table)
