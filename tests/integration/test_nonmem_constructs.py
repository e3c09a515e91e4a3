"""Nothing silent: each control-stream construct or data layout is carried out as written or refused with a
message that names it and its line. Carried out: FO, FOCE, FOCE-I, LAPLACE (with and without INTERACTION),
MAXEVAL=0, FIX on OMEGA and SIGMA, full and partial $OMEGA BLOCKs, TRANS1/3/4/5/6 and NONMEM's default scale,
$ERROR on the amount with a zero guard, $COVARIANCE (MATRIX=R/S, none), a covariate that changes in time (NONMEM's
rule, LOCF), the final estimates written back. Refused: SAEM, METHOD=0 INTERACTION, several $ESTIMATION steps,
0 FIX, a scale that is not the volume, $PK reading AMT or carrying a value over from the previous record, $ERROR
on another compartment's amount, a prediction other than F, TRANS that NONMEM does not pair with the ADVAN.
A tiny initial SIGMA no longer crashes the EBE step. (IOV and SAME: test_nonmem_iov.py.)"""

from __future__ import annotations

import math
import re
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.errors import DatasetError, HybridPKError, ModelError
from hybridpk.population import build_model, fit_population
from hybridpk.population.focei import Problem
from hybridpk.population.nonmem import read_control_stream, write_control_stream
from tests.integration.test_nonmem_import import THEO_TRANS2

OMEGAS = "$OMEGA  0.0309626 ; IIV_CL\n$OMEGA  0.031128 ; IIV_VC"


@pytest.fixture
def pheno_dir(tmp_path, pharmpy_examples):
    shutil.copy(pharmpy_examples / "pheno.dta", tmp_path)
    return tmp_path, (pharmpy_examples / "pheno.mod").read_text()


def test_a_scale_that_converts_units_predicts_nonmems_f(tmp_path, theoph_path, capsys):
    """S2 = V/1000 (doses in mg, levels in ng/mL; refused before): NONMEM's F = A/S2 with the kinetics of CL and V.
    A fit of theophylline's levels x 1000 under it gives the THETAs, OMEGA and SIGMA (proportional) of the levels in
    mg/L under S2 = V, and its OFV is theirs + 2 n log(1000), the -2 log-likelihood of the same residuals in units
    1000 times smaller. The individual CL and V are reported as what they are (CL/1000, V/1000: hybridpk's A/V is
    F), and a dose search without a target is refused, as hybridpk's default is in mg*h/L."""
    from hybridpk.cli import main

    df = pd.read_csv(theoph_path)
    df.loc[(df.EVID == 0) & (df.TIME == 0), ["EVID", "MDV"]] = [2, 1]     # pre-dose: no proportional likelihood
    df.to_csv(tmp_path / "theoph.csv", index=False)
    df.assign(DV=df.DV * 1000).to_csv(tmp_path / "theoph_ng.csv", index=False)
    mg = THEO_TRANS2.replace("Y = F + EPS(1)", "Y = F + F*EPS(1)").replace("$SIGMA 0.5", "$SIGMA 0.04")
    ng = mg.replace("S2 = V", "S2 = V/1000 ; mg and ng/mL").replace("theoph.csv", "theoph_ng.csv")
    fits = []
    for name, text in (("mg.mod", mg), ("ng.mod", ng)):
        (tmp_path / name).write_text(text)
        pm, ds = read_control_stream(tmp_path / name)
        prob = Problem(pm, ds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits.append((pm, ds, fit_population(pm, ds, progress=False, covariance=False)))
    (pm_mg, ds_mg, a), (pm_ng, ds_ng, b) = fits
    n_obs = int(prob.obs.sum())
    assert pm_ng.parameter_labels["V"] == "V/1000" and pm_ng.parameter_labels["CL"] == "CL/1000"
    assert "V" not in pm_mg.parameter_labels and pm_ng.concentration_scale.startswith("S2 = V/1000")
    assert b.estimation.ofv == pytest.approx(a.estimation.ofv + 2 * n_obs * math.log(1000), abs=1e-4)
    for name in a.theta.names:
        assert b.theta[name].value == pytest.approx(a.theta[name].value, rel=1e-4)
    np.testing.assert_allclose(b.omega.matrix, a.omega.matrix, rtol=1e-3)
    assert b.sigma["PROP"].value == pytest.approx(a.sigma["PROP"].value, rel=1e-4)
    ind_mg, ind_ng = a.estimate(ds_mg).parameters, b.estimate(ds_ng).parameters
    np.testing.assert_allclose(ind_ng.CL * 1000, ind_mg.CL, rtol=1e-3)
    np.testing.assert_allclose(ind_ng.V * 1000, ind_mg.V, rtol=1e-3)
    b.save(tmp_path / "run")
    one = df[df.ID == df.ID.iloc[0]].assign(DV=lambda d: d.DV * 1000)
    one.to_csv(tmp_path / "one.csv", index=False)
    capsys.readouterr()
    assert main(["dose", str(tmp_path / "run"), str(tmp_path / "one.csv")]) == 2
    assert "give --target in the units of its levels" in capsys.readouterr().err


TAD_FOR_TABLES = """IF (AMT.GT.0) THEN
TDOS = TIME
TAD = 0.0
ENDIF
IF (AMT.EQ.0) TAD = TIME - TDOS
WTKG = WT
"""


def test_a_time_after_dose_computed_for_tables_is_not_the_model(tmp_path, theoph_path):
    """$PK computing a time after dose for $TABLE, as NONMEM users write it (IF (AMT.GT.0) TDOS = TIME; TAD = TIME -
    TDOS: the value carried from the dose record): no prediction reads it, so the stream is the model without it
    (same OFV at the initial estimates). It was refused ('TDOS is assigned only under IF'). Where $ERROR reads TAD,
    it is the model, and is still refused by name."""
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    with_tad = THEO_TRANS2.replace("$PK\n", "$PK\n" + TAD_FOR_TABLES) + "$TABLE ID TIME TAD WTKG NOPRINT FILE=sdtab\n"
    ofvs = []
    for name, text in (("plain.mod", THEO_TRANS2), ("tad.mod", with_tad)):
        (tmp_path / name).write_text(text)
        pm, ds = read_control_stream(tmp_path / name)
        assert "TAD" not in pm.covariates and "AMT" not in pm.record_items
        ofvs.append(_ofv_at_inits(pm, ds))
    assert ofvs[1] == ofvs[0]
    (tmp_path / "read.mod").write_text(with_tad.replace("Y = F + EPS(1)", "W = 1\nIF (TAD.LT.1) W = 2\n"
                                                                          "Y = F + W*EPS(1)"))
    with pytest.raises(ModelError, match=r"read.mod line \d+: TDOS is assigned only under IF"):
        read_control_stream(tmp_path / "read.mod")


def test_labels_of_abbr_replace_are_the_numbered_parameters(tmp_path, theoph_path):
    """$ABBR REPLACE ETA(CL)=ETA(2) (and THETA, EPS labels; NONMEM 7.4) with the code written on the labels: the
    OFV of the numbered stream at the initial estimates (it was refused: '$PK reads ETA(KA) before assigning it'),
    and the final stream written back keeps the $ABBR records as written (pharmpy rewrote them as ETA_KA=ETA(1)
    and dropped the THETA and EPS labels, which NM-TRAN refuses): read again, it gives the fit's OFV. A list of
    labels (ETA(CL,V)=ETA(2,3)) is refused with its line."""
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    abbr = "".join(f"$ABBR REPLACE {k}({label})={k}({n})\n" for k, label, n in
                   (("ETA", "KA", 1), ("ETA", "CL", 2), ("ETA", "V", 3), ("THETA", "CL", 2), ("EPS", "ADD", 1)))
    labelled = (THEO_TRANS2.replace("$PK\n", abbr + "$PK\n").replace("ETA(1))", "ETA(KA))")
                .replace("THETA(2)*EXP(ETA(2))", "THETA(CL)*EXP(ETA(CL))").replace("ETA(3))", "ETA(V))")
                .replace("Y = F + EPS(1)", "Y = F + EPS(ADD)"))
    assert "ETA(CL)" in labelled and "EPS(ADD)" in labelled
    (tmp_path / "plain.mod").write_text(THEO_TRANS2)
    (tmp_path / "abbr.mod").write_text(labelled)
    assert _ofv_at_inits(*read_control_stream(tmp_path / "abbr.mod")) == \
        _ofv_at_inits(*read_control_stream(tmp_path / "plain.mod"))
    pm, ds = read_control_stream(tmp_path / "abbr.mod")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pm, ds, progress=False, covariance=False)
    final = write_control_stream(fit, tmp_path / "final.mod")
    text = final.read_text()
    assert "$ABBR REPLACE THETA(CL)=THETA(2)" in text and "$ABBR REPLACE ETA(KA)=ETA(1)" in text
    again = text.replace("$ESTIMATION METHOD=1 INTERACTION", "$ESTIMATION METHOD=1 INTERACTION MAXEVAL=0")
    (tmp_path / "again.mod").write_text(again)
    pm2, ds2 = read_control_stream(tmp_path / "again.mod")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at_final = fit_population(pm2, ds2, progress=False, covariance=False)
    assert at_final.estimation.ofv == pytest.approx(fit.estimation.ofv, abs=1e-6)
    (tmp_path / "list.mod").write_text(labelled.replace("ETA(CL)=ETA(2)", "ETA(CL,V)=ETA(2,3)"))
    with pytest.raises(ModelError, match=r"list.mod line \d+: \$ABBR REPLACE ETA\(CL,V\)=ETA\(2,3\)"):
        read_control_stream(tmp_path / "list.mod")


def test_code_for_the_simulation_step_is_not_the_model_and_not_simulated(tmp_path, theoph_path):
    """IF (ICALL.EQ.4) ... (NONMEM's simulation step; ICALL = 2 while it estimates): the fit is the stream's without
    it (same OFV at the initial estimates; it was refused: 'the prediction is Piecewise((0, Eq(ICALL, 4) ...), not
    F'), and hybridpk's simulations, which would not run that code, are refused by its line."""
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    (tmp_path / "plain.mod").write_text(THEO_TRANS2)
    (tmp_path / "sim.mod").write_text(THEO_TRANS2.replace("Y = F + EPS(1)", "Y = F + EPS(1)\n"
                                                                           "IF (ICALL.EQ.4.AND.Y.LT.0) Y = 0"))
    pm, ds = read_control_stream(tmp_path / "sim.mod")
    assert _ofv_at_inits(pm, ds) == _ofv_at_inits(*read_control_stream(tmp_path / "plain.mod"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pm, ds, progress=False, covariance=False, evaluate=True)
    with pytest.raises(ModelError, match=r"sim.mod line 12: .*simulation step \(ICALL.EQ.4\)"):
        fit.simulate(ds)


def test_a_theta_named_in_its_comment_like_a_pk_variable_is_labelled_so(tmp_path, theoph_path, capsys):
    """$THETA (0, 2.8) ; CL beside CL = THETA(2)*EXP(ETA(2)): pharmpy cannot name the THETA CL (the $PK variable
    has that name) and calls it THETA_2; the fit's printout and summary.json label it CL. It was shown as THETA_2
    only."""
    import json

    from hybridpk.cli import main

    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    (tmp_path / "run.mod").write_text(THEO_TRANS2.replace("; POP_CL", "; CL").replace(
        "$ESTIMATION METHOD=1 INTERACTION", "$ESTIMATION METHOD=1 INTERACTION MAXEVAL=0"))
    pm, _ = read_control_stream(tmp_path / "run.mod")
    assert [t.label for t in pm.thetas] == ["", "CL", ""] and pm.thetas[1].name == "THETA_2"
    assert main(["fit", str(tmp_path / "run.mod"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "THETA_2 (CL)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["parameters"]["THETA_2"]["label"] == "CL"


@pytest.mark.parametrize("old, new, construct", [
    ("METHOD=1 INTERACTION", "METHOD=0 INTER", "METHOD=0 INTERACTION"),
    ("METHOD=1 INTERACTION MAXEVALS=99999", "METHOD=0 MAXEVALS=99999\n$ESTIMATION METHOD=1 INTER", "2 $ESTIMATION"),
    ("METHOD=1 INTERACTION", "METHOD=SAEM INTERACTION", "METHOD=SAEM"),
    ("$OMEGA  0.031128 ; IIV_VC", "$OMEGA  0 FIX ; IIV_VC", "IIV_VC is 0 FIX"),
    ("$SIGMA  0.0130865", "$SIGMA  0 FIX", "SIGMA is 0 FIX"),
])
def test_unsupported_constructs_are_refused_by_name_and_line(pheno_dir, old, new, construct):
    folder, text = pheno_dir
    assert old in text
    changed = text.replace(old, new)
    (folder / "run.mod").write_text(changed)
    line = next(i for i, ln in enumerate(changed.splitlines(), 1) if new.split(";")[0].split("\n")[0].strip() in ln)
    with pytest.raises(ModelError, match=rf"run.mod line {line}: .*{re.escape(construct)}"):
        read_control_stream(folder / "run.mod")


@pytest.mark.parametrize("written, method", [("METHOD=0", "FO"), ("METHOD=ZERO", "FO"), ("METHOD=1", "FOCE"),
                                             ("METHOD=COND", "FOCE"), ("METHOD=1 INTERACTION", "FOCE-I"),
                                             ("METHOD=COND LAPLACE INTER", "LAPLACE-I"),
                                             ("METHOD=1 LAPLACE", "LAPLACE")])
def test_the_estimation_method_written_is_the_one_carried_out(pheno_dir, written, method):
    folder, text = pheno_dir
    (folder / "run.mod").write_text(text.replace("METHOD=1 INTERACTION", written))
    pm, ds = read_control_stream(folder / "run.mod")
    assert pm.recipe["estimation"] == method
    fit = fit_population(pm, ds, progress=False, pooled_start=False, covariance=False)   # as the file asks
    assert fit.estimation.method == method
    theta, omega, sd = fit.theta.tensors(), fit.omega.tensor(), fit.sigma.sd_tensors()
    prob = Problem(pm, ds, estimation=method)
    eta = prob.ebe(theta, torch.linalg.inv(omega), sd, torch.zeros(ds.n_subjects, pm.n_eta, dtype=torch.float64))
    assert fit.estimation.ofv == pytest.approx(float(prob.ofv(theta, omega, sd, eta).detach()), abs=1e-6)


def test_fix_on_omega_and_sigma_holds_them_at_their_values(pheno_dir):
    """$OMEGA ... FIX and $SIGMA ... FIX: those stay where the control stream puts them (no standard error),
    the other parameters are estimated: the OFV's gradient in them is 0 at the estimates, and the OFV is above
    NONMEM's unrestricted minimum (586.276)."""
    from hybridpk.population.fit import Packing

    folder, text = pheno_dir
    changed = text.replace("$OMEGA  0.031128 ; IIV_VC", "$OMEGA  0.05 FIX ; IIV_VC").replace(
        "$SIGMA  0.0130865", "$SIGMA  0.02 FIX")
    (folder / "run.mod").write_text(changed)
    pm, ds = read_control_stream(folder / "run.mod")
    assert pm.omega_fixed == (1,) and pm.sigma_fixed == ("PROP",)
    res = fit_population(pm, ds, progress=False, pooled_start=False)
    assert res.omega["ETA_VC"].variance == pytest.approx(0.05, rel=1e-12)
    assert res.sigma.to_dict()["SIGMA"]["variance"] == pytest.approx(0.02, rel=1e-12)
    assert res.omega["ETA_CL"].variance != pytest.approx(0.0309626, rel=1e-3)        # the free one moved
    assert res.omega.se[1][1] is None and res.sigma.to_dict()["SIGMA"]["se"] is None
    assert res.omega.se[0][0] is not None and all(t.se is not None for t in res.theta)
    assert res.estimation.converged and res.estimation.ofv > 586.276
    # optimality in the free parameters alone: a central-difference gradient of the OFV at the estimates
    pack = Packing(pm)
    x_hat = pack.x0({t.name: t.value for t in res.theta})
    x_hat[3] = math.log(res.omega["ETA_CL"].variance)           # the free OMEGA (log variance)
    assert len(x_hat) == 4                                      # 3 THETAs + 1 OMEGA: nothing else estimated
    prob = Problem(pm, ds)

    def ofv(x):
        th, om, sd = pack.unpack(torch.tensor(x, dtype=torch.float64))
        eta = prob.ebe(th, torch.linalg.inv(om), sd, torch.tensor(res.estimation.individual[["ETA_CL", "ETA_VC"]]
                                                                    .to_numpy()))
        return float(prob.ofv(th, om, sd, eta).detach())

    assert ofv(x_hat) == pytest.approx(res.estimation.ofv, abs=1e-6)
    for i in range(4):
        h = np.zeros(4)
        h[i] = 1e-4
        assert abs(ofv(x_hat + h) - ofv(x_hat - h)) / 2e-4 < 0.05


#: NONMEM 7's OFV for pheno.mod at its initial estimates ("0ITERATION NO.: 0 OBJECTIVE VALUE:" in pharmpy's
#: bundled pheno.lst): what MAXEVAL=0 reports
PHENO_OFV_AT_INITS = 587.366441346616


def test_maxeval_0_evaluates_the_ofv_and_ebes_at_the_initial_estimates_as_nonmem(pheno_dir, tmp_path, capsys):
    import json

    from hybridpk.cli import main

    folder, text = pheno_dir
    (folder / "run.mod").write_text(text.replace("MAXEVALS=99999", "MAXEVAL=0"))
    pm, ds = read_control_stream(folder / "run.mod")
    assert pm.recipe["evaluate"] and pm.recipe["estimation"] == "FOCE-I"
    res = fit_population(pm, ds, progress=False, covariance=False)     # pooled_start is not applied either
    e = res.estimation
    assert e.evaluation_only and e.iterations == 0 and not e.converged and "MAXEVAL=0" in e.message
    assert e.ofv == pytest.approx(PHENO_OFV_AT_INITS, abs=1e-4)
    assert [t.value for t in res.theta] == pytest.approx([0.00469307, 1.00916, 0.1], rel=1e-12)   # nothing moved
    assert res.sigma.to_dict()["SIGMA"]["variance"] == pytest.approx(0.0130865, rel=1e-12)
    assert (e.individual["ETA_CL"].abs() > 0).all()                                # POSTHOC EBEs
    # the same from the CLI, on the control stream as written (MAXEVALS=99999) with --evaluate
    (folder / "orig.mod").write_text(text)
    rc = main(["fit", str(folder / "orig.mod"), "--evaluate", "--no-covariance", "--quiet", "--out",
               str(tmp_path / "ev")])
    out = capsys.readouterr().out
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert rc == 0 and "evaluation (MAXEVAL=0" in out and s["evaluation_only"] is True
    assert s["ofv"] == pytest.approx(PHENO_OFV_AT_INITS, abs=1e-4) and s["iterations"] == 0


PRIOR = ("$PRIOR NWPRI\n$THETAP (0.0047 FIX) (1.0 FIX) (0.1 FIX)\n$THETAPV BLOCK(3) FIX 0.01 0 0.01 0 0 0.01\n"
         "$OMEGAP 0.03 FIX 0.03 FIX\n$OMEGAPD (10 FIX) (10 FIX)\n")


@pytest.mark.parametrize("before_est, option, named", [
    (PRIOR, "", r"\$PRIOR \(a prior on THETA"),
    ("$MIX\nNSPOP=2\nP(1)=0.5\nP(2)=0.5\n", "", r"\$MIX \(a mixture model"),
    ("$LEVEL ID=(1[2])\n", "", r"\$LEVEL \(nested levels"),
    ("", " CENT", r"\$ESTIMATION CENT \(the centered FOCE"),
    ("", " LAPLACE LIKELIHOOD", r"\$ESTIMATION LIKELIHOOD \(Y as the likelihood"),
    ("", " -2LL", r"\$ESTIMATION -2LL \(Y as -2 log likelihood")],
    ids=["PRIOR", "MIX", "LEVEL", "CENTERING", "LIKELIHOOD", "-2LL"])
def test_records_that_change_the_ofv_are_refused_by_line(pheno_dir, before_est, option, named):
    """pharmpy reads $PRIOR NWPRI (with $THETAP ...), $MIX and $LEVEL, and $ESTIMATION CENTERING or LIKELIHOOD, and
    hybridpk fitted pheno without them (its own FOCE-I, Y as a prediction): a prior, a mixture, nested random effects
    and the likelihood as Y were left out without a word. Each is refused by its line."""
    folder, text = pheno_dir
    text = text.replace("$ESTIMATION METHOD=1 INTERACTION", before_est + "$ESTIMATION METHOD=1 INTERACTION" + option)
    (folder / "run.mod").write_text(text)
    marker = before_est.splitlines()[0] if before_est else "$ESTIMATION"
    line = next(i for i, s in enumerate(text.splitlines(), 1) if s.startswith(marker))
    with pytest.raises(ModelError, match=rf"run.mod line {line}: {named}.* is not supported"):
        read_control_stream(folder / "run.mod")
    without = text.replace(before_est + "$ESTIMATION METHOD=1 INTERACTION" + option,
                           "$ESTIMATION METHOD=1 INTERACTION NOCENTERING")
    (folder / "run.mod").write_text(without)
    read_control_stream(folder / "run.mod")          # the same stream without them (NOCENTERING: the default)


@pytest.mark.parametrize("omega", ["$OMEGA BLOCK(2) VALUES(0.031,0.005)", "$OMEGA IIV_CL=0.031 IIV_VC=0.031"],
                         ids=["VALUES", "labels"])
def test_nonmem_74_forms_pharmpy_cannot_read_are_named_by_line(pheno_dir, omega):
    """NONMEM 7.4's BLOCK(n) VALUES(diag,odiag) and label=value, which pharmpy's parser does not read: the error said
    "at line 1 col 13" (within the record); it names the control stream's line and how to write the record."""
    folder, text = pheno_dir
    text = text.replace(OMEGAS, omega)
    (folder / "run.mod").write_text(text)
    line = text.splitlines().index(omega) + 1
    with pytest.raises(HybridPKError, match=rf"pharmpy could not read run.mod line {line}: (.|\n)*as NONMEM 7.3 "
                                            r"writes them: write a label as a comment"):
        read_control_stream(folder / "run.mod")


@pytest.mark.parametrize("omega", ["$OMEGA  0.0309626 ; IIV_CL\n$OMEGA SD 0.176 ; IIV_VC",
                                   "$OMEGA DIAGONAL(2) STANDARD 0.176 0.176"], ids=["second record", "DIAGONAL"])
def test_an_option_before_a_value_is_named_by_line_with_nonmems_forms(pheno_dir, omega):
    """$OMEGA SD 0.176 (an option before a single value, outside parentheses; the forms of NONMEM's help are "init
    options", "(init options)", "(options init)") is refused by pharmpy's parser with a token at a line and column
    of the record ("at line 1, column 5"). The error names the control stream's line (the second of two $OMEGA
    records: the column counts from after the record's name) and the forms that are read; those read."""
    folder, text = pheno_dir
    bad = text.replace(OMEGAS, omega)
    (folder / "run.mod").write_text(bad)
    line = bad.splitlines().index(omega.splitlines()[-1]) + 1
    with pytest.raises(HybridPKError, match=rf"pharmpy could not read run.mod line {line}: (.|\n)*written after it or "
                                            r"inside its parentheses, as NONMEM's help lists them: \$OMEGA 0.176 SD or "
                                            r"\$OMEGA \(SD 0.176\)"):
        read_control_stream(folder / "run.mod")
    for good in ("0.176 SD", "(SD 0.176)"):
        (folder / "run.mod").write_text(text.replace(OMEGAS, f"$OMEGA  0.0309626 ; IIV_CL\n$OMEGA {good}"))
        pm, _ = read_control_stream(folder / "run.mod")
        assert pm.omega_init[1] == pytest.approx(0.176 ** 2)    # diagonal: the variances


@pytest.mark.parametrize("option, named", [("RECORDS=100", "RECORDS"), ("TRANSLATE=(TIME/24)", "TRANSLATE"),
                                            ("CHECKOUT", "CHECKOUT"), ("REC=100", "REC")])
def test_data_options_that_change_the_records_are_refused_by_line(pheno_dir, option, named):
    """$DATA RECORDS=n (only the first n records), TRANSLATE=(TIME/24) (hours read as days) and CHECKOUT (no
    estimation): pharmpy reads past them, and hybridpk fitted all 744 records in hours. Refused by line; a data file
    whose name begins like an option is still read."""
    folder, text = pheno_dir
    (folder / "run.mod").write_text(text.replace("$DATA pheno.dta IGNORE=@", f"$DATA pheno.dta IGNORE=@ {option}"))
    with pytest.raises(ModelError, match=rf"run.mod line 2: \$DATA {named} \(.*\) is not supported"):
        read_control_stream(folder / "run.mod")
    shutil.copy(folder / "pheno.dta", folder / "checkout.dta")
    (folder / "run.mod").write_text(text.replace("$DATA pheno.dta", "$DATA checkout.dta"))
    assert read_control_stream(folder / "run.mod")[1].n_subjects == 59


def test_a_simulation_only_stream_is_not_fitted(pheno_dir):
    """$SIMULATION (12345) ONLYSIM: NONMEM simulates and does not estimate; hybridpk fitted it. Reading it is fine
    (its model), fitting it is refused by the $SIMULATION line."""
    folder, text = pheno_dir
    text = text.replace("$ESTIMATION", "$SIMULATION (12345) ONLYSIM\n$ESTIMATION")
    (folder / "run.mod").write_text(text)
    pm, ds = read_control_stream(folder / "run.mod")
    line = text.splitlines().index("$SIMULATION (12345) ONLYSIM") + 1
    with pytest.raises(ModelError, match=rf"run.mod line {line}: \$SIMULATION ONLYSIMULATION asks NONMEM to simulate"):
        fit_population(pm, ds, progress=False)


CARRIED = "IF (AMT.GT.0) TDOS = TIME\nTAD = TIME - TDOS\n"


@pytest.mark.parametrize("where, old, new", [
    ("$ERROR", "Y = F + F*EPS(1)", CARRIED + "W = F\nIF (TAD.GT.1000) W = 2*F\nY = F + W*EPS(1)"),
    ("$ERROR", "Y = F + F*EPS(1)", CARRIED + "Y = F + F*(1 + 0.001*TAD)*EPS(1)"),
    ("$PK", "CL = TVCL*EXP(ETA_CL)", CARRIED + "CL = TVCL*EXP(ETA_CL)*(1 + 0.001*TAD)"),
    ("table", "Y = F + F*EPS(1)", CARRIED + "Y = F + F*EPS(1)")],
    ids=["ERROR-IF", "ERROR", "PK", "table-only"])
def test_a_value_carried_from_an_earlier_record_is_refused_where_the_model_reads_it(pheno_dir, where, old, new):
    """IF (AMT.GT.0) TDOS = TIME (no ELSE): NONMEM carries TDOS from the last dose record; pharmpy writes it as
    forward(TIME, AMT > 0). Y reading it through an IF stopped the import with sympy's TypeError ('Invalid comparison
    of non-real'), without the IF with 'reads a compartment amount', and $PK with 'reads the data item AMT'. Now each
    is refused by TDOS's line; a TAD that only a $TABLE would read changes no prediction and is read."""
    folder, text = pheno_dir
    text = text.replace(old, new)
    (folder / "run.mod").write_text(text)
    if where == "table":
        read_control_stream(folder / "run.mod")
        return
    line = text.splitlines().index("IF (AMT.GT.0) TDOS = TIME") + 1
    with pytest.raises(ModelError, match=rf"run.mod line {line}: TDOS is assigned under an IF without ELSE.*"
                                         rf"and {'Y' if where == '$ERROR' else 'the model'} reads it"):
        read_control_stream(folder / "run.mod")


def test_a_value_at_each_subjects_first_record_is_read_as_a_baseline_covariate(pheno_dir):
    """IF (NEWIND.NE.2) WT0 = WGT (NONMEM's idiom for a baseline covariate: NEWIND is 2 except at an individual's
    first record, and WT0 keeps the value; pharmpy: first(WGT, ID)) was refused ('$PK reads the data item ID'). With
    pheno's weight growing 1% a day, the stream is the model reading a baseline column computed here with pandas (the
    same OFV at the initial estimates, MAXEVAL=0, with its EBEs), not the model reading the weight at every record."""
    folder, text = pheno_dir
    df = pd.read_csv(folder / "pheno.dta", sep=r"\s+")
    df["WGT"] = df["WGT"] * (1 + 0.01 * df["TIME"] / 24)
    df["WT0"] = df.groupby("ID", sort=False)["WGT"].transform("first")
    df.to_csv(folder / "grow.csv", index=False)
    text = text.replace("$DATA pheno.dta IGNORE=@", "$DATA grow.csv IGNORE=@").replace(
        "$INPUT ID TIME AMT WGT APGR DV FA1 FA2", "$INPUT ID TIME AMT WGT APGR DV FA1 FA2 WT0").replace(
        "MAXEVALS=99999", "MAXEVAL=0")
    newind = text.replace("TVCL = THETA(1)*WGT", "IF (NEWIND.NE.2) WTB = WGT\nTVCL = THETA(1)*WTB")
    column = text.replace("TVCL = THETA(1)*WGT", "TVCL = THETA(1)*WT0")
    ofv = {}
    for name, stream in (("newind", newind), ("column", column), ("every record", text)):
        (folder / "run.mod").write_text(stream)
        pm, ds = read_control_stream(folder / "run.mod")
        assert "FIRST_WGT" in pm.covariates if name == "newind" else True
        ofv[name] = fit_population(pm, ds, progress=False, covariance=False).estimation.ofv
    assert ofv["newind"] == pytest.approx(ofv["column"], abs=1e-8)
    assert abs(ofv["newind"] - ofv["every record"]) > 1.0
    with pytest.raises(DatasetError, match="FIRST_WGT is each subject's first record's WGT"):
        ds.require_covariates(["FIRST_WGT"])      # new data for the fitted stream: says what the column is


def test_a_full_omega_block_is_estimated_as_a_block(pheno_dir):
    folder, text = pheno_dir
    block = "$OMEGA BLOCK(2) 0.0309626 ; IIV_CL\n 0.005 0.031128 ; IIV_VC"
    (folder / "run.mod").write_text(text.replace(OMEGAS, block))
    pm, ds = read_control_stream(folder / "run.mod")
    assert pm.omega_block and pm.omega_init == ((0.0309626, 0.005), (0.005, 0.031128))
    assert [t.name for t in pm.thetas] == ["POP_CL", "POP_VC", "COVAPGR"]       # the covariance is no THETA
    res = fit_population(pm, ds, progress=False, pooled_start=False, covariance=False)
    assert res.omega.block and res.omega.covariance("ETA_CL", "ETA_VC") != 0.0
    assert res.estimation.ofv < 586.276 - 1.0          # NONMEM's diagonal OFV: the covariance is supported


def test_an_imported_block_has_the_ofv_of_the_native_block_model(tmp_path, theoph_path):
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    block = THEO_TRANS2.replace("$OMEGA 0.4\n$OMEGA 0.07\n$OMEGA 0.02", "$OMEGA BLOCK(3) 0.4 0.01 0.07 -0.01 0.02 0.02")
    (tmp_path / "run.mod").write_text(block)
    pm_nm, ds_nm = read_control_stream(tmp_path / "run.mod")
    ds = hp.read_nonmem(theoph_path)
    native = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="additive", data=ds, omega_block=True)
    omega = torch.tensor([[0.4, 0.01, -0.01], [0.01, 0.07, 0.02], [-0.01, 0.02, 0.02]], dtype=torch.float64)
    assert torch.equal(torch.tensor(pm_nm.omega_init, dtype=torch.float64), omega)
    sd = {"ADD": torch.tensor(math.sqrt(0.5), dtype=torch.float64)}

    def ofv(pm, data, theta):
        prob = Problem(pm, data)
        th = {k: torch.tensor(v, dtype=torch.float64) for k, v in theta.items()}
        eta = prob.ebe(th, torch.linalg.inv(omega), sd, torch.zeros(data.n_subjects, 3, dtype=torch.float64))
        return float(prob.ofv(th, omega, sd, eta).detach())

    a = ofv(pm_nm, ds_nm, {"POP_KA": 1.5, "POP_CL": 2.8, "POP_V": 32.0})
    b = ofv(native, ds, {"KA": 1.5, "CL": 2.8, "V": 32.0})
    assert a == pytest.approx(b, abs=1e-6)


def _banded_population(folder):
    """60 simulated patients (1cmt_oral, additive error) whose ETAs of KA and CL correlate (0.4), CL and V (0.5),
    KA and V not, written for THEO_TRANS2's $INPUT."""
    design = hp.make_design(60, [dict(TIME=0, AMT=320, CMT=1)], [0.25, 0.5, 1, 2, 3.5, 5, 7, 9, 12, 24], jitter=0.1,
                            seed=1)
    sim = hp.simulate_population("1cmt_oral", design, {"KA": 1.5, "CL": 2.8, "V": 32.0},
                                 {"KA": 0.16, "CL": 0.09, "V": 0.04}, additive=0.3, seed=1,
                                 correlation={("KA", "CL"): 0.4, ("CL", "V"): 0.5})
    df = sim.dataset.to_dataframe().assign(WT=70.0)
    df["CMT"] = np.where(df.EVID == 1, 1, 2)
    df[["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "WT"]].to_csv(folder / "theoph.csv", index=False)


BAND = "$OMEGA BLOCK(3) 0.2 0.01 0.1 0 0.02 0.05"


def test_a_banded_omega_block_holds_its_zero_covariance_at_0(tmp_path, capsys):
    """$OMEGA BLOCK(3) with the covariance of ETA(1) and ETA(3) given as 0: NONMEM holds it at 0 (a banded OMEGA,
    nmusers 2001); pharmpy reads it as a covariance to estimate from 0, and hybridpk fitted the full block (OFV
    -178.008 here instead of -177.480). Now it stays exactly 0, and the fit is the band's optimum, checked without
    hybridpk's parametrisation: the OFV (EBEs searched again) has central differences in each estimated element of
    OMEGA, with THETA and SIGMA at the fit, below 1e-4 (scaled by the element's sqrt(w_ii w_jj)), but not in the held
    one; and the OFV lies between the full block's and the blocks without the covariance of ETA(2) and ETA(3)."""
    _banded_population(tmp_path)
    fits = {}
    for name, omega in [("band", BAND), ("full", BAND.replace(" 0 ", " 0.01 ")),
                        ("apart", "$OMEGA 0.2\n$OMEGA BLOCK(2) 0.1 0.02 0.05")]:
        (tmp_path / f"{name}.mod").write_text(THEO_TRANS2.replace("$OMEGA 0.4\n$OMEGA 0.07\n$OMEGA 0.02", omega)
                                              .replace("$SIGMA 0.5", "$SIGMA 0.1"))
        pm, ds = read_control_stream(tmp_path / f"{name}.mod")
        fits[name] = fit_population(pm, ds, progress=False, covariance=False)
    pm, ds = read_control_stream(tmp_path / "band.mod")
    assert pm.omega_zeros == ((2, 0),)
    band = fits["band"]
    omega = torch.tensor(band.omega.matrix, dtype=torch.float64)
    assert float(omega[2, 0]) == 0.0 and float(omega[1, 0]) > 0.01 and float(omega[2, 1]) > 0.005
    assert fits["full"].estimation.ofv < band.estimation.ofv - 0.1 < fits["apart"].estimation.ofv - 1.0
    prob = Problem(pm, ds)
    theta = {t.name: torch.tensor(t.value, dtype=torch.float64) for t in band.theta}
    sd = {r.kind: torch.tensor(r.sd, dtype=torch.float64) for r in band.sigma.rows}

    def ofv(om):
        eta = prob.ebe(theta, torch.linalg.inv(om), sd, torch.zeros(ds.n_subjects, 3, dtype=torch.float64))
        return float(prob.ofv(theta, om, sd, eta).detach())

    assert ofv(omega) == pytest.approx(band.estimation.ofv, abs=1e-6)
    slopes = {}
    for r, c in [(0, 0), (1, 1), (2, 2), (1, 0), (2, 1), (2, 0)]:
        scale = float(omega[r, r] * omega[c, c]) ** 0.5
        step = torch.zeros(3, 3, dtype=torch.float64)
        step[r, c] = step[c, r] = 1e-4 * scale
        slopes[r, c] = (ofv(omega + step) - ofv(omega - step)) / 2e-4
    assert max(abs(v) for k, v in slopes.items() if k != (2, 0)) < 1e-4
    assert abs(slopes[2, 0]) > 1.0                     # the zero is held, not found
    # the command: the printout says which covariance is held, the saved run reads back with it
    from hybridpk.cli import main

    assert main(["fit", str(tmp_path / "band.mod"), "--out", str(tmp_path / "run")]) == 0
    assert "COV(ETA_1,ETA_3)            0   (held at 0: a banded block" in capsys.readouterr().out
    run = hp.load_run(tmp_path / "run")
    assert run.model.omega_zeros == ((2, 0),) and run.omega.matrix[2][0] == 0.0


@pytest.mark.parametrize("fixed", [False, True], ids=["estimated", "FIX"])
def test_a_zero_after_an_estimated_covariance_is_refused_by_its_line(tmp_path, theoph_path, fixed):
    """A 0 that does not lead its row (ETA(3) with ETA(1) estimated, with ETA(2) held at 0) has no banded Cholesky
    factor: refused, by the block's line and the pair; the same block FIX (every element held) is read as written."""
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    block = "$OMEGA BLOCK(3) 0.4 0.01 0.07 0.01 0 0.02" + (" FIX" if fixed else "")
    text = THEO_TRANS2.replace("$OMEGA 0.4\n$OMEGA 0.07\n$OMEGA 0.02", block)
    (tmp_path / "run.mod").write_text(text)
    if fixed:
        pm, _ = read_control_stream(tmp_path / "run.mod")
        assert pm.omega_init[2][1] == 0.0 and pm.omega_fixed == (0, 1, 2) and pm.omega_zeros == ()
        return
    line = text.splitlines().index(block) + 1
    with pytest.raises(ModelError, match=rf"run.mod line {line}: .*BLOCK\(3\).* ETA\(2\) and ETA\(3\) as 0.*band"):
        read_control_stream(tmp_path / "run.mod")


def test_a_partial_omega_block_is_estimated_as_written(tmp_path, theoph_path):
    """$OMEGA BLOCK(2) on KA, CL beside a diagonal $OMEGA on V: the block's covariance is estimated and V's
    ETA stays uncorrelated; the same OFV as the native model with the same blocks."""
    from hybridpk.population.fit import Packing

    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    (tmp_path / "run.mod").write_text(THEO_TRANS2.replace("$OMEGA 0.4\n$OMEGA 0.07", "$OMEGA BLOCK(2) 0.4 0.01 0.07"))
    pm, data = read_control_stream(tmp_path / "run.mod")
    assert pm.blocks == ((0, 1), (2,)) and pm.omega_init == ((0.4, 0.01, 0.0), (0.01, 0.07, 0.0), (0.0, 0.0, 0.02))
    pack = Packing(pm)
    _, omega, _ = pack.unpack(torch.tensor(pack.x0(), dtype=torch.float64))
    torch.testing.assert_close(omega, torch.tensor(pm.omega_init, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    ds = hp.read_nonmem(theoph_path)
    native = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="additive", data=ds, omega_block=[["KA", "CL"]])
    assert native.blocks == pm.blocks
    sd = {"ADD": torch.tensor(math.sqrt(0.5), dtype=torch.float64)}
    om = torch.tensor(pm.omega_init, dtype=torch.float64)

    def ofv(model, d, theta):
        prob = Problem(model, d)
        th = {k: torch.tensor(v, dtype=torch.float64) for k, v in theta.items()}
        eta = prob.ebe(th, torch.linalg.inv(om), sd, torch.zeros(d.n_subjects, 3, dtype=torch.float64))
        return float(prob.ofv(th, om, sd, eta).detach())

    assert ofv(pm, data, {"POP_KA": 1.5, "POP_CL": 2.8, "POP_V": 32.0}) == pytest.approx(
        ofv(native, ds, {"KA": 1.5, "CL": 2.8, "V": 32.0}), abs=1e-6)
    res = fit_population(pm, data, progress=False, pooled_start=False, covariance=False)
    assert res.omega.blocks == ((0, 1), (2,)) and set(res.omega.covariances_to_dict()) == {"ETA_1,ETA_2"}
    assert res.omega.covariance("ETA_1", "ETA_3") == 0.0 and res.estimation.converged


TV_MOD = """$PROBLEM weight that changes in time
$INPUT ID TIME DV AMT EVID MDV WT
$DATA tv.csv IGNORE=@
$SUBROUTINE ADVAN1 TRANS2
$PK
CL = THETA(1)*(WT/70)**THETA(3)*EXP(ETA(1))
V = THETA(2)*EXP(ETA(2))
S1 = V
$ERROR
Y = F + F*EPS(1)
$THETA (0, 3.0) ; POP_CL
$THETA (0, 30.0) ; POP_V
$THETA 0.75 ; POP_CL_WT
$OMEGA 0.09
$OMEGA 0.09
$SIGMA 0.01
"""


def _tv_data():
    """IV bolus; WT measured at every record, changing from 6 h in subjects 1-3 (a weight that doubles, so the
    rule matters)."""
    rows = []
    for i in range(1, 7):
        rows.append({"ID": i, "TIME": 0.0, "DV": 0.0, "AMT": 100.0, "EVID": 1, "MDV": 1, "WT": 70.0})
        for t, c in ((1, 3.0), (2, 2.8), (4, 2.4), (8, 1.6), (12, 1.1), (24, 0.4)):
            wt = 140.0 if (i <= 3 and t >= 6) else 70.0
            rows.append({"ID": i, "TIME": float(t), "DV": c * (1 + 0.05 * i), "AMT": 0.0, "EVID": 0, "MDV": 0,
                         "WT": wt})
    return pd.DataFrame(rows)


def _bolus_by_rule(df, cl70, v, rule):
    """Concentrations of the IV bolus model, CL = cl70 (WT/70)^0.75, by hand: each interval between records
    with the later record's WT ("nonmem") or the earlier one's ("locf")."""
    out = []
    for _, d in df.groupby("ID", sort=False):
        a, t_prev, wt_prev = 0.0, 0.0, None
        for _, r in d.iterrows():
            wt = r.WT if rule == "nonmem" or wt_prev is None else wt_prev
            a *= np.exp(-cl70 * (wt / 70) ** 0.75 / v * (r.TIME - t_prev))
            a += r.AMT
            t_prev, wt_prev = r.TIME, r.WT
            out.append(a / v)
    return np.array(out)


@pytest.mark.parametrize("rule", ["nonmem", "locf"])
def test_a_covariate_that_changes_in_time_acts_record_by_record(tmp_path, rule):
    """A weight recorded on every record and changing within subjects: the native model follows it record by
    record by NONMEM's rule (default) or LOCF, as the hand computation does; NONMEM's rule gives the OFV of the
    same model written as a control stream."""
    df = _tv_data()
    ds = hp.read_nonmem(df)
    pm = build_model("1cmt_iv", iiv=["CL", "V"], covariates=["CL~WT:power:70:0.75"], data=ds, time_varying=rule)
    prob = Problem(pm, ds)
    theta = {"CL": torch.tensor(3.0, dtype=torch.float64), "V": torch.tensor(30.0, dtype=torch.float64)}
    pred = prob.batch.to_rows(prob.predict(theta, torch.zeros(6, 2, dtype=torch.float64)))
    np.testing.assert_allclose(pred, _bolus_by_rule(df, 3.0, 30.0, rule), rtol=1e-9)
    other = _bolus_by_rule(df, 3.0, 30.0, "locf" if rule == "nonmem" else "nonmem")
    assert np.abs(pred - other).max() > 0.05                                      # the rule matters here
    res = fit_population(pm, ds, progress=False, covariance=False)
    assert res.estimation.converged
    if rule == "nonmem":
        df.to_csv(tmp_path / "tv.csv", index=False)
        (tmp_path / "tv.mod").write_text(TV_MOD.replace("$THETA 0.75 ; POP_CL_WT", "$THETA 0.75 FIX ; POP_CL_WT"))
        nm, nm_ds = read_control_stream(tmp_path / "tv.mod")
        assert nm.record_items == ("WT",)
        values = res.theta.to_dict()
        th = {"CL": values["CL"]["estimate"], "V": values["V"]["estimate"], "CL_WT": 0.75}
        om = res.omega.tensor()
        sd = {"PROP": torch.tensor(res.sigma["PROP"].sd, dtype=torch.float64)}

        def ofv(model, data, names):
            prob = Problem(model, data)
            t = {n: torch.tensor(th[k], dtype=torch.float64) for n, k in names.items()}
            eta = prob.ebe(t, torch.linalg.inv(om), sd, torch.zeros(6, 2, dtype=torch.float64), tol=1e-12)
            return float(prob.ofv(t, om, sd, eta).detach())

        assert ofv(nm, nm_ds, {"POP_CL": "CL", "POP_V": "V", "POP_CL_WT": "CL_WT"}) == pytest.approx(
            res.estimation.ofv, abs=1e-6)


def test_dosing_follows_a_covariate_that_changes_and_carries_the_last_value_forward(tmp_path):
    df = pd.DataFrame({"ID": [1, 1, 1, 2, 2], "TIME": [0, 1, 2, 0, 1], "DV": [0, 1.5, 2, 0, 1],
                       "AMT": [100, 0, 0, 100, 0], "WT": [70, 70, 72, 60, 60]})
    ds = hp.read_nonmem(df)
    with pytest.raises(DatasetError, match="row 3, column WT"):
        hp.simulate_population("1cmt_iv", ds, {"CL": 3.0, "V": 30.0}, covariates={"CL": ("WT", 70.0, 0.75)})
    pm = build_model("1cmt_iv", iiv=["CL"], covariates=["CL~WT:power:70"], data=ds)
    fitted = hp.population.FittedPopulation.from_values(pm, {"CL": 3.0, "V": 30.0, "CL_WT": 0.75}, [[0.09]],
                                                        {"PROP": 0.1})
    post = hp.estimate_patient(fitted, ds.subset([1]))
    assert any("WT changes within the patient's records (70 to 72)" in w and "last one (WT = 72 at 2 h)" in w
               for w in post.warnings)
    assert post.parameters()["CL"]["map"] == pytest.approx(
        3.0 * (72 / 70) ** 0.75 * math.exp(float(post.estimate.eta[0, 0])), rel=1e-9)   # the regimen ahead: WT 72
    ahead = ds.subset([1]).to_batch(covariates=["WT"]).extend(None, [5.0, 8.0])   # a forecast's records
    assert ahead.cov[0, -2:, 0].tolist() == [72.0, 72.0]
    with pytest.raises(DatasetError, match="row 2, column DV: infinite value"):
        hp.read_nonmem(df.assign(DV=[0, np.inf, 2, 0, 1]))


@pytest.mark.slow
def test_a_tiny_initial_sigma_does_not_crash_the_ebe_step(pheno_dir):
    """Two outer iterations from $SIGMA 1E-7 reach ETAs where the EBE Hessians are singular (this raised
    torch's _LinAlgError before; 20 s). The mechanism itself is checked fast below."""
    folder, text = pheno_dir
    (folder / "run.mod").write_text(text.replace("$SIGMA  0.0130865", "$SIGMA  1E-7"))
    pm, ds = read_control_stream(folder / "run.mod")
    with pytest.warns(hp.population.ConvergenceWarning):      # two iterations from SIGMA 1e-7: not converged
        res = fit_population(pm, ds, progress=False, pooled_start=False, covariance=False, maxiter=2)
    assert res.estimation.ebe_fallbacks > 0 and any("singular Hessian" in w for w in res.estimation.warnings)
    assert np.isfinite(res.estimation.individual.filter(like="ETA").to_numpy()).all()


def test_the_newton_direction_falls_back_to_a_bounded_gradient_step(theoph_path):
    ds = hp.read_nonmem(theoph_path)
    prob = Problem(build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="additive", data=ds), ds)
    hess = torch.stack([torch.eye(3) * 2.0, torch.zeros(3, 3), torch.full((3, 3), float("nan"))]).double()
    grad = torch.tensor([[2.0, 4.0, 6.0], [10.0, -20.0, 5.0], [1.0, 0.5, 0.0]], dtype=torch.float64)
    step = prob._direction(hess, grad)
    torch.testing.assert_close(step[0], grad[0] / 2.0)                       # Newton where H is fine
    torch.testing.assert_close(step[1], grad[1] / 20.0)                      # gradient, at most 1 per ETA
    torch.testing.assert_close(step[2], grad[2])                             # |g| <= 1 already
    assert prob.fallback_steps == 2


def test_the_cli_fits_by_the_method_asked_and_refuses_a_conflict_with_the_control_stream(pheno_dir, tmp_path,
                                                                                          capsys):
    import json

    from hybridpk.cli import main

    rc = main(["fit", "theoph", "--model", "1cmt_oral", "--error", "additive", "--method", "fo", "--no-covariance",
               "--quiet", "--out", str(tmp_path / "fo")])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("FO fit of 12 subjects")
    assert json.loads((tmp_path / "fo" / "summary.json").read_text())["method"] == "FO"
    folder, text = pheno_dir
    (folder / "run.mod").write_text(text.replace("METHOD=1 INTERACTION", "METHOD=0"))
    rc = main(["fit", str(folder / "run.mod"), "--method", "FOCE-I", "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert rc == 2 and "asks for FO" in err and not (tmp_path / "never").exists()


# ---------------------------------------------------------------- structures as NONMEM's TRANSn define them
TWO_CMT = """$PROBLEM two compartments, IV
$INPUT ID TIME AMT DV EVID MDV
$DATA two.csv IGNORE=@
$SUBROUTINE ADVAN3 {trans}
$PK
{pk}
$ERROR
Y = F + F*EPS(1)
{thetas}
$OMEGA 0.05
$SIGMA 0.02
"""
#: CL 3, V1 20, Q 5, V2 40 as NONMEM's TRANS1, 3, 4, 5, 6 write them (alpha, beta the roots of
#: l^2 - (k + k12 + k21) l + k k21; AOB from k21 = (AOB beta + alpha) / (AOB + 1))
_K, _K12, _K21 = 3 / 20, 5 / 20, 5 / 40
_ALPHA = 0.5 * ((_K + _K12 + _K21) + np.sqrt((_K + _K12 + _K21) ** 2 - 4 * _K * _K21))
_BETA = _K * _K21 / _ALPHA
TRANS_CASES = {
    "TRANS4": ("CL = THETA(1)*EXP(ETA(1))\nV1 = THETA(2)\nQ = THETA(3)\nV2 = THETA(4)\nS1 = V1", (3, 20, 5, 40)),
    "TRANS1": ("K = THETA(1)*EXP(ETA(1))\nK12 = THETA(2)\nK21 = THETA(3)\nS1 = THETA(4)", (_K, _K12, _K21, 20)),
    "TRANS3": ("CL = THETA(1)*EXP(ETA(1))\nV = THETA(2)\nQ = THETA(3)\nVSS = THETA(4)\nS1 = V", (3, 20, 5, 60)),
    "TRANS5": ("AOB = THETA(1)\nALPHA = THETA(2)\nBETA = THETA(3)*EXP(ETA(1))\nS1 = THETA(4)",
               ((_ALPHA - _K21) / (_K21 - _BETA), _ALPHA, _BETA, 20)),
    "TRANS6": ("ALPHA = THETA(1)\nBETA = THETA(2)*EXP(ETA(1))\nK21 = THETA(3)\nS1 = THETA(4)",
               (_ALPHA, _BETA, _K21, 20)),
}


@pytest.fixture(scope="module")
def two_cmt_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    rng = np.random.default_rng(4)
    rows = []
    for i in range(1, 7):
        rows.append({"ID": i, "TIME": 0.0, "AMT": 100.0, "DV": 0.0, "EVID": 1, "MDV": 1})
        for t in (0.25, 1.0, 3.0, 8.0, 24.0):
            c = 100 / 20 * np.exp(-0.3 * t) + 0.5 * np.exp(-0.04 * t)
            rows.append({"ID": i, "TIME": t, "AMT": 0.0, "DV": c * np.exp(rng.normal(0, 0.2)), "EVID": 0, "MDV": 0})
    pd.DataFrame(rows).to_csv(folder / "two.csv", index=False)
    return folder


@pytest.mark.parametrize("trans", ["TRANS1", "TRANS3", "TRANS5", "TRANS6"])
def test_every_trans_of_advan3_gives_the_predictions_of_trans4(two_cmt_data, trans):
    """The same kinetics written with NONMEM's TRANS1/3/5/6 parameters: the same PRED and IPRED as TRANS4 (the
    ETA acts on a different parameter in TRANS5/6, so the comparison is at ETA = 0 there)."""
    preds = {}
    for t in ("TRANS4", trans):
        pk, values = TRANS_CASES[t]
        (two_cmt_data / f"{t}.mod").write_text(TWO_CMT.format(trans=t, pk=pk, thetas="\n".join(
            f"$THETA {float(v)!r}" for v in values)))
        pm, ds = read_control_stream(two_cmt_data / f"{t}.mod")
        prob = Problem(pm, ds)
        th = {x.name: torch.tensor(x.init, dtype=torch.float64) for x in pm.thetas}
        preds[t] = prob.predict(th, torch.zeros(ds.n_subjects, 1, dtype=torch.float64))
    assert float(preds["TRANS4"].abs().max()) > 1.0
    torch.testing.assert_close(preds[trans], preds["TRANS4"], rtol=1e-10, atol=1e-12)


def test_trans1_without_a_scale_predicts_amounts_as_nonmem_does(tmp_path, theoph_path):
    """NONMEM's default scale is 1 (F = the amount): TRANS1 without S2 predicts amounts, i.e. the concentrations
    of a volume of 1."""
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    no_scale = THEO_TRANS2.replace("ADVAN2 TRANS2", "ADVAN2 TRANS1").replace("S2 = V", "K = CL/V")
    (tmp_path / "run.mod").write_text(no_scale)
    pm, ds = read_control_stream(tmp_path / "run.mod")
    p = pm.individual({t.name: torch.tensor(t.init, dtype=torch.float64) for t in pm.thetas},
                      torch.zeros(ds.n_subjects, 3, dtype=torch.float64), {})
    assert torch.all(p["V"] == 1.0) and torch.allclose(p["CL"], torch.full_like(p["CL"], 2.8 / 32))


@pytest.mark.parametrize("old, new, construct", [
    ("S2 = V", "V2 = V", "no S2"),                            # TRANS2 without a scale: F is the amount
    ("KA = THETA(1)*EXP(ETA(1))", "KA = THETA(1)*EXP(ETA(1))\nIF (AMT.GT.0) KA = 2*KA", "data item AMT"),
    ("KA = THETA(1)*EXP(ETA(1))", "KA = THETA(1)*EXP(ETA(1))\nIF (WT.GT.100) KOLD = 2\nKA = KA*KOLD",
     "KOLD is assigned only under IF"),
    ("KA = THETA(1)*EXP(ETA(1))", "KA = THETA(1)*EXP(ETA(1))*KOLD", "reads KOLD before assigning"),
    ("Y = F + EPS(1)", "IPRED = A(1)/V\nY = IPRED + EPS(1)", "amount A_DEPOT"),
    ("Y = F + EPS(1)", "Y = LOG(2*F) + EPS(1)", "is log(2*F); hybridpk imports log-transform-both-sides"),
    ("Y = F + EPS(1)", "IPRED = 2*F\nY = IPRED + EPS(1)", "is 2*F, not F"),
    ("$SUBROUTINE ADVAN2 TRANS2", "$SUBROUTINE ADVAN2 TRANS4", "ADVAN2 TRANS4"),
])
def test_what_would_change_the_predictions_is_refused_by_name_and_line(tmp_path, theoph_path, old, new, construct):
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    assert old in THEO_TRANS2
    (tmp_path / "run.mod").write_text(THEO_TRANS2.replace(old, new))
    with pytest.raises(ModelError, match=rf"run.mod( line \d+)?: .*{re.escape(construct)}"):
        read_control_stream(tmp_path / "run.mod")


def test_error_written_on_the_amount_with_a_zero_guard_is_the_model_written_on_f(tmp_path, theoph_path):
    """$ERROR as NONMEM users write it: IPRED = A(2)/V, W guarded where IPRED = 0, Y = IPRED + W*EPS(1): the
    proportional model of Y = F + F*EPS(1), with the same OFV."""
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    on_f = THEO_TRANS2.replace("Y = F + EPS(1)", "Y = F + F*EPS(1)").replace("$SIGMA 0.5", "$SIGMA 0.04")
    on_amount = on_f.replace("Y = F + F*EPS(1)", "IPRED = A(2)/V\nW = IPRED\nIF (IPRED.EQ.0) W = 1E-16\n"
                                                 "Y = IPRED + W*EPS(1)")
    ofvs = []
    for name, text in (("f.mod", on_f), ("amount.mod", on_amount)):
        (tmp_path / name).write_text(text)
        pm, ds = read_control_stream(tmp_path / name)
        assert pm.error.kind == "proportional" and pm.error.prop == pytest.approx(0.2)
        ofvs.append(_ofv_at_inits(pm, ds))
    assert ofvs[0] == pytest.approx(ofvs[1], abs=1e-9)


def _ofv_at_inits(pm, ds):
    from hybridpk.population.fit import Packing

    pack = Packing(pm)
    prob = Problem(pm, ds)
    prob.obs = prob.obs & (prob.batch.time > 0)          # theoph's pre-dose levels have F = 0
    th, om, sd = pack.unpack(torch.tensor(pack.x0(), dtype=torch.float64))
    eta = prob.ebe(th, torch.linalg.inv(om), sd, torch.zeros(ds.n_subjects, pm.n_eta, dtype=torch.float64))
    return float(prob.ofv(th, om, sd, eta).detach())


@pytest.mark.parametrize("omegas", [OMEGAS, "$OMEGA BLOCK(2) 0.0309626 ; IIV_CL\n 0.005 0.031128 ; IIV_VC"],
                         ids=["diagonal", "block"])
def test_final_estimates_are_written_back_as_a_control_stream_that_reproduces_the_ofv(pheno_dir, tmp_path, omegas):
    """A fitted import written back (through pharmpy) with its estimates as initial estimates: read again and
    evaluated (MAXEVAL=0), it gives the fit's OFV; its other records are as written."""
    from hybridpk.population.nonmem import write_control_stream

    folder, text = pheno_dir
    (folder / "run.mod").write_text(text.replace(OMEGAS, omegas))
    pm, ds = read_control_stream(folder / "run.mod")
    res = fit_population(pm, ds, progress=False, covariance=False)
    (tmp_path / "final").mkdir()
    out = write_control_stream(res, tmp_path / "final" / "run_final.mod")
    written = out.read_text()
    assert "$ESTIMATION METHOD=1 INTERACTION" in written and "IF(APGR.LT.5)" in written
    assert f"{res.theta['POP_CL'].value:.6g}"[:5] in written
    pm2, ds2 = read_control_stream(out)
    again = fit_population(pm2, ds2, evaluate=True, progress=False, covariance=False)
    assert again.estimation.ofv == pytest.approx(res.estimation.ofv, abs=1e-4)
    np.testing.assert_allclose(again.omega.tensor().numpy(), res.omega.tensor().numpy(), rtol=1e-5)


def test_a_model_built_from_options_is_not_written_as_a_control_stream(theoph_path, tmp_path):
    from hybridpk.population.nonmem import write_control_stream

    ds = hp.read_nonmem(theoph_path)
    pm = build_model("1cmt_oral", data=ds)
    fitted = hp.population.FittedPopulation.from_values(pm, {"KA": 1.5, "CL": 2.8, "V": 32.0},
                                                        np.diag([0.09] * 3).tolist(), {"PROP": 0.1})
    with pytest.raises(ModelError, match="only a model imported from a NONMEM control stream"):
        write_control_stream(fitted, tmp_path / "x.mod")


@pytest.mark.parametrize("record, method", [("", "none"), ("$COVARIANCE", "sandwich"),
                                            ("$COV UNCONDITIONAL PRINT=E", "sandwich"), ("$COVARIANCE MATRIX=R", "R"),
                                            ("$COV MATRIX=S ; the S matrix", "S"), ("; $COV MATRIX=R", "none")])
def test_the_covariance_step_is_the_one_the_control_stream_asks_for(pheno_dir, record, method):
    folder, text = pheno_dir
    changed = text.replace("$COVARIANCE UNCONDITIONAL PRINT=E", record)
    (folder / "run.mod").write_text(changed)
    pm, ds = read_control_stream(folder / "run.mod")
    assert pm.recipe["covariance"] == method
    if method in ("none", "R"):
        res = fit_population(pm, ds, progress=False, evaluate=method == "none")
        assert res.estimation.covariance == method and (res.theta["POP_CL"].se is None) == (method == "none")
