"""Malformed inputs: each must raise DatasetError naming the right rows and column, never a traceback."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import hybridpk as hp
from hybridpk.cli import main
from hybridpk.errors import DatasetError

H = "ID,TIME,DV,AMT,EVID,MDV\n"
# two subjects named by text, with equal levels at one time
TEXT_IDS = H + "PT-1,0,0,100,1,1\nPT-1,1,5,0,0,0\nPT-2,0,0,100,1,1\nPT-2,1,5,0,0,0\n"

# (case id, file content, expected column, expected 1-based data rows, text the message must contain)
CASES = [
    ("missing_required_column", "ID,TIME,AMT\n1,0,100\n1,1,0\n", "DV", (), "required column DV is missing"),
    ("non_numeric_value", H + "1,0,0,100,1,1\n1,1h,5,0,0,0\n", "TIME", (2,), "non-numeric value"),
    ("time_decreasing", H + "1,0,0,100,1,1\n1,2,5,0,0,0\n1,1,4,0,0,0\n", "TIME", (3,), "TIME decreases"),
    ("id_reappears", H + "1,0,0,100,1,1\n2,0,0,100,1,1\n1,4,4,0,0,0\n", "ID", (3,), "reappears"),
    ("negative_amt", H + "1,0,0,-100,1,1\n1,1,5,0,0,0\n", "AMT", (1,), "negative dose"),
    ("negative_rate", "ID,TIME,DV,AMT,RATE\n1,0,0,100,-3\n1,1,5,0,0\n", "RATE", (1,), "negative RATE"),
    ("dose_row_with_observation_mdv", H + "1,0,3,100,1,0\n1,1,5,0,0,0\n", "MDV", (1,), "dose row with an obs"),
    ("dose_row_with_observation_no_evid", "ID,TIME,DV,AMT\n1,0,3,100\n1,1,5,0\n", "DV", (1,), "also carries"),
    ("evid_out_of_range", H + "1,0,0,100,1,1\n1,1,5,0,5,0\n", "EVID", (2,), "EVID must be"),
    ("ss_without_ii", "ID,TIME,DV,AMT,SS,II\n1,0,0,100,1,0\n1,1,5,0,0,0\n", "II", (1,), "SS without II"),
    ("addl_without_ii", "ID,TIME,DV,AMT,ADDL,II\n1,0,0,100,3,0\n1,1,5,0,0,0\n", "II", (1,), "ADDL without II"),
    ("duplicate_observation", H + "1,0,0,100,1,1\n1,1,5,0,0,0\n1,1,5,0,0,0\n", "DV", (2, 3), "duplicated obs"),
    ("nan_in_covariate", "ID,TIME,DV,AMT,WT\n1,0,0,100,70\n1,1,5,0,.\n", "WT", (2,), "missing value (NaN)"),
    ("mdv_out_of_range", H + "1,0,0,100,1,1\n1,1,5,0,0,3\n", "MDV", (2,), "MDV must be"),
    ("observation_without_dv", H + "1,0,0,100,1,1\n1,1,,0,0,0\n", "DV", (2,), "without a DV"),
    ("cmt_not_integer", "ID,TIME,DV,AMT,CMT\n1,0,0,100,1.5\n1,1,5,0,2\n", "CMT", (1,), "whole number"),
    ("addl_negative", "ID,TIME,DV,AMT,ADDL,II\n1,0,0,100,-1,12\n1,1,5,0,0,0\n", "ADDL", (1,), "whole number"),
    ("negative_ii", "ID,TIME,DV,AMT,II\n1,0,0,100,-12\n1,1,5,0,0\n", "II", (1,), "negative dosing interval"),
    ("obs_row_with_amt", H + "1,0,0,100,0,0\n", "AMT", (1,), "observation row (EVID=0) with AMT"),
    ("missing_id", H + "1,0,0,100,1,1\n,1,5,0,0,0\n", "ID", (2,), "missing subject ID"),
    ("ss_out_of_range", "ID,TIME,DV,AMT,SS,II\n1,0,0,100,4,12\n1,1,5,0,0,0\n", "SS", (1,), "SS must be"),
    ("text_ids", TEXT_IDS, "ID", (1, 2, 3, 4), "number the subjects (1, 2, ...)"),
    ("non_numeric_covariate_declared", "ID,TIME,DV,AMT,WT\n1,0,0,100,70\n1,1,5,0,heavy\n", "WT", (2,),
     "non-numeric value"),
]

FILE_CASES = [
    ("empty_file", b"", "the file is empty"),
    ("blank_lines_only", b"\n\n  \n", "the file is empty"),
    ("not_csv_binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "not a CSV file"),
    ("header_only", b"ID,TIME,DV,AMT\n", "no records"),
    ("single_field", b"hello world this is prose\nmore prose here\n", "does not look like a CSV"),
    ("ragged_rows", b"ID,TIME,DV,AMT\n1,0,0,100\n1,1,5\n", "line 3 has 3 fields"),
    ("no_header", b"1,0,0,100\n1,1,5,0\n", "no column names"),
]


def _write(tmp_path, name, content):
    p = tmp_path / f"{name}.csv"
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


@pytest.mark.parametrize("name,content,column,rows,text", CASES, ids=[c[0] for c in CASES])
def test_malformed_record(tmp_path, capsys, name, content, column, rows, text):
    path = _write(tmp_path, name, content)
    cov = ["WT"] if "covariate" in name else None
    with pytest.raises(DatasetError) as exc:
        hp.read_nonmem(path, covariates=cov)
    hits = [v for v in exc.value.violations if v.column == column and v.rows == rows]
    assert hits, f"expected a violation on column {column} rows {rows}, got {exc.value.violations}"
    assert any(text in v.message or text in str(v) for v in hits), str(exc.value)
    if rows:  # file line = data row + 1 (header)
        assert hits[0].lines == tuple(r + 1 for r in rows)
        assert re.search(rf"rows? {rows[0]}\b", str(exc.value)) and f"column {column}" in str(exc.value)
    # the CLI prints the problem and exits 2, without a traceback
    argv = ["check", str(path)] + (["--covariates", "WT"] if cov else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert column in err and "Traceback" not in err


def test_text_ids_are_the_one_problem_reported(tmp_path):
    """Subjects named by text: the ID column is the problem, not the levels of two subjects at one time with one
    value, which read as one subject's record entered twice while the IDs were not numbers."""
    path = _write(tmp_path, "text_ids", TEXT_IDS)
    with pytest.raises(DatasetError) as exc:
        hp.read_nonmem(path)
    assert [v.column for v in exc.value.violations] == ["ID"], str(exc.value)


@pytest.mark.parametrize("name,content,text", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_malformed_file(tmp_path, capsys, name, content, text):
    path = _write(tmp_path, name, content)
    with pytest.raises(DatasetError, match=text):
        hp.read_nonmem(path)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err


def test_missing_file_and_bad_sidecar(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    p = _write(tmp_path, "ok", "ID,TIME,DV,AMT\n1,0,0,100\n1,1,5,0\n")
    side = tmp_path / "side.json"
    side.write_text("{not json")
    assert main(["check", str(p), "--columns", str(side)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    side.write_text('{"columns": {"ID": "patient"}}')
    assert main(["check", str(p), "--columns", str(side)]) == 2
    assert "unknown role 'patient'" in capsys.readouterr().err


def test_installed_script_never_shows_traceback(tmp_path):
    # (a text column that is not declared a covariate is only a warning, so that case is left out here)
    cases = [c for c in CASES if c[0] != "non_numeric_covariate_declared"] + [(f[0], f[1]) for f in FILE_CASES]
    paths = [str(_write(tmp_path, c[0], c[1])) for c in cases]
    proc = subprocess.run([sys.executable, "-m", "hybridpk", "check", *paths], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    for p in paths:  # every file is reported, with at least one problem
        assert f"{p}: " in proc.stderr
