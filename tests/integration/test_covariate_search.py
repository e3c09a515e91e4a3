"""Covariate discovery: the screen finds the simulated relations and their q-values control the decoys; the
stepwise search (PsN's SCM rules) keeps WT on V and CRCL on CL and no decoy."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import hybridpk as hp
from hybridpk.classify import patient_covariates, screen_covariates, stepwise_covariates
from hybridpk.errors import HybridPKError
from hybridpk.population import build_model, fit_population


def _population(seed: int, n: int = 80):
    """1-cmt IV bolus; CL = 3 (CRCL/80)^0.75, V = 30 (WT/70)^1; decoys AGE (random), HT (correlated with WT,
    r ~ 0.6) and SEX (random, two levels)."""
    def draws(rng, k):
        wt = rng.normal(72, 14, k).clip(40, 130)
        return {"WT": wt, "CRCL": rng.normal(85, 25, k).clip(20, 160), "AGE": rng.uniform(20, 85, k),
                "HT": 170 + 0.45 * (wt - 72) + rng.normal(0, 7, k), "SEX": rng.integers(0, 2, k).astype(float)}

    design = hp.make_design(n, [dict(TIME=0, AMT=500)], [0.5, 2, 6, 12, 24], jitter=0.1, seed=seed,
                            covariates={k: (lambda rng, m, k=k: draws(np.random.default_rng([seed, 3]), m)[k])
                                        for k in ("WT", "CRCL", "AGE", "HT", "SEX")})
    sim = hp.simulate_population("1cmt_iv", design, dict(CL=3.0, V=30.0), dict(CL=0.09, V=0.06),
                                 covariates={"CL": ("CRCL", 80.0, 0.75), "V": ("WT", 70.0, 1.0)},
                                 proportional=0.1, additive=0.05, seed=seed)
    return sim.dataset


@pytest.fixture(scope="module")
def base():
    ds = _population(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(build_model("1cmt_iv", iiv=["CL", "V"], error="combined"), ds, progress=False,
                             covariance=False)
    return ds, fit


def test_the_screen_finds_the_relations(base):
    ds, fit = base
    screen = screen_covariates(fit.estimation.individual, patient_covariates(ds), permutations=300, seed=1)
    top = {(r.covariate, r.target) for r in screen.itertuples() if r.q_value < 0.05}
    assert ("CRCL", "ETA_CL") in top and ("WT", "ETA_V") in top
    assert ("AGE", "ETA_CL") not in top and ("SEX", "ETA_V") not in top
    assert set(screen.acts_on) == {"parameter"}
    assert {"spearman_rho", "mutual_information", "p_value", "q_value"} <= set(screen.columns)


def test_the_stepwise_search_keeps_the_true_relations_only(base):
    ds, fit = base
    candidates = [(p, c) for p in ("CL", "V") for c in ("WT", "CRCL", "AGE", "HT", "SEX")]
    search = stepwise_covariates(fit, ds, candidates)
    assert sorted(search.selected) == ["CL~CRCL", "V~WT"]
    final = search.final.theta
    assert final["CL_CRCL"].value == pytest.approx(0.75, abs=0.25) and final["V_WT"].value == pytest.approx(1, abs=0.3)
    forward = search.steps[search.steps.phase == "forward"]
    assert forward.kept.sum() == 2 and (forward[forward.kept].dOFV > 3.84).all()
    with pytest.raises(HybridPKError, match="no parameter KA"):
        stepwise_covariates(fit, ds, [("KA", "WT")])


def test_the_covariates_command(base, tmp_path, capsys):

    from hybridpk.cli import main

    ds, fit = base
    fit.save(tmp_path / "run")
    ds.to_dataframe().to_csv(tmp_path / "data.csv", index=False)
    assert main(["covariates", str(tmp_path / "run"), "--data", str(tmp_path / "data.csv"), "--candidates",
                 "WT,CRCL", "--parameters", "V", "--permutations", "100", "--out", str(tmp_path / "covs")]) == 0
    screen = pd.read_csv(tmp_path / "covs" / "screen.csv")
    assert len(screen) == 4 and (tmp_path / "covs" / "screen.png").stat().st_size > 1000
    steps = pd.read_csv(tmp_path / "covs" / "steps.csv")
    assert set(steps[steps.kept & (steps.phase == "forward")].relation) == {"V~WT"}
    assert (tmp_path / "covs" / "final" / "model.json").is_file()
    assert "selected: V~WT" in capsys.readouterr().out
    other = _population(seed=9)
    other.to_dataframe().to_csv(tmp_path / "other.csv", index=False)
    assert main(["covariates", str(tmp_path / "run"), "--data", str(tmp_path / "other.csv"), "--out",
                 str(tmp_path / "x")]) == 2


def test_a_sigmoid_maturation_beats_the_power_form():
    """CL matures with age as AGE^3 / (1^3 + AGE^3) (TM50 1 year, Hill 3; ages 0.05-12 years): the search
    tried with the power and the maturation forms keeps the maturation form, which beats the best power model
    by more than 10 OFV points, and recovers TM50 and the Hill coefficient."""
    import torch

    rng = np.random.default_rng(11)
    n = 80
    age = np.exp(rng.uniform(np.log(0.05), np.log(12.0), n))
    design = hp.make_design(n, [dict(TIME=0, AMT=100)], [0.5, 2, 6, 12, 24], jitter=0.1, seed=11,
                            covariates={"AGE": lambda r, m: age[:m]})
    cl = 3.0 * age ** 3 / (1.0 + age ** 3) * np.exp(rng.normal(0, 0.2, n))
    v = 30.0 * np.exp(rng.normal(0, 0.2, n))
    batch = design.to_batch()
    ipred = hp.simulate("1cmt_iv", {"CL": torch.tensor(cl), "V": torch.tensor(v)}, batch).ipred
    df = design.to_dataframe()
    conc = batch.to_rows(ipred)
    noise = 1 + 0.1 * rng.standard_normal(len(df))
    df["DV"] = np.where(df.EVID == 0, conc * noise + 0.01 * rng.standard_normal(len(df)), 0.0)
    ds = hp.read_nonmem(pd.DataFrame(df))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(build_model("1cmt_iv", iiv=["CL", "V"], error="combined"), ds, progress=False,
                             covariance=False)
    search = stepwise_covariates(fit, ds, [("CL", "AGE")], forms=("power", "maturation"))
    assert search.selected == ["CL~AGE (maturation)"]
    first = search.steps[(search.steps.phase == "forward") & (search.steps.step == 1)].set_index("form")
    assert first.loc["power", "OFV"] - first.loc["maturation", "OFV"] > 10
    theta = search.final.theta
    assert theta["CL_AGE_TM50"].value == pytest.approx(1.0, rel=0.3)
    assert theta["CL_AGE_HILL"].value == pytest.approx(3.0, rel=0.35)


def test_the_screen_figure_draws_each_relations_shape():
    """The strongest relation's shape: ETA_CL against AGE (a sigmoid in log AGE) with its running median, on a log
    axis because AGE spans more than two decades; the median follows the sigmoid."""
    from hybridpk.diagnostics import covariate_relations_figure

    rng = np.random.default_rng(3)
    age = np.exp(rng.uniform(np.log(0.05), np.log(12.0), 400))
    eta = np.log(age ** 3 / (1 + age ** 3)) + rng.normal(0, 0.1, 400)
    table = pd.DataFrame({"ID": np.arange(400), "ETA_CL": eta, "AGE": age})
    screen = screen_covariates(table[["ID", "ETA_CL"]], table[["ID", "AGE"]], permutations=50)
    ax = covariate_relations_figure(screen, table, units={"AGE": "y"}).axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "AGE (y)" and ax.get_ylabel() == "ETA_CL"
    (median,) = ax.lines
    x, y = median.get_xdata(), median.get_ydata()
    assert np.all(np.diff(y) > -0.2) and np.abs(y - np.log(x ** 3 / (1 + x ** 3))).max() < 0.35


@pytest.mark.slow
def test_a_maturation_on_an_ehc_population_is_found_through_the_hybrid():
    """Opt-in (about 3-4 min): benchmarks/maturation_ehc.py, seed 1: the screen of the hybrid's ETAs and Z finds AGE on
    ETA_CL (q < 0.05), the random decoy is not found, and the stepwise search keeps the maturation form of CL~AGE,
    which beats the power form by more than 10 OFV points."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "maturation_ehc", Path(__file__).resolve().parents[2] / "benchmarks" / "maturation_ehc.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.one(1)
    assert r["age_q_eta_cl"] < 0.05 and not r["decoy_found"] and r["selected"] == "CL~AGE (maturation)"
    assert r["ofv_power"] - r["ofv_maturation"] > 10
