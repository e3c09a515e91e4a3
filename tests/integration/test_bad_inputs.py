"""The table of bad inputs (issue 20, point 7): CLI arguments, run folders, model specs, weights files and
data files a user gets wrong, each run through the real command in its own process (``cli_cases.py``), each
refused with exit status 2, a message naming the argument or file, and no traceback or internal error."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.residual import TrainConfig, fit_hybrid

HERE = Path(__file__).parent


class _Code:
    """An object whose unpickling runs code: what a weights file must never be allowed to do."""

    def __reduce__(self):
        return (print, ("code ran",))


def _patient(d: Path) -> Path:
    rows = [dict(ID=7, TIME=0.0, DV=0.0, AMT=1000.0, RATE=1000.0, ADDL=3, II=12.0, EVID=1, MDV=1),
            dict(ID=7, TIME=37.5, DV=28.0, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0),
            dict(ID=7, TIME=47.5, DV=11.0, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0)]
    pd.DataFrame(rows).assign(CRCL=80.0, WT=80.0, DIAL=0).to_csv(d / "p.csv", index=False)
    return d / "p.csv"


def _runs(d: Path) -> None:
    """A population run and a hybrid run of theophylline, and damaged copies of them."""
    ds = hp.read_nonmem(hp.bundled_dataset("theoph"))
    pm = hp.build_model("1cmt_oral", iiv=["CL", "V"], error="additive", data=ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.fit_population(pm, ds, maxiter=5, covariance=False, progress=False)
    fit.save(d / "pop")
    fit_hybrid(pm, ds, population=fit, progress=False,
               config=TrainConfig(epochs=2, warmup_epochs=1, min_epochs=1, progress=False)).save(d / "hyb")

    def damaged(src, name, edit):
        shutil.copytree(d / src, d / name)
        edit(d / name)

    damaged("pop", "pop_truncated", lambda r: (r / "model.json").write_text((r / "model.json").read_text()[:200]))
    damaged("pop", "pop_empty", lambda r: (r / "model.json").write_text(""))
    damaged("pop", "pop_edited", lambda r: (r / "model.json").write_text(
        (r / "model.json").read_text().replace('"name": "CL"', '"name": "CLX"')))
    damaged("pop", "pop_no_manifest", lambda r: (r / "manifest.json").unlink())
    damaged("pop", "pop_bad_manifest", lambda r: (r / "manifest.json").write_text("{not json"))
    damaged("pop", "pop_summary_garbage", lambda r: (r / "summary.json").write_text("garbage"))
    damaged("pop", "pop_summary_missing", lambda r: (r / "summary.json").unlink())
    damaged("pop", "pop_foreign", lambda r: (r / "model.json").write_text(json.dumps({"format": "other", "x": 1})))
    damaged("hyb", "hyb_code", lambda r: (r / "vae.pt").write_bytes(pickle.dumps(_Code())))
    damaged("hyb", "hyb_code_torch", lambda r: torch.save({"x": _Code()}, r / "vae.pt"))
    damaged("hyb", "hyb_truncated", lambda r: (r / "vae.pt").write_bytes((r / "vae.pt").read_bytes()[:500]))
    damaged("hyb", "hyb_no_vae_json", lambda r: (r / "vae.json").unlink())
    damaged("hyb", "hyb_vae_json_garbage", lambda r: (r / "vae.json").write_text("[1, 2"))


def _files(d: Path, pharmpy_examples: Path) -> None:
    (d / "not_a_folder").write_text("x")
    (d / "bad.toml").write_text("name = 'x'\n[typical\nCL = 1\n")
    good = (Path(hp.__file__).parents[2] / "models" / "vancomycin_goti2018.toml").read_text()
    (d / "no_q.toml").write_text(good.replace("Q = 6.5\n", ""))
    (d / "bad_iiv.toml").write_text(good.replace("CL = 0.147", "CL = -0.147"))
    theoph = pd.read_csv(hp.bundled_dataset("theoph"))
    theoph.assign(TIME=theoph.TIME.where(theoph.index != 5, -1.0)).to_csv(d / "negative_time.csv", index=False)
    theoph.drop(columns="TIME").to_csv(d / "no_time.csv", index=False)
    theoph.assign(DVID=np.where(theoph.index % 3 == 0, 2, 1)).to_csv(d / "two_dvids.csv", index=False)
    at_dose = (theoph.EVID == 0) & (theoph.TIME == 0)          # every level at the dose's time written as 0
    theoph.assign(DV=theoph.DV.where(~at_dose, 0.0)).to_csv(d / "zeros_at_dose.csv", index=False)
    theoph.assign(CMT=np.where((theoph.EVID == 0) & (theoph.index % 3 == 0), 1, theoph.CMT)).to_csv(
        d / "depot_observed.csv", index=False)
    (d / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (d / "params.csv").write_text("ID,CL\n1,2.5\n")
    mod = (pharmpy_examples / "pheno.mod").read_text()
    shutil.copy(pharmpy_examples / "pheno.dta", d / "pheno.dta")
    (d / "pheno_saem.mod").write_text(mod.replace("$ESTIMATION METHOD=1 INTERACTION",
                                                     "$ESTIMATION METHOD=SAEM INTERACTION"))
    sub = d / "sub"
    sub.mkdir()
    (sub / "pheno_moved.mod").write_text(mod)       # $DATA pheno.dta, read from sub/, where it is not


def _table(d: Path):
    """(id, argv, what the message must name)."""
    p = str(d / "p.csv")
    run = str(d / "newrun")
    dose = ["dose", "vancomycin_goti2018", p, "--target", "auc24=400:600"]
    fit = ["fit", "theoph", "--model", "1cmt_oral", "--error", "combined"]
    cases = [
        # dose: limits and targets
        ("dose-max-negative", dose + ["--max-dose", "-5"], "--max-dose"),
        ("dose-step-negative", dose + ["--dose-step", "-250"], "--dose-step"),
        ("dose-step-zero", dose + ["--dose-step", "0"], "--dose-step"),
        ("dose-infusion-overlaps", dose + ["--duration", "24", "--interval", "12"], "--duration"),
        ("dose-duration-negative", dose + ["--duration", "-1"], "--duration"),
        ("dose-interval-zero", dose + ["--interval", "0"], "--interval"),
        ("dose-interval-text", dose + ["--interval", "abc"], "--interval"),
        ("dose-start-far", dose + ["--start", "1e9"], "--start"),
        ("dose-start-nan", dose + ["--start", "nan"], "--start"),
        ("dose-target-unordered", ["dose", "vancomycin_goti2018", p, "--target", "auc24=600:400"], "600"),
        ("dose-target-negative", ["dose", "vancomycin_goti2018", p, "--target", "auc24=-5:10"], "-5"),
        ("dose-target-unknown", ["dose", "vancomycin_goti2018", p, "--target", "cmax2=1:2"], "cmax2"),
        ("dose-target-no-window", ["dose", "vancomycin_goti2018", p, "--target", "auc24"], "auc24"),
        ("dose-unknown-model", ["dose", "vancomycin_2099", p], "vancomycin_2099"),
        ("dose-missing-patient", ["dose", "vancomycin_goti2018", str(d / "nobody.csv")], "nobody.csv"),
        ("dose-fixed-dose-and-interval", dose + ["--dose", "1000", "--interval", "12"], "--interval"),
        ("dose-fixed-dose-zero", dose + ["--dose", "0"], "--dose"),
        ("dose-fixed-dose-conc-target", dose[:3] + ["--dose", "1000", "--target", "conc@24=5:10"], "conc@24"),
        ("dose-interval-step-without-dose", dose + ["--interval-step", "6"], "--interval-step"),
        ("dose-time-below-negative", dose[:3] + ["--time-below", "-3"], "--time-below"),
        ("dose-time-below-with-dose", dose[:3] + ["--time-below", "3", "--dose", "500"], "--dose"),
        ("dose-cmt-not-in-model", dose + ["--cmt", "7"], "cmt = 7"),
        ("map-auc-reversed", ["map", "vancomycin_goti2018", p, "--auc", "5:1"], "--auc"),
        ("map-auc-after-the-records", ["map", "vancomycin_goti2018", p, "--auc", "500:"], "500"),
        ("dose-loading-with-fixed-dose", dose + ["--loading", "--dose", "100"], "--dose"),
        ("dose-loading-conc-target", dose[:3] + ["--loading", "--target", "conc@12=5:10"], "conc@12"),
        ("dose-out-folder", dose + ["--out", str(d)], str(d)),
        ("dose-out-below-file", dose + ["--out", str(d / "not_a_folder" / "rec.json")], "not_a_folder"),
        ("map-plot-format", ["map", "vancomycin_goti2018", p, "--plot", "forecast.jpgx"], "--plot"),
        ("map-until-nan", ["map", "vancomycin_goti2018", p, "--until", "nan"], "--until"),
        ("map-out-folder", ["map", "vancomycin_goti2018", p, "--out", str(d)], str(d)),
        # model specs
        ("spec-not-toml", ["dose", str(d / "bad.toml"), p], "bad.toml"),
        ("spec-missing-theta", ["dose", str(d / "no_q.toml"), p], "no_q.toml"),
        ("spec-negative-variance", ["dose", str(d / "bad_iiv.toml"), p], "bad_iiv.toml"),
        # fit: arguments
        ("fit-init-out-of-range", fit + ["--init", "CL=-3", "--out", run], "CL=-3"),
        ("fit-init-text", fit + ["--init", "CL=abc", "--out", run], "CL"),
        ("fit-latent-text", fit + ["--hybrid", "vae", "--latent-dim", "abc", "--out", run], "--latent-dim"),
        ("fit-latent-zero", fit + ["--hybrid", "vae", "--latent-dim", "0", "--out", run], "--latent-dim"),
        ("fit-device-nonsense", fit + ["--hybrid", "vae", "--device", "nonsense", "--out", run], "--device"),
        ("fit-epochs-zero", fit + ["--hybrid", "vae", "--epochs", "0", "--out", run], "--epochs"),
        ("fit-maxiter-negative", fit + ["--maxiter", "-1", "--out", run], "--maxiter"),
        ("fit-out-is-file", fit + ["--out", str(d / "not_a_folder")], "not_a_folder"),
        ("fit-out-below-file", fit + ["--out", str(d / "not_a_folder" / "run")], "not_a_folder"),
        ("fit-unknown-model", ["fit", "theoph", "--model", "4cmt_magic", "--out", run], "4cmt_magic"),
        ("fit-no-model", ["fit", "theoph", "--out", run], "--model"),
        ("fit-unknown-iiv", fit + ["--iiv", "CL,XYZ", "--out", run], "XYZ"),
        ("fit-covariate-missing-column", fit + ["--covariate", "CL~NOPE", "--out", run], "NOPE"),
        ("fit-omega-block-unknown", fit + ["--omega-block", "CL,XYZ", "--out", run], "XYZ"),
        ("fit-iov-without-occasions", fit + ["--iov", "CL", "--out", run], "occasion column OCC"),
        ("fit-iov-unknown", fit + ["--iov", "XYZ", "--out", run], "XYZ"),
        ("fit-occasion-without-iov", fit + ["--occasion", "VISIT", "--out", run], "--iov"),
        ("fit-proportional-predose", ["fit", "theoph", "--model", "1cmt_oral", "--error", "proportional", "--out",
                                      run], "--error combined"),
        ("fit-combined-zeros-where-predicted-zero", ["fit", str(d / "zeros_at_dose.csv"), "--model", "1cmt_oral",
                                                     "--out", run], "grow without bound as ADD goes to 0"),
        ("fit-two-kinds-of-observation", ["fit", str(d / "two_dvids.csv"), "--model", "1cmt_oral", "--out", run],
         "DVID 1, 2"),
        ("fit-depot-observed", ["fit", str(d / "depot_observed.csv"), "--model", "1cmt_oral", "--out", run],
         "compartment 1 (DEPOT)"),
        ("fit-control-stream-saem", ["fit", str(d / "pheno_saem.mod"), "--out", run], "METHOD=SAEM"),
        ("fit-control-stream-data-missing", ["fit", str(d / "sub" / "pheno_moved.mod"), "--out", run],
         "pheno_moved.mod line 2: the data file pheno.dta was not found"),
        ("fit-resume-other-options", ["fit", "theoph", "--model", "1cmt_oral", "--error", "additive", "--out",
                                      str(d / "resume_run"), "--resume", "--maxiter", "3"], "foce.json"),
        # data files
        ("check-missing-file", ["check", str(d / "missing.csv")], "missing.csv"),
        ("check-negative-time", ["check", str(d / "negative_time.csv")], "TIME"),
        ("check-no-time-column", ["check", str(d / "no_time.csv")], "TIME"),
        ("check-binary-file", ["check", str(d / "binary.csv")], "binary.csv"),
        ("simulate-params-missing", ["simulate", "theoph", "--model", "1cmt_oral", "--params", str(d / "nope.csv"),
                                     "--out", str(d / "sim.csv")], "nope.csv"),
        ("simulate-params-incomplete", ["simulate", "theoph", "--model", "1cmt_oral", "--params",
                                        str(d / "params.csv"), "--out", str(d / "sim.csv")], "params.csv"),
        ("simulate-out-folder", ["simulate", "theoph", "--model", "1cmt_oral", "--typical", "CL=3,V=30,KA=1.5",
                                 "--out", str(d)], str(d)),
        ("simulate-typical-text", ["simulate", "theoph", "--model", "1cmt_oral", "--typical", "CL=abc,V=30,KA=1",
                                   "--out", str(d / "sim.csv")], "CL"),
        # run folders and weights files
        ("predict-no-run", ["predict", str(d / "norun"), "theoph", "--out", str(d / "pred.csv")], "norun"),
        ("predict-out-folder", ["predict", str(d / "pop"), "theoph", "--out", str(d)], str(d)),
    ]
    for name, named in [("pop_truncated", "model.json"), ("pop_empty", "model.json"), ("pop_edited", "model.json"),
                        ("pop_no_manifest", "manifest.json"), ("pop_bad_manifest", "manifest.json"),
                        ("pop_summary_garbage", "summary.json"), ("pop_summary_missing", "summary.json"),
                        ("pop_foreign", "model.json"), ("hyb_code", "vae.pt"), ("hyb_code_torch", "vae.pt"),
                        ("hyb_truncated", "vae.pt"), ("hyb_no_vae_json", "vae.json"),
                        ("hyb_vae_json_garbage", "vae.json")]:
        cases.append((f"run-{name}", ["predict", str(d / name), "theoph", "--out", str(d / "pred.csv")], named))
    cases.append(("dose-run-weights-with-code", ["dose", str(d / "hyb_code"), p], "vae.pt"))
    if not torch.cuda.is_available():
        cases.append(("fit-device-cuda-absent", fit + ["--hybrid", "vae", "--device", "cuda", "--out", run],
                      "--device"))
        cases.append(("simulate-device-cuda-absent", ["simulate", "theoph", "--model", "1cmt_oral", "--typical",
                                                      "CL=3,V=30,KA=1.5", "--device", "cuda", "--out",
                                                      str(d / "sim_cuda.csv")], "--device"))
    return cases


@pytest.fixture(scope="module")
def results(tmp_path_factory, pharmpy_examples):
    d = tmp_path_factory.mktemp("bad_inputs")
    _patient(d)
    _runs(d)
    _files(d, pharmpy_examples)
    # a FOCE checkpoint of another fit, for the --resume case
    (d / "resume_run" / "checkpoint").mkdir(parents=True)
    (d / "resume_run" / "checkpoint" / "foce.json").write_text(json.dumps(
        {"format": "hybridpk-foce-checkpoint", "version": 1, "fingerprint": "0" * 64, "iteration": 2,
         "x": [0.0], "eta": [[0.0]]}))
    cases = _table(d)
    proc = subprocess.run([sys.executable, str(HERE / "cli_cases.py")], input=json.dumps([c[1] for c in cases]),
                          capture_output=True, text=True, timeout=600, cwd=d)
    assert proc.returncode == 0, proc.stderr
    return d, {c[0]: (c, r) for c, r in zip(cases, json.loads(proc.stdout))}


def test_the_table_has_at_least_40_cases(results):
    assert len(results[1]) >= 40


@pytest.mark.parametrize("case", [c[0] for c in _table(Path("/D"))])
def test_each_bad_input_is_refused_by_name(results, case):
    d, table = results
    if case not in table:
        pytest.skip("not applicable on this machine")
    (_, argv, named), r = table[case]
    err = r["stderr"]
    assert r["code"] == 2, f"{argv}: exit {r['code']}\n{err}{r['stdout']}"
    assert named.replace("/D", str(d)) in err, f"{argv}: the message does not name {named!r}:\n{err}"
    assert "Traceback" not in err and "internal error" not in err, err
    assert "weights_only=False" not in err      # never the unsafe advice
    assert "code ran" not in r["stdout"] + err  # a weights file never executes code
    assert not (d / "newrun").exists()         # refused before any work: nothing written
