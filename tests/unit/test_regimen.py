"""A regimen extends a patient's batch directly: the same tensors, and the same concentrations, as writing its
dose record into the patient's data and reading it back through the CSV door."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.data import Regimen
from hybridpk.data.regimen import MODEL_DURATION

PARAMS = {"CL": torch.tensor([4.5], dtype=torch.float64), "V": torch.tensor([58.0], dtype=torch.float64),
          "Q": torch.tensor([6.5], dtype=torch.float64), "V2": torch.tensor([38.0], dtype=torch.float64)}


def _patient():
    rows = [dict(ID=7, TIME=0.0, DV=0.0, AMT=1000.0, RATE=1000.0, ADDL=3, II=12.0, EVID=1, MDV=1, CRCL=80.0),
            dict(ID=7, TIME=37.5, DV=28.0, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0, CRCL=80.0),
            dict(ID=7, TIME=47.5, DV=11.0, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0, CRCL=80.0)]
    return pd.DataFrame(rows)


def _through_the_reader(history: pd.DataFrame, regimen, times, params=PARAMS):
    """The old way: the regimen's record and EVID=2 rows appended to the data, sorted, read back."""
    parts = [history.assign(_o=0)]
    if regimen is not None:
        parts.append(regimen.records(7).assign(CRCL=80.0, _o=0))
    parts.append(pd.DataFrame({"ID": 7, "TIME": np.asarray(times, float), "DV": 0.0, "AMT": 0.0, "RATE": 0.0,
                               "ADDL": 0, "II": 0.0, "EVID": 2, "MDV": 1, "CRCL": 80.0, "_o": 1}))
    df = pd.concat(parts, ignore_index=True)
    df = df.iloc[np.lexsort((df["_o"].to_numpy(), df["TIME"].to_numpy()))].drop(columns="_o")
    ds = hp.read_nonmem(df.reset_index(drop=True))
    b = ds.to_batch()
    is_new = (b.evid[0] == 2)
    return hp.simulate("2cmt_iv", params, b).ipred[0][is_new]


@pytest.mark.parametrize("regimen", [None, Regimen(48.0, 750.0, 12.0, 6, 1.0), Regimen(48.0, 500.0, 8.0, 4, 0.0),
                                     Regimen(40.0, 250.0, 6.0, 5, 0.5)])
def test_extend_gives_what_the_dataset_round_trip_gives(regimen):
    patient = hp.read_nonmem(_patient())
    times = np.linspace(0.0, 96.0, 193)        # on and between every dose time
    ext = patient.to_batch().extend(regimen, times)
    got = hp.simulate("2cmt_iv", PARAMS, ext).ipred[0, -len(times):]
    want = _through_the_reader(_patient(), regimen, times)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-12)
    assert ext.record_mask.all() and (ext.evid[0, -len(times):] == 2).all()


def test_regimen_alone_at_steady_state_and_its_record():
    reg = Regimen(0.0, 1.0, 12.0, 1, 1.0, steady_state=True)
    patient = hp.read_nonmem(_patient()).to_batch()
    alone = patient.extend(reg, [12.0], keep_records=False, keep_doses=False)
    assert alone.time.shape == (1, 1) and int(alone.dose_mask.sum()) == 1 and int(alone.dose_ss[0, 0]) == 1
    rec = Regimen(48.0, 750.0, 12.0, 6, 1.0).records(7)
    assert rec.to_dict("records") == [{"ID": 7, "TIME": 48.0, "AMT": 750.0, "RATE": 750.0, "ADDL": 5, "II": 12.0,
                                       "EVID": 1, "MDV": 1, "CMT": 0, "DV": 0.0}]
    # steady-state trough of a unit dose: the closed form's geometric series against 40 doses given in turn
    c_ss = hp.simulate("2cmt_iv", PARAMS, alone).ipred[0, 0]
    many = patient.extend(Regimen(0.0, 1.0, 12.0, 40, 1.0), [40 * 12.0], keep_records=False, keep_doses=False)
    assert float(hp.simulate("2cmt_iv", PARAMS, many).ipred[0, -1]) == pytest.approx(float(c_ss), rel=1e-6)


def test_a_regimen_of_the_models_own_duration_is_given_as_rate_minus_two():
    """Regimen(..., duration=MODEL_DURATION): records with RATE = -2 (NONMEM: the model's D1 sets the duration); the
    extended batch gives what its records read back give, and with D = 2.5 h what a stated 2.5-h infusion gives."""
    reg = Regimen(48.0, 750.0, 12.0, 6, MODEL_DURATION)
    assert reg.model_duration and reg.records(7).RATE.tolist() == [-2.0] and "model's own duration" in reg.how
    params = {**PARAMS, "D": torch.tensor([2.5], dtype=torch.float64)}
    times = np.linspace(0.0, 96.0, 193)
    ext = hp.read_nonmem(_patient()).to_batch().extend(reg, times)
    got = hp.simulate("2cmt_iv", params, ext).ipred[0, -len(times):]
    torch.testing.assert_close(got, _through_the_reader(_patient(), reg, times, params), rtol=1e-13, atol=1e-12)
    stated = _through_the_reader(_patient(), Regimen(48.0, 750.0, 12.0, 6, 2.5), times)
    torch.testing.assert_close(got, stated, rtol=1e-12, atol=1e-12)
