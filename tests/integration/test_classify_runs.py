"""The latent classifier of a hybrid run: trained and saved with the run (manifest), its columns in
individual.csv, P_COMPLEX for new patients in 'hybridpk predict', the 'hybridpk classify' command."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from hybridpk.classify import classify_patients, load_classifier, save_classifier, train_classifier
from hybridpk.cli import main
from hybridpk.population import build_model, fit_population
from hybridpk.report.html import FIGURES, HYBRID_FIGURES
from hybridpk.residual import TrainConfig, fit_hybrid, load_run
from hybridpk.solve.examples import simulate_ehc_population


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small hybrid (60 EHC patients, reservoir form, 40 epochs) saved with its classifier."""
    ds, truth = simulate_ehc_population(60, seed=4)
    pm = build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pm, ds, progress=False, covariance=False)
    hyb = fit_hybrid(pm, ds, population=fit, config=TrainConfig(epochs=40, warmup_epochs=10, progress=False,
                                                                form="reservoir"), seed=3, progress=False)
    folder = tmp_path_factory.mktemp("classify") / "run"
    hyb.save(folder)
    rc = train_classifier(hyb, seed=0)
    save_classifier(folder, rc)
    return hyb, folder, rc


def test_the_classifier_is_saved_with_the_run(run):
    hyb, folder, rc = run
    ind = pd.read_csv(folder / "individual.csv")
    assert {"COMPLEX_EVIDENCE", "P_COMPLEX", "COMPLEX"} <= set(ind.columns)
    assert (ind.COMPLEX_EVIDENCE == (ind.COMPLEXITY > rc.threshold)).all()
    assert ind.P_COMPLEX.between(0, 1).all() and (ind.COMPLEX == (ind.P_COMPLEX >= 0.5)).all()
    reloaded = load_run(folder)                    # the manifest now lists classifier.json and the new table
    assert len(reloaded.individual) == 60
    loaded = load_classifier(folder)
    x = np.random.default_rng(0).normal(size=(5, len(rc.features)))
    assert loaded.classifier.predict_proba(x) == pytest.approx(rc.classifier.predict_proba(x), abs=1e-15)
    new, _ = simulate_ehc_population(12, seed=9)
    flags = classify_patients(reloaded, loaded, new)
    assert list(flags.ID) == list(new.ids) and flags.P_COMPLEX.between(0, 1).all()


def test_an_edited_classifier_file_is_refused_by_name(run, tmp_path):
    import shutil

    _, folder, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    d = json.loads((copy / "classifier.json").read_text())
    d["alpha"] = 0.5
    (copy / "classifier.json").write_text(json.dumps(d))
    assert main(["classify", str(copy)]) == 2


def test_predict_and_classify_commands(run, tmp_path, capsys):
    hyb, folder, rc = run
    new, _ = simulate_ehc_population(8, seed=11)
    new.to_dataframe().to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", str(folder), str(tmp_path / "new.csv"), "--out", str(tmp_path / "pred.csv")]) == 0
    pred = pd.read_csv(tmp_path / "pred.csv")
    per_patient = pred.groupby("ID").P_COMPLEX.nunique()
    assert (per_patient == 1).all() and pred.P_COMPLEX.between(0, 1).all()
    expected = classify_patients(hyb, rc, new).set_index("ID").P_COMPLEX
    assert pred.groupby("ID").P_COMPLEX.first().to_numpy() == pytest.approx(expected.to_numpy(), abs=1e-9)
    capsys.readouterr()
    assert main(["classify", str(folder), str(tmp_path / "new.csv"), "--out", str(tmp_path / "f.csv")]) == 0
    printed = capsys.readouterr().out
    assert "latent classifier" in printed and "new patients flagged COMPLEX" in printed
    assert len(pd.read_csv(tmp_path / "f.csv")) == 8


@pytest.mark.slow   # 40 s; tutorial 05 runs the same path (a hybrid in compare_runs) in the default suite
def test_a_hybrid_is_compared_by_cross_validation(run):
    """A hybrid run against its own ODE-only population fit: no AIC for the hybrid (its likelihood is
    conditional on z), both refitted per fold (the hybrid with its form and latent dimension) and scored on
    held-out patients."""
    from hybridpk.classify import compare_runs
    from hybridpk.solve.examples import simulate_ehc_population

    hyb, _, _ = run
    ds, _ = simulate_ehc_population(60, seed=4)
    result = compare_runs({"ode": hyb.population, "hybrid": hyb}, ds, folds=2, seed=1)
    rows = result.table.set_index("run")
    assert rows.loc["hybrid", "AIC"] is None or np.isnan(rows.loc["hybrid", "AIC"])
    assert np.isfinite(rows.loc["ode", "AIC"])
    assert all(np.isfinite(s.mean_cv_nll) and len(s.cv_rmse) == 2 for s in result.scores)
    assert result.recommended in ("ode", "hybrid")
    assert "of 2 folds" in result.reason or "one-standard-error rule" in result.reason


def test_the_report_of_a_hybrid_run(run, tmp_path):
    from hybridpk.report import write_report
    from hybridpk.solve.examples import simulate_ehc_population

    _, folder, _ = run
    ds, _ = simulate_ehc_population(60, seed=4)
    page = write_report(folder, ds, tmp_path / "rep", vpc_replicates=40).read_text()
    for name in FIGURES + HYBRID_FIGURES + ("fits_1", "classifier"):
        assert f'alt="{name}"' in page
    assert "no AIC or BIC" in page
    hybrid = load_run(folder).summary()["omega"]
    assert "estimated again with the correction in place" in page
    assert f"{hybrid['hybrid'][1][1]:.4g}" in page and f"{hybrid['sigma_hybrid']['ADD']:.4g}" in page


def test_the_training_curves_are_saved_with_the_run_and_drawn(run):
    from hybridpk.diagnostics import training_figure

    hyb, folder, _ = run
    reloaded = load_run(folder)
    assert reloaded.history == hyb.history and len(hyb.history) == 40
    curves = pd.read_csv(folder / "training.csv")
    assert list(curves.EPOCH) == list(range(40)) and (curves.FORM == "reservoir").all() and curves.CHOSEN.all()
    ax = training_figure(curves, warmup=10).axes[0]
    train, val, best = ax.lines[:3]
    assert list(train.get_ydata()) == [t for _, t, _ in hyb.history] and list(val.get_ydata()) == [
        v for _, _, v in hyb.history]
    after = [(v, e) for e, _, v in hyb.history if e >= 10]
    assert (best.get_ydata()[0], best.get_xdata()[0]) == min(after)
    assert reloaded.summary()["epochs_run"] == 40


def test_user_given_labels(run, tmp_path, capsys):
    """--labels FILE (ID, COMPLEX) replaces the evidence labels; a file missing a patient is refused by name."""
    import shutil

    from hybridpk.solve.examples import simulate_ehc_population

    _, folder, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    _, truth = simulate_ehc_population(60, seed=4)
    truth.rename(columns={"RECIRC": "COMPLEX"})[["ID", "COMPLEX"]].to_csv(tmp_path / "labels.csv", index=False)
    assert main(["classify", str(copy), "--labels", str(tmp_path / "labels.csv")]) == 0
    ind = pd.read_csv(copy / "individual.csv")
    assert (ind.LABEL.to_numpy() == truth.RECIRC.to_numpy()).all()
    assert "30 labelled COMPLEX" in capsys.readouterr().out
    truth.iloc[:-1].rename(columns={"RECIRC": "COMPLEX"})[["ID", "COMPLEX"]].to_csv(tmp_path / "short.csv",
                                                                                    index=False)
    assert main(["classify", str(copy), "--labels", str(tmp_path / "short.csv")]) == 2
