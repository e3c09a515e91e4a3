"""Shipped published models reproduce the numbers their peers document for them.

amikacin_burdet2015: posologyr's test suite (tests/testthat/test_rxui.R, 'mod_amikacin_Burdet2015', patient A:
2000 mg over 0.5 h, levels 58 and 14 mg/L at 1 and 6 h, CLCREAT4H 50, TBW 62, PoverF 169) documents the MAP
ETAs (0.449952188793169, 0.273058665000001, 0.70615858706018, -0.138843327030614), the time to a trough of
2.5 mg/L by poso_time_cmin (33.9 h, its 0.1-h grid), and the dose at 34 h (0.5-h infusion) that gives 80 mg/L
at 35 h by poso_dose_conc (2447.917 mg)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import hybridpk as hp
from hybridpk.data import Regimen
from hybridpk.dosing import estimate_patient, forecast, time_to_concentration
from hybridpk.population import load_model


def _amikacin_patient_a():
    return hp.read_nonmem(pd.DataFrame([
        dict(ID=1, TIME=0.0, DV=0.0, EVID=1, MDV=1, AMT=2000.0, RATE=4000.0),
        dict(ID=1, TIME=1.0, DV=58.0, EVID=0, MDV=0, AMT=0.0, RATE=0.0),
        dict(ID=1, TIME=6.0, DV=14.0, EVID=0, MDV=0, AMT=0.0, RATE=0.0)]).assign(CLCREAT4H=50.0, TBW=62.0,
                                                                                  PoverF=169.0))


def test_amikacin_burdet2015_reproduces_posologyr():
    model = load_model("amikacin_burdet2015")
    post = estimate_patient(model, _amikacin_patient_a())
    eta = post.estimate.eta[0].numpy()
    assert eta == pytest.approx([0.449952188793169, 0.273058665000001, 0.70615858706018, -0.138843327030614],
                                abs=1e-5)
    ttc = time_to_concentration(model, _amikacin_patient_a(), 2.5, method="grid", posterior=post)
    assert ttc["map_time_after_last_dose_h"] == pytest.approx(33.9, abs=1e-9)
    fc = forecast(post.estimate, post.estimate.eta[:1], np.array([35.0]), Regimen(34.0, 2447.917, 24.0, 1, 0.5))
    assert float(fc.table.IPRED_MAP.iloc[0]) == pytest.approx(80.0, rel=1e-4)
