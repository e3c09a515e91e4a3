"""Every command with default options on every bundled dataset (issue 20, point 6): only the required
arguments, as a new user types them. A fit the model cannot do on a dataset (e.g. pre-dose samples under a
proportional error) is refused naming the records and the fix, and the fix named then works; every other
command succeeds with finite outputs.

The bundled datasets are oral (doses into CMT 1, a depot): the applicable library models are those that dose
into a depot. The default suite runs the whole chain on theophylline and the cheap commands on every
dataset; ``-m slow`` fits every applicable model to every dataset (a few minutes per EHC fit on 2 cores).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from hybridpk.cli import main
from hybridpk.data.bundled import bundled_dataset, bundled_datasets
from hybridpk.models import get_model, list_models

DATASETS = bundled_datasets()
ORAL_MODELS = [m for m in list_models() if get_model(m).dose_cmt != get_model(m).obs_cmt]


def _typical(model: str) -> str:
    return ",".join(f"{p.name}={p.typical:g}" for p in get_model(model).parameters if p.name not in ("F", "ALAG"))


def _first_patient(dataset: str, path) -> str:
    df = pd.read_csv(bundled_dataset(dataset))
    df[df.ID == df.ID.iloc[0]].to_csv(path, index=False)
    return str(path)


def _fit_with_defaults(dataset: str, model: str, run, capsys) -> str:
    """``hybridpk fit DATASET --model MODEL --out RUN``; when refused, the refusal names the records and the
    fix, and the fix it names is applied. Returns what the fit printed."""
    code = main(["fit", dataset, "--model", model, "--out", str(run), "--quiet"])
    out = capsys.readouterr()
    if code == 2:
        assert "internal error" not in out.err and "row" in out.err, out.err
        fixes = re.findall(r"--error \w+", out.err)
        assert fixes, f"the refusal names no fix:\n{out.err}"
        code = main(["fit", dataset, "--model", model, "--out", str(run), "--quiet", *fixes[0].split()])
        out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads((run / "summary.json").read_text())
    assert np.isfinite(summary["ofv"])
    return out.out


def _commands_on_a_run(dataset: str, run, tmp_path, capsys) -> None:
    """predict, map and dose with a fitted run, default options. A fit the run itself reports as degenerate (a
    THETA outside the library's plausible range, an OMEGA beyond any CV: e.g. the 3-compartment model on the EHC
    data, whose clearance runs to 2e-7 L/h) may find no regimen in the default target: ``dose`` then refuses
    with the nearest regimen (exit 2), never with an internal error."""
    assert main(["predict", str(run), dataset, "--out", str(tmp_path / "pred.csv")]) == 0
    pred = pd.read_csv(tmp_path / "pred.csv")
    obs = pred[pred.MDV == 0]
    assert np.isfinite(obs[["PRED", "IPRED"]].to_numpy()).all() and len(obs) > 0
    patient = _first_patient(dataset, tmp_path / "patient.csv")
    assert main(["map", str(run), patient]) == 0
    warned = " ".join(json.loads((run / "summary.json").read_text())["warnings"])
    degenerate = "THETA outside the range" in warned or "implausibly large" in warned
    code = main(["dose", str(run), patient])
    if degenerate and code == 2:
        err = capsys.readouterr().err
        assert "no allowed regimen" in err and "the nearest is" in err and "internal error" not in err, err
        return
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "mg every" in printed and "(bolus or oral doses)" in printed   # an oral model is dosed orally
    assert "MAP" in printed and "posterior median" in printed and "90% interval" in printed


@pytest.mark.parametrize("dataset", DATASETS)
def test_check_and_simulate_with_default_options(dataset, tmp_path, capsys):
    assert main(["check", dataset]) == 0
    assert "subjects" in capsys.readouterr().out
    for model in ORAL_MODELS:
        out = tmp_path / f"{model}.csv"
        assert main(["simulate", dataset, "--model", model, "--typical", _typical(model), "--out", str(out)]) == 0, \
            capsys.readouterr().err
        sim = pd.read_csv(out)
        assert len(sim) == len(pd.read_csv(bundled_dataset(dataset))) and np.isfinite(sim.DV).all()


def test_every_command_with_default_options_on_theophylline(tmp_path, capsys):
    run = tmp_path / "run"
    printed = _fit_with_defaults("theoph", "1cmt_oral", run, capsys)
    assert "FOCE-I fit of 12 subjects" in printed
    _commands_on_a_run("theoph", run, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("model", ORAL_MODELS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_applicable_model_fits_every_bundled_dataset_with_default_options(dataset, model, tmp_path, capsys):
    run = tmp_path / "run"
    _fit_with_defaults(dataset, model, run, capsys)
    _commands_on_a_run(dataset, run, tmp_path, capsys)
