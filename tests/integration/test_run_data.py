"""A run remembers its dataset: 'hybridpk fit' records where it read the data (RUN/data.json, with the records'
fingerprint), so that report, vpc, covariates and compare need no --data; a dataset that changed or went away
since the fit is refused by name, never silently replaced."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

import hybridpk as hp
from hybridpk.cli import main


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """A fit of theophylline from a CSV file of the user's (copied from the bundled one)."""
    d = tmp_path_factory.mktemp("rundata")
    shutil.copy(hp.bundled_dataset("theoph"), d / "theo.csv")
    assert main(["fit", str(d / "theo.csv"), "--model", "1cmt_oral", "--out", str(d / "run"), "--quiet",
                 "--no-covariance"]) == 0
    assert main(["fit", str(d / "theo.csv"), "--model", "1cmt_oral", "--error", "combined", "--out",
                 str(d / "prop"), "--quiet", "--no-covariance"]) == 0
    return d


def test_fit_records_its_dataset_and_the_commands_take_it(csv_run, capsys):
    d = csv_run
    entry = json.loads((d / "run" / "data.json").read_text())
    assert entry["source"] == str((d / "theo.csv").resolve())
    assert entry["data_sha256"] == hp.read_nonmem(d / "theo.csv").fingerprint()
    capsys.readouterr()
    assert main(["vpc", str(d / "run"), "--n", "20", "--out", str(d / "vpc.png")]) == 0
    out = capsys.readouterr().out
    assert f"data: {d / 'theo.csv'} (the dataset {d / 'run'} was fitted to)" in out and (d / "vpc.png").is_file()
    assert main(["report", str(d / "run"), "--vpc", "0", "--out", str(d / "rep")]) == 0
    assert (d / "rep" / "report.html").is_file()
    capsys.readouterr()
    assert main(["compare", str(d / "run"), str(d / "prop"), "--folds", "0"]) == 0
    out = capsys.readouterr().out
    assert f"data: {d / 'theo.csv'}" in out and "recommended" in out


def test_a_dataset_changed_or_gone_since_the_fit_is_refused(csv_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(csv_run / "run", run)
    data = pd.read_csv(csv_run / "theo.csv")
    moved = tmp_path / "theo.csv"
    data.to_csv(moved, index=False)
    entry = json.loads((run / "data.json").read_text())
    (run / "data.json").write_text(json.dumps({**entry, "source": str(moved)}))
    assert main(["vpc", str(run), "--n", "20", "--out", str(tmp_path / "v.png")]) == 0   # same records, new place
    data.loc[data.DV > 0, "DV"] *= 1.01
    data.to_csv(moved, index=False)
    capsys.readouterr()
    assert main(["vpc", str(run), "--n", "20", "--out", str(tmp_path / "v2.png")]) == 2
    assert f"{moved} has changed since {run} was fitted to it" in capsys.readouterr().err
    moved.unlink()
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2
    assert "which is no longer there; give --data" in capsys.readouterr().err
    (run / "data.json").unlink()
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2
    assert "does not record the dataset it was fitted to" in capsys.readouterr().err


def test_a_control_stream_run_reads_its_data_as_the_stream_does(tmp_path, pharmpy_examples, capsys):
    """pheno.mod: the recorded source is the control stream, so its $DATA is read again through it."""
    for f in ("pheno.mod", "pheno.dta"):
        shutil.copy(pharmpy_examples / f, tmp_path / f)
    assert main(["fit", str(tmp_path / "pheno.mod"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "data.json").read_text())["source"] == str(tmp_path / "pheno.mod")
    capsys.readouterr()
    assert main(["vpc", str(tmp_path / "run"), "--n", "20", "--out", str(tmp_path / "v.png")]) == 0
    assert f"data: {tmp_path / 'pheno.mod'}" in capsys.readouterr().out
    # --data may name the control stream too
    assert main(["report", str(tmp_path / "run"), "--data", str(tmp_path / "pheno.mod"), "--vpc", "0", "--out",
                 str(tmp_path / "rep")]) == 0
