"""Dates and clock times read as NM-TRAN reads them (hybridpk.data._clock): the hours since each subject's first
record, checked against NONMEM's own example, against calendar arithmetic done here by hand, and against
pharmpy's pheno.mod, whose data are rewritten with dates and clock times; what cannot be read one way is
refused, naming the record."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

import hybridpk as hp
from hybridpk.cli import main
from hybridpk.errors import DatasetError


def _read(tmp_path, text: str, name: str = "d.csv"):
    (tmp_path / name).write_text(text)
    return hp.read_nonmem(tmp_path / name)


def test_nonmem_help_example(tmp_path):
    """NONMEM's help on the DATE data item: 10-1-86 9:15 -> 0, 14:40 -> 5.42, 10-2-86 8:30 -> 23.25; a subject
    whose dates have no year (10-12 8 -> 0, 10-14 10 -> 50). The date column is gone from the records."""
    ds = _read(tmp_path, "ID,DATE,TIME,AMT,DV\n1,10-1-86,9:15,100,.\n1,10-1-86,14:40,.,2.0\n1,10-2-86,8:30,.,1.0\n"
                         "2,10-12,8,100,.\n2,10-14,10,.,1.5\n")
    f = ds.to_dataframe()
    np.testing.assert_allclose(f.TIME, [0.0, 5 + 25 / 60, 23.25, 0.0, 50.0], rtol=0, atol=1e-12)
    assert "DATE" not in f.columns
    assert dict(ds.time_origin) == {1: "1986-10-01 09:15"}      # subject 2's dates have no year
    assert "NM-TRAN's time translation" in ds.time_note


@pytest.mark.parametrize("label,fmt", [("DATE", "{m:02d}/{d:02d}/{y}"), ("DAT1", "{d}.{m}.{y}"),
                                       ("DAT2", "{y}-{m:02d}-{d:02d}"), ("DAT3", "{y}/{d}/{m}")])
def test_date_labels_and_calendar(tmp_path, label, fmt):
    """The same instants written in each label's order give the hours of Python's calendar arithmetic, across a
    leap day (2024-02-29), a year's end and a two-digit year (99 -> 1999, 00 -> 2000: LAST20=50)."""
    when = [dt.datetime(2023, 12, 31, 22, 5), dt.datetime(2024, 1, 1, 1, 30, 15), dt.datetime(2024, 2, 28, 23, 0),
            dt.datetime(2024, 3, 1, 6, 45)]
    body = "".join(f"1,{fmt.format(y=w.year, m=w.month, d=w.day)},{w:%H:%M:%S},{100 if i == 0 else '.'},"
                   f"{'.' if i == 0 else 1.0}\n" for i, w in enumerate(when))
    old = [dt.datetime(1999, 12, 31, 23, 0), dt.datetime(2000, 1, 1, 1, 0), dt.datetime(2000, 3, 1, 1, 0)]
    body += "".join(f"2,{fmt.format(y=f'{w.year % 100:02d}', m=w.month, d=w.day)},{w:%H:%M},"
                    f"{100 if i == 0 else '.'},{'.' if i == 0 else 1.0}\n" for i, w in enumerate(old))
    ds = _read(tmp_path, f"ID,{label},TIME,AMT,DV\n" + body)
    expect = [(w - when[0]).total_seconds() / 3600 for w in when] + [(w - old[0]).total_seconds() / 3600 for w in old]
    np.testing.assert_allclose(ds.to_dataframe().TIME, expect, rtol=0, atol=1e-12)
    assert expect[3] - expect[2] == pytest.approx(31.75)           # 2024 has a 29th of February
    assert dict(ds.time_origin) == {1: "2023-12-31 22:05", 2: "1999-12-31 23:00"}


def test_iso_date_times_and_one_day_clock_times(tmp_path):
    """ISO 8601 date-times in TIME (clinical exports), with or without seconds and the T; clock times without a
    date within one day. Each subject starts at 0."""
    ds = _read(tmp_path, "ID,TIME,AMT,DV\n7,2024-02-28T20:00,500,.\n7,2024-02-29 08:30:30,.,3.1\n"
                         "7,2024-03-01 20:00,.,1.2\n8,2025-06-01 09:00,500,.\n8,2025-06-02 09:00,.,2.0\n")
    np.testing.assert_allclose(ds.to_dataframe().TIME, [0, 12.5 + 30 / 3600, 48, 0, 24], rtol=0, atol=1e-12)
    assert dict(ds.time_origin) == {7: "2024-02-28 20:00", 8: "2025-06-01 09:00"}
    ds = _read(tmp_path, "ID,TIME,AMT,DV\n1,08:00,100,.\n1,8:45,.,2.0\n1,13.5,.,1.0\n")
    np.testing.assert_allclose(ds.to_dataframe().TIME, [0, 0.75, 5.5], rtol=0, atol=1e-12)
    assert dict(ds.time_origin) == {}
    plain = _read(tmp_path, "ID,TIME,AMT,DV\n1,0,100,.\n1,30,.,2.0\n")
    assert plain.time_note is None and plain.to_dataframe().TIME.tolist() == [0.0, 30.0]


@pytest.mark.parametrize("text,message", [
    ("ID,TIME,AMT,DV\n1,22:00,100,.\n1,02:00,.,2.0\n",
     r"row 2 \(file line 3\), column TIME: a clock time earlier than the record before it and no date: add a DATE"),
    ("ID,DATE,TIME,AMT,DV\n1,01/02/2024,0,100,.\n1,01/03/2024,26,.,2.0\n",
     r"row 2 \(file line 3\), column TIME: a TIME of 24 or more: beside the date column DATE, TIME is the clock "
     r"time .* remove or rename the DATE column"),
    ("ID,DATE,TIME,AMT,DV\n1,2024-01-02,08:00,100,.\n1,2024-01-03,08:00,.,2.0\n",
     r"rows 1, 2 \(file lines 2, 3\), column DATE: '2024-01-02', '2024-01-03': a four-digit year where the label DATE "
     r"reads month/day/year .* label the column DAT2"),
    ("ID,DATE,TIME,AMT,DV\n1,02-27,08:00,100,.\n1,03-01,08:00,.,2.0\n",
     r"column DATE: dates without a year whose subject's records cross the end of February: add the year"),
    ("ID,DATE,TIME,AMT,DV\n1,02/30/2024,08:00,100,.\n1,03/01/2024,25:00,.,2.0\n",
     r"row 1 \(file line 2\), column DATE: '02/30/2024' is not a date"),
    ("ID,DATE,TIME,AMT,DV\n1,02/27/2024,08:00,100,.\n1,02/28/2024,25:00,.,2.0\n",
     r"row 2 \(file line 3\), column TIME: '25:00' is not a clock time"),
    ("ID,DATE,TIME,AMT,DV\n1,02/27/2024,08:00,100,.\n1,.,09:00,.,2.0\n",
     r"row 2 \(file line 3\), column DATE: missing date"),
    ("ID,DATE,TIME,AMT,DV\n1,02/27/2024,08:00,100,.\n1,28,09:00,.,2.0\n",
     r"rows 1, 2 .*column DATE: a subject's dates written with different numbers of components"),
    ("ID,TIME,AMT,DV\n1,2024-01-01 08:00,100,.\n1,9:00,.,2.0\n",
     r"row 2 \(file line 3\), column TIME: TIME mixes ISO date-times"),
    ("ID,DATE,DAT1,TIME,AMT,DV\n1,01/02/2024,02/01/2024,08:00,100,.\n",
     r"two date columns \(DATE, DAT1\)"),
    ("ID,DATE,TIME,AMT,DV\n1,01.12.2026,08:00,100,.\n1,02.12.2026,08:00,.,2.0\n",
     r"rows 1, 2 \(file lines 2, 3\), column DATE: '01.12.2026', '02.12.2026': dates with dots, the day.month.year "
     r"convention, under the label DATE, .* label the column DAT1"),
    ("ID,TIME,AMT,DV\n1,12/1/2026 8:00,100,.\n1,12/1/2026 9:30,.,2.0\n",
     r"rows 1, 2 .*column TIME: '12/1/2026 8:00', '12/1/2026 9:30': a date and a clock time in TIME; write the date "
     r"in a DATE column"),
])
def test_what_cannot_be_read_one_way_is_refused(tmp_path, text, message):
    with pytest.raises(DatasetError, match=message):
        _read(tmp_path, text)


def _pheno_with_dates(tmp_path, pharmpy_examples, name: str, date_format: str = "%m/%d/%Y", data_options: str = ""):
    """pharmpy's pheno.mod with its data rewritten as NONMEM users write clinical records: ``$INPUT ID DATE=DROP
    TIME ...``, dates (month/day/year, across a year's end) and clock times, each subject starting on another
    day; the control stream's path."""
    mod = (pharmpy_examples / "pheno.mod").read_text()
    raw = pd.read_csv(pharmpy_examples / "pheno.dta", sep=r"\s+", skiprows=1, header=None,
                      names="ID TIME AMT WGT APGR DV FA1 FA2".split())
    lines = ["ID DATE TIME AMT WGT APGR DV FA1 FA2"]
    for r in raw.itertuples():
        w = dt.datetime(2023, 12, 30, 21, 40) + dt.timedelta(days=r.ID % 3, minutes=round(r.TIME * 60))
        lines.append(f"{r.ID} {w.strftime(date_format)} {w.hour}:{w.minute:02d} {r.AMT:g} {r.WGT:g} {r.APGR:g} "
                     f"{r.DV:g} {r.FA1} {r.FA2}")
    (tmp_path / f"{name}.dta").write_text("\n".join(lines) + "\n")
    assert "$DATA pheno.dta IGNORE=@" in mod and "$INPUT ID TIME" in mod
    (tmp_path / f"{name}.mod").write_text(mod.replace("$DATA pheno.dta IGNORE=@", f"$DATA {name}.dta IGNORE=@"
                                                      f"{data_options}")
                                          .replace("$INPUT ID TIME", "$INPUT ID DATE=DROP TIME"))
    return tmp_path / f"{name}.mod"


def test_pheno_with_dates_and_clock_times_reads_as_pheno(tmp_path, pharmpy_examples):
    """The control stream and its data file alone both read to pheno's own records (its TIME starts at 0 for every
    subject), so a fit of it is pheno's fit. Two-digit years (23, 24) read so with $DATA LAST20=24 (both 20nn)
    and are refused with LAST20=23 (2023 to 1924: time goes back); LAST20 that is not a year is refused."""
    _, pheno = hp.read_control_stream(pharmpy_examples / "pheno.mod")
    _, dated = hp.read_control_stream(_pheno_with_dates(tmp_path, pharmpy_examples, "pheno_date"))
    assert dated == pheno
    assert dated.time_origin[1] == "2023-12-31 21:40" and dated.time_origin[2] == "2024-01-01 21:40"
    assert main(["check", str(tmp_path / "pheno_date.dta")]) == 0
    _, short = hp.read_control_stream(_pheno_with_dates(tmp_path, pharmpy_examples, "p24", "%m/%d/%y", " LAST20=24"))
    assert short == pheno and short.time_origin == dated.time_origin
    with pytest.raises(DatasetError, match="TIME decreases within a subject"):
        hp.read_control_stream(_pheno_with_dates(tmp_path, pharmpy_examples, "p23", "%m/%d/%y", " LAST20=23"))
    with pytest.raises(hp.ModelError, match=r"pbad.mod line 2: LAST20=X: give a two-digit year"):
        hp.read_control_stream(_pheno_with_dates(tmp_path, pharmpy_examples, "pbad", "%m/%d/%y", " LAST20=X"))


def test_check_says_what_was_translated(tmp_path, capsys):
    (tmp_path / "d.csv").write_text("ID,TIME,AMT,DV\n3,2024-05-01 08:00,100,.\n3,2024-05-01 10:30,.,2.0\n")
    assert main(["check", str(tmp_path / "d.csv")]) == 0
    out = capsys.readouterr().out
    assert "time span      0 to 2.5 h" in out
    assert ("time           TIME is the hours since each subject's first record, from the ISO date-times in TIME "
            "(NM-TRAN's time translation); subject 3 starts 2024-05-01 08:00") in out


def test_dose_says_the_date_and_time_of_a_recommendation(tmp_path, pharmpy_examples, capsys):
    """A patient's record with dates and clock times (pharmpy's first pheno neonate, as a clinic exports it):
    the recommendation gives the first new dose's date and time beside its hour, and REC.json holds it; the same
    record in hours gives the same regimen."""
    import json

    raw = pd.read_csv(pharmpy_examples / "pheno.dta", sep=r"\s+", skiprows=1, header=None,
                      names="ID TIME AMT WGT APGR DV FA1 FA2".split())
    patient = raw[raw.ID == 1]
    patient.to_csv(tmp_path / "hours.csv", index=False)
    t0 = dt.datetime(2026, 12, 4, 7, 30)
    patient.assign(TIME=[f"{t0 + dt.timedelta(hours=h):%Y-%m-%d %H:%M}" for h in patient.TIME]).to_csv(
        tmp_path / "clock.csv", index=False)
    model = str(pharmpy_examples / "pheno.mod")
    assert main(["dose", model, str(tmp_path / "hours.csv"), "--out", str(tmp_path / "h.json")]) == 0
    assert main(["dose", model, str(tmp_path / "clock.csv"), "--out", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    by_hours, by_clock = (json.loads((tmp_path / f).read_text()) for f in ("h.json", "c.json"))
    assert by_clock["dose_mg"] == by_hours["dose_mg"] and by_clock["start_h"] == by_hours["start_h"]
    when = t0 + dt.timedelta(hours=by_clock["start_h"])
    assert by_clock["start_clock"] == f"{when:%Y-%m-%d %H:%M}" and "start_clock" not in by_hours
    assert f"from t = {by_clock['start_h']:g} h, {when:%Y-%m-%d %H:%M}\n" in out
    from hybridpk.dosing import dosing_model, estimate_patient, forecast, plot_forecast

    post = estimate_patient(dosing_model(model), hp.read_nonmem(tmp_path / "clock.csv"), n_samples=50, seed=0)
    fig = plot_forecast(forecast(post.estimate, post.draws, np.linspace(0.0, 130.0, 27), seed=0), post.estimate)
    assert fig.axes[0].get_xlabel() == "time (h since 2026-12-04 07:30)"


def test_dose_start_as_a_date_and_time(tmp_path, pharmpy_examples, capsys):
    """--start as a date and time: each patient of a day's list starts at the hours its own record places that
    instant at (three pheno neonates whose records begin on different days); a record in hours is refused, so is
    text that is neither."""
    import json

    raw = pd.read_csv(pharmpy_examples / "pheno.dta", sep=r"\s+", skiprows=1, header=None,
                      names="ID TIME AMT WGT APGR DV FA1 FA2".split())
    three = raw[raw.ID.isin([1, 2, 3])].copy()
    t0 = {1: dt.datetime(2026, 12, 4, 7, 30), 2: dt.datetime(2026, 12, 5, 9, 0), 3: dt.datetime(2026, 12, 3, 22, 15)}
    three["TIME"] = [f"{t0[i] + dt.timedelta(hours=h):%Y-%m-%d %H:%M}" for i, h in zip(three.ID, three.TIME)]
    three.to_csv(tmp_path / "three.csv", index=False)
    model = str(pharmpy_examples / "pheno.mod")
    assert main(["dose", model, str(tmp_path / "three.csv"), "--start", "2026-12-12 08:00",
                 "--out", str(tmp_path / "day.json")]) == 0
    starts = {p["ID"]: p["start_h"] for p in json.loads((tmp_path / "day.json").read_text())["patients"]}
    assert starts == {i: (dt.datetime(2026, 12, 12, 8) - t0[i]).total_seconds() / 3600 for i in (1, 2, 3)}
    raw[raw.ID == 1].to_csv(tmp_path / "hours.csv", index=False)
    assert main(["dose", model, str(tmp_path / "hours.csv"), "--start", "2026-12-12 08:00"]) == 2
    assert main(["dose", model, str(tmp_path / "three.csv"), "--start", "tomorrow"]) == 2
    assert main(["dose", model, str(tmp_path / "three.csv"), "--start", "2026-12-12T08:00+01:00"]) == 2
    err = capsys.readouterr().err
    assert "give the date and time without a time zone" in err
    assert "the record of patient 1 has no calendar dates to place it" in err
    assert "--start 'tomorrow': give hours (e.g. 120) or a date and time" in err


def test_fit_of_pheno_with_dates_is_nonmems_fit(tmp_path, pharmpy_examples, capsys):
    """`hybridpk fit` of pheno with dates and clock times reaches NONMEM's OFV of pheno (pheno_real.ext:
    586.27605), says that TIME was translated, and RUN/data.json holds every subject's first date and time."""
    import json

    mod = _pheno_with_dates(tmp_path, pharmpy_examples, "pheno_date")
    assert main(["fit", str(mod), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ofv"] == pytest.approx(586.27605, abs=2e-3)
    assert "  TIME is the hours since each subject's first record, from the dates in DATE and the clock times" in out
    record = json.loads((tmp_path / "run" / "data.json").read_text())
    assert record["time_origin"]["1"] == "2023-12-31 21:40" and len(record["time_origin"]) == 59
    assert "NM-TRAN's time translation" in record["time_translation"]


def test_day_numbers_held_as_numbers():
    """A DataFrame whose DATE holds day numbers as floats (pandas' 3.0) reads them as day numbers, not as day 3,
    month 0."""
    frame = pd.DataFrame({"ID": [1, 1, 1], "DATE": [1.0, 1.0, 2.0], "TIME": ["8:00", "9:30", "7:00"],
                          "AMT": [100, 0, 0], "DV": [np.nan, 2.0, 1.0]})
    assert hp.read_nonmem(frame).to_dataframe().TIME.tolist() == [0.0, 1.5, 23.0]
