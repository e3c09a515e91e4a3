"""The single door through which data enter hybridpk: :func:`read_nonmem` -> immutable :class:`Dataset`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd

from ..errors import DatasetError, DatasetWarning, Violation
from . import _clock, _columns, _read
from ._checks import Rows, as_text, check_records, convert

__all__ = ["Dataset", "read_nonmem"]

#: the prefix of a column that holds each subject's first record's value of a data item on every record (a control
#: stream's IF (NEWIND.NE.2) WT0 = WT reads FIRST_WT; hybridpk.population.nonmem makes it)
FIRST_RECORD = "FIRST_"

# fill values of optional roles when the column is absent (NONMEM defaults)
_DEFAULTS = {"AMT": 0.0, "CMT": 0.0, "RATE": 0.0, "DUR": 0.0, "ADDL": 0.0, "II": 0.0, "SS": 0.0,
             "LLOQ": np.nan, "BLQ": 0.0, "CENS": 0.0, "DVID": 0.0}


def read_nonmem(source, columns=None, covariates=None, *, names=None, separator=None, last20: int = 50,
                label: str = "<DataFrame>") -> "Dataset":
    """Read a NONMEM-style dataset and validate it.

    Parameters
    ----------
    source : str, Path or pandas.DataFrame
        A CSV (comma, tab, semicolon or whitespace separated; ``#`` lines are comments) with a header
        row, or a DataFrame with the same columns.
    columns : dict, str or Path, optional
        Column sidecar (JSON/TOML file or dict) declaring roles, units and covariates. When omitted,
        ``<stem>.datainfo``, ``<stem>.columns.json`` or ``<stem>.columns.toml`` next to the file is used
        if present; otherwise standard names (ID, TIME, DV, AMT, EVID, MDV, CMT, RATE, DUR/D, ADDL, II,
        SS, LLOQ, BLQ, CENS, DVID) are recognised case-insensitively.
    covariates : list of str, optional
        Columns used as covariates. Default: those declared in the sidecar, or else every numeric
        column without a role. A covariate may not be missing (NaN) on any record.
    names : list of str, optional
        Column names for a file without a header row.
    separator : str, optional
        Field separator (default: detected from the first line).
    last20 : int
        With dates and clock times (a DATE, DAT1, DAT2 or DAT3 column, or hh:mm in TIME; see
        :mod:`hybridpk.data._clock`, NM-TRAN's time translation): one- and two-digit years up to it are 20nn,
        the others 19nn (NM-TRAN's $DATA LAST20).
    label : str
        How messages name a DataFrame ``source`` (default "<DataFrame>").

    Returns
    -------
    Dataset

    Raises
    ------
    DatasetError
        Listing every problem found, each with its row numbers (1-based data rows, and file lines),
        the column and what was expected.

    Examples
    --------
    >>> from hybridpk import read_nonmem, bundled_dataset
    >>> ds = read_nonmem(bundled_dataset("theoph"))
    >>> ds.n_subjects, ds.n_observations, ds.n_doses
    (12, 132, 12)
    """
    decimal_comma = False
    if isinstance(source, pd.DataFrame):        # ``label`` names it in messages
        if source.shape[0] == 0:
            raise DatasetError("the DataFrame has no rows", label)
        raw = source.reset_index(drop=True).copy()
        raw.columns = [str(c).strip() for c in raw.columns]
        lines = None
        sidecar, sidecar_path = _columns.load_sidecar(columns)
        path = None
    else:
        path = Path(source)
        label = str(path)
        if columns is None and path.is_file():
            columns = _columns.find_sidecar(path)
        sidecar, sidecar_path = _columns.load_sidecar(columns)
        sep = separator or (sidecar.get("separator") if sidecar else None)
        header, body, lines, decimal_comma = _read.read_table(path, sep, names)
        raw = pd.DataFrame(body, columns=header, dtype=object)
    raw, lines, commented = _without_commented_records(raw, lines, label)
    raw, header_units = _units_in_header(raw)
    spec = _columns.resolve_columns(list(raw.columns), sidecar, covariates, label, header_units)
    ds = _build(raw, spec, lines, label, path, sidecar_path, last20)
    return replace(ds, commented_lines=commented, decimal_comma=decimal_comma) if commented or decimal_comma else ds


#: the values of NONMEM's comment column C: "C" marks a record left out, "." or nothing one that is read
_COMMENT_MARKS = {"C", "c"}
_READ_MARKS = {"", ".", "0"}


#: a column name with its unit, as spreadsheets head them: "TIME (h)", "DV [mg/L]", "WT(kg)"
_NAME_AND_UNIT = r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*[(\[]\s*([^()\[\]]+?)\s*[)\]]\s*$"


def _units_in_header(raw: pd.DataFrame):
    """(records with the columns named without their units, {name: unit}) for headers such as "TIME (h)" or
    "DV [mg/L]"; the units label figures and tables as a sidecar's would. Left as they are when two columns
    would get the same name."""
    import re

    found = {c: re.match(_NAME_AND_UNIT, str(c)) for c in raw.columns}
    names = [m.group(1) if m else c for c, m in found.items()]
    if not any(found.values()) or len({n.upper() for n in names}) < len(names):
        return raw, {}
    units = {m.group(1): m.group(2) for m in found.values() if m}
    return raw.set_axis(names, axis=1), units


def _without_commented_records(raw: pd.DataFrame, lines, label: str):
    """(records, their file lines, the lines (or 1-based rows) of the records left out) without the records a
    first column named C marks with "C" -- NONMEM datasets' comment column, which NM-TRAN's IGNORE=C (or
    IGNORE=@) skips -- and without that column. A first column C holding anything but "C", "." or nothing is an
    ordinary column."""
    if raw.shape[1] == 0 or str(raw.columns[0]).strip().upper() != "C":
        return raw, lines, ()
    marks = as_text(raw.iloc[:, 0])
    if not marks.isin(_COMMENT_MARKS | _READ_MARKS).all():
        return raw, lines, ()
    out = marks.isin(_COMMENT_MARKS).to_numpy()
    where = tuple(int(lines[i]) if lines is not None else int(i) + 1 for i in np.flatnonzero(out))
    kept = raw.loc[~out].drop(columns=raw.columns[0]).reset_index(drop=True)
    if kept.empty:
        raise DatasetError("every record is marked C in the comment column C (left out, as NM-TRAN's IGNORE=C "
                           "does): there is nothing to read", label)
    return kept, [n for n, o in zip(lines, out) if not o] if lines is not None else None, where


def _build(raw: pd.DataFrame, spec, lines, label: str, path, sidecar_path, last20: int = 50) -> "Dataset":
    rows = Rows(len(raw), lines)
    raw, clock = _translate_time(raw, spec, rows, label, last20)
    violations: list[Violation] = []
    numeric, text_columns, unreadable = convert(raw, spec, rows, violations)
    role_names = dict(spec.roles)
    has = set(role_names)
    n = len(raw)
    t: dict[str, np.ndarray] = {}
    for role in _columns.ROLES:
        if role in has and role_names[role] in numeric:
            t[role] = numeric[role_names[role]].copy()
        elif role in _DEFAULTS:
            t[role] = np.full(n, _DEFAULTS[role])
        else:
            t[role] = np.full(n, np.nan)
    # NONMEM reads '.' as 0 in numeric data items
    for role in ("AMT", "RATE", "ADDL", "II", "SS", "CMT", "EVID", "MDV", "DUR", "BLQ", "CENS", "DVID"):
        if role in has:
            t[role] = np.where(np.isnan(t[role]), 0.0, t[role])
    # infer EVID / MDV as NONMEM does
    if "EVID" not in has:
        mdv_given = t["MDV"] if "MDV" in has else np.zeros(n)
        t["EVID"] = np.where(t["AMT"] > 0, 1.0, np.where(mdv_given == 1, 2.0, 0.0))
    if "MDV" not in has:
        t["MDV"] = np.where(t["EVID"] == 0, 0.0, 1.0)
        # a missing DV on an observation row is an observation we cannot use: keep the row, flag the error
    check_records(t, role_names, rows, has, violations, unreadable)

    # covariates: declared, or every numeric column without a role
    if spec.covariates is not None:
        cov_names = list(spec.covariates)
    else:
        taken = set(role_names.values()) | set(spec.ignored)
        cov_names = [c for c in raw.columns if c not in taken and c in numeric]
        if text_columns:
            warnings.warn(f"{label}: column(s) {', '.join(text_columns)} hold text and are not used as "
                          "covariates (declare them in a column sidecar, or encode them as numbers)",
                          DatasetWarning, stacklevel=3)
    for c in cov_names:
        if c in numeric:
            nan = np.isnan(numeric[c])
            if nan.any():
                violations.append(rows.violation(nan, c, "missing value (NaN) in a covariate that is used; fill it "
                                                 "(e.g. carry the last value forward) or leave the column out "
                                                 "of covariates"))
            if np.isinf(numeric[c]).any():
                violations.append(rows.violation(np.isinf(numeric[c]), c, "infinite value in a covariate that is "
                                                 "used; covariates must be finite numbers"))
    if violations:
        raise DatasetError(violations, label)

    frame = pd.DataFrame({role: t[role] for role in ("ID", "TIME", "DV", "AMT", "EVID", "MDV")})
    for role in ("CMT", "RATE", "DUR", "ADDL", "II", "SS", "LLOQ", "BLQ", "CENS", "DVID"):
        if role in has:
            frame[role] = t[role]
    for c in cov_names:
        frame[c] = numeric[c]
    others = [c for c in raw.columns if c not in set(role_names.values()) and c not in cov_names]
    for c in others:
        frame[c] = numeric[c] if c in numeric else raw[c].to_numpy()
    for role in ("EVID", "MDV", "CMT", "ADDL", "SS", "BLQ", "CENS", "DVID"):
        if role in frame:
            frame[role] = frame[role].astype(np.int64)
    if np.all(_int_like_all(frame["ID"])):
        frame["ID"] = frame["ID"].astype(np.int64)
    units = {}
    for role, col in role_names.items():
        if col in spec.units:
            units[role] = spec.units[col]
    for c in cov_names + others:
        if c in spec.units:
            units[c] = spec.units[c]
    row_numbers = np.arange(1, len(frame) + 1)
    line_numbers = np.asarray(lines) if lines is not None else None
    return Dataset(_frame=frame, covariates=tuple(cov_names), categorical=tuple(c for c in spec.categorical
                                                                                 if c in cov_names),
                   units=MappingProxyType(units), source=label, roles_present=tuple(sorted(has)),
                   other_columns=tuple(others), _row_numbers=row_numbers, _line_numbers=line_numbers,
                   time_note=clock.note if clock else None,
                   time_origin=MappingProxyType({frame["ID"].iloc[i].item(): stamp
                                                 for i, stamp in (clock.origins.items() if clock else ())}))


def _translate_time(raw: pd.DataFrame, spec, rows, label: str, last20: int):
    """(records, the Translation or None): dates and clock times made hours since each subject's first record,
    as NM-TRAN does (:mod:`hybridpk.data._clock`); the date column is dropped once read."""
    time_column, id_column = spec.roles.get("TIME"), spec.roles.get("ID")
    if time_column is None or id_column is None:
        return raw, None
    taken = set(spec.roles.values()) | set(spec.covariates or ()) | set(spec.ignored)
    try:
        date_col = _clock.date_column(raw.columns, taken)
        if not _clock.needs_translation(raw, time_column, date_col):
            return raw, None
        clock = _clock.translate(raw, time_column, id_column, date_col, rows, last20)
    except DatasetError as exc:
        raise DatasetError(exc.violations, label) from None
    raw = raw.copy()
    raw[time_column] = clock.times
    if date_col is not None:
        raw = raw.drop(columns=[date_col])
    return raw, clock


def _int_like_all(x: pd.Series) -> np.ndarray:
    v = x.to_numpy(dtype=float)
    return np.isfinite(v) & (v == np.round(v)) & (np.abs(v) < 2.0 ** 53)   # exact as an int64


@dataclass(frozen=True, eq=False)
class Dataset:
    """A validated, immutable NONMEM-style dataset.

    Columns use NONMEM names (ID, TIME in h, DV, AMT, EVID, MDV, CMT, RATE, DUR, ADDL, II, SS, LLOQ, BLQ,
    CENS, DVID) followed by covariates; EVID and MDV are always present (inferred when the file had
    none). Create one with :func:`read_nonmem`; convert with :meth:`to_dataframe` and :meth:`to_batch`.
    """

    _frame: pd.DataFrame = field(repr=False)
    covariates: tuple = ()
    categorical: tuple = ()
    units: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    source: str = "<DataFrame>"
    roles_present: tuple = ()
    other_columns: tuple = ()
    _row_numbers: np.ndarray | None = field(default=None, repr=False)
    _line_numbers: np.ndarray | None = field(default=None, repr=False)
    #: what the reader did to TIME when the data had dates or clock times (NM-TRAN's time translation), else None
    time_note: str | None = None
    #: {ID: its first record's date and time "YYYY-MM-DD hh:mm"}, TIME 0 of each subject, when the records had
    #: calendar dates (hybridpk.data._clock); empty otherwise
    time_origin: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    #: the file lines (data rows for a DataFrame) of the records a comment column C marked "C" and the reader left
    #: out, as NM-TRAN's IGNORE=C does
    commented_lines: tuple = ()
    #: the file wrote its numbers with decimal commas ("0,5" in a ';'-separated file), read as decimal points
    decimal_comma: bool = False
    #: the file's DV were log concentrations, read as EXP(DV) on the observations (:meth:`dv_from_log`)
    dv_log: bool = False
    #: the user stated that the DV are concentrations (:meth:`dv_stated_concentrations`)
    dv_stated: bool = False

    # ----------------------------------------------------------------- views
    @property
    def axis_units(self) -> tuple:
        """(time unit, concentration unit) for figures: from the column sidecar, else h and mg/L."""
        return self.units.get("TIME", "h"), self.units.get("DV", "mg/L")

    def to_dataframe(self) -> pd.DataFrame:
        """A copy of the records as a DataFrame (NONMEM column names; ADDL kept, not expanded)."""
        return self._frame.copy()

    def __len__(self) -> int:
        return len(self._frame)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Dataset):
            return NotImplemented
        return self.covariates == other.covariates and self._frame.equals(other._frame)

    __hash__ = None  # type: ignore[assignment]

    @property
    def ids(self) -> tuple:
        """Subject IDs in file order."""
        return tuple(pd.unique(self._frame["ID"]).tolist())

    @property
    def n_subjects(self) -> int:
        return int(self._frame["ID"].nunique())

    @property
    def observation_mask(self) -> np.ndarray:
        """True for records that are observations used in a likelihood (EVID=0, MDV=0)."""
        f = self._frame
        return ((f["EVID"] == 0) & (f["MDV"] == 0)).to_numpy()

    @property
    def n_observations(self) -> int:
        return int(self.observation_mask.sum())

    @property
    def n_censored_observations(self) -> int:
        """Observations below a limit of quantification (or above one), as the batch reads them for M3: CENS != 0,
        else BLQ != 0, else DV below an LLOQ column (:meth:`censoring`)."""
        return int((self.censoring()[0] != 0).sum())

    def censoring(self) -> tuple:
        """(CENS, limit) per record (numpy), as hybridpk reads censored levels (Beal's M3): CENS 1 where the level
        is below its limit, -1 above it, 0 elsewhere (and on records without a level); the limit where censored
        (NaN where there is none). From a CENS column (the limit in DV, or below it an LLOQ column's), else a BLQ
        column (its LLOQ column's, else the limit in DV), else DV below an LLOQ column."""
        f, obs = self._frame, self.observation_mask
        n = len(f)
        dv = f["DV"].to_numpy(dtype=float)
        lloq = f["LLOQ"].to_numpy(dtype=float) if "LLOQ" in f else np.full(n, np.nan)
        if "CENS" in f:     # 1: below the limit, -1: above it (the limit in DV; a level above an ULOQ in DV)
            cens = f["CENS"].to_numpy(dtype=float)
            limit = np.where(cens == -1, dv, lloq if "LLOQ" in f else np.where(cens == 1, dv, np.nan))
        elif "BLQ" in f:
            cens = f["BLQ"].to_numpy(dtype=float)
            limit = lloq if "LLOQ" in f else np.where(cens == 1, dv, np.nan)   # the limit in DV, as with CENS
        elif "LLOQ" in f:
            cens, limit = np.where(dv < lloq, 1.0, 0.0), lloq
        else:
            cens, limit = np.zeros(n), np.full(n, np.nan)
        return np.where(obs, cens, 0.0), limit

    def simulated_records(self, dv) -> pd.DataFrame:
        """The records with simulated levels ``dv`` (per record) at the observations (DV 0 at the other records),
        censored as these data's levels are: a simulated level below the LLOQ the data state
        (:meth:`censoring_limits`) is marked CENS = 1 with the limit as DV, one above an ULOQ CENS = -1 (a BLQ column
        follows CENS = 1). The data's own marks belonged to their measured levels and are replaced; data without
        censored levels keep every simulated level."""
        records = self._frame.copy()
        obs = self.observation_mask
        dv = np.asarray(dv, dtype=float)
        records.loc[obs, "DV"] = dv[obs]
        records.loc[~obs, "DV"] = 0.0
        if not self.n_censored_observations:
            return records
        lloq, uloq = self.censoring_limits()
        below, above = obs & (dv < lloq), obs & (dv > uloq)
        records["CENS"] = np.where(below, 1, np.where(above, -1, 0))
        records.loc[below, "DV"] = lloq[below]
        records.loc[above, "DV"] = uloq[above]
        if "BLQ" in records:
            records["BLQ"] = below.astype(int)
        return records

    def censoring_limits(self) -> tuple:
        """(LLOQ, ULOQ) per record (NaN: none) that any level of these data would be censored at: each record's own
        LLOQ where the data have an LLOQ column; else, where every level censored below has one limit (the usual
        single LLOQ, in DV), it is every record's, and otherwise a censored record's own (NaN elsewhere); the same
        above. How the VPC censors simulated levels (Bergstrand and Karlsson 2009) and a simulated dataset is
        censored as the data are."""
        cens, limit = self.censoring()

        def limits(sign):
            own = np.where(cens == -sign, np.nan, limit)       # a level above the ULOQ has no LLOQ, and the reverse
            values = np.unique(own[cens == sign])
            return np.full(len(cens), values[0] if values.size == 1 else np.nan) if values.size <= 1 else own

        lloq = self._frame["LLOQ"].to_numpy(dtype=float) if "LLOQ" in self._frame else limits(1)
        return lloq, limits(-1)

    @property
    def dose_mask(self) -> np.ndarray:
        """True for dose records (EVID 1 or 4)."""
        return self._frame["EVID"].isin([1, 4]).to_numpy()

    @property
    def n_dose_records(self) -> int:
        return int(self.dose_mask.sum())

    @property
    def n_doses(self) -> int:
        """Number of doses after expanding ADDL (each dose record counts 1 + ADDL)."""
        f = self._frame[self.dose_mask]
        addl = f["ADDL"].sum() if "ADDL" in f else 0
        return int(len(f) + addl)

    def row_label(self, index: int) -> str:
        """How record ``index`` (0-based position) is named in messages: 'row R (file line L)'."""
        label = f"row {int(self._row_numbers[index])}" if self._row_numbers is not None else f"row {index + 1}"
        if self._line_numbers is not None:
            label += f" (file line {int(self._line_numbers[index])})"
        return label

    def time_varying_covariates(self) -> tuple:
        """Covariates whose value changes within at least one subject."""
        f = self._frame
        out = []
        for c in self.covariates:
            if (f.groupby("ID", sort=False)[c].nunique() > 1).any():
                out.append(c)
        return tuple(out)

    def require_units(self, units: dict, user: str) -> None:
        """Refuse, naming both, when the units this dataset states (a sidecar's or its header's, "DV (ng/mL)")
        differ from ``units`` {"time": .., "amount": .., "concentration": ..} that ``user`` (a model) works in:
        its numbers would be read on the wrong scale. Units that are the same quantity written differently
        (ug/mL and mg/L, hr and h) agree; a unit that cannot be compared is refused unless written alike."""
        from ._units import same_unit

        clashes = []
        for role, kind in (("TIME", "time"), ("AMT", "amount"), ("DV", "concentration")):
            ours, theirs = self.units.get(role), units.get(kind)
            if ours and theirs and not same_unit(ours, theirs, kind):
                clashes.append(f"{role} in {ours}, but {user} works in {theirs}")
        if clashes:
            raise DatasetError("; ".join(clashes) + ": convert the data to the model's units (hybridpk does not "
                               "rescale them), or correct the unit the file or its sidecar states", self.source)

    def clock_time(self, subject, hours: float) -> str | None:
        """The date and time ("YYYY-MM-DD hh:mm") ``hours`` after ``subject``'s TIME 0, when its records had
        calendar dates (:attr:`time_origin`); None otherwise. Naive local time, as the records were written."""
        origin = self.time_origin.get(subject)
        if origin is None or hours is None or not np.isfinite(hours):
            return None
        import datetime as dt

        when = dt.datetime.fromisoformat(origin) + dt.timedelta(hours=float(hours))
        return when.strftime("%Y-%m-%d %H:%M")

    def hours_at(self, subject, when) -> float | None:
        """The inverse of :meth:`clock_time`: the hours on ``subject``'s TIME scale of the naive date and time
        ``when`` (a datetime), when its records had calendar dates; None otherwise."""
        origin = self.time_origin.get(subject)
        if origin is None:
            return None
        import datetime as dt

        return (when - dt.datetime.fromisoformat(origin)).total_seconds() / 3600.0

    def violation(self, positions, column: str, message: str) -> Violation:
        """A Violation naming the records at ``positions`` (0-based, in this dataset) by their data rows and
        file lines."""
        idx = [int(i) for i in positions]
        rows = tuple(int(self._row_numbers[i]) if self._row_numbers is not None else i + 1 for i in idx)
        lines = tuple(int(self._line_numbers[i]) for i in idx) if self._line_numbers is not None else ()
        return Violation(rows, column, message, lines)

    def require_covariates(self, covariates) -> None:
        """Raise a DatasetError naming the covariates of ``covariates`` (a model's) that the dataset has no
        column for."""
        missing = [c for c in covariates if c not in self._frame.columns]
        if missing:
            first = {c: c[len(FIRST_RECORD):] for c in missing if c.startswith(FIRST_RECORD)}
            hint = "".join(f"; {c} is each subject's first record's {item} (a control stream's IF (NEWIND.NE.2) ... = "
                           f"{item}): add it as a column" for c, item in first.items() if item in self._frame.columns)
            raise DatasetError(f"the model uses covariate(s) {', '.join(missing)}, which the dataset lacks "
                               f"(it has {', '.join(self.covariates) or 'none'}){hint}", self.source)

    def require_constant_covariates(self, covariates, user: str = "the model") -> None:
        """Raise a DatasetError listing, per covariate of ``covariates`` that changes within a subject, the
        records where it differs from the subject's first value: ``user`` takes one value per subject (the
        first record), so a covariate that varies in time would be silently replaced by its first value."""
        f = self._frame
        problems = []
        for c in covariates:
            if c not in f:
                continue
            first = f.groupby("ID", sort=False)[c].transform("first").to_numpy()
            changed = f[c].to_numpy() != first
            if changed.any():
                idx = np.flatnonzero(changed)
                ids = ", ".join(str(i) for i in pd.unique(f["ID"].to_numpy()[idx])[:6])
                problems.append(self.violation(idx, c, f"covariate {c} changes within subject(s) {ids}; {user} "
                                               "takes one value per subject (its first record) and would silently "
                                               "replace the later ones: give one value per subject (e.g. the "
                                               f"baseline) or leave {c} out of the model"))
        if problems:
            raise DatasetError(problems, self.source)

    def doses(self) -> pd.DataFrame:
        """Dose events with ADDL expanded: one row per administration.

        Columns ID, TIME (h), AMT, CMT, RATE, DUR, SS, II, EVID and ROW (1-based data row of the record it
        came from). Reset-only records (EVID 3) appear with AMT 0 so a solver can honour them.
        """
        f = self._frame
        sel = f["EVID"].isin([1, 3, 4]).to_numpy()
        d = f.loc[sel].copy()
        d["ROW"] = np.flatnonzero(sel) + 1
        for col in ("CMT", "RATE", "DUR", "SS", "II", "ADDL"):
            if col not in d:
                d[col] = 0
        addl = d["ADDL"].to_numpy().astype(int)
        rep = np.repeat(np.arange(len(d)), addl + 1)
        out = d.iloc[rep].reset_index(drop=True)
        k = np.concatenate([np.arange(a + 1) for a in addl]) if len(addl) else np.zeros(0, int)
        out["TIME"] = out["TIME"].to_numpy() + k * out["II"].to_numpy()
        # additional doses are plain doses: no steady state, no reset
        extra = k > 0
        out.loc[extra, "SS"] = 0
        out.loc[extra, "EVID"] = 1
        out = out[["ID", "TIME", "AMT", "CMT", "RATE", "DUR", "SS", "II", "EVID", "ROW"]]
        order = np.lexsort((out["TIME"].to_numpy(), _id_order(out["ID"], self.ids)))
        return out.iloc[order].reset_index(drop=True)

    def summary(self) -> dict:
        """Counts a user checks first: subjects, observations, doses, routes, covariates, time span."""
        f = self._frame
        obs = self.observation_mask
        dose = self.dose_mask
        d = f[dose]
        routes = {}
        if len(d):
            rate = d["RATE"] if "RATE" in d else pd.Series(0, index=d.index)
            kind = np.where(rate != 0, "infusion", "bolus")
            cmt = d["CMT"] if "CMT" in d else pd.Series(0, index=d.index)
            for (c, k), n in pd.Series(list(zip(cmt, kind))).value_counts().sort_index().items():
                routes[f"{'default CMT' if c == 0 else f'CMT {c}'} {k}"] = int(n)
        ss = int((f["SS"] > 0).sum()) if "SS" in f else 0
        per_subject = f[obs].groupby("ID", sort=False).size()
        censored = self.n_censored_observations
        return {
            "source": self.source,
            "records": int(len(f)),
            "subjects": self.n_subjects,
            "observations": int(obs.sum()),
            "observations_per_subject": (int(per_subject.min()) if len(per_subject) else 0,
                                         int(per_subject.max()) if len(per_subject) else 0),
            "censored_observations": censored,
            "dose_records": int(dose.sum()),
            "doses": self.n_doses,
            "steady_state_doses": ss,
            "reset_records": int(f["EVID"].isin([3, 4]).sum()),
            "other_records": int((f["EVID"] == 2).sum() + ((f["EVID"] == 0) & (f["MDV"] == 1)).sum()),
            "routes": routes,
            "covariates": list(self.covariates),
            "time_varying_covariates": list(self.time_varying_covariates()),
            "time_span": (float(f["TIME"].min()), float(f["TIME"].max())),
            "commented_out": list(self.commented_lines),
            "decimal_comma": self.decimal_comma,
            "time_translation": self.time_note,
            "time_origin": dict(self.time_origin),
            "dv_log": self.dv_log,
            "units": dict(self.units),
        }

    def with_records(self, frame: pd.DataFrame, covariates=None) -> "Dataset":
        """A dataset of ``frame`` (this dataset's records, changed: some MDV set, covariates filled in), read and
        checked as any, named as this one and with DV on this one's scale (``dv_log`` kept)."""
        out = read_nonmem(frame, covariates=list(self.covariates if covariates is None else covariates),
                          label=self.source)
        return replace(out, dv_log=self.dv_log, dv_stated=self.dv_stated)

    def dv_stated_concentrations(self) -> "Dataset":
        """The dataset as it is, with its DV stated to be concentrations (``hybridpk map/dose/predict --dv conc``):
        a model whose control stream fits LOG(F) to log DV takes them (it refuses DV of unknown scale)."""
        return replace(self, dv_stated=True)

    def dv_from_log(self) -> "Dataset":
        """The dataset with its observations' DV read as log concentrations: DV = EXP(DV) (mg/L when the logs are
        of mg/L), marked ``dv_log``. A control stream that fits Y = LOG(F) + EPS to DV in log units (NONMEM's
        log-transform-both-sides) reads its data so, and hybridpk's log-transform-both-sides fit takes log(DV)
        back, the stream's DV. A censored level (CENS or BLQ) with its limit in DV has it in log units too, and
        so in concentrations after. Refused: an LLOQ column (in which units?) and DV whose EXP a float cannot hold
        (beyond +-700)."""
        if self.dv_log:
            return self
        f, obs = self._frame, self.observation_mask
        if "LLOQ" in self.roles_present:
            raise DatasetError("the DV are log concentrations (a control stream's Y = LOG(F) + ...) and the data "
                               "have an LLOQ column, whose limits hybridpk cannot place on that scale; give "
                               "DV and LLOQ in concentrations and fit with log-transform-both-sides (--ltbs)",
                               self.source)
        out = np.flatnonzero(obs & (f["DV"].abs() > 700).to_numpy())
        if out.size:
            raise DatasetError([self.violation(out, "DV", "DV in log units beyond +-700 (EXP(DV) overflows or "
                                               "is 0); are these DV log concentrations?")], self.source)
        frame = f.copy()
        frame.loc[obs, "DV"] = np.exp(frame.loc[obs, "DV"].to_numpy(dtype=float))
        return replace(self, _frame=frame, dv_log=True)

    def to_batch(self, dtype=None, device=None, covariates=None):
        """Padded tensors for the solver: see :class:`hybridpk.data.batch.EventBatch`."""
        from .batch import EventBatch

        return EventBatch.from_dataset(self, dtype=dtype, device=device, covariates=covariates)

    def subset(self, ids) -> "Dataset":
        """A Dataset with only the given subject IDs (in this dataset's order)."""
        keep = self._frame["ID"].isin(list(ids)).to_numpy()
        if not keep.any():
            raise DatasetError(f"none of the IDs {list(ids)[:5]} is in the dataset", self.source)
        return replace(self, _frame=self._frame[keep].reset_index(drop=True),
                       _row_numbers=None if self._row_numbers is None else self._row_numbers[keep],
                       _line_numbers=None if self._line_numbers is None else self._line_numbers[keep])

    def prediction_design(self, times, cmt: int = 0) -> "Dataset":
        """Every subject's dose records plus EVID=2 records at ``times`` (h), the same for all subjects, with each
        subject's first-record covariates: the design to predict curves on a grid (observations dropped)."""
        f = self._frame
        doses = f[f["EVID"].isin([1, 3, 4])]
        first = f.groupby("ID", sort=False).first()
        t = np.asarray(times, dtype=float)
        grids = []
        for sid in self.ids:
            g = pd.DataFrame({"ID": sid, "TIME": t, "DV": 0.0, "AMT": 0.0, "EVID": 2, "MDV": 1})
            if "CMT" in f:
                g["CMT"] = cmt
            for c in self.covariates:
                g[c] = first.loc[sid, c]
            grids.append(g)
        full = pd.concat([doses] + grids, ignore_index=True)
        order = np.lexsort(((full["EVID"] == 2).to_numpy(), full["TIME"].to_numpy(), _id_order(full["ID"], self.ids)))
        return read_nonmem(full.iloc[order].reset_index(drop=True), covariates=list(self.covariates))

    def fingerprint(self) -> str:
        """SHA-256 of the records (columns, values and order): identifies the data a model was fitted to."""
        import hashlib

        h = hashlib.sha256(",".join(map(str, self._frame.columns)).encode())
        h.update(pd.util.hash_pandas_object(self._frame, index=False).to_numpy().tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"Dataset({self.source!r}, subjects={self.n_subjects}, observations={self.n_observations}, "
                f"doses={self.n_doses}, covariates={list(self.covariates)})")


def _id_order(ids: pd.Series, order: tuple) -> np.ndarray:
    pos = {k: i for i, k in enumerate(order)}
    return np.array([pos[k] for k in ids], dtype=int)
