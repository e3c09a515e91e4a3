"""Log-transform-both-sides control streams, written as NONMEM users write them: the data's DV are log
concentrations and $ERROR fits LOG(F) to them (IF (F.GT.0) IPRED = LOG(F) after IPRED = LOG(0.0025); DDMoRe's
LOG(F + FLAG) with FLAG = 1 on dose records; LOG(ABS(F) + 1E-30) as in Bauer's 2019 tutorial). hybridpk refused
them all ("a logarithm of F ... not imported yet"). Checked three ways on theophylline (the bundled data, DV
logged): the ADVAN2 streams against a $PRED stream that computes the closed form and its LOG on the stream's DV
as they are (no conversion anywhere), and against hybridpk's native log-transform-both-sides fit of the
concentrations. The $PRED stream itself failed: LOG(0) on its dose records made every OFV gradient NaN (the fit
stayed at its start) and its CWRES a LinAlgError, and a CMT column in its data was refused."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.errors import DatasetError, ModelError
from hybridpk.population import ErrorModel, build_model, fit_population
from hybridpk.population.nonmem import read_control_stream

HEAD = """$PROBLEM theophylline, log-transformed both sides
$INPUT ID TIME DV=DROP AMT EVID MDV CMT WT LNDV=DV DOSE
$DATA theoph_log.csv IGNORE=@
"""
ADVAN2 = HEAD + """$SUBROUTINE ADVAN2 TRANS2
$PK
KA = THETA(1)*EXP(ETA(1))
CL = THETA(2)*EXP(ETA(2))
V = THETA(3)*EXP(ETA(3))
S2 = V
$ERROR
{error}
IRES = DV - IPRED
$THETA (0, 1.5) (0, 2.8) (0, 32) (0, 0.3)
$OMEGA 0.4 0.07 0.02
$SIGMA 1 FIX
$ESTIMATION METHOD=1 INTERACTION
"""
ERRORS = {
    "guarded": "IPRED = LOG(0.0025)\nW = THETA(4)\nIF (F.GT.0) IPRED = LOG(F)\nY = IPRED + W*EPS(1)",
    "ddmore": "FLAG = 0\nIF (AMT.NE.0) FLAG = 1\nIPRED = LOG(F + FLAG)\nW = THETA(4)\nY = IPRED + W*EPS(1)",
    "bauer": "IPRED = LOG(ABS(F) + 1E-30)\nY = IPRED + THETA(4)*EPS(1)",
}
PRED = HEAD + """$PRED
KA = THETA(1)*EXP(ETA(1))
CL = THETA(2)*EXP(ETA(2))
V = THETA(3)*EXP(ETA(3))
K = CL/V
CONC = DOSE*KA/(V*(KA - K))*(EXP(-K*TIME) - EXP(-KA*TIME))
IPRED = LOG(CONC)
Y = IPRED + THETA(4)*EPS(1)
$THETA (0, 1.5) (0, 2.8) (0, 32) (0, 0.3)
$OMEGA 0.4 0.07 0.02
$SIGMA 1 FIX
$ESTIMATION METHOD=1 INTERACTION
"""


def _log_data(theoph_path, folder, predose: bool = False):
    """theophylline with DV logged (LNDV) and the dose per subject (DOSE, for $PRED); the levels at the dose time
    (LOG of a prediction of 0) are records without a level (EVID 2), as a NONMEM user leaves them out
    (``predose``: those above 0 are kept, for a model whose guard gives LOG(F) a value there)."""
    df = pd.read_csv(theoph_path)
    at_dose = (df.EVID == 0) & (df.TIME == 0) & ((df.DV <= 0) | (not predose))
    df.loc[at_dose, ["EVID", "MDV"]] = [2, 1]
    df["LNDV"] = np.where(df.MDV == 0, np.log(df.DV.where(df.DV > 0, 1.0)), 0.0)
    df["DOSE"] = df.groupby("ID").AMT.transform("max")
    df.to_csv(folder / "theoph_log.csv", index=False)
    df.drop(columns=["LNDV", "DOSE"]).to_csv(folder / "theoph_levels.csv", index=False)


def _fit(path, **kw):
    pm, ds = read_control_stream(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_population(pm, ds, progress=False, **kw), pm, ds


def test_log_scale_streams_give_the_ofv_of_the_streams_dv(tmp_path, theoph_path):
    """At the initial estimates (MAXEVAL=0), each ADVAN2 $ERROR gives the OFV of the $PRED stream, which reads
    the log DV as they are (1e-6); the guarded LOG reads the guard's value where F is 0, as NONMEM does."""
    _log_data(theoph_path, tmp_path)
    (tmp_path / "pred.mod").write_text(PRED)
    reference, _, _ = _fit(tmp_path / "pred.mod", evaluate=True, covariance=False)
    assert reference.estimation.ofv == pytest.approx(-185.5779, abs=1e-3)
    for name, error in ERRORS.items():
        (tmp_path / f"{name}.mod").write_text(ADVAN2.format(error=error))
        res, pm, ds = _fit(tmp_path / f"{name}.mod", evaluate=True, covariance=False)
        assert pm.error.ltbs and pm.error.log_dv and ds.dv_log
        assert res.estimation.ofv == pytest.approx(reference.estimation.ofv, abs=1e-6), name
    f = torch.tensor([0.0, 2.0], dtype=torch.float64)
    guarded = read_control_stream(tmp_path / "guarded.mod")[0].error
    assert guarded.log_scale(f).tolist() == pytest.approx([math.log(0.0025), math.log(2.0)], rel=1e-12)
    bauer = read_control_stream(tmp_path / "bauer.mod")[0].error
    assert bauer.log_scale(f).tolist() == pytest.approx([math.log(1e-30), math.log(2.0 + 1e-30)], rel=1e-12)


def test_a_log_scale_stream_fits_as_the_pred_stream_and_the_native_ltbs_fit(tmp_path, theoph_path):
    """The guarded ADVAN2 stream, the $PRED stream and `hybridpk fit --ltbs` of the concentrations reach one
    optimum (OFV and THETAs); the tables give DV and IPRED as concentrations."""
    _log_data(theoph_path, tmp_path)
    (tmp_path / "run.mod").write_text(ADVAN2.format(error=ERRORS["guarded"]))
    (tmp_path / "pred.mod").write_text(PRED)
    stream, _, ds = _fit(tmp_path / "run.mod", covariance=False)
    pred, _, _ = _fit(tmp_path / "pred.mod", covariance=False)
    levels = hp.read_nonmem(tmp_path / "theoph_levels.csv")
    native_pm = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error=ErrorModel("additive", add=0.3, ltbs=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = fit_population(native_pm, levels, progress=False, covariance=False)
    assert stream.estimation.ofv == pytest.approx(native.estimation.ofv, abs=1e-3)
    assert pred.estimation.ofv == pytest.approx(native.estimation.ofv, abs=1e-3)
    values = {t.name: t.value for t in native.theta}
    for fit in (stream, pred):
        theta = [t.value for t in fit.theta]
        assert theta == pytest.approx([values["KA"], values["CL"], values["V"], native.sigma.rows[0].sd], rel=1e-3)
    table = stream.predict(ds).table
    obs = table.MDV == 0
    assert table.DV[obs].to_numpy() == pytest.approx(levels.to_dataframe().DV[obs].to_numpy(), rel=1e-12)
    assert table.IPRED[~obs & (table.TIME == 0)].to_numpy() == pytest.approx(0.0025, rel=1e-12)   # the guard


def test_levels_before_the_dose_take_the_guards_value_as_in_nonmem(tmp_path, theoph_path):
    """Three pre-dose levels (0.74, 0.15 and 0.13 mg/L at 0 h) kept as observations: NONMEM fits them at the
    guard's IPRED = LOG(0.0025), as the guarded $PRED stream computes it; hybridpk refused them ("an observation
    at or before the first dose ... cannot be log-transformed") and, on the $PRED stream, the untaken LOG(0) of
    its IF made every gradient NaN (the fit stayed at its start, "NOT converged"). Both reach one optimum."""
    _log_data(theoph_path, tmp_path, predose=True)
    guarded_pred = PRED.replace("IPRED = LOG(CONC)", "IPRED = LOG(0.0025)\nIF (CONC.GT.0) IPRED = LOG(CONC)")
    (tmp_path / "pred.mod").write_text(guarded_pred)
    (tmp_path / "run.mod").write_text(ADVAN2.format(error=ERRORS["guarded"]))
    stream, _, ds = _fit(tmp_path / "run.mod", covariance=False)
    pred, _, _ = _fit(tmp_path / "pred.mod", covariance=False)
    assert ds.n_observations == 123
    assert stream.estimation.converged and pred.estimation.converged
    assert pred.estimation.ofv == pytest.approx(stream.estimation.ofv, abs=1e-3)
    assert [t.value for t in pred.theta] == pytest.approx([t.value for t in stream.theta], rel=1e-3)


def test_log_scale_constructs_and_data_that_cannot_be_read_so_are_refused(tmp_path, theoph_path):
    """An SD that reads the log prediction, data that do not say their DV are logs, and a limit of
    quantification whose scale is unknown (an LLOQ column) are refused by name; a BLQ level's limit in DV is in DV's
    units (it was refused too, before M3 streams on log DV were read)."""
    _log_data(theoph_path, tmp_path)
    sd_on_f = ("IPRED = LOG(F)\nW = SQRT(THETA(4)**2 + THETA(4)**2/F**2)\nY = IPRED + W*EPS(1)")
    (tmp_path / "sd.mod").write_text(ADVAN2.format(error=sd_on_f))
    with pytest.raises(ModelError, match=r"sd.mod line 11: the residual SD reads the prediction on the log scale"):
        read_control_stream(tmp_path / "sd.mod")
    (tmp_path / "run.mod").write_text(ADVAN2.format(error=ERRORS["guarded"]))
    pm, ds = read_control_stream(tmp_path / "run.mod")
    with pytest.raises(DatasetError, match="fits LOG\\(F\\) to DV in log units"):
        fit_population(pm, hp.read_nonmem(tmp_path / "theoph_log.csv"), progress=False)
    with_lloq = pd.read_csv(tmp_path / "theoph_log.csv").assign(LLOQ=0.1)
    with pytest.raises(DatasetError, match="an LLOQ column, whose limits hybridpk cannot place on that scale"):
        hp.read_nonmem(with_lloq).dv_from_log()
    # a BLQ (or CENS) level with its limit in DV has the limit in DV's units: log(2 mg/L) becomes 2 mg/L
    with_blq = pd.read_csv(tmp_path / "theoph_log.csv").assign(BLQ=0)
    last = with_blq.index[(with_blq.MDV == 0)][-1]
    with_blq.loc[last, ["BLQ", "LNDV"]] = [1, math.log(2.0)]
    batch = hp.read_nonmem(with_blq.drop(columns="DV").rename(columns={"LNDV": "DV"})).dv_from_log().to_batch()
    assert float(batch.lloq[batch.cens == 1]) == pytest.approx(2.0, rel=1e-12)


def test_a_pred_stream_ignores_the_cmt_column(tmp_path, theoph_path):
    """$PRED has no compartments: the CMT of the data's observations (2 in theophylline) is a data item, as in
    NONMEM; it was refused ('observations in compartment 2, but model PRED predicts ... compartment 1')."""
    _log_data(theoph_path, tmp_path)
    (tmp_path / "pred.mod").write_text(PRED)
    pm, ds = read_control_stream(tmp_path / "pred.mod")
    assert set(ds.to_dataframe().CMT[ds.observation_mask]) == {2}
    res, _, _ = _fit(tmp_path / "pred.mod", evaluate=True)
    assert math.isfinite(res.estimation.ofv)


def test_the_hybrid_scores_a_log_scale_model_on_the_log_scale(tmp_path, theoph_path):
    """The hybrid's likelihood of a log-transform-both-sides model is the population fit's: its -2LL at the ODE
    prediction (NLL_ODE) is each patient's sum of (log DV - log IPRED)^2 / W^2 + log W^2, computed here from the
    tables. It took the concentrations' residuals over the log-scale SD (theophylline: 2239 where the log-scale
    -2LL is -328.6), for the stream's import and for `--ltbs` alike."""
    from hybridpk.residual import TrainConfig, fit_hybrid

    _log_data(theoph_path, tmp_path)
    (tmp_path / "run.mod").write_text(ADVAN2.format(error=ERRORS["guarded"]))
    pm, ds = read_control_stream(tmp_path / "run.mod")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hyb = fit_hybrid(pm, ds, config=TrainConfig(epochs=6, warmup_epochs=2, progress=False, form="reservoir"),
                         seed=3, progress=False)
    w = [t.value for t in hyb.population.theta][3]
    table = hyb.population.predict(ds).table
    obs = table[table.MDV == 0]
    terms = (np.log(obs.DV) - np.log(obs.IPRED)) ** 2 / w ** 2 + math.log(w ** 2)
    expected = terms.groupby(obs.ID, sort=False).sum()
    got = hyb.individual.set_index("ID").NLL_ODE.loc[expected.index]
    assert got.to_numpy() == pytest.approx(expected.to_numpy(), rel=1e-8, abs=1e-8)
    assert np.isfinite(hyb.individual.NLL_HYBRID).all()


def test_a_pred_stream_with_a_subject_without_levels_fits(tmp_path, theoph_path):
    """A subject whose records are all without a level (subject 12's levels made EVID 2): its $PRED values, all
    taken without derivatives, gave NaN derivatives from LOG(0) at its dose record all the same, and the fit
    stayed at its start."""
    _log_data(theoph_path, tmp_path)
    df = pd.read_csv(tmp_path / "theoph_log.csv")
    df.loc[(df.ID == 12) & (df.EVID == 0), ["EVID", "MDV"]] = [2, 1]
    df.to_csv(tmp_path / "theoph_log.csv", index=False)
    (tmp_path / "pred.mod").write_text(PRED)
    start, _, _ = _fit(tmp_path / "pred.mod", evaluate=True, covariance=False)
    res, _, ds = _fit(tmp_path / "pred.mod", covariance=False)
    assert ds.n_subjects == 12 and res.estimation.converged
    assert res.estimation.ofv < start.estimation.ofv - 10.0


def test_a_patient_file_states_the_scale_of_its_dv(tmp_path, theoph_path, capsys):
    """`hybridpk map STREAM PATIENT.csv` with the log-DV stream as prior: a data file's DV could be logs or
    concentrations, so it is refused unless --dv says which; --dv conc on the measured levels and --dv log on the
    stream's log DV give the MAP of the stream's own data (the patient read through the stream)."""
    import json

    from hybridpk.cli import main

    _log_data(theoph_path, tmp_path)
    (tmp_path / "run.mod").write_text(ADVAN2.format(error=ERRORS["guarded"]))
    df = pd.read_csv(tmp_path / "theoph_log.csv")
    df = df[df.ID == 1]
    df.drop(columns=["LNDV"]).to_csv(tmp_path / "levels.csv", index=False)
    df.assign(DV=df.LNDV.where(df.MDV == 0, 0.0)).drop(columns=["LNDV"]).to_csv(tmp_path / "logs.csv", index=False)
    maps = {}
    for name, args in (("stream", ["run.mod"]), ("conc", ["levels.csv", "--dv", "conc"]),
                       ("log", ["logs.csv", "--dv", "log"])):
        out = tmp_path / f"{name}.json"
        assert main(["map", str(tmp_path / "run.mod"), *[str(tmp_path / a) if a.endswith((".csv", ".mod")) else a
                                                        for a in args], "--out", str(out)]) == 0
        written = json.loads(out.read_text())
        maps[name] = next(p["map"] for p in written["patients"] if p["ID"] == 1) if "patients" in written \
            else written["map"]
    for name in ("conc", "log"):
        assert maps[name] == pytest.approx(maps["stream"], rel=1e-6, abs=1e-9)
    assert main(["map", str(tmp_path / "run.mod"), str(tmp_path / "levels.csv")]) == 2
    pd.read_csv(tmp_path / "theoph_log.csv").drop(columns=["LNDV"]).to_csv(tmp_path / "ward.csv", index=False)
    capsys.readouterr()
    assert main(["map", str(tmp_path / "run.mod"), str(tmp_path / "ward.csv")]) == 0     # a day's list
    printed = capsys.readouterr().out
    assert "12 of 12 patients refused" in printed and "state it (--dv log or --dv conc" in printed
    assert "\\n" not in printed           # each refusal on one line of the table (it printed '\\n')
