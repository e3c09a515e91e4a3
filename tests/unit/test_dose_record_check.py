"""The recommended dose against the patient's own record (hybridpk.dosing.safety.check_dose_against_record), and the
choice among regimens in the window by their daily dose (hybridpk.dosing.recommend._choose)."""

from __future__ import annotations

import pandas as pd

from hybridpk.dosing.safety import RECORD_FACTOR, check_dose_against_record


def _record(*amounts):
    rows = [dict(ID=1, TIME=12.0 * i, AMT=a, EVID=1, DV=0.0) for i, a in enumerate(amounts)]
    return pd.DataFrame(rows + [dict(ID=1, TIME=30.0, AMT=0.0, EVID=0, DV=10.0)])


def test_a_dose_far_above_the_largest_recorded_one_is_named():
    df = _record(1000.0, 1000.0)
    assert check_dose_against_record(RECORD_FACTOR * 1000.0, df) == []
    (warning,) = check_dose_against_record(RECORD_FACTOR * 1000.0 + 250.0, df)
    assert "5.25 times the largest dose in the patient's record (1000 mg)" in warning


def test_a_dose_far_below_the_smallest_recorded_one_is_named_and_a_loading_dose_is_not_the_reference():
    df = _record(25.0, 3.5, 3.5)            # pheno's neonate: a loading dose, then maintenance
    assert check_dose_against_record(1.0, df) == []                         # 3.5 times below the smallest
    (warning,) = check_dose_against_record(0.5, df)
    assert "7 times smaller than the smallest dose in the patient's record (3.5 mg)" in warning


def test_no_dose_in_the_record_or_no_dose_recommended_gives_no_warning():
    df = _record()
    assert check_dose_against_record(1e6, df) == []
    assert check_dose_against_record(0.0, _record(100.0)) == []


def test_a_regimen_needing_more_than_twice_the_least_daily_drug_in_the_window_is_not_chosen():
    from hybridpk.dosing.recommend import _choose
    from hybridpk.dosing.targets import parse_target

    tgt = parse_target("trough=1:4")
    cands = [dict(dose_mg=3000.0, interval_h=8.0, map_exposure=1.5),      # 9000 mg a day, 1.5 (off the middle)
             dict(dose_mg=1.1e7, interval_h=24.0, map_exposure=2.5),      # exactly the middle, 1.1e7 mg a day
             dict(dose_mg=9000.0, interval_h=12.0, map_exposure=2.0)]     # 18000 mg a day: within twice 9000
    assert _choose(tgt, cands)["interval_h"] == 12.0
    cands[2]["dose_mg"] = 9100.0                                           # 18200 mg a day: more than twice
    assert _choose(tgt, cands)["interval_h"] == 8.0


def test_the_default_dose_step_is_a_round_quarter_of_the_median_recorded_dose_or_less():
    from hybridpk.dosing.constraints import FALLBACK_DOSE_STEP, check_limits, record_dose_step

    cases = {(1000.0,): 250.0, (1000.0, 1250.0, 1250.0): 250.0, (500.0,): 100.0, (100.0,): 25.0, (10.0,): 2.5,
             (8.0,): 2.0, (40.0,): 10.0, (3.5,): 0.5, (25.0, 3.5, 3.5): 0.5, (0.3,): 0.05, (12000.0,): 2500.0}
    for amounts, step in cases.items():
        assert record_dose_step(_record(*amounts)) == step, amounts
    assert record_dose_step(_record()) is None
    limits = dict(intervals=[12.0], duration=0.0, max_dose=None, start=36.0, n_doses=10)
    assert check_limits(_record(25.0, 3.5, 3.5), dose_step=None, **limits).dose_step == 0.5
    assert check_limits(_record(), dose_step=None, **limits).dose_step == FALLBACK_DOSE_STEP
    assert check_limits(_record(3.5), dose_step=1.0, **limits).dose_step == 1.0     # a given step is kept
