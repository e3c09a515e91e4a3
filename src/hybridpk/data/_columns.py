"""Column roles: which column is the ID, the time, the dose ... and the optional sidecar that declares them.

Without a sidecar, standard NONMEM names are recognised case-insensitively. A sidecar (JSON or TOML) may
declare roles, units and covariates. Two shapes are accepted::

    {"columns": {"WGT": {"role": "covariate", "unit": "kg"}, "CONC": {"role": "DV", "unit": "mg/L"}}}

or pharmpy's ``.datainfo`` (a list of ``{"name": ..., "type": ...}`` or ``{"name", "variable_mapping"}``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError, Violation

#: canonical role names (NONMEM vocabulary) in the order used when writing a dataset back.
ROLES = ("ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "DUR", "ADDL", "II", "SS",
         "LLOQ", "BLQ", "CENS", "DVID")
REQUIRED = ("ID", "TIME", "DV")

#: column names (upper case) recognised for each role when no sidecar says otherwise.
ALIASES = {
    "ID": ("ID",), "TIME": ("TIME",), "DV": ("DV",), "AMT": ("AMT",), "EVID": ("EVID",),
    "MDV": ("MDV",), "CMT": ("CMT",), "RATE": ("RATE",), "DUR": ("DUR", "D"), "ADDL": ("ADDL",),
    "II": ("II",), "SS": ("SS",), "LLOQ": ("LLOQ", "LOQ"), "BLQ": ("BLQ", "BQL"), "CENS": ("CENS",),
    "DVID": ("DVID",),
}

#: pharmpy DataInfo types and common synonyms -> our roles.
_ROLE_WORDS = {
    "id": "ID", "idv": "TIME", "time": "TIME", "dv": "DV", "dose": "AMT", "amt": "AMT", "event": "EVID",
    "evid": "EVID", "mdv": "MDV", "compartment": "CMT", "cmt": "CMT", "rate": "RATE", "dur": "DUR",
    "duration": "DUR", "additional": "ADDL", "addl": "ADDL", "ii": "II", "ss": "SS", "lloq": "LLOQ",
    "blq": "BLQ", "cens": "CENS", "dvid": "DVID", "covariate": "covariate", "unknown": "ignore",
    "ignore": "ignore", "drop": "ignore", "other": "ignore",
}

DEFAULT_UNITS = {"TIME": "h", "AMT": "mg", "DV": "mg/L", "RATE": "mg/h", "DUR": "h", "II": "h"}


@dataclass(frozen=True)
class ColumnSpec:
    """Resolved roles of a dataset's columns.

    Attributes
    ----------
    roles : dict
        canonical role -> column name in the source.
    covariates : tuple of str or None
        Declared covariates; None means "every numeric column that has no role".
    ignored : tuple of str
        Columns declared as ignored (kept in the data, not used).
    units : dict
        column name -> unit string.
    categorical : tuple of str
        Covariates declared categorical (numeric codes).
    separator : str or None
        Field separator declared by the sidecar (None: detect).
    """

    roles: dict = field(default_factory=dict)
    covariates: tuple | None = None
    ignored: tuple = ()
    units: dict = field(default_factory=dict)
    categorical: tuple = ()
    separator: str | None = None


def _parse_role(word: str, column: str, source: str) -> str:
    key = str(word).strip()
    if key.upper() in ROLES:
        return key.upper()
    if key.lower() in _ROLE_WORDS:
        return _ROLE_WORDS[key.lower()]
    raise DatasetError(Violation((), column, f"unknown role {word!r} in the column sidecar; use one of "
                                 f"{', '.join(ROLES)}, 'covariate' or 'ignore'"), source)


def load_sidecar(spec: dict | str | Path | None) -> tuple[dict, str | None]:
    """Read a sidecar (dict, JSON file, pharmpy ``.datainfo`` or TOML file) into a plain dict."""
    if spec is None:
        return {}, None
    if isinstance(spec, dict):
        return spec, None
    path = Path(spec)
    if not path.is_file():
        raise DatasetError(f"column sidecar {path} does not exist", str(path))
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            return tomllib.loads(text), str(path)
        return json.loads(text), str(path)
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError both derive from ValueError
        raise DatasetError(f"the column sidecar is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {exc}",
                           str(path)) from None


def find_sidecar(path: Path) -> Path | None:
    """Sidecar next to a data file: ``<stem>.datainfo``, ``<stem>.columns.json`` or ``<stem>.columns.toml``."""
    for candidate in (path.with_suffix(".datainfo"), path.parent / f"{path.stem}.columns.json",
                      path.parent / f"{path.stem}.columns.toml"):
        if candidate.is_file():
            return candidate
    return None


def resolve_columns(header: list[str], sidecar: dict, covariates, source: str | None,
                    units: dict | None = None) -> ColumnSpec:
    """Assign roles to the columns of ``header``; report every ambiguity at once. ``units`` {column: unit}: units
    the file states (its header's "TIME (h)"), which a sidecar's override and which override the defaults."""
    violations: list[Violation] = []
    roles: dict[str, str] = {}
    units = dict(units or {})
    declared_cov: list[str] = []
    ignored: list[str] = []
    categorical: list[str] = []
    by_upper = {}
    for name in header:
        by_upper.setdefault(name.upper(), []).append(name)
    for upper, names in by_upper.items():
        if len(names) > 1:
            violations.append(Violation((), names[0], f"column names {names} differ only in case; "
                                        "rename one (columns are matched case-insensitively)"))

    cols = sidecar.get("columns", {}) if sidecar else {}
    if isinstance(cols, list):  # pharmpy .datainfo or a list of {"name": ..., "role": ...}
        entries = []
        for c in cols:
            mapping = c.get("variable_mapping", {})
            props = mapping.get("properties", {}) if isinstance(mapping, dict) else {}
            entries.append((c.get("name"), {
                "role": c.get("role", c.get("type", mapping.get("type", "unknown"))),
                "unit": c.get("unit", props.get("unit")),
                "scale": mapping.get("scale", c.get("scale")),
            }))
    else:
        entries = list(cols.items())
    for name, info in entries:
        info = info if isinstance(info, dict) else {"role": info}
        match = by_upper.get(str(name).upper())
        if not match:
            violations.append(Violation((), str(name), "declared in the column sidecar but not in the data"))
            continue
        col = match[0]
        role = _parse_role(info.get("role", info.get("type", "unknown")), col, source)
        if role == "covariate":
            declared_cov.append(col)
            if str(info.get("type", info.get("scale", ""))).lower() in ("categorical", "nominal"):
                categorical.append(col)
        elif role == "ignore":
            ignored.append(col)
        elif role in roles:
            violations.append(Violation((), col, f"role {role} is declared twice ({roles[role]} and {col})"))
        else:
            roles[role] = col
        if info.get("unit"):
            units[col] = str(info["unit"])

    # standard names for roles the sidecar did not declare
    assigned = set(roles.values()) | set(declared_cov) | set(ignored)
    for role, aliases in ALIASES.items():
        if role in roles:
            continue
        hits = [by_upper[a][0] for a in aliases if a in by_upper and by_upper[a][0] not in assigned]
        if len(hits) > 1:
            violations.append(Violation((), hits[0], f"several columns could be {role}: {hits}; "
                                        "declare the right one in a column sidecar"))
        elif hits:
            roles[role] = hits[0]
            assigned.add(hits[0])

    for role in REQUIRED:
        if role not in roles:
            violations.append(Violation((), role, f"required column {role} is missing (columns found: "
                                        f"{', '.join(header)}); rename the column or declare its role in a sidecar"))

    if covariates is not None:
        wanted = [covariates] if isinstance(covariates, str) else list(covariates)
        chosen = []
        for c in wanted:
            match = by_upper.get(str(c).upper())
            if not match:
                violations.append(Violation((), str(c), "requested as a covariate but not in the data"))
            else:
                chosen.append(match[0])
        cov: tuple | None = tuple(chosen)
    elif sidecar and entries:
        cov = tuple(declared_cov)
    else:
        cov = None
    if violations:
        raise DatasetError(violations, source)
    for role, col in roles.items():
        if role in DEFAULT_UNITS and col not in units:
            units[col] = DEFAULT_UNITS[role]
    return ColumnSpec(roles=roles, covariates=cov, ignored=tuple(ignored), units=units,
                      categorical=tuple(categorical), separator=sidecar.get("separator") if sidecar else None)
