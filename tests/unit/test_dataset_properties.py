"""Property-based tests: valid datasets round-trip; corruptions raise DatasetError and nothing else."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hybridpk as hp
from hybridpk.errors import DatasetError, DatasetWarning

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def valid_datasets(draw):
    n = draw(st.integers(1, 5))
    rows = []
    for i in range(n):
        sid = draw(st.integers(1, 10_000)) * 10 + i  # unique
        wt = draw(st.floats(20, 150, allow_nan=False))
        t = 0.0
        addl = draw(st.integers(0, 3))
        ii = draw(st.sampled_from([0.0, 8.0, 12.0, 24.0])) if addl == 0 else draw(st.sampled_from([8.0, 12.0]))
        rate = draw(st.sampled_from([0.0, 50.0]))
        rows.append(dict(ID=sid, TIME=0.0, DV=0.0, AMT=draw(st.floats(1, 1000)), EVID=1, MDV=1, CMT=1,
                         RATE=rate, ADDL=addl, II=ii, WT=wt))
        k = draw(st.integers(1, 8))
        gaps = draw(st.lists(st.floats(0.05, 24, allow_nan=False), min_size=k, max_size=k))
        for g in gaps:
            t = round(t + g, 6)
            rows.append(dict(ID=sid, TIME=t, DV=draw(st.floats(0.001, 500, allow_nan=False)), AMT=0.0, EVID=0,
                             MDV=0, CMT=2, RATE=0.0, ADDL=0, II=0.0, WT=wt))
    return pd.DataFrame(rows)


def _read_csv_text(df: pd.DataFrame, **kwargs):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "data.csv"
        df.to_csv(p, index=False)
        return hp.read_nonmem(p, **kwargs)


@SETTINGS
@given(valid_datasets())
def test_valid_datasets_round_trip(df):
    ds = _read_csv_text(df)
    assert ds.n_subjects == df.ID.nunique()
    assert ds.n_observations == int((df.EVID == 0).sum())
    assert ds.n_doses == int((df.EVID == 1).sum() + df.ADDL.sum())
    back = ds.to_dataframe()
    np.testing.assert_array_equal(back["TIME"].to_numpy(), df["TIME"].to_numpy())
    np.testing.assert_allclose(back["DV"].to_numpy(), df["DV"].to_numpy(), rtol=0, atol=0)
    assert hp.read_nonmem(back) == ds
    assert _read_csv_text(back) == ds
    b = ds.to_batch()
    assert int(b.is_obs.sum()) == ds.n_observations and int(b.dose_mask.sum()) == ds.n_doses


INVALID_VALUES = {
    "ID": ["abc", ""], "TIME": ["x", ""], "AMT": ["-1", "dose"], "EVID": ["9", "-1", "1.5"], "MDV": ["2", "y"],
    "ADDL": ["-2", "0.5"], "II": ["-3"], "RATE": ["-7"], "CMT": ["-1", "2.5"], "WT": ["", "heavy"],
}


@SETTINGS
@given(valid_datasets(), st.data())
def test_guaranteed_corruptions_raise_dataset_error(df, data):
    col = data.draw(st.sampled_from(sorted(INVALID_VALUES)))
    row = data.draw(st.integers(0, len(df) - 1))
    value = data.draw(st.sampled_from(INVALID_VALUES[col]))
    bad = df.astype(object)
    bad.iloc[row, bad.columns.get_loc(col)] = value
    try:
        _read_csv_text(pd.DataFrame(bad), covariates=["WT"])  # WT declared: text there is an error
    except DatasetError as exc:
        assert exc.violations, "a DatasetError must list its violations"
        assert any(v.column == col or v.rows for v in exc.violations)
    else:
        raise AssertionError(f"corrupting {col} on row {row + 1} with {value!r} was accepted")


@SETTINGS
@given(valid_datasets(), st.data())
def test_arbitrary_corruptions_raise_nothing_but_dataset_error(df, data):
    kind = data.draw(st.sampled_from(["cell", "drop_column", "swap_rows", "duplicate_row", "truncate"]))
    bad = df.astype(object)
    if kind == "cell":
        col = data.draw(st.sampled_from(list(bad.columns)))
        row = data.draw(st.integers(0, len(bad) - 1))
        bad.iloc[row, bad.columns.get_loc(col)] = data.draw(st.one_of(
            st.text(max_size=5), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10)))
    elif kind == "drop_column":
        bad = bad.drop(columns=data.draw(st.sampled_from(list(bad.columns))))
    elif kind == "swap_rows" and len(bad) > 1:
        i, j = data.draw(st.integers(0, len(bad) - 1)), data.draw(st.integers(0, len(bad) - 1))
        order = list(range(len(bad)))
        order[i], order[j] = order[j], order[i]
        bad = bad.iloc[order]
    elif kind == "duplicate_row":
        i = data.draw(st.integers(0, len(bad) - 1))
        bad = pd.concat([bad.iloc[: i + 1], bad.iloc[i:]])
    elif kind == "truncate":
        bad = bad.iloc[: data.draw(st.integers(0, len(bad)))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        try:
            _read_csv_text(pd.DataFrame(bad))
        except DatasetError:
            pass
