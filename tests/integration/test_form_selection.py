"""The hybrid's correction form chosen by held-out evidence: the candidates that suit the structural model, a
screening round, and the winner trained to the end exactly as if it had been trained alone."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from hybridpk.cli import main
from hybridpk.residual import TrainConfig, fit_hybrid, load_run
from hybridpk.residual.predictive import predictive_score
from hybridpk.residual.selection import candidates
from hybridpk.residual.training import held_out_patients
from tests.integration.ehc import fitted_ehc_population


@pytest.fixture(scope="module")
def ehc_fit():
    ds, _, pm, fit = fitted_ehc_population(30, seed=4)
    return ds, pm, fit


def test_the_candidates_are_the_forms_that_suit_the_structure():
    forms = [c.form for c in candidates("auto", None, 2, joint=True, linear=True)]
    assert forms == ["input", "reservoir", "elimination", "log"]
    assert [c.form for c in candidates("auto", None, 2, joint=True, linear=False)] == ["log"]
    assert [c.form for c in candidates("auto", None, 2, joint=False, linear=True)] == ["log"]
    both = candidates("auto", "auto", 2, joint=True, linear=True)
    assert len(both) == 12 and {c.latent_dim for c in both} == {1, 2, 4}
    assert [(c.form, c.latent_dim) for c in candidates("reservoir", 3, 2, True, True)] == [("reservoir", 3)]


def test_the_best_screened_form_is_trained_to_the_end_as_if_alone(ehc_fit, tmp_path):
    ds, pm, fit = ehc_fit
    cfg = TrainConfig(epochs=30, warmup_epochs=5, screen_epochs=12, progress=False)
    hyb = fit_hybrid(pm, ds, population=fit, config=cfg, seed=2, progress=False)
    cands = hyb.candidates
    assert [c.form for c in cands] == ["input", "reservoir", "elimination", "log", "none"]
    (chosen,) = [c for c in cands if c.chosen]
    trained, none = cands[:-1], cands[-1]
    assert chosen.screen_score == min(c.screen_score for c in trained)
    # the ODE model (form none, nothing trained) scored alike: the recirculation is worth a correction
    assert none.epochs == 0 and none.score == none.screen_score and chosen.score < none.score
    assert hyb.vae.form_name == chosen.form == hyb.config.form and hyb.config.epochs == 30
    # the criterion: each held-out patient's levels predicted from its other levels, recomputed here
    held = [ds.ids[i] for i in held_out_patients(ds.n_subjects, replace(cfg, seed=2)).tolist()]
    assert chosen.criterion == "predictive" and len(held) == 6
    # candidates are scored as trained, with the population fit's OMEGA and SIGMA and the typical values training
    # left (the hybrid's own OMEGA, SIGMA and typical values are estimated once the form is chosen)
    as_trained = copy.deepcopy(hyb.vae)
    with torch.no_grad():
        as_trained.log_shift.copy_(torch.tensor(hyb.trained_log_shift, dtype=as_trained.log_shift.dtype))
    scored = replace(hyb, vae=as_trained, omega=None, sigma=None)
    assert chosen.epochs == 30 and chosen.score == pytest.approx(predictive_score(scored, ds, held), rel=1e-9)
    assert all(c.epochs == 12 and c.score is None for c in trained if not c.chosen)
    alone = fit_hybrid(pm, ds, population=fit, config=replace(cfg, form=chosen.form), seed=2, progress=False)
    assert alone.candidates == []
    for (k, v), (_, w) in zip(hyb.vae.state_dict().items(), alone.vae.state_dict().items()):
        assert torch.equal(v, w), k
    assert [h[2] for h in hyb.history] == [h[2] for h in alone.history]
    hyb.save(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["hybrid"]
    assert [c["form"] for c in summary["candidates"]] == [c.form for c in cands]
    assert [c["chosen"] for c in summary["candidates"]] == [c.chosen for c in cands]
    loaded = load_run(tmp_path / "run")
    assert loaded.candidates == cands
    assert loaded.trained_log_shift == hyb.trained_log_shift and summary["typical_values"]
    assert all(set(row) == {"population", "trained", "hybrid"} for row in summary["typical_values"].values())
    # every candidate's training curve is kept (training.csv): the losers' screening epochs, the winner's all
    assert [c.history for c in loaded.candidates] == [c.history for c in cands] and loaded.history == hyb.history
    assert loaded.training_curves().groupby("FORM", sort=False).size().to_dict() == {c.form: c.epochs for c in trained}


def test_the_command_prints_every_candidates_score_and_the_choice(ehc_fit, tmp_path, capsys):
    ds, _, _ = ehc_fit
    ds.to_dataframe().to_csv(tmp_path / "ehc.csv", index=False)
    assert main(["fit", str(tmp_path / "ehc.csv"), "--model", "1cmt_oral", "--error", "combined", "--hybrid", "vae",
                 "--epochs", "16", "--screen-epochs", "8", "--no-covariance", "--quiet", "--out",
                 str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "selection by predictive -2LL per held-out observation (each held-out patient's levels predicted from " \
           "its other levels) (lower is better; after 8 screening epochs):" in out
    assert out.count("<- chosen") == 1
    for form in ("input", "reservoir", "elimination", "log", "none (ODE)"):
        assert f"  {form:<12} K=2" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["hybrid"]
    assert sum(c["chosen"] for c in summary["candidates"]) == 1 and summary["config"]["screen_epochs"] == 8


def test_a_selection_interrupted_while_the_winner_continues_resumes_to_the_same_run(ehc_fit, tmp_path, monkeypatch):
    """Interrupted in the winner's continuation (past its screening epochs), then repeated with the same
    checkpoint folder: the screening scores are the kept ones (not the winner scored again at its later state),
    and the weights those of an uninterrupted selection."""
    import hybridpk.residual.training as training
    from hybridpk.errors import Interrupted

    ds, pm, fit = ehc_fit
    cfg = TrainConfig(epochs=14, warmup_epochs=3, screen_epochs=6, progress=False, checkpoint_every=2)
    ref = fit_hybrid(pm, ds, population=fit, config=cfg, seed=5, progress=False)
    real, calls = training._validate, {"n": 0}

    def interrupt(*a, **k):          # Ctrl-C in epoch 11 of the winner (4 x 6 screening epochs before)
        calls["n"] += 1
        if calls["n"] == 4 * 6 + 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(training, "_validate", interrupt)
        with pytest.raises(Interrupted):
            fit_hybrid(pm, ds, population=fit, config=cfg, seed=5, progress=False, checkpoint_dir=tmp_path)
    assert len(list(tmp_path.glob("vae_*.screen.json"))) == 4
    resumed = fit_hybrid(pm, ds, population=fit, config=cfg, seed=5, progress=False, checkpoint_dir=tmp_path)
    assert [(c.form, c.screen_score, c.chosen) for c in resumed.candidates] == \
        [(c.form, c.screen_score, c.chosen) for c in ref.candidates]
    for (k, v), (_, w) in zip(ref.vae.state_dict().items(), resumed.vae.state_dict().items()):
        assert torch.equal(v, w), k
