"""Turn a CSV/whitespace NONMEM data file into a table of strings with file line numbers.

We read the text ourselves (rather than through ``pandas.read_csv``) so that every record keeps the
line number the user sees in an editor, and so that a file that is not a table fails with a message
about the file instead of a parser traceback.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path


from ..errors import DatasetError, Violation

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eEdD][+-]?\d+)?$")


def _is_number(token: str) -> bool:
    return bool(_NUMBER.match(token.strip()))


def _looks_like_header(line: str) -> bool:
    """A line of names (the first is not a number): a header, not a record."""
    first = re.split(r"[,;\t ]+", line.strip())[0]
    return bool(first) and not _is_number(first)


def read_table(path: Path, separator: str | None = None, names: list[str] | None = None):
    """Read ``path`` into (header, rows of str, file line numbers, whether its numbers were written with decimal
    commas and are now with points). Raises DatasetError on a non-table."""
    source = str(path)
    if not path.exists():
        raise DatasetError(f"file {path} does not exist", source)
    if path.is_dir():
        raise DatasetError(f"{path} is a folder, not a data file", source)
    raw = path.read_bytes()
    if not raw.strip():
        raise DatasetError("the file is empty; expected a NONMEM-style CSV with a header row "
                           "(ID,TIME,DV,AMT,...) and one record per line", source)
    if b"\x00" in raw[:4096]:
        raise DatasetError("this is not a CSV file (it contains binary data); export the data as "
                           "comma-separated text with a header row", source)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = raw.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            raise DatasetError("this is not a text file; export the data as CSV", source) from None
    return parse_text(text, source, separator, names)


def _without_table_title(numbered: list, source: str) -> list:
    """A NONMEM table file ($TABLE output, e.g. sdtab1) opens with a title line, "TABLE NO.  1", before its
    header: that line is not data and is skipped. A file holding several tables (one per subproblem, each with
    its title and header) is refused: which table to read is the user's choice."""
    titles = [n for n, ln in numbered if ln.lstrip().upper().startswith("TABLE NO.")]
    if not titles:
        return numbered
    if len(titles) > 1 or titles[0] != numbered[0][0]:
        raise DatasetError(f"this is a NONMEM table file holding {len(titles)} tables (\"TABLE NO.\" on lines "
                           f"{', '.join(map(str, titles[:5]))}{', ...' if len(titles) > 5 else ''}); keep one table "
                           "(its header line and records) in the file", source)
    return numbered[1:]


def _commented_header(lines: list[str]):
    """(line number, header) when the first non-blank line is a header written after '#' ("#ID,TIME,DV,..."), as
    files written for NONMEM's default IGNORE=# have it (NM-TRAN skips the line, so the header must not be read
    as data): names, not numbers, at least two of them. None otherwise (a comment)."""
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        if not ln.lstrip().startswith("#"):
            return None
        head = ln.lstrip()[1:].strip()
        tokens = [t for t in re.split(r"[,;\t ]+", head) if t]
        if len(tokens) >= 2 and all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", t) for t in tokens):
            return i + 1, head
        return None
    return None


def parse_text(text: str, source: str, separator: str | None = None, names: list[str] | None = None):
    lines = text.splitlines()
    # data lines: not blank, not a comment (# or @ as NONMEM's IGNORE=# / IGNORE=@ header lines aside); a header
    # written after '#' is the header
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#")]
    header_line = _commented_header(lines) if names is None else None
    if header_line is not None and numbered and not _looks_like_header(numbered[0][1]):
        numbered.insert(0, header_line)
    numbered = _without_table_title(numbered, source)
    if not numbered:
        raise DatasetError("the file has no records (only blank or comment lines)", source)
    first = numbered[0][1]
    if separator is None:
        if "," in first:
            separator = ","
        elif "\t" in first:
            separator = "\t"
        elif ";" in first:
            separator = ";"
        else:
            separator = r"\s+"

    def split(line: str) -> list[str]:
        if separator in (r"\s+", " ", "whitespace"):
            return line.split()
        return next(csv.reader(io.StringIO(line), delimiter=separator))

    header = [h.strip() for h in split(first)]
    if names is not None:
        header = list(names)
        body = numbered
    else:
        if all(_is_number(h) for h in header if h):
            raise DatasetError("the first record has no column names; add a header row (ID,TIME,DV,AMT,...) "
                               "or pass names=[...]", source)
        body = numbered[1:]
    if len(header) < 2:
        raise DatasetError(f"this does not look like a CSV file: the header {first[:60]!r} has a single field; "
                           "expected comma-separated columns such as ID,TIME,DV,AMT", source)
    if any(not h for h in header):
        raise DatasetError(Violation((), "", "the header has an empty column name; name every column"), source)
    if not body:
        raise DatasetError("the file has a header but no records", source)
    if not any(_is_number(tok) for ln in body[:50] for tok in split(ln[1])):
        raise DatasetError("this does not look like a CSV data file: no record holds a number; expected "
                           "comma-separated columns such as ID,TIME,DV,AMT with numeric values", source)
    rows, linenos, bad = [], [], []
    for lineno, line in body:
        fields = [f.strip() for f in split(line)]
        if len(fields) != len(header):
            # tolerate a trailing separator
            if len(fields) == len(header) + 1 and fields[-1] == "":
                fields = fields[:-1]
            else:
                bad.append((lineno, len(fields)))
                continue
        rows.append(fields)
        linenos.append(lineno)
    decimal_comma = separator != "," and _decimal_commas(rows)
    if decimal_comma:
        rows = [[_DECIMAL_COMMA.sub(r"\1.\2", f) for f in r] for r in rows]
    if bad:
        viol = [Violation((), "", f"line {ln} has {n} fields but the header has {len(header)}; "
                          "check the separator and quoting") for ln, n in bad[:20]]
        if len(bad) > 20:
            viol.append(Violation((), "", f"... and {len(bad) - 20} more lines with the wrong number of fields"))
        raise DatasetError(viol, source)
    return header, rows, linenos, decimal_comma


#: a number written with a decimal comma ("0,5", "-12,25", ",5"), as spreadsheets in most of Europe export them
_DECIMAL_COMMA = re.compile(r"^([+-]?\d*),(\d+(?:[eE][+-]?\d+)?)$")
_DECIMAL_POINT = re.compile(r"^[+-]?\d*\.\d+(?:[eE][+-]?\d+)?$")      # a whole field: not a date 01.12.2026


def _decimal_commas(rows) -> bool:
    """True when the records write their decimals with commas: some field is a number with a decimal comma and
    none is a number with a decimal point (a file that mixes them is left as it is; its commas are then refused
    as non-numeric values). Only asked for a file whose separator is not the comma."""
    fields = [f for r in rows for f in r]
    return any(_DECIMAL_COMMA.match(f) for f in fields) and not any(_DECIMAL_POINT.match(f) for f in fields)
