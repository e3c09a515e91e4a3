"""Dataset checks: convert a raw table to numbers and collect *every* violation with its rows.

Each check is a small function that appends :class:`~hybridpk.errors.Violation` objects; none stops at
the first problem, so the user sees the whole list at once (as pharmpy's ``check_dataset`` does).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import Violation
from ._columns import ColumnSpec

#: how a missing value is written
MISSING = {"", ".", "nan", "NaN", "NA", "na", "null", "NULL", "None"}


class Rows:
    """Maps positions in the table to the row/line numbers shown to the user."""

    def __init__(self, n: int, lines: list[int] | None):
        self.n = n
        self.lines = lines

    def violation(self, mask_or_idx, column: str, message: str) -> Violation:
        idx = np.flatnonzero(mask_or_idx) if np.asarray(mask_or_idx).dtype == bool else np.asarray(mask_or_idx)
        idx = np.asarray(idx, dtype=int)
        rows = tuple(int(i) + 1 for i in idx)
        lines = tuple(int(self.lines[i]) for i in idx) if self.lines is not None else ()
        return Violation(rows, column, message, lines)


def as_text(series: pd.Series) -> pd.Series:
    """The cells as stripped text, "" where missing."""
    return series.astype(object).where(series.notna(), "").astype(str).str.strip()


def examples(text: pd.Series, mask, k: int = 3) -> str:
    """Up to ``k`` distinct values of ``text`` where ``mask`` holds, quoted, for a message."""
    return ", ".join(repr(v) for v in pd.unique(text[mask])[:k])


def to_numeric(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Numeric values (NaN where missing) and a mask of cells that are present but not numbers."""
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        values = series.to_numpy(dtype=float, na_value=np.nan)
        return values, np.zeros(len(values), dtype=bool)
    text = as_text(series)
    missing = text.isin(MISSING).to_numpy()
    # Fortran exponents (1.0D+02) appear in NONMEM tables
    cleaned = text.str.replace(r"(?<=\d)[dD](?=[+-]?\d)", "e", regex=True)
    values = pd.to_numeric(cleaned.where(~missing, None), errors="coerce").to_numpy(dtype=float, na_value=np.nan).copy()
    bad = ~missing & np.isnan(values)
    values[missing] = np.nan
    return values, bad


def convert(raw: pd.DataFrame, spec: ColumnSpec, rows: Rows, violations: list[Violation]):
    """(numeric columns for every role and candidate covariate, the text columns that are not used, {role: the
    cells reported as not numbers}); the last keep check_records from reporting those cells again as missing."""
    role_of = {col: role for role, col in spec.roles.items()}
    numeric: dict[str, np.ndarray] = {}
    text_columns: list[str] = []
    unreadable: dict[str, np.ndarray] = {}      # role -> cells already reported as not numbers
    for col in raw.columns:
        values, bad = to_numeric(raw[col])
        used = col in role_of or (spec.covariates is not None and col in spec.covariates)
        if bad.any():
            if used:
                what = role_of.get(col, "covariate")
                violations += _non_numeric(raw[col], bad, col, what, rows)
                unreadable[what] = bad
            else:
                text_columns.append(col)
                continue
        numeric[col] = values
    return numeric, text_columns, unreadable


#: a level written as below a limit ("<0.5", "< 2", "BLQ<0.1")
_BELOW_LIMIT = r"^(?:BLQ|BQL|LLOQ)?\s*<\s*[0-9.]+\s*$"


def _non_numeric(column: pd.Series, bad: np.ndarray, name: str, what: str, rows: Rows) -> list:
    """Violations for the non-numeric cells ``bad`` of a used column: levels written below a limit ("<0.5") get
    the fix NONMEM users apply, anything else the general message (dates and clock times in TIME never come
    here: the reader translates them first, hybridpk.data._clock)."""
    text = column.astype(str).str.strip()
    out = []
    below = bad & text.str.match(_BELOW_LIMIT, case=False).to_numpy() if what == "DV" else np.zeros_like(bad)
    if below.any():
        ex = examples(text, below)
        out.append(rows.violation(below, name, f"{ex} in DV is a level below the limit of quantification: put the "
                                  "limit in DV with CENS=1 (NONMEM's M3 convention), or BLQ=1 with the limit in an "
                                  "LLOQ column, to fit it as censored; or set MDV=1 to leave it out"))
    comma = bad & text.str.match(r"^[+-]?\d*,\d+$").to_numpy()
    if comma.any():
        ex = examples(text, comma)
        out.append(rows.violation(comma, name, f"{ex} in {what} is written with a decimal comma, and other numbers "
                                  "in the file with decimal points (or the file is comma-separated): write every "
                                  "number one way (decimal commas are read in a file separated by ; or tabs whose "
                                  "numbers all have them)"))
    rest = bad & ~below & ~comma
    if rest.any():
        ex = ", ".join(repr(v) for v in column[rest].astype(str).unique()[:3])
        fix = ("NONMEM's ID is a number: number the subjects (1, 2, ...) and keep their own IDs in a column of "
               "their own" if what == "ID" else "expected a number ('.' or empty for missing)")
        out.append(rows.violation(rest, name, f"non-numeric value ({ex}) in {what} column; {fix}"))
    return out


def _int_like(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):   # inf - inf: not a whole number (isfinite says so), no warning
        return np.isfinite(x) & (np.abs(x - np.round(x)) < 1e-9)


def check_records(t: dict[str, np.ndarray], names: dict[str, str], rows: Rows, has: set[str],
                  violations: list[Violation], unreadable: dict | None = None) -> None:
    """Record-level NONMEM rules on canonical arrays ``t`` (keys are roles); ``names`` maps role -> column;
    ``unreadable`` {role: mask}: cells already reported as not numbers, not reported again as missing."""
    ID, TIME, DV, AMT, EVID, MDV = (t[k] for k in ("ID", "TIME", "DV", "AMT", "EVID", "MDV"))
    add = violations.append
    unreadable = unreadable or {}

    def nan(role):
        """Missing values of ``role`` that were not reported as unreadable."""
        return np.isnan(t[role]) & ~unreadable.get(role, np.zeros(len(t[role]), dtype=bool))

    def v(mask, role, msg):
        if np.any(mask):
            add(rows.violation(mask, names.get(role, role), msg))

    for role in ("ID", "DV", "AMT", "RATE", "DUR", "II", "ADDL", "LLOQ"):
        if role in has:
            v(np.isinf(t[role]), role, f"infinite value in {role}; a NONMEM data item must be a finite number "
              "('.' or empty for missing)")
    v(nan("ID"), "ID", "missing subject ID; every record needs an ID")
    v(nan("TIME"), "TIME", "missing TIME; every record needs a time (h)")
    v(~np.isfinite(TIME) & ~np.isnan(TIME), "TIME", "TIME must be finite")
    if "EVID" in has:
        ok = np.isin(EVID, [0, 1, 2, 3, 4])
        v(~ok, "EVID", "EVID must be 0 (observation), 1 (dose), 2 (other), 3 (reset) or 4 (reset and dose)")
    if "MDV" in has:
        v(~np.isin(MDV, [0, 1]), "MDV", "MDV must be 0 (DV is an observation) or 1 (no observation)")
    if "AMT" in has:
        v(AMT < 0, "AMT", "negative dose amount; AMT must be >= 0")
    is_dose = np.isin(EVID, [1, 4])
    is_obs = (EVID == 0) & (MDV == 0)
    if "MDV" in has:
        v(is_dose & (MDV == 0), "MDV", "a dose row with an observation (EVID 1/4 with MDV=0); put the "
          "observation on its own row with EVID=0, MDV=0")
    elif "EVID" not in has:
        v(is_dose & np.isfinite(DV) & (DV != 0), "DV", "a dose row (AMT > 0) also carries an observation in DV; "
          "put the observation on its own row with AMT=0 (or add EVID/MDV columns)")
    if "EVID" in has:
        v((EVID == 0) & (AMT > 0), "AMT", "observation row (EVID=0) with AMT > 0; set EVID=1 for a dose")
    v(is_obs & nan("DV"), "DV", "observation (MDV=0) without a DV value; set MDV=1 if there is no observation")

    RATE, II, ADDL, SS = t["RATE"], t["II"], t["ADDL"], t["SS"]
    if "RATE" in has:
        v((RATE < 0) & ~np.isin(RATE, [-1, -2]), "RATE", "negative RATE; use a rate > 0 (mg/h), 0 for a bolus, "
          "-1 (rate modelled) or -2 (duration modelled or given in a DUR/D column)")
        if "DUR" in has:
            v(is_dose & (RATE == -2) & ~(t["DUR"] > 0) & ~np.isnan(t["DUR"]), "DUR",
              "RATE=-2 needs a positive infusion duration (h) in the DUR/D column")
    if "DUR" in has:
        v(t["DUR"] < 0, "DUR", "negative infusion duration")
    if "II" in has:
        v(II < 0, "II", "negative dosing interval II")
    if "ADDL" in has:
        v((ADDL < 0) | ~_int_like(ADDL), "ADDL", "ADDL must be a whole number >= 0")
        v((ADDL > 0) & ~(II > 0), "II", "ADDL without II: additional doses need a dosing interval II > 0 (h)")
        v((ADDL > 0) & ~is_dose, "ADDL", "ADDL on a row that is not a dose")
    if "SS" in has:
        v(~np.isin(SS, [0, 1, 2]), "SS", "SS must be 0, 1 (steady state, reset) or 2 (steady state, added)")
        v((SS > 0) & ~(II > 0) & ~((RATE > 0) & (AMT == 0)), "II",
          "SS without II: a steady-state dose needs the dosing interval II > 0 (h)")
        v((SS > 0) & ~is_dose, "SS", "SS on a row that is not a dose")
    if "CMT" in has:
        v((t["CMT"] < 0) | (t["CMT"] > 1000) | ~_int_like(t["CMT"]), "CMT",
          "CMT must be a whole number from 0 to 1000 (compartment number; 0 = model default)")
    if "DVID" in has:
        v((t["DVID"] < 0) | (t["DVID"] > 1e6) | ~_int_like(t["DVID"]), "DVID",
          "DVID must be a whole number from 0 to 1000000 (which kind of observation)")
    if "LLOQ" in has:
        v(t["LLOQ"] < 0, "LLOQ", "negative LLOQ")
    if "BLQ" in has:
        v(~np.isin(t["BLQ"], [0, 1]) & ~np.isnan(t["BLQ"]), "BLQ", "BLQ must be 0 or 1")
    if "CENS" in has:
        v(~np.isin(t["CENS"], [-1, 0, 1]) & ~np.isnan(t["CENS"]), "CENS",
          "CENS must be 0, 1 (below the limit, DV holds the LLOQ) or -1 (above)")

    # ordering within and between subjects
    ok_id = ~np.isnan(ID)
    if ok_id.all() and len(ID) > 1:
        change = np.flatnonzero(ID[1:] != ID[:-1]) + 1
        starts = np.r_[0, change]
        first_seen: dict[float, int] = {}
        for s in starts:
            key = float(ID[s])
            if key in first_seen:
                add(rows.violation([s], names["ID"], f"ID {key:g} reappears after another ID (first block at row "
                                   f"{first_seen[key] + 1}); sort the records so each subject is one block"))
            else:
                first_seen[key] = s
        same = np.r_[False, ID[1:] == ID[:-1]]
        back = same & np.r_[False, TIME[1:] < TIME[:-1]] & ~np.isin(EVID, [3, 4])
        if back.any():
            add(rows.violation(back, names["TIME"], "TIME decreases within a subject; records must be in time "
                               "order (only a reset record, EVID 3/4, may start the clock again)"))
    # duplicated observation rows (same ID, TIME, CMT, DVID and DV: a record entered twice). Replicate levels at
    # one time (two assays of one sample: different DVs) are observations, fitted each, as NONMEM fits them
    # (nlmixr2's warfarin data, subject 9).
    # (rows whose ID is not a number are left out: they are reported as such, and would all read as one subject)
    keys = pd.DataFrame({"ID": ID, "TIME": TIME, "CMT": t["CMT"], "DVID": t["DVID"], "DV": DV})[is_obs & ok_id]
    dup = keys.duplicated(keep=False).to_numpy()
    if dup.any():
        idx = np.flatnonzero(is_obs & ok_id)[dup]
        add(rows.violation(idx, names["DV"], "duplicated observation (same ID, TIME, CMT and DV: a record entered "
                           "twice); keep one (replicate levels with different DVs are taken as they are)"))
