"""A published spec's [dosing] conventions (its drug's target, interval, infusion duration, dose step) are what
'hybridpk dose' takes when the flags are not given, and it says so; a model that states no target gets the
documented vancomycin window with a note, never silently; a bad [dosing] table is refused by name."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from hybridpk.cli import main
from hybridpk.errors import ModelError
from hybridpk.population import load_model


def _busulfan_child(path):
    """A 20 kg, 6-year-old child after two 22 mg doses over 2 h, levels at 2, 4 and 6 h (mg/L)."""
    rows = [dict(ID=1, TIME=0.0, AMT=22.0, RATE=11.0, DV=0.0, EVID=1, MDV=1),
            dict(ID=1, TIME=2.0, AMT=0.0, RATE=0.0, DV=1.1, EVID=0, MDV=0),
            dict(ID=1, TIME=4.0, AMT=0.0, RATE=0.0, DV=0.95, EVID=0, MDV=0),
            dict(ID=1, TIME=6.0, AMT=22.0, RATE=11.0, DV=0.0, EVID=1, MDV=1),
            dict(ID=1, TIME=6.0, AMT=0.0, RATE=0.0, DV=0.55, EVID=0, MDV=0)]
    pd.DataFrame(rows).assign(WT=20.0, AGE=6.0).to_csv(path, index=False)
    return str(path)


def test_busulfan_is_dosed_on_its_papers_regimen_by_default(tmp_path, capsys):
    assert load_model("busulfan_longboyle2015").dosing == {"target": "auc24=14.4:21.6", "interval": 6.0,
                                                          "duration": 2.0, "dose_step": 0.1}
    patient = _busulfan_child(tmp_path / "child.csv")
    assert main(["dose", "busulfan_longboyle2015", patient, "--out", str(tmp_path / "rec.json")]) == 0
    out = capsys.readouterr().out
    assert "busulfan_longboyle2015 states its regimen: target auc24=14.4:21.6" in out and "note:" not in out
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["interval_h"] == 6.0 and rec["infusion_duration_h"] == 2.0
    assert rec["dose_mg"] == pytest.approx(round(rec["dose_mg"] / 0.1) * 0.1, abs=1e-9)
    auc24 = rec["predicted_exposure"]["auc24"]
    assert rec["target"] == "auc24=14.4:21.6" and auc24["target"] == [14.4, 21.6] and 14.4 <= auc24["map"] <= 21.6
    # a flag overrides the stated convention
    assert main(["dose", "busulfan_longboyle2015", patient, "--interval", "8", "--out",
                 str(tmp_path / "rec8.json")]) == 0
    assert json.loads((tmp_path / "rec8.json").read_text())["interval_h"] == 8.0
    assert "interval" not in capsys.readouterr().out.split("states its regimen:")[1].split("\n")[0]


def test_a_model_without_a_target_gets_the_default_with_a_note(tmp_path, capsys):
    rows = [dict(ID=1, TIME=0.0, AMT=1000.0, RATE=2000.0, DV=0.0, EVID=1, MDV=1, ADDL=5, II=8.0),
            dict(ID=1, TIME=40.5, AMT=0.0, RATE=0.0, DV=45.0, EVID=0, MDV=0, ADDL=0, II=0.0),
            dict(ID=1, TIME=47.9, AMT=0.0, RATE=0.0, DV=1.2, EVID=0, MDV=0, ADDL=0, II=0.0)]
    pd.DataFrame(rows).assign(WT=60.0, CRCL=90.0).to_csv(tmp_path / "p.csv", index=False)
    assert main(["dose", "meropenem_abulfathi2021", str(tmp_path / "p.csv")]) == 0
    assert "note: target auc24=400:600 is hybridpk's default" in capsys.readouterr().out
    assert main(["dose", "meropenem_abulfathi2021", str(tmp_path / "p.csv"), "--target", "trough=1:4", "--out",
                 str(tmp_path / "rec.json")]) == 0
    out = capsys.readouterr().out
    assert "note: target" not in out and "the dose step is 250 mg (doses are multiples of it), taken from the " \
        "patient's record: a round quarter of the median dose 1000 mg" in out
    # a trough at 24 h for a drug with a half-life of an hour is reached only by an absurd dose (1.1e7 mg every
    # 24 h was recommended): the regimen needing the least drug per day is taken instead
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["interval_h"] == 8.0 and rec["dose_mg"] <= 5000.0
    assert "times the largest dose" not in out
    # with the 24-h interval asked for, the absurd dose is the answer, and it is named
    assert main(["dose", "meropenem_abulfathi2021", str(tmp_path / "p.csv"), "--target", "trough=1:4",
                 "--interval", "24"]) == 0
    assert "times the largest dose in the patient's record (1000 mg)" in capsys.readouterr().out


def test_a_model_without_a_dose_step_takes_it_from_the_patients_record(tmp_path, capsys, pharmpy_examples):
    """pharmpy's pheno.mod (no [dosing]) and its first neonate (25 mg, then 3.5 mg every 12 h): the 250-mg step of
    a vancomycin regimen left no dose in the window ("widen the limits"); the record's doses give 0.5 mg steps."""
    data = pd.read_csv(pharmpy_examples / "pheno.dta", sep=r"\s+")
    data[(data.ID == 1) & (data.TIME <= 120.5)].to_csv(tmp_path / "p.csv", index=False)
    assert main(["dose", str(pharmpy_examples / "pheno.mod"), str(tmp_path / "p.csv"), "--target", "trough=15:25",
                 "--out", str(tmp_path / "rec.json")]) == 0
    out = capsys.readouterr().out
    assert "pheno states no dose step, so the dose step is 0.5 mg" in out and "median dose 3.5 mg" in out
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["dose_step_mg"] == 0.5 and rec["dose_mg"] % 0.5 == 0 and 0 < rec["dose_mg"] <= 17.5
    assert 15 <= rec["predicted_exposure"]["trough"]["map"] <= 25
    # a stated step is kept, and the answer then is a multiple of it
    assert main(["dose", str(pharmpy_examples / "pheno.mod"), str(tmp_path / "p.csv"), "--target", "trough=15:25",
                 "--dose-step", "0.1", "--out", str(tmp_path / "rec1.json")]) == 0
    assert "no dose step" not in capsys.readouterr().out
    assert json.loads((tmp_path / "rec1.json").read_text())["dose_step_mg"] == 0.1


@pytest.mark.parametrize("table, message", [
    ('target = 12', "target must be text"),
    ('interval = -6', "interval = -6 must be positive"),
    ('dose_step = "a lot"', "is not a number"),
    ('regimen = "q6h"', "has regimen; it takes target, interval"),
])
def test_a_bad_dosing_table_is_refused_by_name(tmp_path, table, message):
    path = tmp_path / "drug.toml"
    path.write_text('name = "drug"\nstructure = "1cmt_iv"\ncitation = "test"\n\n[typical]\nCL = 4.0\nV = 30.0\n\n'
                    '[iiv]\nCL = 0.1\n\n[error]\nkind = "proportional"\nprop = 0.2\n\n[dosing]\n' + table + "\n")
    with pytest.raises(ModelError, match=message):
        load_model(path)


def test_an_unreadable_stated_target_is_refused_naming_the_model(tmp_path, capsys):
    path = tmp_path / "drug.toml"
    path.write_text('name = "drug"\nstructure = "1cmt_iv"\ncitation = "test"\n\n[typical]\nCL = 4.0\nV = 30.0\n\n'
                    '[iiv]\nCL = 0.1\n\n[error]\nkind = "proportional"\nprop = 0.2\n\n[dosing]\ntarget = "auc=10"\n')
    rows = [dict(ID=1, TIME=0.0, AMT=100.0, RATE=100.0, DV=0.0, EVID=1, MDV=1),
            dict(ID=1, TIME=4.0, AMT=0.0, RATE=0.0, DV=2.0, EVID=0, MDV=0)]
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    assert main(["dose", str(path), str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert "drug: the target its [dosing] states is not usable" in err and "give --target" in err
    assert main(["dose", str(path), str(tmp_path / "p.csv"), "--target", "auc24=20:30", "--dose-step", "10"]) == 0


def test_the_model_listing_shows_the_stated_regimen(capsys):
    assert main(["models", "busulfan_longboyle2015", "meropenem_abulfathi2021"]) == 0
    out = capsys.readouterr().out
    assert "dose: target auc24=14.4:21.6, every 6 h, infusions of 2 h, steps of 0.1 mg" in out
    assert "meropenem_abulfathi2021: 2cmt_iv, covariates CRCL, WT, combined error\n" in out


def test_a_patients_estimate_reports_the_specs_own_parameters(tmp_path):
    """busulfan_longboyle2015 computes the structure's VMAX from its own CLIN (VMAX = CLIN KM): the MAP reports
    CLIN too, the parameter its IIV and covariates act on, and CLIN KM = VMAX in every summary of the draws."""
    from hybridpk.data.dataset import read_nonmem
    from hybridpk.dosing import estimate_patient

    post = estimate_patient("busulfan_longboyle2015", read_nonmem(_busulfan_child(tmp_path / "child.csv")),
                            n_samples=200)
    p = post.parameters()
    assert {"CLIN", "VMAX", "KM", "V"} <= set(p)
    for key in ("map", "median", "p05", "p95"):
        assert p["CLIN"][key] * 6.704 == pytest.approx(p["VMAX"][key], rel=1e-12)
    assert 2.0 < p["CLIN"]["map"] < 6.0      # the typical 20-kg 6-year-old: 4.32 (20/22)^0.75 1.192 = 4.79 L/h
