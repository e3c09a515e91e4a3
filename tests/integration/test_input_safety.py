"""Inputs that used to "succeed" or fail late (issue 20): a dataset without observations, a patient file
without an optional covariate."""

from __future__ import annotations

import pandas as pd
import pytest

import hybridpk as hp
from hybridpk.cli import main
from hybridpk.dosing import recommend_dose
from hybridpk.errors import HybridPKError


def test_a_dataset_without_observations_is_refused(tmp_path, capsys):
    df = pd.DataFrame({"ID": [1, 2], "TIME": [0.0, 0.0], "DV": [0.0, 0.0], "AMT": [100.0, 100.0], "EVID": [1, 1],
                       "MDV": [1, 1]})
    df.to_csv(tmp_path / "doses.csv", index=False)
    pm = hp.build_model("1cmt_iv", iiv=["CL", "V"], error="proportional")
    with pytest.raises(HybridPKError, match="no observations"):
        hp.fit_population(pm, hp.read_nonmem(df), progress=False)
    assert main(["fit", str(tmp_path / "doses.csv"), "--model", "1cmt_iv", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no observations" in err and "doses.csv" in err and "internal error" not in err
    assert not (tmp_path / "run" / "model.json").exists()


def _vanco(dial: bool):
    rows = [dict(ID=7, TIME=0.0, DV=0.0, AMT=1000.0, RATE=1000.0, ADDL=3, II=12.0, EVID=1, MDV=1),
            dict(ID=7, TIME=37.5, DV=28.0, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0),
            dict(ID=7, TIME=47.5, DV=11.0, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0)]
    df = pd.DataFrame(rows).assign(CRCL=80.0, WT=80.0)
    return hp.read_nonmem(df.assign(DIAL=0) if dial else df)


def test_an_optional_covariate_takes_the_specs_documented_default():
    """Vancomycin (Goti 2018) declares DIAL = 0 as its default: a patient file without DIAL is dosed as one
    with DIAL = 0, and the answer says which value was taken; a covariate without a default is still
    refused."""
    with_col = recommend_dose("vancomycin_goti2018", _vanco(True), "auc24=400:600", interval=12, n_samples=300)
    without = recommend_dose("vancomycin_goti2018", _vanco(False), "auc24=400:600", interval=12, n_samples=300)
    assert (without.dose, without.interval) == (with_col.dose, with_col.interval)
    assert without.exposure == with_col.exposure and without.pta == with_col.pta
    assert any("DIAL is not in the patient file: taken as 0" in w for w in without.warnings)
    assert not any("DIAL" in w for w in with_col.warnings)
    assert hp.load_model("vancomycin_goti2018").covariate_defaults == {"DIAL": 0.0}
    no_crcl = hp.read_nonmem(_vanco(True).to_dataframe().drop(columns="CRCL"))
    with pytest.raises(HybridPKError, match="CRCL"):
        recommend_dose("vancomycin_goti2018", no_crcl, "auc24=400:600", interval=12, n_samples=300)


def test_a_covariate_column_named_in_another_case_is_read_under_the_models_name():
    """A control stream's $DATA names its columns by $INPUT, so its header may say wt where $PK reads WT
    (metrumresearchgroup/bbr's acop data): such a column is read as the model's covariate and the answer says
    so; two candidates (wt beside Wt) are refused by the reader."""
    upper = recommend_dose("vancomycin_goti2018", _vanco(True), "auc24=400:600", interval=12, n_samples=300)
    lower = hp.read_nonmem(_vanco(True).to_dataframe().rename(columns={"CRCL": "crcl", "WT": "wt"}))
    got = recommend_dose("vancomycin_goti2018", lower, "auc24=400:600", interval=12, n_samples=300)
    assert (got.dose, got.interval, got.exposure, got.pta) == (upper.dose, upper.interval, upper.exposure, upper.pta)
    assert any("column wt read as the model's covariate WT" in w for w in got.warnings)
    assert not any("differ only in case" in w for w in upper.warnings)
    with pytest.raises(hp.DatasetError, match="differ only in case"):      # which one would be WT: refused
        hp.read_nonmem(_vanco(True).to_dataframe().rename(columns={"WT": "wt"}).assign(Wt=60.0))


@pytest.mark.parametrize("column", ["CMT", "DVID", "ADDL", "EVID", "MDV"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), 1e300, 2.5])
def test_integer_data_items_that_are_not_whole_numbers_are_refused(column, value):
    """Found by the corruption property test: CMT = inf passed the checks and crashed the integer cast, and a
    huge CMT or ID would have overflowed it silently."""
    df = pd.DataFrame({"ID": [1, 1], "TIME": [0.0, 1.0], "DV": [0.0, 1.0], "AMT": [1.0, 0.0], "EVID": [1, 0],
                       "MDV": [1, 0], "CMT": [1, 2], "ADDL": [0, 0], "II": [0.0, 0.0], "DVID": [0, 0]}).astype(float)
    df.loc[0, column] = value
    with pytest.raises(hp.DatasetError) as err:
        hp.read_nonmem(df)
    assert column in str(err.value)
    huge_id = hp.read_nonmem(df.assign(**{column: df[column].where(df.index != 0, 1.0 if column != "ADDL" else 0.0)},
                                       ID=1e300))
    assert huge_id.ids[0] == 1e300          # kept as a float, not overflowed into an int64


def test_one_subject_fit_warns_instead_of_reporting_meaningless_variances(theoph_path):
    """One subject with three ETAs: OMEGA collapses to ~1e-9 and the sandwich's S has rank 1. The fit says
    so (OMEGA not estimable, at its boundary; no sandwich SEs, with the R option named) instead of printing
    RSE 0.0% and 'shrinkage nan%'."""
    one = hp.read_nonmem(pd.read_csv(theoph_path).query("ID == 1"))
    pm = hp.build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="additive", data=one)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.fit_population(pm, one, progress=False)
        by_r = hp.fit_population(pm, one, progress=False, covariance="R")
    w = " ".join(fit.estimation.warnings)
    assert "S matrix is singular" in w and "covariance='R'" in w and "cannot be estimated from one subject" in w
    assert "near its boundary" in w and "ETA_CL" in w
    assert fit.estimation.covariance == "none" and all(t.se is None for t in fit.theta)
    assert by_r.estimation.covariance == "R" and all(t.se is not None for t in by_r.theta)
    with pytest.raises(HybridPKError, match="covariance='X'"):
        hp.fit_population(pm, one, progress=False, covariance="X")


def test_a_degenerate_fit_is_reported_not_a_crash(theoph_path):
    """What the 3-compartment model does on the EHC data (CL -> 2e-7 L/h with an OMEGA of 1e6, the third
    compartment standing in for elimination; the run crashed saving the CV): an OMEGA far beyond any CV and a
    THETA outside the library's plausible range are warned about by name, and the CV is reported as not finite
    (exp(OMEGA) overflows) instead of raising."""
    from hybridpk.population.fit import Packing, _boundary_warnings
    from hybridpk.population.tables import OmegaEntry

    ds = hp.read_nonmem(theoph_path)
    pm = hp.build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="additive", data=ds)
    pack = Packing(pm, omega=[1.2e6, 0.09, 0.09])
    text = " ".join(_boundary_warnings(pack, pack.x0(theta={"CL": 2e-7, "V": 30.0, "KA": 1.5}), ds.n_subjects))
    assert "OMEGA implausibly large for ETA_CL (1.2e+06)" in text and "ETA_V" not in text
    assert "CL = 2e-07 L/h (plausible 0.0001 to 10000)" in text and "KA =" not in text
    assert not _boundary_warnings(Packing(pm), Packing(pm).x0(), ds.n_subjects)
    assert OmegaEntry("IIV_CL", "ETA_CL", 1.2e6).cv_percent is None
    assert OmegaEntry("IIV_CL", "ETA_CL", 0.09).cv_percent == pytest.approx(30.7, abs=0.1)
