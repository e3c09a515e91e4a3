"""A recommendation is never impossible: for any valid patient and limits it is a positive whole number of
dose steps, at most the maximum dose, with infusions no longer than the interval and its MAP exposure in the
target window, or it is a refusal naming the nearest allowed regimen; invalid limits are refused by name;
the sampling seed does not change it."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings

import hybridpk as hp
from hybridpk.dosing import estimate_patient, recommend_dose
from hybridpk.errors import HybridPKError


def patient(crcl=80.0, wt=70.0, peak=28.5, trough=12.1):
    rows = [dict(ID=3, TIME=0.0, DV=0.0, AMT=1000.0, RATE=1000.0, ADDL=3, II=12.0, EVID=1, MDV=1),
            dict(ID=3, TIME=37.5, DV=peak, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0),
            dict(ID=3, TIME=47.5, DV=trough, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0)]
    return hp.read_nonmem(pd.DataFrame(rows).assign(CRCL=crcl, WT=wt, DIAL=0))


limits = st.fixed_dictionaries({
    "dose_step": st.sampled_from([50.0, 125.0, 250.0, 500.0]),
    "cap": st.one_of(st.none(), st.floats(1.0, 8.0)),            # max dose in steps (None: no cap)
    "interval": st.sampled_from([None, 6.0, 8.0, 12.0, 24.0]),
    "duration": st.floats(0.0, 1.0),                              # fraction of the shortest interval
    "target": st.sampled_from(["auc24=400:600", "trough=10:15", "peak=25:40", "auc24@2=300:500"]),
})


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(crcl=st.floats(20.0, 150.0), wt=st.floats(45.0, 130.0), trough=st.floats(3.0, 30.0), lim=limits)
def test_every_recommendation_is_possible_or_a_refusal_with_the_nearest(crcl, wt, trough, lim):
    ds = patient(crcl, wt, peak=trough * 2.2, trough=trough)
    step = lim["dose_step"]
    max_dose = None if lim["cap"] is None else step * math.floor(lim["cap"])
    shortest = lim["interval"] or 8.0
    duration = round(lim["duration"] * shortest, 3)
    kw = dict(interval=lim["interval"], duration=duration, dose_step=step, max_dose=max_dose, n_samples=200)
    try:
        rec = recommend_dose("vancomycin_goti2018", ds, lim["target"], **kw)
    except HybridPKError as exc:
        assert "nearest is" in str(exc) and " 0 mg" not in str(exc)
        return
    assert rec.dose > 0 and abs(rec.dose / step - round(rec.dose / step)) < 1e-9
    assert max_dose is None or rec.dose <= max_dose
    assert rec.duration <= rec.interval and rec.interval in ((lim["interval"],) if lim["interval"] else (8, 12, 24))
    exposure = next(iter(rec.exposure.values()))
    assert exposure["target"][0] <= exposure["map"] <= exposure["target"][1]


@pytest.mark.parametrize("kw, named", [
    (dict(max_dose=-5), "max_dose (--max-dose) = -5"), (dict(max_dose=100), "max_dose (--max-dose) = 100"),
    (dict(dose_step=-250), "dose_step (--dose-step) = -250"), (dict(dose_step=0), "dose_step (--dose-step) = 0"),
    (dict(duration=24, interval=12), "would overlap the next dose"), (dict(duration=-1), "duration (--duration) = -1"),
    (dict(interval=0), "interval (--interval) = 0"), (dict(start=1e9), "start (--start) = 1000000000.0"),
    (dict(dose_step=float("nan")), "dose_step (--dose-step) = nan"),
])
def test_invalid_limits_are_refused_by_name(kw, named):
    with pytest.raises(HybridPKError, match=__import__("re").escape(named)):
        recommend_dose("vancomycin_goti2018", patient(), "auc24=400:600", n_samples=100, **kw)


def test_the_seed_does_not_change_the_recommendation():
    """The issue's patient (70 kg, 1000 mg q12h, peak 28.5, trough 12.1 mg/L): seed 0 recommended 750 mg (MAP
    AUC24 398.7, outside 400-600) over 1000 mg because Monte-Carlo attainment was 50.9% against 50.4%."""
    ds = patient()
    recs = [recommend_dose("vancomycin_goti2018", ds, "auc24=400:600", interval=12, n_samples=1000,
                           posterior=estimate_patient("vancomycin_goti2018", ds, seed=seed)) for seed in range(10)]
    assert {(r.dose, r.interval) for r in recs} == {(1000.0, 12.0)}
    assert all(400 <= r.exposure["auc24"]["map"] <= 600 for r in recs)
    assert all(r.pta_mc_se is not None and 0 < r.pta_mc_se < 0.05 for r in recs)
