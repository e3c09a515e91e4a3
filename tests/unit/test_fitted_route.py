"""The route a fit's dose recommendations default to follows how its data dosed the model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import hybridpk as hp
from hybridpk.population import build_model
from hybridpk.population.fitted import route_of


def _data(**dose_columns) -> "hp.Dataset":
    rows = []
    for i in (1, 2):
        rows.append(dict(ID=i, TIME=0.0, AMT=100.0, DV=0.0, EVID=1, MDV=1,
                         **{k: v[0] for k, v in dose_columns.items()}))
        for t, c in ((1.0, 4.0), (4.0, 2.5)):
            rows.append(dict(ID=i, TIME=t, AMT=0.0, DV=c, EVID=0, MDV=0, **{k: v[1] for k, v in dose_columns.items()}))
    return hp.read_nonmem(pd.DataFrame(rows))


@pytest.mark.parametrize("columns, expected", [
    ({}, "bolus"),                                    # nlme's Indometh: boluses, no RATE column
    ({"RATE": (0.0, 0.0)}, "bolus"),
    ({"RATE": (50.0, 0.0)}, "infusion"),              # 2-h infusions
    ({"RATE": (-2.0, 0.0), "DUR": (2.0, 0.0)}, "infusion"),
])
def test_an_iv_model_takes_the_route_of_its_data(columns, expected):
    iv = build_model("1cmt_iv").structural
    assert route_of(iv, _data(**columns)) == expected


def test_a_depot_model_is_oral_and_no_data_is_infusion():
    assert route_of(build_model("1cmt_oral").structural, _data()) == "oral"
    assert route_of(build_model("1cmt_iv").structural) == "infusion"


def test_a_fit_records_it():
    rows = []
    for i, cl in enumerate((2.0, 2.6, 3.1, 3.9, 4.4, 5.2)):
        rows.append(dict(ID=i + 1, TIME=0.0, AMT=100.0, DV=0.0, EVID=1, MDV=1))
        rows += [dict(ID=i + 1, TIME=t, AMT=0.0, DV=100 / 20 * np.exp(-cl / 20 * t) * (1 + 0.03 * (-1) ** j),
                      EVID=0, MDV=0) for j, t in enumerate((0.5, 1.0, 2.0, 4.0, 8.0, 12.0))]
    fit = hp.fit_population(build_model("1cmt_iv", iiv=("CL",), error="proportional"),
                            hp.read_nonmem(pd.DataFrame(rows)), progress=False)
    assert fit.route == "bolus"
