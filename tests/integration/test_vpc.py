"""VPC and pcVPC: a correctly specified model's observed percentiles lie in the simulated bands, a
misspecified one's do not in the terminal phase; prediction correction as Bergstrand et al. define it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import hybridpk as hp
from hybridpk.diagnostics import plot_vpc, prediction_correct, vpc
from hybridpk.population import build_model, fit_population


def test_prediction_correction_by_hand():
    """Bergstrand et al. 2011, eq. 1 with lb = 0: bin 'a' has PRED 1 and 2 (median 1.5), so 2 -> 2 x 1.5 / 1 = 3
    and 4 -> 4 x 1.5 / 2 = 3; bin 'b' (PRED 4, 4, 10; median 4) leaves the first two unchanged and scales the
    third by 0.4; PRED 0 (before the dose) is left out; a lower bound lb = 1 shifts the scaling to (y - 1)."""
    y = [2.0, 4.0, 5.0, 6.0, 10.0, 0.3]
    pred = [1.0, 2.0, 4.0, 4.0, 10.0, 0.0]
    bins = ["a", "a", "b", "b", "b", "a"]
    out = prediction_correct(y, pred, bins)
    assert out[:5] == pytest.approx([3.0, 3.0, 5.0, 6.0, 4.0]) and np.isnan(out[5])
    bounded = prediction_correct([2.0, 4.0], [2.0, 3.0], ["a", "a"], lower=1.0)   # median PRED 2.5
    assert bounded == pytest.approx([1 + 1 * 1.5 / 1, 1 + 3 * 1.5 / 2])


def _data(model: str, seed: int):
    design = hp.make_design(60, [dict(TIME=0, AMT=500)], [0.25, 0.5, 1, 2, 4, 8, 12, 24, 36, 48], jitter=0.1,
                            seed=seed)
    typical = dict(CL=3.0, V=10.0) if model == "1cmt_iv" else dict(CL=3.0, V=10.0, Q=8.0, V2=40.0)
    return hp.simulate_population(model, design, typical, dict(CL=0.09, V=0.04), proportional=0.1,
                                  additive=0.02, seed=seed).dataset


def _fit(model, ds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_population(build_model(model, iiv=["CL", "V"], error="combined"), ds, progress=False,
                              covariance=False)


@pytest.mark.parametrize("pc", [False, True])
def test_a_correct_model_is_inside_its_bands(pc):
    """Each observed percentile of a correct model lies in its simulated 90% band with probability about 0.9, so
    one dataset's 24 checks scatter around 0.9 (seeds 1-6: 0.875-1.0 for the VPC, 0.958-1.0 for the pcVPC); the
    criterion (>= 90% of bins inside) is checked over six datasets pooled, 144 checks."""
    inside = []
    for seed in range(1, 7):
        ds = _data("1cmt_iv", seed=seed)
        result = vpc(_fit("1cmt_iv", ds), ds, n=200, bins=8, pc=pc, seed=1)
        assert len(result.table) == 8
        inside.append(result.fraction_inside)
    assert np.mean(inside) >= 0.9 and min(inside) >= 0.8, inside
    fig = plot_vpc(result)
    assert len(fig.axes) == 1 and ("pcVPC" if pc else "VPC") in fig.axes[0].get_title()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_misspecified_model_is_outside_in_the_terminal_phase(seed):
    """1-cmt fitted to 2-cmt data: in the terminal phase (the last bins, 24-48 h) the observed median lies
    outside the simulated band."""
    ds = _data("2cmt_iv", seed=seed)
    result = vpc(_fit("1cmt_iv", ds), ds, n=200, bins=8, seed=1)
    late = result.table[result.table.TIME > 20]
    assert len(late) >= 2 and not late.INSIDE_P50.any()


def test_the_vpc_command(tmp_path, capsys):
    import pandas as pd

    from hybridpk.cli import main

    ds = _data("1cmt_iv", seed=4)
    _fit("1cmt_iv", ds).save(tmp_path / "run")
    ds.to_dataframe().to_csv(tmp_path / "d.csv", index=False)
    assert main(["vpc", str(tmp_path / "run"), "--data", str(tmp_path / "d.csv"), "--n", "50", "--pc", "--out",
                 str(tmp_path / "v.png")]) == 0
    assert (tmp_path / "v.png").stat().st_size > 5000 and len(pd.read_csv(tmp_path / "v.csv")) == 8
    assert "pcVPC" in capsys.readouterr().out
    assert main(["vpc", str(tmp_path / "run"), "--data", str(tmp_path / "d.csv"), "--n", "5", "--out",
                 str(tmp_path / "w.png")]) == 2


def test_time_after_dose_by_hand():
    """TAD from the dose records: ADDL doses count (6 h after the one at 24 h: 30 -> 6), a dose at a sample's time
    counts when its record comes first (the trough written before the 48-h dose is 24 h after the one at 24 h;
    the sample written after the 60-h dose 0 h), a steady-state dose is the last of its regimen, and a sample
    before any dose has none (NaN). Dose records' own TAD: from the dose before them."""
    import pandas as pd

    rows = [dict(ID=1, TIME=0.0, AMT=100.0, DV=0.0, EVID=1, MDV=1, ADDL=2, II=12.0, SS=0),
            dict(ID=1, TIME=6.0, AMT=0.0, DV=1.0, EVID=0, MDV=0, ADDL=0, II=0.0, SS=0),
            dict(ID=1, TIME=30.0, AMT=0.0, DV=1.0, EVID=0, MDV=0, ADDL=0, II=0.0, SS=0),
            dict(ID=1, TIME=48.0, AMT=0.0, DV=1.0, EVID=0, MDV=0, ADDL=0, II=0.0, SS=0),
            dict(ID=1, TIME=48.0, AMT=100.0, DV=0.0, EVID=1, MDV=1, ADDL=0, II=0.0, SS=0),
            dict(ID=1, TIME=60.0, AMT=100.0, DV=0.0, EVID=1, MDV=1, ADDL=0, II=0.0, SS=0),
            dict(ID=1, TIME=60.0, AMT=0.0, DV=1.0, EVID=0, MDV=0, ADDL=0, II=0.0, SS=0),
            dict(ID=2, TIME=0.0, AMT=0.0, DV=1.0, EVID=0, MDV=0, ADDL=0, II=0.0, SS=0),
            dict(ID=2, TIME=10.0, AMT=100.0, DV=0.0, EVID=1, MDV=1, ADDL=0, II=12.0, SS=1),
            dict(ID=2, TIME=13.0, AMT=0.0, DV=1.0, EVID=0, MDV=0, ADDL=0, II=0.0, SS=0)]
    b = hp.read_nonmem(pd.DataFrame(rows)).to_batch()
    tad = b.to_rows(b.time_after_dose())
    expect = [0.0, 6.0, 6.0, 24.0, 0.0, 0.0, 0.0, np.nan, 0.0, 3.0]
    np.testing.assert_allclose(tad, expect, equal_nan=True)


def test_a_vpc_by_time_after_dose_bins_tdm_samples_by_their_place_in_the_interval(tmp_path, capsys):
    """Repeated doses and samples at irregular times (TDM-like): binned by TAD every bin lies within one dosing
    interval, the correct model is inside its bands, the samples drawn before the first dose (written before
    its record) are left out; the command writes a TAD column and says how many were left out."""
    import pandas as pd

    from hybridpk.cli import main

    rng = np.random.default_rng(7)
    times = [0.0] + sorted(np.round(rng.uniform(1.0, 72.0, 7), 2).tolist())
    design = hp.make_design(60, [dict(TIME=0.0, AMT=300.0, ADDL=5, II=12.0)], times, seed=7)
    sim = hp.simulate_population("1cmt_iv", design, dict(CL=3.0, V=10.0), dict(CL=0.09, V=0.04), proportional=0.1,
                                 additive=0.02, seed=7).dataset.to_dataframe()
    pre = (sim.EVID == 0) & (sim.TIME == 0.0)          # the samples at 0 h drawn before the first dose
    df = sim.assign(DV=sim.DV.where(~pre, 0.0), ORDER=np.where(pre, 0, 1)).sort_values(
        ["ID", "TIME", "ORDER"], kind="stable").drop(columns="ORDER").reset_index(drop=True)
    ds = hp.read_nonmem(df)
    before = int(pre.sum())
    fit = _fit("1cmt_iv", hp.read_nonmem(sim))       # (fitted without them: DV 0 at a prediction of 0 would take
    #                                                   the additive SD to 0, an unbounded likelihood)
    result = vpc(fit, ds, n=200, bins=6, seed=1, idv="TAD")
    assert result.idv == "TAD" and "TAD" in result.table and result.left_out == before
    assert (result.observed.TAD >= 0).all() and (result.observed.TAD <= 12.0).all()
    assert result.table.TAD.is_monotonic_increasing and result.fraction_inside >= 0.75
    by_time = vpc(fit, ds, n=200, bins=6, seed=1)
    assert by_time.table.TIME.max() > 12.0 and by_time.left_out == 0
    assert plot_vpc(result).axes[0].get_xlabel().startswith("time after dose")
    fit.save(tmp_path / "run")
    df.to_csv(tmp_path / "d.csv", index=False)
    assert main(["vpc", str(tmp_path / "run"), "--data", str(tmp_path / "d.csv"), "--n", "50", "--idv", "TAD",
                 "--out", str(tmp_path / "v.png")]) == 0
    assert "TAD" in pd.read_csv(tmp_path / "v.csv").columns
    out = capsys.readouterr().out
    assert f"TAD: computed from the dose records; left out: {before} observation(s)" in out
    own = df.assign(TAD=np.where(df.EVID == 0, 1.0, 0.0))              # the data's own TAD column is the one used
    own.to_csv(tmp_path / "own.csv", index=False)
    assert main(["vpc", str(tmp_path / "run"), "--data", str(tmp_path / "own.csv"), "--n", "50", "--idv", "TAD",
                 "--out", str(tmp_path / "o.png")]) == 0
    assert "TAD: the data's TAD column" in capsys.readouterr().out
    assert set(pd.read_csv(tmp_path / "o.csv").TAD) == {1.0}


def test_npde_are_standard_normal_under_the_right_model_and_not_under_the_wrong_one():
    """Brendel et al. 2006: under the model the NPDE are N(0, 1) (Kolmogorov-Smirnov, mean, variance); the
    1-cmt model on 2-cmt data is rejected."""
    from scipy.stats import kstest

    from hybridpk.diagnostics import npde, plot_npde

    ds = _data("1cmt_iv", seed=2)
    table = npde(_fit("1cmt_iv", ds), ds, n=500, seed=3)
    v = table.NPDE.to_numpy()
    assert len(v) == 600 and abs(v.mean()) < 0.15 and 0.8 < v.var() < 1.2 and kstest(v, "norm").pvalue > 0.01
    assert len(plot_npde(table).axes) == 3
    wrong = _data("2cmt_iv", seed=3)
    bad = npde(_fit("1cmt_iv", wrong), wrong, n=500, seed=3).NPDE.to_numpy()
    assert kstest(bad, "norm").pvalue < 1e-3


def _censored(ds, lloq: float):
    """``ds`` with its levels below ``lloq`` censored (CENS = 1, the limit in DV), as an assay reports them."""
    df = ds.to_dataframe()
    below = ((df.EVID == 0) & (df.MDV == 0) & (df.DV < lloq)).to_numpy()
    return hp.read_nonmem(df.assign(CENS=below.astype(int), DV=np.where(below, lloq, df.DV))), below


@pytest.mark.parametrize("pc", [False, True])
def test_censored_levels_are_checked_as_bergstrand_and_karlsson_do(pc):
    """Levels below an LLOQ of 1 mg/L (about a third, all late): observed and simulated levels censored alike. The
    true model's observed fraction below the LLOQ lies in its simulated 90% band in nearly every bin (six datasets,
    48 bins) and its percentiles as often as without censoring; percentiles among censored levels are not drawn
    (NaN, observed and simulated alike). A model with half the clearance predicts too few levels below the LLOQ: its
    fraction is outside in the last bins. Before, the observed P5 and P50 of the late bins sat at the LLOQ, where the
    censored levels held them, against simulated percentiles far below it, and no fraction was checked."""
    inside_blq, inside = [], []
    for seed in range(1, 7):
        ds, below = _censored(_data("1cmt_iv", seed=seed), 1.0)
        assert 0.2 < below.mean() < 0.5
        true = hp.population.FittedPopulation.from_values(build_model("1cmt_iv", iiv=["CL", "V"], error="combined"),
                                                          {"CL": 3.0, "V": 10.0}, {"CL": 0.09, "V": 0.04},
                                                          {"ADD": 0.02, "PROP": 0.1})
        result = vpc(true, ds, n=200, bins=8, pc=pc, seed=1)
        assert result.censored == ("BLQ",)
        inside_blq.append(result.table.INSIDE_BLQ.mean())
        inside.append(result.fraction_inside)
        last = result.table.iloc[-1]
        assert np.isnan(last.OBS_P5) and np.isnan(last.SIM_P5_MEDIAN) and last.OBS_BLQ > 0.5
    assert np.mean(inside_blq) >= 0.85 and np.mean(inside) >= 0.85, (inside_blq, inside)
    assert len(plot_vpc(result).axes) == 1
    slow = hp.population.FittedPopulation.from_values(build_model("1cmt_iv", iiv=["CL", "V"], error="combined"),
                                                      {"CL": 1.5, "V": 10.0}, {"CL": 0.09, "V": 0.04},
                                                      {"ADD": 0.02, "PROP": 0.1})
    late = vpc(slow, ds, n=200, bins=8, pc=pc, seed=1).table.iloc[-2:]
    assert not late.INSIDE_BLQ.any() and (late.OBS_BLQ > late.SIM_BLQ_HIGH).all()
