"""hybridpk models / simulate from the command line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import hybridpk as hp
from hybridpk.cli import main


def test_models_lists_every_model_with_units(capsys):
    assert main(["models", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    expected = {"1cmt_iv", "1cmt_oral", "2cmt_iv", "2cmt_oral", "3cmt_iv", "1cmt_oral_transit", "1cmt_iv_mm",
                "1cmt_oral_mm", "tmdd_full", "tmdd_qss", "1cmt_oral_ehc"}
    assert expected <= set(info)
    assert info["2cmt_iv"]["parameters"]["Q"]["unit"] == "L/h"
    assert main(["models", "tmdd_qss"]) == 0
    assert "KSS" in capsys.readouterr().out


def test_simulate_individual_params_matches_library(tmp_path, theoph_path, capsys):
    ds = hp.read_nonmem(theoph_path)
    params = pd.DataFrame({"ID": list(ds.ids), "CL": np.linspace(2, 4, 12), "V": 30.0, "KA": 1.5})
    params.to_csv(tmp_path / "p.csv", index=False)
    out = tmp_path / "ipred.csv"
    assert main(["simulate", str(theoph_path), "--model", "1cmt_oral", "--params", str(tmp_path / "p.csv"),
                 "--out", str(out)]) == 0
    got = pd.read_csv(out)
    assert list(got.columns) == ["ID", "TIME", "IPRED"] and len(got) == len(ds)
    b = ds.to_batch()
    direct = hp.simulate("1cmt_oral", params, b).to_dataframe(b)
    np.testing.assert_allclose(got.IPRED, direct.IPRED, rtol=1e-12)
    np.testing.assert_array_equal(got.TIME, ds.to_dataframe().TIME)


def test_simulate_population_writes_readable_dataset(tmp_path, capsys):
    out = tmp_path / "sim.csv"
    args = ["simulate", "theoph", "--model", "1cmt_oral", "--typical", "CL=2.8,V=31,KA=1.5", "--omega",
            "CL=0.1,KA=0.3", "--covariate", "V=WT:70:1", "--proportional", "0.1", "--seed", "4", "--out", str(out)]
    assert main(args) == 0
    sim = hp.read_nonmem(out)
    assert sim.n_subjects == 12 and sim.n_observations == 132
    meta = json.loads((tmp_path / "sim.json").read_text())
    assert meta["seed"] == 4 and meta["versions"]["torch"]
    first = out.read_bytes()
    assert main(args) == 0
    assert out.read_bytes() == first


def test_simulate_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["simulate", "theoph", "--model", "nope", "--typical", "CL=1", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    bad = tmp_path / "p.csv"
    bad.write_text("ID,CL,V\n1,2,3\n")
    assert main(["simulate", "theoph", "--model", "1cmt_oral", "--params", str(bad), "--out",
                 str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert "no row for ID" in err or "missing: KA" in err


def test_simulate_a_virtual_population_in_chunks(tmp_path, capsys):
    """--n with a one-patient design: N patients (IDs 1..N) streamed to Parquet with the parameter file, the
    same as CSV; --n with --params and --chunk without --n are refused by name."""
    design = tmp_path / "one.csv"
    rows = [dict(ID=1, TIME=0.0, AMT=100.0, EVID=1, MDV=1, DV=0.0, WT=70.0)]
    rows += [dict(ID=1, TIME=t, AMT=0.0, EVID=0, MDV=0, DV=0.0, WT=70.0) for t in (0.5, 1, 2, 4, 8, 12, 24)]
    pd.DataFrame(rows).to_csv(design, index=False)
    args = ["simulate", str(design), "--model", "1cmt_oral", "--typical", "CL=5,V=50,KA=1.2", "--omega",
            "CL=0.09,V=0.04", "--proportional", "0.1", "--n", "2500", "--chunk", "700", "--seed", "4"]
    assert main(args + ["--out", str(tmp_path / "sim.parquet")]) == 0
    assert "2500 subjects" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "sim.csv")]) == 0
    pq = pd.read_parquet(tmp_path / "sim.parquet")
    pd.testing.assert_frame_equal(pq, pd.read_csv(tmp_path / "sim.csv"), check_dtype=False)
    assert pq.ID.unique().tolist() == list(range(1, 2501)) and len(pq) == 2500 * 8
    params = pd.read_parquet(tmp_path / "sim.params.parquet")
    assert params.ID.tolist() == list(range(1, 2501)) and params.KA.eq(1.2).all()
    assert np.log(params.CL / 5).var() == pytest.approx(0.09, rel=0.1)
    meta = json.loads((tmp_path / "sim.json").read_text())
    assert meta["virtual_patients"] == 2500 and meta["chunk"] == 700
    assert main(["simulate", str(design), "--model", "1cmt_oral", "--params", str(design), "--n", "5",
                 "--out", str(tmp_path / "x.csv")]) != 0
    assert "--n simulates a virtual population" in capsys.readouterr().err
    assert main(["simulate", str(design), "--model", "1cmt_oral", "--typical", "CL=5,V=50,KA=1", "--chunk", "5",
                 "--out", str(tmp_path / "y.csv")]) != 0
    assert "--chunk applies to a virtual population" in capsys.readouterr().err


def test_device_auto_simulates_where_a_gpu_would_and_gives_the_same_population(tmp_path, theoph_path, capsys):
    """--device auto solves on a CUDA GPU when there is one, else the CPU; the draws stay on the CPU, so the
    population is the device's solve of the same numbers. Here (no GPU in CI) auto is the CPU: the files equal
    the default run's byte for byte, and the run's JSON says which device solved it."""
    import torch

    args = ["simulate", "theoph", "--model", "1cmt_oral", "--typical", "CL=2.8,V=31,KA=1.5", "--omega", "CL=0.1",
            "--proportional", "0.1", "--n", "30", "--chunk", "7", "--seed", "2"]
    assert main(args + ["--out", str(tmp_path / "a.csv")]) == 0
    assert main(args + ["--device", "auto", "--out", str(tmp_path / "b.csv")]) == 0
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.loads((tmp_path / "b.json").read_text())["device"] == expected
    assert json.loads((tmp_path / "a.json").read_text())["device"] == "cpu"
    if expected == "cpu":
        for name in ("a.csv", "a.params.csv"):
            assert (tmp_path / name).read_bytes() == (tmp_path / name.replace("a", "b", 1)).read_bytes()
    # --params mode takes the device too
    ds = hp.read_nonmem(theoph_path)
    params = pd.DataFrame({"ID": list(ds.ids), "CL": np.linspace(2, 4, 12), "V": 30.0, "KA": 1.5})
    params.to_csv(tmp_path / "p.csv", index=False)
    for dev, name in (("cpu", "c.csv"), ("auto", "d.csv")):
        assert main(["simulate", str(theoph_path), "--model", "1cmt_oral", "--params", str(tmp_path / "p.csv"),
                     "--device", dev, "--out", str(tmp_path / name)]) == 0
    got = pd.read_csv(tmp_path / "d.csv")
    b = ds.to_batch()
    np.testing.assert_allclose(got.IPRED, hp.simulate("1cmt_oral", params, b).to_dataframe(b).IPRED, rtol=1e-12)
    if expected == "cpu":
        assert (tmp_path / "c.csv").read_bytes() == (tmp_path / "d.csv").read_bytes()


@pytest.fixture(scope="module")
def pheno_run(tmp_path_factory, pharmpy_examples):
    """pharmpy's pheno.mod fitted by 'hybridpk fit' (WGT and APGR covariates, proportional error)."""
    import shutil

    d = tmp_path_factory.mktemp("simfit")
    for f in ("pheno.mod", "pheno.dta"):
        shutil.copy(pharmpy_examples / f, d / f)
    assert main(["fit", str(d / "pheno.mod"), "--out", str(d / "run"), "--quiet", "--no-covariance"]) == 0
    return d


def test_simulate_from_a_fitted_run_uses_its_own_estimates(pheno_run, capsys):
    """--model RUN: the design of DATA with DV from the run's THETA/OMEGA/SIGMA (NONMEM's $SIMULATION at the final
    estimates): the same as the library's FittedPopulation.simulate; the ETAs drawn over 5000 virtual patients have
    the run's OMEGA as their variance; seeded, and the chunks do not change the per-patient design."""
    from hybridpk.residual import load_run

    d = pheno_run
    fitted = load_run(d / "run")
    design = hp.read_nonmem(d / "pheno.dta")
    assert main(["simulate", str(d / "pheno.dta"), "--model", str(d / "run"), "--out", str(d / "s.csv")]) == 0
    assert "simulated from" in capsys.readouterr().out
    sim, drawn = pd.read_csv(d / "s.csv"), pd.read_csv(d / "s.params.csv")
    ref = design.to_dataframe()
    assert list(sim.columns) == list(ref.columns) and np.allclose(sim.TIME, ref.TIME) and np.allclose(sim.AMT, ref.AMT)
    obs = ref.MDV.to_numpy() == 0
    assert (sim.DV[obs] != ref.DV[obs]).all() and (sim.DV[~obs] == 0).all()
    seed = int(np.random.SeedSequence([0, 0]).generate_state(1)[0])
    lib = fitted.simulate(design, n=1, seed=seed)
    assert np.allclose(sim.DV, lib.DV, rtol=1e-12) and list(drawn.columns) == ["ID", "ETA_CL", "ETA_VC"]
    assert main(["simulate", str(d / "pheno.dta"), "--model", str(d / "run"), "--out", str(d / "s1.csv")]) == 0
    assert pd.read_csv(d / "s1.csv").equals(sim)                                   # same seed, same data
    assert main(["simulate", str(d / "pheno.dta"), "--model", str(d / "run"), "--seed", "4", "--n", "5000",
                 "--chunk", "2000", "--out", str(d / "v.csv")]) == 0
    big, etas = pd.read_csv(d / "v.csv"), pd.read_csv(d / "v.params.csv")
    assert big.ID.nunique() == 5000 and len(etas) == 5000 and list(etas.ID) == list(range(1, 5001))
    omega = {e.eta: e.variance for e in fitted.omega}
    for name in ("ETA_CL", "ETA_VC"):            # SE of a variance from 5000 draws: 2%
        assert etas[name].var() == pytest.approx(omega[name], rel=0.08)
        assert abs(etas[name].mean()) < 4 * np.sqrt(omega[name] / 5000)


def test_simulate_from_a_fitted_model_refuses_what_it_cannot_honour(pheno_run, theoph_path, capsys):
    d = pheno_run
    assert main(["simulate", str(d / "pheno.dta"), "--model", str(d / "run"), "--typical", "CL=1", "--proportional",
                 "0.1", "--out", str(d / "x.csv")]) == 2
    assert "simulated from its own THETA, OMEGA and SIGMA; drop --typical, --proportional" in capsys.readouterr().err
    assert main(["simulate", str(theoph_path), "--model", str(d / "run"), "--out", str(d / "x.csv")]) == 2
    assert "uses covariate(s) WGT, APGR, which the dataset lacks (it has WT)" in capsys.readouterr().err
    assert main(["simulate", str(theoph_path), "--model", "1cmt_oral", "--out", str(d / "x.csv")]) == 2
    assert "give --params (individual mode) or --typical (population mode)" in capsys.readouterr().err
    # a control stream at its estimates is a fitted model too
    assert main(["simulate", str(d / "pheno.dta"), "--model", str(d / "pheno.mod"), "--out", str(d / "m.csv")]) == 0
    assert len(pd.read_csv(d / "m.csv")) == len(hp.read_nonmem(d / "pheno.dta").to_dataframe())


def test_simulated_levels_are_censored_as_the_data_are_not_by_their_old_marks(tmp_path, theoph_path, capsys):
    """Simulating on data with censored levels (CENS = 1, the limit 2 mg/L in DV): every simulated level below 2
    mg/L is CENS = 1 at 2 mg/L, every other one is kept as simulated with CENS = 0, in population and in fitted
    mode. The data's CENS marks were copied onto the new levels: a simulated 7 mg/L marked censored, which a fit
    of the simulated dataset read as a level below a limit of 7 mg/L."""
    df = pd.read_csv(theoph_path)
    obs = ((df.EVID == 0) & (df.MDV == 0)).to_numpy()
    below = obs & (df.DV < 2.0).to_numpy()
    df.assign(CENS=below.astype(int), DV=np.where(below, 2.0, df.DV)).to_csv(tmp_path / "cens.csv", index=False)
    run = tmp_path / "run"
    assert main(["fit", str(tmp_path / "cens.csv"), "--model", "1cmt_oral", "--out", str(run), "--quiet"]) == 0
    population = ["--model", "1cmt_oral", "--typical", "CL=2.8,V=32,KA=1.5", "--omega", "CL=0.5,V=0.5",
                  "--proportional", "0.1"]
    for mode in (["--model", str(run)], population):
        out = tmp_path / "sim.csv"
        capsys.readouterr()
        assert main(["simulate", str(tmp_path / "cens.csv"), *mode, "--seed", "2", "--out", str(out)]) == 0
        sim = pd.read_csv(out)
        cens = sim.CENS.to_numpy()[obs]
        level = sim.DV.to_numpy()[obs]
        assert 0 < (cens == 1).sum() < obs.sum() and (cens == 1).tolist() != below[obs].tolist()
        assert (level[cens == 1] == 2.0).all() and (level[cens == 0] >= 2.0).all()
        assert f"{int((cens == 1).sum())} censored at the data's limits" in capsys.readouterr().out
        assert hp.read_nonmem(out).n_censored_observations == (cens == 1).sum()


def test_simulated_records_follow_a_blq_column_and_each_records_lloq():
    """Dataset.simulated_records: with a BLQ and an LLOQ column of two limits, each record's own LLOQ censors its
    simulated level (BLQ follows CENS); with one limit for every censored level, it is every record's."""
    base = dict(ID=[1] * 5, TIME=[0, 1, 2, 3, 4], AMT=[100, 0, 0, 0, 0], EVID=[1, 0, 0, 0, 0])
    two = hp.read_nonmem(pd.DataFrame(dict(base, DV=[0, 5, 0.5, 0.05, 0.05], BLQ=[0, 0, 0, 1, 1],
                                           LLOQ=[0, 1, 1, 0.1, 0.1])))
    rec = two.simulated_records(np.array([0, 0.8, 3.0, 0.05, 0.5]))
    assert rec.CENS.tolist() == [0, 1, 0, 1, 0] and rec.BLQ.tolist() == [0, 1, 0, 1, 0]
    assert rec.DV.tolist() == [0, 1.0, 3.0, 0.1, 0.5]
    one = hp.read_nonmem(pd.DataFrame(dict(base, DV=[0, 5, 0.2, 0.2, 9], CENS=[0, 0, 1, 1, -1])))
    rec = one.simulated_records(np.array([7, 0.1, 3.0, 0.3, 12.0]))
    assert rec.CENS.tolist() == [0, 1, 0, 0, -1] and rec.DV.tolist() == [0, 0.2, 3.0, 0.3, 9.0]
