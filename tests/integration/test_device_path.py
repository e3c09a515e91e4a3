"""Predictions, patient estimates, simulations and doses compute on the model's device (``model.to(device)``,
``--device`` on predict, map and dose).

CI has no GPU, so these tests use torch's "meta" device as the stray one: with the default device set to
meta and the model (and so the patient's records) on the CPU, a tensor made anywhere on the path without the
model's device lands on meta, and the first operation that mixes it with the patient's tensors fails ("Tensor
on device meta is not on the expected device cpu"), as a CPU tensor fails beside CUDA ones on a GPU. Every
answer must come out the same as without the trap. The random draws are made on the CPU on purpose (the same
seed, the same draws on every device) and moved to the model's device.

What the trap cannot see: a tensor put on the CPU explicitly where the model's device was meant, and
``.numpy()`` of a device tensor (fine on the CPU, an error on a GPU). The code names the CPU only for the random
draws, the importance sampler's own arithmetic (small, K-dimensional) and the analytic FOCE-I engine (numpy),
and takes ``.cpu()`` before ``.numpy()`` on these paths; benchmarks/gpu_check.py runs them on a real GPU."""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.cli import main
from hybridpk.dosing import (auc, dosing_model, estimate_patient, forecast, interval_for_dose, loading_dose,
                             recommend_dose, time_above, time_to_concentration)
from hybridpk.dosing.summary import patient_summary
from hybridpk.population import FittedPopulation, build_model, fit_population, load_model
from hybridpk.population.nonmem import read_control_stream
from hybridpk.residual import TrainConfig, fit_hybrid
from tests.integration.ehc import fitted_ehc_population
from tests.integration.test_nonmem_des import ADVAN5, MM_DES, THEO_DES

THEOPH = Path(__file__).parents[2] / "data" / "theoph.csv"


@contextmanager
def stray_tensors_on_meta():
    """Tensors made without an explicit device go to meta while this holds (see the module docstring)."""
    with torch.device("meta"):
        yield


@pytest.fixture
def general_path(monkeypatch):
    """FOCE-I's analytic path off: the automatic-differentiation path, the one a GPU takes."""
    monkeypatch.setattr("hybridpk.population.analytic_focei.analytic_problem",
                        lambda pm, prob, theta: (None, "turned off by the test"))


def _same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def _plain(x):
    return json.loads(json.dumps(x, default=str))


THEOPH_MODELS = {
    # structure, IIV, typical values, OMEGA, error SDs
    "1cmt_oral": ("1cmt_oral", ["KA", "CL", "V"], dict(KA=1.5, CL=2.8, V=32.0), dict(KA=0.4, CL=0.07, V=0.02),
                  dict(ADD=0.3, PROP=0.1)),
    "2cmt_oral": ("2cmt_oral", ["CL", "V", "KA"], dict(KA=1.5, CL=2.8, V=25.0, Q=1.0, V2=10.0),
                  dict(KA=0.4, CL=0.07, V=0.02), dict(ADD=0.3, PROP=0.1)),
    "1cmt_oral_mm (ODE)": ("1cmt_oral_mm", ["VMAX", "V"], dict(KA=1.5, VMAX=30.0, KM=5.0, V=32.0),
                           dict(VMAX=0.07, V=0.02), dict(ADD=0.3, PROP=0.1)),
}


def _theoph_model(case) -> FittedPopulation:
    structure, iiv, typical, omega, sd = THEOPH_MODELS[case]
    pm = build_model(structure, iiv=iiv, error="combined", initial=typical)
    return FittedPopulation.from_values(pm, typical, omega, sd)


@pytest.mark.parametrize("case", list(THEOPH_MODELS))
@pytest.mark.parametrize("path", ["default", "general"])
def test_predict_and_simulate_stay_on_the_models_device(case, path, request):
    if path == "general":
        request.getfixturevalue("general_path")
    model = _theoph_model(case)
    ds = hp.read_nonmem(THEOPH).subset([1, 2, 3, 4])
    want, sim = model.predict(ds).table, model.simulate(ds, n=2, seed=5)
    on_cpu = model.to("cpu")
    assert on_cpu is model and on_cpu.device == "cpu"     # already there: the model itself
    with stray_tensors_on_meta():
        got, got_sim = on_cpu.predict(ds).table, on_cpu.simulate(ds, n=2, seed=5)
    _same_table(got, want)
    _same_table(got_sim, sim)


@pytest.mark.parametrize("estimation, path", [("FOCE-I", "default"), ("FOCE-I", "general"), ("FOCE", "general"),
                                              ("FO", "default"), ("LAPLACE-I", "general")])
def test_a_population_fit_stays_on_its_device(estimation, path, request):
    """fit_population(device=...): the search's every evaluation, the EBEs, the covariance step and the tables
    (the analytic path of FOCE-I where it covers the model; the automatic-differentiation one a GPU takes)."""
    if path == "general":
        request.getfixturevalue("general_path")
    pm = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="combined")
    ds = hp.read_nonmem(THEOPH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = fit_population(pm, ds, progress=False, estimation=estimation)
        with stray_tensors_on_meta():
            got = fit_population(pm, ds, progress=False, estimation=estimation, device="cpu")
    assert got.device == "cpu"
    assert got.estimation.ofv == want.estimation.ofv
    assert got.tables_to_dict() == want.tables_to_dict()
    _same_table(got.estimation.predictions, want.estimation.predictions)
    _same_table(got.estimation.individual, want.estimation.individual)


def test_an_imported_control_stream_fits_on_its_device(pharmpy_examples):
    """pharmpy's pheno.mod fitted as its $ESTIMATION says (OFV 586.2761, NONMEM's 586.27605)."""
    pm, ds = read_control_stream(pharmpy_examples / "pheno.mod")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = fit_population(pm, ds, progress=False)
        with stray_tensors_on_meta():
            got = fit_population(pm, ds, progress=False, device="cpu")
    assert got.estimation.ofv == want.estimation.ofv == pytest.approx(586.27605, abs=1e-3)
    assert got.tables_to_dict() == want.tables_to_dict()
    _same_table(got.estimation.predictions, want.estimation.predictions)


@pytest.mark.parametrize("text", [THEO_DES, MM_DES, ADVAN5], ids=["ADVAN13", "ADVAN13 Michaelis-Menten", "ADVAN5"])
def test_a_control_stream_with_its_own_equations_predicts_on_its_device(tmp_path, text):
    """$DES (ADVAN13: an IF block on T, a THETA in $DES, $ERROR on the amount) and the general linear ADVAN5
    read from control streams: the statements evaluated on the data's device."""
    shutil.copy(THEOPH, tmp_path / "theoph.csv")
    (tmp_path / "theo_des.mod").write_text(text)
    model = load_model(tmp_path / "theo_des.mod")
    ds = hp.read_nonmem(THEOPH).subset([1, 2])
    want = model.predict(ds).table
    on_cpu = model.to("cpu")
    with stray_tensors_on_meta():
        got = on_cpu.predict(ds).table
    _same_table(got, want)


def _vanco_patient():
    rows = [dict(ID=7, TIME=0.0, DV=0.0, AMT=1000.0, RATE=1000.0, ADDL=3, II=12.0, EVID=1, MDV=1)]
    rows += [dict(ID=7, TIME=t, DV=v, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0)
             for t, v in ((37.5, 28.0), (47.5, 11.0))]
    return hp.read_nonmem(pd.DataFrame(rows).assign(CRCL=80.0, WT=80.0, DIAL=0))


def _every_answer(model, ds, target, n=100):
    """What the dosing functions answer for one patient, as plain data."""
    post = estimate_patient(model, ds, n_samples=n, seed=1)
    return _plain({
        "dose": recommend_dose(model, ds, target, seed=1, n_samples=n).to_dict(),
        "interval": interval_for_dose(model, ds, 1000.0, target, seed=1, n_samples=n).to_dict(),
        "below": time_to_concentration(model, ds, 5.0, n_samples=n),
        "loading": asdict(loading_dose(model, ds, target, n_samples=n)),
        "estimate": patient_summary(post),
        "forecast": forecast(post.estimate, post.draws, np.linspace(0, 72, 13), seed=1).table.to_dict("list"),
        "auc": auc(model, ds, posterior=post), "above": time_above(model, ds, 10.0, posterior=post)})


@pytest.mark.parametrize("path", ["default", "general"])
def test_every_dosing_answer_stays_on_the_models_device(path, request):
    """A published model with covariates and infusions (vancomycin_goti2018): the dose search, the interval
    for a dose, the time below a level, the loading dose, the estimate's summary, the forecast, AUC and time
    above."""
    if path == "general":
        request.getfixturevalue("general_path")
    ds = _vanco_patient()
    want = _every_answer(dosing_model("vancomycin_goti2018"), ds, "auc24=400:600")
    model = dosing_model("vancomycin_goti2018", device="cpu")
    with stray_tensors_on_meta():
        got = _every_answer(model, ds, "auc24=400:600")
    assert got == want


def test_an_imported_control_stream_stays_on_the_models_device(pharmpy_examples):
    """pharmpy's pheno.mod ($PK with IF blocks and data items): predictions of every subject, and one
    patient's dose."""
    model = load_model(pharmpy_examples / "pheno.mod")
    ds = hp.read_nonmem(pharmpy_examples / "pheno.dta")
    one = ds.subset([1])
    want = (model.predict(ds).table, _plain(recommend_dose(model, one, "trough=1000:2000", n_samples=50).to_dict()))
    on_cpu, dosing = model.to("cpu"), dosing_model(model, device="cpu")
    with stray_tensors_on_meta():
        got = (on_cpu.predict(ds).table, _plain(recommend_dose(dosing, one, "trough=1000:2000",
                                                              n_samples=50).to_dict()))
    _same_table(got[0], want[0])
    assert got[1] == want[1]


SMALL = TrainConfig(epochs=6, warmup_epochs=2, progress=False, form="reservoir")


@pytest.fixture(scope="module")
def small_hybrid():
    """A briefly trained reservoir hybrid on 30 EHC patients (its weights are real, not its quality)."""
    ds, _, pm, fit = fitted_ehc_population(30, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hyb = fit_hybrid(pm, ds, population=fit, config=SMALL, seed=3, progress=False)
    return hyb, ds, pm


def test_a_hybrid_on_a_population_fitted_on_a_device(small_hybrid):
    """fit_hybrid takes a population fitted on a device (its EBEs moved, not searched again): the same hybrid."""
    hyb, ds, pm = small_hybrid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with stray_tensors_on_meta():
            fit = fit_population(pm, ds, progress=False, covariance=False, device="cpu")
        got = fit_hybrid(pm, ds, population=fit, config=SMALL, seed=3, progress=False)
    _same_table(got.individual, hyb.individual)
    assert got.summary() == hyb.summary()


def test_a_hybrid_predicts_simulates_and_doses_on_its_device(small_hybrid):
    hyb, ds, _ = small_hybrid
    some = ds.subset(list(ds.ids[:3]))
    one = ds.subset(list(ds.ids[:1]))

    def answers(model, dosing):
        post = estimate_patient(dosing, one, n_samples=40, seed=2)
        rec = recommend_dose(dosing, one, "auc24=20:40", dose_step=10, n_samples=40, seed=2)
        return (model.predict(some).table, model.simulate(some, n=1, seed=4),
                _plain({"dose": rec.to_dict(),
                        "estimate": patient_summary(post),
                        "forecast": forecast(post.estimate, post.draws, [30.0, 40.0], seed=2).table.to_dict("list")}))

    want = answers(hyb, dosing_model(hyb))
    on_cpu = hyb.to("cpu")
    assert on_cpu.vae is hyb.vae          # already there: the networks are not copied
    with stray_tensors_on_meta():
        got = answers(on_cpu, dosing_model(on_cpu))
    _same_table(got[0], want[0])
    _same_table(got[1], want[1])
    assert got[2] == want[2]


def test_device_option_on_fit_predict_map_and_dose(tmp_path, capsys):
    """--device cpu and --device auto (the CPU on a machine without a GPU) give the default's output byte for
    byte (timings and versions aside); a device this machine lacks is refused before any work, naming
    --device."""
    run = tmp_path / "run"
    assert main(["fit", str(THEOPH), "--model", "1cmt_oral", "--out", str(run), "--quiet",
                 "--no-covariance"]) == 0
    devices = ["cpu"] + ([] if torch.cuda.is_available() else ["auto"])
    for device in devices:
        other = tmp_path / f"run-{device}"
        assert main(["fit", str(THEOPH), "--model", "1cmt_oral", "--out", str(other), "--quiet", "--no-covariance",
                     "--device", device]) == 0
        for name in ("individual.csv", "predictions.csv", "model.json"):
            assert (other / name).read_text() == (run / name).read_text(), name
        summary = [{k: v for k, v in json.loads((r / "summary.json").read_text()).items()
                    if k not in ("fit_seconds", "created", "versions", "command")} for r in (run, other)]
        assert summary[0] == summary[1]
    patient = tmp_path / "patient.csv"
    hp.read_nonmem(THEOPH).subset([1]).to_dataframe().to_csv(patient, index=False)
    commands = {"predict": ["predict", str(run), str(THEOPH), "--out"],
                "map": ["map", str(run), str(patient), "--out"],
                "dose": ["dose", str(run), str(patient), "--target", "trough=3:6", "--out"]}
    for name, command in commands.items():
        suffix = ".csv" if name == "predict" else ".json"
        outputs = []
        for device in [None] + devices:
            out = tmp_path / f"{name}-{device}{suffix}"
            assert main(command + [str(out)] + ([] if device is None else ["--device", device])) == 0
            text = out.read_text()
            if suffix == ".json":       # the run's own metadata (time, versions) aside
                text = json.dumps({k: v for k, v in json.loads(text).items()
                                   if k not in ("created", "seconds", "versions", "command")}, sort_keys=True)
            outputs.append(text)
        assert all(o == outputs[0] for o in outputs[1:]), name
    capsys.readouterr()
    if not torch.cuda.is_available():
        for command in (["fit", str(THEOPH), "--model", "1cmt_oral", "--out", str(tmp_path / "x")],
                        ["predict", str(run), str(THEOPH), "--out", str(tmp_path / "x.csv")],
                        ["map", str(run), str(patient)], ["dose", str(run), str(patient)]):
            with pytest.raises(SystemExit) as exc:
                main(command + ["--device", "cuda"])
            assert exc.value.code == 2
            assert "--device" in capsys.readouterr().err
