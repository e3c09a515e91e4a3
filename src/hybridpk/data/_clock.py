"""Dates and clock times in, hours out: NM-TRAN's time translation.

Clinical records carry a date and a clock time, not the hours since a reference. NM-TRAN translates them when
the data have a date data item, or when a TIME value holds a ":" (NONMEM help, "DATE data item"; Guide IV,
II.C.2); :func:`translate` does the same, so that a data file and a control stream written for NONMEM read here
as NONMEM reads them:

- the date column is labelled ``DATE`` (month day year), ``DAT1`` (day month year), ``DAT2`` (year month day) or
  ``DAT3`` (year day month); its components are separated by any non-numeric character (``12/3/90``,
  ``12-3-1990``). One component is a day number (it may be 0 or negative); two are the day and month, in the
  label's order without the year. A year of one or two digits is 20nn up to NM-TRAN's LAST20 (50 here, as
  pharmpy assumes) and 19nn above it;
- TIME is the clock time, ``hh:mm`` (``hh:mm:ss`` too), or a number of hours since midnight (``8``, ``14.5``);
- every subject's times become the hours since its first record (which is at 0), as in NONMEM's example
  (``10-1-86 9:15`` -> 0, ``10-2-86 8:30`` -> 23.25).

Two more forms are read because clinical exports write them: an ISO 8601 date-time in TIME
(``2026-12-01 08:00``, ``2026-12-01T08:00:00``) without a date column, and clock times without a date within
one day. What cannot be read one way only is refused, naming the records: a clock time that goes back without a
date (the next day, or a reset?), dates without a year that cross the end of February (is there a 29th?), a
date whose year is where the label does not put it (``2026-12-01`` under ``DATE``: label it ``DAT2``), dates
with dots under ``DATE`` (``01.12.2026``: the day.month.year convention, which ``DATE`` reads as January 12:
label it ``DAT1``), a date and clock time together in TIME other than ISO (``12/1/2026 8:00``), a TIME of 24 or
more beside a date column (already elapsed hours? then the date column must go).

The date column is then dropped from the records, as NONMEM's DATE=DROP does, so that a dataset written back has
no date beside its elapsed TIME to be translated twice.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import DatasetError, Violation
from ._checks import MISSING, as_text, examples

#: NONMEM's labels of the date data item and the order of their components (y: year, m: month, d: day)
DATE_LABELS = {"DATE": "mdy", "DAT1": "dmy", "DAT2": "ymd", "DAT3": "ydm"}
#: one- and two-digit years 00..LAST20 are 20nn, the others 19nn (NM-TRAN's $DATA LAST20; its default is set
#: when NONMEM is installed, 50 is pharmpy's and the usual one)
LAST20 = 50

_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}(?:\.\d*)?))?$")
_HOURS = re.compile(r"^\+?(\d+\.?\d*|\.\d+)$")
_ISO = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})[T ](\d{1,2}):(\d{2})(?::(\d{2}(?:\.\d*)?))?$")


@dataclass(frozen=True)
class Translation:
    """The outcome of :func:`translate`.

    times : elapsed hours of each record since its subject's first record (NaN where TIME is missing)
    date_column : the date column read (dropped from the records), or None
    origins : {position of a subject's first record: its date and time, "YYYY-MM-DD hh:mm[:ss]"} where the
        calendar date is known (a date with its year, or an ISO date-time); empty otherwise
    note : one line saying what was translated, for summaries
    """

    times: np.ndarray
    date_column: str | None
    origins: dict
    note: str


def date_column(columns, taken) -> str | None:
    """The column holding NONMEM's date data item (named DATE, DAT1, DAT2 or DAT3, any case), None if there is
    none or it has another role (``taken``: the columns with a role, declared covariates or ignored ones)."""
    found = [c for c in columns if str(c).upper() in DATE_LABELS and c not in taken]
    if len(found) > 1:
        raise DatasetError(Violation((), found[1], f"two date columns ({', '.join(found)}); NONMEM reads one date "
                                     "data item: keep one"))
    return found[0] if found else None


def needs_translation(raw: pd.DataFrame, time_column: str, date_col: str | None) -> bool:
    """True when NM-TRAN would translate: a date column, or a TIME holding a ':' (or an ISO date-time)."""
    if date_col is not None:
        return True
    col = raw[time_column]
    if pd.api.types.is_numeric_dtype(col.dtype):
        return False
    return bool(as_text(col).str.contains(":", regex=False).any())


def translate(raw: pd.DataFrame, time_column: str, id_column: str, date_col: str | None, rows,
              last20: int = LAST20) -> Translation:
    """Elapsed hours from the dates and clock times of ``raw`` (see the module docstring); ``rows`` names the
    records in messages (hybridpk.data._checks.Rows); ``last20``: the last two-digit year read as 20nn (a control
    stream's $DATA LAST20). Raises DatasetError listing every record it cannot read."""
    time_text = as_text(raw[time_column])
    missing_time = time_text.isin(MISSING).to_numpy()
    subject = pd.factorize(as_text(raw[id_column]))[0]
    violations: list[Violation] = []
    iso = time_text.str.match(_ISO).to_numpy() & ~missing_time
    if iso.any() and date_col is None:
        day, seconds, calendar = _iso_times(time_text, iso, missing_time, time_column, rows, violations)
        source = f"the ISO date-times in {time_column}"
    else:
        if iso.any():
            violations.append(rows.violation(iso, time_column, f"a date and time in {time_column} beside the date "
                                             f"column {date_col}: with a date column, {time_column} is the clock "
                                             "time (hh:mm) alone"))
        seconds = _clock_seconds(time_text, missing_time | iso, time_column, date_col, rows, violations)
        if date_col is not None:
            day, calendar = _days(_date_text(raw[date_col]), DATE_LABELS[date_col.upper()], subject, date_col,
                                  rows, violations, last20)
            source = f"the dates in {date_col} and the clock times in {time_column}"
        else:
            day, calendar = np.zeros(len(raw)), np.zeros(len(raw), dtype=bool)
            back = _goes_back(seconds, subject)
            if back.any():
                violations.append(rows.violation(back, time_column, "a clock time earlier than the record before it "
                                                 "and no date: add a DATE column (NONMEM's date data item) so that "
                                                 "the day is known, or give TIME as hours since the first record"))
            source = f"the clock times in {time_column} (one day)"
    if violations:
        raise DatasetError(violations)
    absolute = day * 86400.0 + seconds                  # seconds since day 0 of the calendar used (exact to 2^53)
    firsts = pd.Series(np.arange(len(raw))).groupby(subject).transform("first").to_numpy()   # (records,)
    first = absolute[firsts]
    if np.isnan(first).any():
        bad = np.isnan(first) & (np.arange(len(raw)) == firsts)
        raise DatasetError(rows.violation(bad, time_column, "the first record of a subject has no TIME: its times "
                                          "are counted from it (NONMEM's time translation)"))
    hours = (absolute - first) / 3600.0
    origins = {int(i): _stamp(absolute[i]) for i in np.unique(firsts) if calendar[i]}
    note = f"TIME is the hours since each subject's first record, from {source} (NM-TRAN's time translation)"
    return Translation(times=hours, date_column=date_col, origins=origins, note=note)


def _date_text(col: pd.Series) -> pd.Series:
    """The date column as text; day numbers held as numbers (a DataFrame's 3.0) written as whole numbers."""
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        values = col.to_numpy(dtype=float)
        whole = np.isfinite(values) & (values == np.round(values))
        return pd.Series([str(int(v)) if w else ("" if np.isnan(v) else repr(v)) for v, w in zip(values, whole)],
                         index=col.index)
    return as_text(col)


def _clock_seconds(text, skip, column, date_col, rows, violations) -> np.ndarray:
    """Seconds since midnight of each clock time (hh:mm, hh:mm:ss or a number of hours below 24); NaN where
    missing."""
    out = np.full(len(text), np.nan)
    bad = np.zeros(len(text), dtype=bool)
    late = np.zeros(len(text), dtype=bool)
    for i, s in enumerate(text):
        if skip[i]:
            continue
        m = _CLOCK.match(s)
        if m:
            out[i] = _seconds(*m.groups())
            bad[i] = np.isnan(out[i])
        elif _HOURS.match(s):
            h = float(s)
            if h >= 24:
                late[i] = True
                continue
            out[i] = h * 3600.0
        else:
            bad[i] = True
    dated = bad & text.str.contains(r"\d[/.-]\d.*\s\d", regex=True).to_numpy()    # "12/1/2026 8:00"
    if dated.any():
        ex = examples(text, dated)
        violations.append(rows.violation(dated, column, f"{ex}: a date and a clock time in {column}; write the date "
                                         f"in a DATE column (month/day/year; DAT1: day/month/year) and the clock "
                                         f"time in {column}, or write {column} as ISO date-times (2026-12-01 08:00)"))
    bad &= ~dated
    if bad.any():
        ex = examples(text, bad)
        violations.append(rows.violation(bad, column, f"{ex} is not a clock time: write hh:mm (00:00 to 23:59) or "
                                         "hours since midnight"))
    if late.any():
        why = (f"beside the date column {date_col}, TIME is the clock time of that day (NONMEM's date data item)"
               if date_col else "with clock times (hh:mm) in the column, its numbers are clock times too")
        violations.append(rows.violation(late, column, f"a TIME of 24 or more: {why}; if TIME already holds the "
                                         "hours since a reference, "
                                         + (f"remove or rename the {date_col} column" if date_col else
                                            "write every record so")))
    return out


def _days(text, order: str, subject, column, rows, violations, last20: int = LAST20):
    """(day number of each record, whether each record's date is a calendar date with its year) from a date
    column of component ``order`` ('mdy', ...); see the module docstring. A subject's dates are written alike
    (NONMEM's own example has subjects with and without the year)."""
    parts = [re.split(r"[^0-9]+", s.lstrip("+-")) if s not in MISSING else [] for s in text]
    counts = pd.Series([len(p) for p in parts])
    missing = (counts == 0).to_numpy()
    if missing.any():
        violations.append(rows.violation(missing, column, "missing date: every record needs one when the data have "
                                         "a date column"))
    present = counts.where(~missing)
    mixed = (present.groupby(subject).transform("nunique") > 1).to_numpy() & ~missing
    if mixed.any():
        violations.append(rows.violation(mixed, column, "a subject's dates written with different numbers of "
                                         "components (a day number, day and month, or a full date); write them "
                                         "alike"))
        return np.zeros(len(text)), np.zeros(len(text), dtype=bool)
    dotted = np.array([order == "mdy" and bool(re.fullmatch(r"\d{1,2}\.\d{1,2}\.\d{1,4}", s)) for s in text])
    if dotted.any():             # 01.12.2026: the day.month.year convention, which DATE would read as Jan 12
        ex = examples(text, dotted)
        violations.append(rows.violation(dotted, column, f"{ex}: dates with dots, the day.month.year convention, "
                                         f"under the label {column}, which NONMEM reads as month/day/year; label the "
                                         f"column DAT1 for day.month.year, or write month/day/year with / or -"))
        return np.zeros(len(text)), np.zeros(len(text), dtype=bool)
    day = np.zeros(len(text))
    month_of = np.zeros(len(text), dtype=int)
    bad, year_place = np.zeros(len(text), dtype=bool), np.zeros(len(text), dtype=bool)
    for i, p in enumerate(parts):
        n = len(p)
        if n == 0:
            continue
        if n == 1:                      # a day number, possibly 0 or negative
            try:
                day[i] = float(int(text.iloc[i]))
            except ValueError:
                bad[i] = True
            continue
        if n > 3 or any(not x for x in p):
            bad[i] = True
            continue
        fields = order if n == 3 else order.replace("y", "")
        value = dict(zip(fields, (int(x) for x in p)))
        digits = dict(zip(fields, (len(x) for x in p)))
        if any(digits[f] > 2 for f in "md"):
            year_place[i] = n == 3 and any(digits[f] == 4 for f in "md")
            bad[i] = not year_place[i]
            continue
        if n == 3 and digits["y"] == 3:
            bad[i] = True
            continue
        if n == 3 and digits["y"] <= 2:
            value["y"] += 2000 if value["y"] <= last20 else 1900
        try:
            day[i] = _dt.date(value.get("y", 2000), value["m"], value["d"]).toordinal()
        except ValueError:
            bad[i] = True
            continue
        month_of[i] = value["m"] if n == 2 else 0
    # no year: a subject whose dates cross the end of February may or may not have a 29th
    months = pd.Series(month_of).where(month_of > 0)
    crossing = ((months.groupby(subject).transform("min") <= 2) & (months.groupby(subject).transform("max") >= 3)
                ).to_numpy() & (month_of > 0)
    if crossing.any():
        violations.append(rows.violation(crossing, column, "dates without a year whose subject's records cross the "
                                         "end of February: add the year (is there a 29th?)"))
    if year_place.any():
        label = {"mdy": "month/day/year", "dmy": "day/month/year", "ymd": "year/month/day",
                 "ydm": "year/day/month"}[order]
        other = "DAT2" if order in ("mdy", "dmy") else "DATE or DAT1"
        ex = examples(text, year_place)
        violations.append(rows.violation(year_place, column, f"{ex}: a four-digit year where the label {column} "
                                         f"reads {label} (NONMEM's date data item); label the column {other}"))
    if bad.any():
        ex = examples(text, bad)
        violations.append(rows.violation(bad, column, f"{ex} is not a date of the form the label {column} names "
                                         "(DATE: month/day/year, DAT1: day/month/year, DAT2: year/month/day, "
                                         "DAT3: year/day/month; or a day number)"))
    return day, (counts == 3).to_numpy()


def _iso_times(text, iso, missing, column, rows, violations):
    """(day ordinal, seconds since midnight, calendar dates: all True) of ISO 8601 date-times in TIME; every
    present value must be one."""
    day, seconds = np.zeros(len(text)), np.full(len(text), np.nan)
    other = ~iso & ~missing
    if other.any():
        violations.append(rows.violation(other, column, f"{column} mixes ISO date-times (2026-12-01 08:00) with "
                                         "other values; write every record alike"))
    bad = np.zeros(len(text), dtype=bool)
    for i in np.flatnonzero(iso):
        y, mo, d, h, mi, sec = _ISO.match(text.iloc[i]).groups()
        try:
            day[i] = _dt.date(int(y), int(mo), int(d)).toordinal()
        except ValueError:
            bad[i] = True
            continue
        seconds[i] = _seconds(h, mi, sec)
        bad[i] = np.isnan(seconds[i])
    if bad.any():
        ex = examples(text, bad)
        violations.append(rows.violation(bad, column, f"{ex} is not a valid date and time"))
    return day, seconds, np.ones(len(text), dtype=bool)


def _seconds(hours: str, minutes: str, seconds: str | None) -> float:
    """Seconds since midnight of a clock time's matched fields; NaN when it is not one (25:00, 08:61)."""
    h, mi, sec = int(hours), int(minutes), float(seconds or 0.0)
    return h * 3600.0 + mi * 60.0 + sec if h <= 23 and mi <= 59 and sec < 60 else float("nan")


def _goes_back(seconds, subject) -> np.ndarray:
    """Records whose clock time is earlier than their subject's record before them."""
    prev = pd.Series(seconds).groupby(subject).shift(1).to_numpy()
    with np.errstate(invalid="ignore"):
        return seconds < prev


def _stamp(absolute: float) -> str:
    """'YYYY-MM-DD hh:mm[:ss]' of seconds since day 0 of the proleptic Gregorian ordinal calendar."""
    day, rest = divmod(absolute, 86400.0)
    when = _dt.datetime.combine(_dt.date.fromordinal(int(day)), _dt.time()) + _dt.timedelta(seconds=rest)
    return when.strftime("%Y-%m-%d %H:%M" + (":%S" if when.second or when.microsecond else ""))
