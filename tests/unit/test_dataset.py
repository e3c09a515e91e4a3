"""Dataset layer: reading real datasets, NONMEM conventions, conversions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import hybridpk as hp
from hybridpk.errors import DatasetError, DatasetWarning


def test_theoph_counts(theoph_path):
    ds = hp.read_nonmem(theoph_path)
    assert (ds.n_subjects, ds.n_observations, ds.n_doses) == (12, 132, 12)
    assert ds.covariates == ("WT",)
    assert ds.units["WT"] == "kg" and ds.units["TIME"] == "h"
    s = ds.summary()
    assert s["time_span"] == (0.0, 24.65)


def test_pheno_counts_whitespace_and_no_evid(pharmpy_examples):
    ds = hp.read_nonmem(pharmpy_examples / "pheno.dta")  # pharmpy's .datainfo sidecar is picked up
    assert (ds.n_subjects, ds.n_observations, ds.n_doses) == (59, 155, 589)
    assert ds.covariates == ("WGT", "APGR")               # FA1/FA2 have no role in pheno.datainfo
    assert ds.units["WGT"] == "kg"
    f = ds.to_dataframe()
    assert set(f.loc[f.AMT > 0, "EVID"]) == {1} and set(f.loc[f.AMT > 0, "MDV"]) == {1}
    assert set(f.loc[f.AMT == 0, "EVID"]) == {0}


def test_pheno_without_sidecar_treats_extra_numeric_columns_as_covariates(pharmpy_examples, tmp_path):
    (tmp_path / "pheno.dta").write_text((pharmpy_examples / "pheno.dta").read_text())
    ds = hp.read_nonmem(tmp_path / "pheno.dta")
    assert ds.covariates == ("WGT", "APGR", "FA1", "FA2")
    assert (ds.n_subjects, ds.n_observations, ds.n_doses) == (59, 155, 589)


def test_a_nonmem_table_file_is_read_past_its_title_and_several_tables_are_refused(pharmpy_examples, tmp_path):
    """pheno_linear.dta is NONMEM $TABLE output: a "TABLE NO.  1" title line, then the header. It was refused
    ("line 3 has 17 fields but the header has 3"); the title is not data."""
    ds = hp.read_nonmem(pharmpy_examples / "pheno_linear.dta")
    assert (ds.n_subjects, ds.n_observations, ds.n_doses) == (59, 155, 589)
    assert {"OPRED", "WGT", "APGR"} <= set(ds.covariates)
    text = (pharmpy_examples / "pheno_linear.dta").read_text()
    (tmp_path / "sim.tab").write_text(text + text)         # two subproblems' tables
    with pytest.raises(DatasetError, match=r"NONMEM table file holding 2 tables .*lines 1, 747\)"):
        hp.read_nonmem(tmp_path / "sim.tab")


def test_moxo_steady_state_doses(pharmpy_examples):
    ds = hp.read_nonmem(pharmpy_examples / "moxo.csv")
    s = ds.summary()
    assert (s["subjects"], s["observations"], s["dose_records"]) == (73, 1006, 142)
    assert s["steady_state_doses"] == 69 and s["reset_records"] == 69
    doses = ds.doses()
    ss = doses[doses.SS == 1]
    assert len(ss) == 69 and set(ss.II) == {12.0} and set(ss.EVID) == {4}
    # the DV on moxo's EVID=4 rows is ignored (MDV inferred as 1), as NONMEM does
    assert ds.n_observations == 1006


def test_case_insensitive_names_and_inferred_evid():
    df = pd.DataFrame({"id": [1, 1, 1], "time": [0, 1, 2], "dv": [0, 5.0, 4.0], "amt": [100, 0, 0]})
    ds = hp.read_nonmem(df)
    f = ds.to_dataframe()
    assert list(f.columns[:6]) == ["ID", "TIME", "DV", "AMT", "EVID", "MDV"]
    assert f.EVID.tolist() == [1, 0, 0] and f.MDV.tolist() == [1, 0, 0]


def test_mdv_without_evid_makes_other_records():
    df = pd.DataFrame({"ID": [1, 1, 1], "TIME": [0, 1, 2], "DV": [0, 0, 4.0], "AMT": [100, 0, 0],
                       "MDV": [1, 1, 0]})
    f = hp.read_nonmem(df).to_dataframe()
    assert f.EVID.tolist() == [1, 2, 0]


def test_addl_expansion_and_rate_duration():
    df = pd.DataFrame({"ID": [1, 1, 2, 2], "TIME": [0, 30, 0, 5], "DV": [0, 3.0, 0, 2.0],
                       "AMT": [1000, 0, 500, 0], "RATE": [500, 0, -2, 0], "DUR": [0, 0, 0.5, 0],
                       "ADDL": [2, 0, 0, 0], "II": [12, 0, 0, 0], "EVID": [1, 0, 1, 0], "MDV": [1, 0, 1, 0]})
    ds = hp.read_nonmem(df)
    d = ds.doses()
    assert d.TIME.tolist() == [0, 12, 24, 0] and ds.n_doses == 4
    b = ds.to_batch()
    assert b.dose_time.shape == (2, 3)
    assert b.dose_duration[0, :3].tolist() == [2.0, 2.0, 2.0]
    assert b.dose_rate[1, 0].item() == 1000.0 and b.dose_duration[1, 0].item() == 0.5
    assert b.dose_mask.tolist() == [[True, True, True], [True, False, False]]
    assert b.dose_amt[1, 1:].tolist() == [0.0, 0.0]


def test_batch_padding_and_observations(theoph_path):
    import torch

    ds = hp.read_nonmem(theoph_path)
    b = ds.to_batch()
    assert b.time.shape == (12, 12) and b.time.dtype == torch.float64
    assert int(b.is_obs.sum()) == 132 and int(b.record_mask.sum()) == 144
    assert b.cov.shape == (12, 12, 1)
    assert torch.allclose(b.cov_baseline[:, 0], torch.tensor(ds.to_dataframe().groupby("ID").WT.first().values))
    # records map back to dataset rows
    f = ds.to_dataframe()
    rows = b.row[b.record_mask]
    assert torch.equal(b.time[b.record_mask], torch.tensor(f.TIME.values[rows.numpy()]))
    sub = b.select([2, 0])
    assert sub.ids == (ds.ids[2], ds.ids[0]) and sub.time.shape == (2, 12)


def test_censoring_roles():
    df = pd.DataFrame({"ID": [1, 1, 1], "TIME": [0, 1, 2], "DV": [0, 5.0, 0.1], "AMT": [100, 0, 0],
                       "LLOQ": [0.2, 0.2, 0.2]})
    ds = hp.read_nonmem(df)
    b = ds.to_batch()
    assert b.cens[0].tolist() == [0, 0, 1]
    assert ds.summary()["censored_observations"] == 1
    df2 = df.drop(columns="LLOQ").assign(CENS=[0, 0, 1], DV=[0, 5.0, 0.2])
    b2 = hp.read_nonmem(df2).to_batch()
    assert b2.cens[0].tolist() == [0, 0, 1] and b2.lloq[0, 2].item() == 0.2
    # BLQ=1 with the limit in DV and no LLOQ column: the limit is DV, as with CENS (was NaN: the M3 term and the
    # fit's OFV were NaN)
    b3 = hp.read_nonmem(df.drop(columns="LLOQ").assign(BLQ=[0, 0, 1], DV=[0, 5.0, 0.2])).to_batch()
    assert b3.cens[0].tolist() == [0, 0, 1] and b3.lloq[0, 2].item() == 0.2


def test_sidecar_json_and_toml(tmp_path):
    csv = tmp_path / "study.csv"
    csv.write_text("SUBJ,T,CONC,DOSE,BW,SITE\n1,0,.,100,70,A\n1,1,5,0,70,A\n")
    side = {"columns": {"SUBJ": {"role": "id"}, "T": {"role": "idv", "unit": "h"},
                        "CONC": {"role": "DV", "unit": "ug/L"}, "DOSE": {"role": "dose", "unit": "ug"},
                        "BW": {"role": "covariate", "unit": "kg"}, "SITE": "ignore"}}
    (tmp_path / "study.columns.json").write_text(json.dumps(side))
    ds = hp.read_nonmem(csv)
    assert ds.covariates == ("BW",) and ds.units["DV"] == "ug/L" and ds.units["BW"] == "kg"
    assert ds.n_doses == 1 and ds.n_observations == 1
    toml = tmp_path / "other.toml"
    toml.write_text('[columns]\nSUBJ = "ID"\nT = "TIME"\nCONC = "DV"\nDOSE = "AMT"\nSITE = "ignore"\n'
                    '[columns.BW]\nrole = "covariate"\nunit = "kg"\n')
    ds2 = hp.read_nonmem(csv, columns=toml)
    assert ds2 == ds


def test_text_column_without_role_warns_and_is_kept():
    df = pd.DataFrame({"ID": [1, 1], "TIME": [0, 1], "DV": [0, 5.0], "AMT": [100, 0], "SITE": ["A", "B"]})
    with pytest.warns(DatasetWarning, match="SITE"):
        ds = hp.read_nonmem(df)
    assert ds.covariates == () and ds.to_dataframe().SITE.tolist() == ["A", "B"]


def test_dataset_is_immutable(theoph_path):
    ds = hp.read_nonmem(theoph_path)
    f = ds.to_dataframe()
    f.loc[0, "AMT"] = -1
    assert ds.to_dataframe().loc[0, "AMT"] > 0
    with pytest.raises(AttributeError):
        ds.covariates = ()


def test_round_trip_theoph(theoph_path):
    ds = hp.read_nonmem(theoph_path)
    assert hp.read_nonmem(ds.to_dataframe()) == ds


def test_reset_allows_time_to_restart():
    df = pd.DataFrame({"ID": [1, 1, 1, 1], "TIME": [0, 5, 0, 3], "DV": [0, 2.0, 0, 3.0],
                       "AMT": [100, 0, 100, 0], "EVID": [1, 0, 4, 0], "MDV": [1, 0, 1, 0]})
    ds = hp.read_nonmem(df)
    assert ds.summary()["reset_records"] == 1


def test_error_collects_all_violations():
    df = pd.DataFrame({"ID": [1, 1, 1], "TIME": [0, 2, 1], "DV": [0, 1.0, 1.0], "AMT": [-5, 0, 0],
                       "EVID": [1, 0, 7]})
    with pytest.raises(DatasetError) as exc:
        hp.read_nonmem(df)
    cols = {v.column for v in exc.value.violations}
    assert {"AMT", "EVID", "TIME"} <= cols
    assert isinstance(exc.value, ValueError)


def test_prediction_design_keeps_doses_and_covariates(theoph_path):
    ds = hp.read_nonmem(theoph_path)
    grid = [0.5, 1.0, 30.0]
    pd_ = ds.prediction_design(grid, cmt=2)
    f = pd_.to_dataframe()
    assert pd_.n_subjects == 12 and pd_.n_observations == 0 and pd_.n_doses == ds.n_doses
    assert (f[f.EVID == 2].groupby("ID").TIME.apply(list) == [grid] * 12).all()
    first = ds.to_dataframe().groupby("ID").WT.first()
    assert (f.groupby("ID").WT.nunique() == 1).all() and (f.groupby("ID").WT.first() == first).all()
    assert (f[f.EVID == 2].CMT == 2).all()


@pytest.mark.parametrize("model", ["1cmt_iv", "1cmt_oral", "2cmt_iv", "1cmt_oral_mm"])
@pytest.mark.parametrize("rate", [0.0, 100.0])
def test_a_zero_amount_dose_record_is_accepted_and_changes_nothing(model, rate):
    """NONMEM accepts a dose record with AMT=0 (a bolus or an infusion of nothing): it is read, and the predictions
    equal those without it (closed form and ODE path)."""
    import torch

    from hybridpk.models import get_model
    from hybridpk.solve import simulate

    rows = [dict(ID=1, TIME=0.0, AMT=500.0, DV=0.0, EVID=1, MDV=1, RATE=0.0),
            dict(ID=1, TIME=1.0, AMT=0.0, DV=0.0, EVID=1, MDV=1, RATE=rate),
            dict(ID=1, TIME=2.0, AMT=0.0, DV=14.0, EVID=0, MDV=0, RATE=0.0),
            dict(ID=1, TIME=10.0, AMT=0.0, DV=6.0, EVID=0, MDV=0, RATE=0.0)]
    df = pd.DataFrame(rows)
    sm = get_model(model)
    p = {q.name: torch.tensor([q.typical], dtype=torch.float64) for q in sm.parameters}
    with_zero = simulate(sm, p, hp.read_nonmem(df).to_batch()).ipred[0, 2:]
    without = simulate(sm, p, hp.read_nonmem(df.drop(index=1)).to_batch()).ipred[0, 1:]
    torch.testing.assert_close(with_zero, without, rtol=1e-10, atol=1e-12)


def test_levels_below_a_limit_get_the_fix_users_apply(tmp_path):
    """Data as clinics export them: '<0.5' in DV is named with its fix, not as a bare "non-numeric value"; any
    other text keeps the general message. (Dates and clock times: tests/unit/test_clock_times.py.)"""
    (tmp_path / "blq.csv").write_text("id,time,amt,dv\n1,0,100,.\n1,1,.,2.1\n1,4,.,<0.5\n1,6,.,abc\n")
    with pytest.raises(DatasetError) as exc:
        hp.read_nonmem(tmp_path / "blq.csv")
    text = str(exc.value)
    assert "row 3 (file line 4), column dv: '<0.5' in DV is a level below the limit of quantification" in text
    assert "CENS=1" in text and "MDV=1" in text
    assert "row 4 (file line 5), column dv: non-numeric value ('abc') in DV column" in text


def test_a_header_written_after_hash_is_the_header(tmp_path):
    """Files written for NONMEM's default IGNORE=# put '#' before the header ("#ID,TIME,..."): it is the header,
    not a comment (the first record was read as the header). A comment line of words before a real header stays a
    comment; a record after '#' stays out."""
    plain = "ID,TIME,AMT,DV\n1,0,100,.\n1,1,.,2.0\n1,4,.,1.0\n"
    (tmp_path / "plain.csv").write_text(plain)
    (tmp_path / "hash.csv").write_text("#" + plain.replace("1,1,.,2.0\n", "1,1,.,2.0\n#1,2,.,99\n"))
    (tmp_path / "note.csv").write_text("# study ABC export\n" + plain)
    (tmp_path / "spaced.csv").write_text("# ID TIME AMT DV\n1 0 100 .\n1 1 . 2.0\n1 4 . 1.0\n")
    ref = hp.read_nonmem(tmp_path / "plain.csv").to_dataframe()
    for name in ("hash.csv", "note.csv", "spaced.csv"):
        pd.testing.assert_frame_equal(hp.read_nonmem(tmp_path / name).to_dataframe(), ref)


def test_records_marked_in_the_comment_column_c_are_left_out(tmp_path, capsys):
    """NONMEM datasets' comment column C: records marked "C" are left out (NM-TRAN's IGNORE=C), the column with
    them, and `check` says which lines; a first column C with other values is an ordinary column."""
    from hybridpk.cli import main

    (tmp_path / "c.csv").write_text("C,ID,TIME,AMT,DV,WT\n.,1,0,100,.,70\nC,1,0.5,.,99,70\n,1,1,.,2.0,70\n"
                                    ".,1,4,.,1.0,70\nC,2,0,100,.,80\n")
    ds = hp.read_nonmem(tmp_path / "c.csv")
    f = ds.to_dataframe()
    assert "C" not in f.columns and f.DV.tolist()[1:] == [2.0, 1.0] and ds.ids == (1,)
    assert ds.commented_lines == (3, 6) and ds.covariates == ("WT",)
    assert main(["check", str(tmp_path / "c.csv")]) == 0
    assert ("commented out  2 records marked C in the comment column C, left out as NM-TRAN's IGNORE=C does "
            "(lines 3, 6)") in capsys.readouterr().out
    frame = pd.DataFrame({"C": [".", "C", "."], "ID": [1, 1, 1], "TIME": [0, 1, 2], "AMT": [100, 0, 0],
                          "DV": [np.nan, 99, 2.0]})
    assert hp.read_nonmem(frame).commented_lines == (2,)
    (tmp_path / "code.csv").write_text("C,ID,TIME,AMT,DV\nA,1,0,100,.\nB,1,1,.,2.0\n")
    with pytest.warns(DatasetWarning, match="column\\(s\\) C hold text"):
        assert len(hp.read_nonmem(tmp_path / "code.csv")) == 2
    (tmp_path / "all.csv").write_text("C,ID,TIME,AMT,DV\nC,1,0,100,.\nC,1,1,.,2.0\n")
    with pytest.raises(DatasetError, match="every record is marked C"):
        hp.read_nonmem(tmp_path / "all.csv")


def test_decimal_commas_of_european_spreadsheets(tmp_path, capsys):
    """A ';'-separated export whose numbers have decimal commas (0,5) reads them as decimal points, dotted dates
    beside them included, and `check` says so; a file that mixes commas and points names the comma with its fix,
    once (not again as a missing value)."""
    from hybridpk.cli import main

    (tmp_path / "eu.csv").write_text("ID;DAT1;TIME;AMT;DV;WT\n1;01.12.2026;08:00;100;.;70,5\n"
                                     "1;01.12.2026;09:30;.;2,5;70,5\n1;02.12.2026;08:00;.;1,25;70,5\n")
    ds = hp.read_nonmem(tmp_path / "eu.csv")
    f = ds.to_dataframe()
    assert ds.decimal_comma and f.TIME.tolist() == [0.0, 1.5, 24.0] and f.DV.tolist()[1:] == [2.5, 1.25]
    assert f.WT.tolist() == [70.5] * 3 and ds.covariates == ("WT",)
    assert main(["check", str(tmp_path / "eu.csv")]) == 0
    assert "numbers        written with decimal commas (0,5), read as 0.5" in capsys.readouterr().out
    (tmp_path / "mix.csv").write_text("ID;TIME;AMT;DV\n1;0;100;.\n1;0.5;.;2,1\n1;1,5;.;1.0\n")
    with pytest.raises(DatasetError) as exc:
        hp.read_nonmem(tmp_path / "mix.csv")
    text = str(exc.value)
    assert "2 problems" in text and "missing TIME" not in text and "without a DV value" not in text
    assert "row 2 (file line 3), column DV: '2,1' in DV is written with a decimal comma" in text
    assert "row 3 (file line 4), column TIME: '1,5' in TIME is written with a decimal comma" in text
    (tmp_path / "comma.csv").write_text('ID,TIME,AMT,DV\n1,0,100,.\n1,1,.,"2,1"\n')
    with pytest.raises(DatasetError, match="'2,1' in DV is written with a decimal comma"):
        hp.read_nonmem(tmp_path / "comma.csv")


def test_units_in_the_header(tmp_path):
    """Spreadsheet headers with units ("TIME (min)", "AMT [ug]", "WT(kg)") name the columns and state their units;
    a sidecar's unit wins over the header's; names that would then clash are left as written."""
    (tmp_path / "u.csv").write_text("ID,TIME (min),AMT [ug],DV (ng/mL),WT(kg)\n1,0,100,.,70\n1,1,.,2.0,70\n")
    ds = hp.read_nonmem(tmp_path / "u.csv")
    assert list(ds.to_dataframe().columns)[:4] == ["ID", "TIME", "DV", "AMT"] and ds.covariates == ("WT",)
    assert dict(ds.units) == {"TIME": "min", "DV": "ng/mL", "AMT": "ug", "WT": "kg"}
    assert ds.axis_units == ("min", "ng/mL")
    (tmp_path / "u.columns.json").write_text(json.dumps({"columns": {"DV": {"role": "DV", "unit": "ug/L"}}}))
    assert hp.read_nonmem(tmp_path / "u.csv").units["DV"] == "ug/L"
    (tmp_path / "twice.csv").write_text("ID,TIME,DV,WT (kg),WT (lb)\n1,0,1.0,70,154\n")
    twice = hp.read_nonmem(tmp_path / "twice.csv")
    assert twice.covariates == ("WT (kg)", "WT (lb)") and "WT" not in twice.units


def test_data_in_other_units_than_the_model_are_refused(tmp_path):
    """A published model works in h, mg and mg/L: a patient record stating the same scale otherwise (ug/mL, hr)
    is estimated; one in ng/mL or minutes is refused naming both units, for the estimate (map, dose, predict)
    and for simulation. The unit arithmetic: same scale, different scale, unknown units."""
    from hybridpk.data._units import same_unit

    assert same_unit("ug/mL", "mg/L", "concentration") and same_unit("ng/mL", "ug/L", "concentration")
    assert not same_unit("ng/mL", "mg/L", "concentration") and same_unit("hr", "h", "time")
    assert not same_unit("min", "h", "time") and same_unit("mcg", "ug", "amount")
    assert same_unit("mmol/L", "mmol/l", "concentration") and not same_unit("mmol/L", "mg/L", "concentration")
    model = hp.load_model("phenobarbital_grasela1985")
    body = "1,0,25,1.4,7,0,.\n1,2,0,1.4,7,0,17.3\n"
    for header, ok in [("ID,TIME,AMT,WGT,APGR,APGRLOW,DV (ug/mL)", True),
                       ("ID,TIME (hr),AMT,WGT,APGR,APGRLOW,DV", True),
                       ("ID,TIME,AMT,WGT,APGR,APGRLOW,DV (ng/mL)", False),
                       ("ID,TIME (min),AMT,WGT,APGR,APGRLOW,DV", False)]:
        (tmp_path / "p.csv").write_text(header + "\n" + body)
        ds = hp.read_nonmem(tmp_path / "p.csv", covariates=["WGT", "APGRLOW"])
        if ok:
            assert model.estimate(ds).eta.shape == (1, model.model.n_eta)
            continue
        unit = "ng/mL" if "ng" in header else "min"
        for call in (lambda: model.estimate(ds), lambda: model.simulate(ds)):
            with pytest.raises(DatasetError, match=rf"in {unit}, but phenobarbital_grasela1985 works in "
                                                   r"(mg/L|h): convert the data"):
                call()
    from hybridpk.cli import main

    assert main(["fit", str(tmp_path / "p.csv"), "--model", "phenobarbital_grasela1985", "--out",
                 str(tmp_path / "run")]) == 2 and not (tmp_path / "run" / "summary.json").exists()
