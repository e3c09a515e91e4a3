"""Which unit strings name the same scale: "ug/mL" and "mg/L", "hr" and "h". Units in hybridpk are labels that
travel with the data (a sidecar's, or a header's "DV (ng/mL)") and with published models; numbers are never
rescaled, so a dataset in other units than its model's is refused (:meth:`hybridpk.data.Dataset.require_units`)
and this module decides what counts as other."""

from __future__ import annotations

import math

#: hours per time unit
_TIME = {"h": 1.0, "hr": 1.0, "hrs": 1.0, "hour": 1.0, "hours": 1.0, "min": 1 / 60, "mins": 1 / 60,
         "minute": 1 / 60, "minutes": 1 / 60, "s": 1 / 3600, "sec": 1 / 3600, "second": 1 / 3600,
         "seconds": 1 / 3600, "d": 24.0, "day": 24.0, "days": 24.0, "wk": 168.0, "week": 168.0, "weeks": 168.0}
#: grams per mass unit
_MASS = {"g": 1.0, "mg": 1e-3, "ug": 1e-6, "µg": 1e-6, "μg": 1e-6, "mcg": 1e-6, "ng": 1e-9, "pg": 1e-12,
         "kg": 1e3}
#: litres per volume unit
_VOLUME = {"l": 1.0, "ml": 1e-3, "dl": 0.1, "ul": 1e-6, "µl": 1e-6, "μl": 1e-6}


def scale(unit: str, kind: str) -> float | None:
    """The unit's size in hours ("time"), grams ("amount") or grams per litre ("concentration"); None when it is
    not one this module knows."""
    u = unit.strip().lower().replace(" ", "")
    if kind == "time":
        return _TIME.get(u)
    if kind == "amount":
        return _MASS.get(u)
    if kind == "concentration" and u.count("/") == 1:
        mass, volume = u.split("/")
        if mass in _MASS and volume in _VOLUME:
            return _MASS[mass] / _VOLUME[volume]
    return None


def same_unit(a: str, b: str, kind: str) -> bool:
    """True when units ``a`` and ``b`` of a ``kind`` ("time", "amount", "concentration") are the same scale, or
    are written alike when either is unknown."""
    x, y = scale(a, kind), scale(b, kind)
    if x is None or y is None:
        return a.strip().lower().replace(" ", "") == b.strip().lower().replace(" ", "")
    return math.isclose(x, y, rel_tol=1e-9)
