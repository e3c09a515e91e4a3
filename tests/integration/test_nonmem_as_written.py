"""Control streams as users write them, read as NM-TRAN reads them, each found on a published NONMEM run: lower
case (NONMEM 7.2 and later accept it; a NONMEM 7.5 run with ``$DATA dat3.csv ignore=@`` was refused by
pharmpy's parser), $TABLE records with NONMEM's NPD item (Bauer's 2019 CPT:PSP tutorial run 402 was refused), the
names the stream gives its parameters (ADVAN4's central volume is V2, which hybridpk's structural model calls V),
an OMEGA block's covariances in the printout, F_FLAG likelihood $ERROR refused by name, $DES models
without DEFOBS (nlmixr2's warfarin runs were observed in the gut), replicate levels at one time, a W form on an
amount, NONMEM's CONTROL5 ($INPUT synonyms, CALLFL=1), and initial amounts A_0 of $DES models."""

from __future__ import annotations

import math
import shutil
import warnings

import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.errors import ModelError
from hybridpk.population import fit_population
from hybridpk.population.focei import Problem
from hybridpk.population.nonmem import nmtran_case, read_control_stream, write_control_stream
from tests.integration.test_nonmem_error import HEAD


def test_nmtran_case_keeps_what_nmtran_keeps():
    text = ("$prob my Run ; a title\n"
            "$data ../Data/Run1.csv ignore=@ ignore=(SEX.EQ.'m') ; Comment\n"
            "$input id time dv amt wt=drop\n"
            "$pk\n"
            "cl = theta(1)*exp(eta(1)) ; cl; Label\n"
            "\"  verbatim Fortran\n"
            "$omega (0.09 fix)x2 block(2) 0.1 0.01 0.1\n"
            "$est method=1 inter msfo=./Run.msf\n"
            "$table id cl file=sdTab1 noprint\n"
            "$data\n  Other.csv ignore=#\n")
    assert nmtran_case(text).splitlines() == [
        "$PROB my Run ; a title",
        "$DATA ../Data/Run1.csv IGNORE=@ IGNORE=(SEX.EQ.'m') ; Comment",
        "$INPUT ID TIME DV AMT WT=DROP",
        "$PK",
        "CL = THETA(1)*EXP(ETA(1)) ; cl; Label",
        "\"  verbatim Fortran",
        "$OMEGA (0.09 FIX)x2 BLOCK(2) 0.1 0.01 0.1",
        "$EST METHOD=1 INTER MSFO=./Run.msf",
        "$TABLE ID CL FILE=sdTab1 NOPRINT",
        "$DATA",
        "  Other.csv IGNORE=#"]
    assert nmtran_case("$THETA (0,1)X3\r\n$SIGMA 1\r\n") == "$THETA (0,1)x3\r\n$SIGMA 1\r\n"   # line ends kept


def test_a_lower_case_pheno_fits_to_nonmems_published_run(pharmpy_examples, tmp_path):
    """pharmpy's pheno.mod written in lower case (its $DATA file name as it is): read as the upper-case stream
    (same data, same model) and fitted to NONMEM's final OFV (pheno.ext) within 0.01, as the upper-case one."""
    shutil.copy(pharmpy_examples / "pheno.dta", tmp_path)
    (tmp_path / "pheno.mod").write_text((pharmpy_examples / "pheno.mod").read_text().lower())
    pm, ds = read_control_stream(tmp_path / "pheno.mod")
    upper_pm, upper_ds = read_control_stream(pharmpy_examples / "pheno.mod")
    assert ds.n_subjects == upper_ds.n_subjects == 59 and ds.n_observations == upper_ds.n_observations == 155
    assert [t.init for t in pm.thetas] == [t.init for t in upper_pm.thetas]
    assert pm.etas == upper_pm.etas == ("ETA_CL", "ETA_VC")         # $ABBREV REPLACE eta_cl=eta(1)
    assert [t.name for t in pm.thetas] == ["pop_cl", "pop_vc", "covapgr"]       # labels: the comments as written
    ext = pd.read_csv(pharmpy_examples / "pheno.ext", sep=r"\s+", skiprows=1).set_index("ITERATION")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit_population(pm, ds, progress=False)
    assert res.estimation.ofv == pytest.approx(ext.loc[-1000000000, "OBJ"], abs=0.01)


TABLE = """$TABLE ID TIME DV IPRE=CIPRED CWRES IRES=CIRES IWRE=CIWRES NPD NPDE ESAMPLE=1000
          NOPRINT FILE=run.tab FORMAT=s1PE12.5
"""


def test_table_records_are_left_to_nonmem_and_written_back_as_they_are(pharmpy_examples, tmp_path):
    """A $TABLE with NPD (which pharmpy's option parser takes for an abbreviation of NPDTYPE) no longer stops the
    import; the fit is pheno's as published (pheno.ext's final OFV within 0.01) and the final control stream
    keeps the $TABLE records as written."""
    shutil.copy(pharmpy_examples / "pheno.dta", tmp_path)
    text = (pharmpy_examples / "pheno.mod").read_text()
    (tmp_path / "pheno.mod").write_text(text + TABLE)
    pm, ds = read_control_stream(tmp_path / "pheno.mod")
    ext = pd.read_csv(pharmpy_examples / "pheno.ext", sep=r"\s+", skiprows=1).set_index("ITERATION")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit_population(pm, ds, progress=False)
    assert res.estimation.ofv == pytest.approx(ext.loc[-1000000000, "OBJ"], abs=0.01)
    written = write_control_stream(res, tmp_path / "pheno_final.mod").read_text()
    assert written.rstrip().endswith(TABLE.rstrip().upper().replace("FILE=RUN.TAB", "FILE=run.tab"))
    assert "hybridpk" not in written.lower()


ADVAN4 = """$PROBLEM theophylline, two compartments
$INPUT ID TIME DV AMT EVID MDV CMT WT
$DATA theoph.csv IGNORE=@
$SUBROUTINE ADVAN4 TRANS4
$PK
KA = THETA(1)*EXP(ETA(1))
CL = THETA(2)*EXP(ETA(2))
V2 = THETA(3)*EXP(ETA(3))
Q  = THETA(4)
V3 = THETA(5)
S2 = V2
$ERROR
Y = F + EPS(1)
$THETA (0, 1.5) (0, 2.8) (0, 30) (0, 1) (0, 8)
$OMEGA 0.4 0.07 0.02
$SIGMA 0.5
$ESTIMATION METHOD=1 INTERACTION MAXEVAL=0
"""


def test_parameters_are_reported_under_the_control_streams_names(tmp_path, theoph_path):
    """ADVAN4 TRANS4 names the central volume V2 and the peripheral one V3: the individual table and a patient's
    MAP report them so, with the values the $PK formulas give at the EBEs."""
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    (tmp_path / "run.mod").write_text(ADVAN4)
    pm, ds = read_control_stream(tmp_path / "run.mod")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit_population(pm, ds, progress=False)
    ind = res.estimation.individual
    assert {"KA", "CL", "V2", "Q", "V3"} <= set(ind.columns) and "V" not in ind.columns
    eta = ind["ETA_3"].to_numpy()
    assert ind["V2"].to_numpy() == pytest.approx(30.0 * pd.Series(eta).map(math.exp).to_numpy(), rel=1e-12)
    assert ind["V3"].to_numpy() == pytest.approx([8.0] * ds.n_subjects, rel=1e-12)
    post = hp.estimate_patient(res, ds.subset([ds.ids[0]]))
    shown = post.parameters()
    assert set(shown) == {"KA", "CL", "V2", "Q", "V3"}
    assert shown["V2"]["map"] == pytest.approx(30.0 * math.exp(float(post.estimate.eta[0, 2])), rel=1e-9)
    assert shown["V3"]["map"] == pytest.approx(8.0, rel=1e-12)


def test_the_printout_shows_a_blocks_covariances(pharmpy_examples, tmp_path, capsys):
    """A $OMEGA BLOCK(2): the fit's printout gives the covariance with its correlation, as NONMEM prints the
    whole block (it gave the two variances only; the covariance was in summary.json alone)."""
    from hybridpk.cli import main

    shutil.copy(pharmpy_examples / "pheno.dta", tmp_path)
    text = (pharmpy_examples / "pheno.mod").read_text().replace(
        "$OMEGA  0.0309626 ; IIV_CL\n$OMEGA  0.031128 ; IIV_VC",
        "$OMEGA BLOCK(2) 0.0309626 ; IIV_CL\n 0.005 0.031128 ; IIV_VC").replace("MAXEVALS=99999", "MAXEVAL=0")
    (tmp_path / "pheno.mod").write_text(text)
    assert main(["fit", str(tmp_path / "pheno.mod"), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("COV(ETA_CL,ETA_VC)"))
    assert float(line.split()[1]) == pytest.approx(0.005)
    assert f"correlation {0.005 / math.sqrt(0.0309626 * 0.031128):.2f}" in line


def test_the_printout_gives_etabar_and_its_p_value_beside_each_omega(pharmpy_examples, tmp_path, capsys):
    """Each OMEGA line of the printout ends with NONMEM's ETABAR and P VAL of that ETA, as summary.json holds them
    (the numbers themselves are checked against pheno.lst in test_population_fit)."""
    import json

    from hybridpk.cli import main

    shutil.copy(pharmpy_examples / "pheno.dta", tmp_path)
    text = (pharmpy_examples / "pheno.mod").read_text().replace("MAXEVALS=99999", "MAXEVAL=0")
    (tmp_path / "pheno.mod").write_text(text)
    assert main(["fit", str(tmp_path / "pheno.mod"), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    bars = json.loads((tmp_path / "run" / "summary.json").read_text())["etabar"]
    assert set(bars) == {"ETA_CL", "ETA_VC"}
    for label, eta in (("IIV_CL", "ETA_CL"), ("IIV_VC", "ETA_VC")):
        line = next(x for x in out.splitlines() if x.strip().startswith(label))
        assert line.endswith(f"ETABAR {bars[eta]['etabar']:.3g} (P {bars[eta]['p']:.3f}))"), line
        assert bars[eta]["n"] == 59 and 0 < bars[eta]["p"] <= 1


DES_LOWER = """$prob theophylline, written as nlmixr2's NONMEM runs are
$input id time dv amt evid mdv cmt wt
$data theoph.csv ignore=@
$subr advan13 tol=9
$model
   comp=gut
   comp=central
$pk
\tpop_ka = theta(1)
\tpop_cl = theta(2)
\tpop_v  = theta(3)
    ka = pop_ka*exp(eta(1))
    cl = pop_cl*exp(eta(2))
    v  = pop_v*exp(eta(3))
$des
    gut    = a(1)
    center = a(2)
    dadt(1) = -ka*gut
    dadt(2) =  ka*gut - cl/v*center
$error
    conc = a(2)/v
    ipred = conc
    y = ipred + eps(1)
$theta (0, 1.5) (0, 2.8) (0, 32)
$omega 0.4 0.07 0.02
$sigma 0.5
$est method=1 interaction
"""


def test_a_des_model_without_defobs_observes_the_compartment_its_error_reads(tmp_path, theoph_path):
    """$MODEL without DEFOBS and $ERROR on A(2)/V (nlmixr2's warfarin runs, NONMEM 7): the prediction is the
    central compartment's, as the ADVAN2 model's (OFV at the initial estimates to 1e-6). hybridpk took the
    first compartment (the gut) for the observed one and gave OFV 17712 where NONMEM gives 558.48; the
    stream is in lower case, as those runs are. A patient's MAP reports the $PK parameters, not the scales."""
    from tests.integration.test_nonmem_constructs import _ofv_at_inits
    from tests.integration.test_nonmem_import import THEO_TRANS2

    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    (tmp_path / "des.mod").write_text(DES_LOWER)
    (tmp_path / "advan2.mod").write_text(THEO_TRANS2)
    pm, ds = read_control_stream(tmp_path / "des.mod")
    assert pm.structural.obs_cmt == 2
    ours = _ofv_at_inits(pm, ds)
    reference = _ofv_at_inits(*read_control_stream(tmp_path / "advan2.mod"))
    assert ours == pytest.approx(reference, abs=1e-6)
    shown = hp.estimate_patient(hp.load_model(tmp_path / "des.mod"), ds.subset([ds.ids[0]])).parameters()
    assert set(shown) == {"KA", "CL", "V"}         # not the scales S1, S2 that divide amounts


def test_replicate_levels_at_one_time_are_observations_and_a_repeated_record_is_named(tmp_path, theoph_path):
    """Two assays of one sample (same ID and TIME, different DV; nlmixr2's warfarin data, subject 9, which
    NONMEM fits) were refused as duplicates: both are now observations, with the OFV of the same levels a
    nanosecond apart. A record entered twice (same DV too) is still refused, naming the control stream's
    data file (the message said '<DataFrame>')."""
    from tests.integration.test_nonmem_constructs import _ofv_at_inits
    from tests.integration.test_nonmem_import import THEO_TRANS2

    df = pd.read_csv(theoph_path)
    first = df.index[(df.ID == 1) & (df.MDV == 0) & (df.TIME > 0)][0]
    replicate = df.loc[[first]].assign(DV=df.loc[first, "DV"] * 1.2)
    together = pd.concat([df.loc[:first], replicate, df.loc[first + 1:]], ignore_index=True)
    apart = together.copy()
    apart.loc[first + 1, "TIME"] += 1e-9
    ofvs = []
    for name, data in (("together", together), ("apart", apart)):
        folder = tmp_path / name
        folder.mkdir()
        data.to_csv(folder / "theoph.csv", index=False)
        (folder / "run.mod").write_text(THEO_TRANS2)
        pm, ds = read_control_stream(folder / "run.mod")
        assert ds.n_observations == int((df.MDV == 0).sum()) + 1
        ofvs.append(_ofv_at_inits(pm, ds))
    assert ofvs[0] == pytest.approx(ofvs[1], abs=1e-6)
    twice = pd.concat([df.loc[:first], df.loc[[first]], df.loc[first + 1:]], ignore_index=True)
    twice.to_csv(tmp_path / "theoph.csv", index=False)
    (tmp_path / "run.mod").write_text(THEO_TRANS2)
    with pytest.raises(hp.errors.DatasetError, match=r"(?s)theoph\.csv \(\$DATA of run\.mod.*duplicated observation"):
        read_control_stream(tmp_path / "run.mod")


def test_a_w_form_on_an_amount_reads_no_eta_and_the_hybrid_takes_it(tmp_path, theoph_path):
    """W = SQRT(IPRED**2*RESCV**2 + RESADD**2) with IPRED = A(2)/V (nlmixr2's warfarin run006): written in the
    prediction, W reads the THETAs only (V's ETA cancels), so the hybrid extends the model (it was refused: 'the
    residual error's SD reads ETAs')."""
    from hybridpk.residual.hybrid import require_hybrid_support

    text = DES_LOWER.replace("    y = ipred + eps(1)", "    w = sqrt(ipred*ipred*theta(4)**2 + theta(5)**2)\n"
                                                       "    y = ipred + w*eps(1)")
    text = text.replace("$theta (0, 1.5) (0, 2.8) (0, 32)", "$theta (0, 1.5) (0, 2.8) 3.4657 (0, 0.1) (0, 0.3)")
    text = text.replace("$sigma 0.5", "$sigma 1 fix").replace("v  = pop_v*exp(eta(3))", "v  = exp(pop_v + eta(3))")
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    (tmp_path / "des.mod").write_text(text)
    pm, ds = read_control_stream(tmp_path / "des.mod")
    assert pm.error.kind == "general" and not set(pm.error.h.reads) & set(pm.etas)
    require_hybrid_support(pm, ds)


CONTROL5 = """$PROBLEM theophylline as NONMEM's own CONTROL5 example codes it
$INPUT ID DOSE=AMT TIME CP=DV WT
$DATA THEOPP
$SUBROUTINES ADVAN2
$PK
   CALLFL=1                   ; the weight is on the dose record only ('.' elsewhere)
   KA=THETA(1)+ETA(1)
   K=THETA(2)+ETA(2)
   CL=THETA(3)*WT+ETA(3)
   SC=CL/K/WT                 ; doses in mg/kg
$ERROR
   Y=F+EPS(1)
$THETA (.1,3,5) (.008,.08,.5) (.004,.04,.9)
$OMEGA BLOCK(3) 6 .005 .0002 .3 .006 .4
$SIGMA .4
$ESTIMATION MAXEVAL=450 PRINT=5
"""


def test_nonmems_control5_example_with_its_synonyms_and_callfl(tmp_path, theoph_path):
    """NONMEM's CONTROL5 (the theophylline data of R's Theoph, which we bundle, in NONMEM's THEOPP layout: no
    header, whitespace, '.' for nulls, the weight on the dose record only, doses in mg/kg): $INPUT synonyms
    DOSE=AMT and CP=DV (refused: 'required column DV is missing'), CALLFL=1 (the $PK once per subject, so WT is
    the dose record's; per record it would be 0), additive ETAs, TRANS1 with SC, a BLOCK(3) and FO (no METHOD).
    NONMEM 7's published run (nonmem2rx's CONTROL5_dolabbr.ext): OFV 104.561066, THETA 2.77387 / 0.0781286 /
    0.0363073, SIGMA 0.387501."""
    df = pd.read_csv(theoph_path)
    lines = []
    for i, g in df.groupby("ID", sort=False):
        dose = g[g.AMT > 0].iloc[0]
        lines.append(f"{i:5d} {dose.AMT / dose.WT:8.2f} {0.0:8.2f} {'.':>8} {dose.WT:8.1f}")
        lines += [f"{i:5d} {'.':>8} {r.TIME:8.2f} {r.DV:8.2f} {'.':>8}" for _, r in g[g.AMT == 0].iterrows()]
    (tmp_path / "THEOPP").write_text("\n".join(lines) + "\n")
    (tmp_path / "control5.mod").write_text(CONTROL5)
    pm, ds = read_control_stream(tmp_path / "control5.mod")
    assert ds.n_subjects == 12 and ds.n_observations == 132 and pm.recipe["estimation"] == "FO"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit_population(pm, ds, progress=False)
    assert res.estimation.ofv == pytest.approx(104.561066, abs=0.01)
    for t, ref in zip(res.theta, (2.77387, 0.0781286, 0.0363073)):
        assert t.value == pytest.approx(ref, rel=2e-3)
    assert res.sigma.rows[0].variance == pytest.approx(0.387501, rel=2e-3)


A0_DES = """$PROBLEM theophylline, the dose as an initial amount
$INPUT ID TIME DV AMT EVID MDV CMT WT DOSE
$DATA {data} IGNORE=@
$SUBROUTINE ADVAN13 TOL=9
$MODEL COMP=(DEPOT DEFDOSE) COMP=(CENTRAL DEFOBS) COMP=(RESP)
$PK
KA = THETA(1)*EXP(ETA(1))
CL = THETA(2)*EXP(ETA(2))
V = THETA(3)*EXP(ETA(3))
KIN = THETA(4)
KOUT = THETA(5)
{initial}
A_0(3) = KIN/KOUT
S2 = V
$DES
DADT(1) = -KA*A(1)
DADT(2) = KA*A(1) - CL/V*A(2)
DADT(3) = KIN - KOUT*A(3)
$ERROR
Y = F + EPS(1)
$THETA (0, 1.5) (0, 2.8) (0, 32) (0, 10) (0, 0.5)
$OMEGA 0.4 0.07 0.02
$SIGMA 0.5
$ESTIMATION METHOD=1 INTERACTION MAXEVAL=0
"""


def test_initial_amounts_of_a_des_model_are_its_state_at_the_start(tmp_path, theoph_path):
    """NONMEM's A_0(n) in $PK (a turnover's baseline KIN/KOUT, an amount present at the start): the $DES model's
    state at each subject's first record (it was refused for every model). Theophylline's dose given as A_0(1)
    from a data item, its dose records made records without an event, gives the predictions of the dose records
    (1e-7, at ETAs away from 0); the response compartment starts at KIN/KOUT = 20 (four subjects). An ADVAN's
    A_0 stays refused, with its line."""
    df = pd.read_csv(theoph_path)
    df = df[df.ID <= 4].assign(DOSE=df.groupby("ID").AMT.transform("max"))
    df.to_csv(tmp_path / "dosed.csv", index=False)
    df.assign(AMT=0.0, EVID=df.EVID.where(df.EVID != 1, 2)).to_csv(tmp_path / "initial.csv", index=False)
    (tmp_path / "dosed.mod").write_text(A0_DES.format(data="dosed.csv", initial=""))
    (tmp_path / "initial.mod").write_text(A0_DES.format(data="initial.csv", initial="A_0(1) = DOSE"))
    preds = {}
    for name in ("dosed", "initial"):
        pm, ds = read_control_stream(tmp_path / f"{name}.mod")
        prob = Problem(pm, ds)
        theta = {t.name: torch.tensor(t.init, dtype=torch.float64) for t in pm.thetas}
        eta = torch.tensor([[0.3, -0.2, 0.1]] * ds.n_subjects, dtype=torch.float64)
        preds[name] = prob.predict(theta, eta)[prob.obs]
    assert ds.n_doses == 0 and pm.structural.initial == (1, 3)
    assert float(preds["dosed"].max()) > 5.0
    torch.testing.assert_close(preds["initial"], preds["dosed"], rtol=1e-7, atol=1e-9)
    batch = ds.to_batch(covariates=list(pm.covariates))
    p = pm.parameters(theta, torch.zeros(ds.n_subjects, 3, dtype=torch.float64), batch)
    start = pm.structural.initial_state(p, batch.time)
    assert start[:, 2].tolist() == pytest.approx([20.0] * ds.n_subjects)
    assert start[:, 0].tolist() == pytest.approx(df.groupby("ID", sort=False).DOSE.first().tolist())
    (tmp_path / "advan.mod").write_text(HEAD + "A_0(1) = 320\n$ERROR\nY = F + EPS(1)\n$THETA (0, 1.5) (0, 2.8) "
                                        "(0, 32)\n$OMEGA 0.4 0.07 0.02\n$SIGMA 0.5\n")
    shutil.copy(theoph_path, tmp_path / "theoph.csv")
    with pytest.raises(ModelError, match=r"advan.mod line 10: \$PK sets an initial amount"):
        read_control_stream(tmp_path / "advan.mod")
