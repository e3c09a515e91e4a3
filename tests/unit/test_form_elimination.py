"""The elimination form of the hybrid: an extra concentration-dependent elimination from the central compartment,
checked against scipy's solution of the same ODE (Michaelis-Menten elimination on top of the linear model, for an IV
2-compartment model and an oral 1-compartment model, single and repeated doses)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.integrate import solve_ivp

import hybridpk as hp
from hybridpk.models import get_model
from hybridpk.residual.vae import HybridVAE

VM, KM = 0.5, 2.0           # extra elimination V VM C / (KM + C): k_e = VM / (KM + C) 1/h, KM mg/L
TIMES = [0.5, 1.0, 2.0, 3.0, 4.2, 5.0, 7.0, 9.0, 10.3, 12.0, 13.9, 16.0, 20.0, 24.0]
CASES = {
    "2cmt_iv": ({"CL": 2.0, "V": 20.0, "Q": 3.0, "V2": 30.0}, 1),
    "1cmt_oral": ({"CL": 4.0, "V": 40.0, "KA": 1.2}, 1),
}


def michaelis_menten(z, k10, scale, dt, tfd):
    """Stands in for the rate network: k_e = VM / (KM + C)."""
    return lambda c, j: VM / (KM + c)


def form_prediction(model_name, rows, cells: int):
    params, _ = CASES[model_name]
    batch = hp.read_nonmem(pd.DataFrame(rows)).to_batch()
    vae = HybridVAE(28, 2, 8, joint=True, n_shift=len(params), form="elimination").double()
    vae.scale = {"input_dt": 24.0 / cells, "t": 1.0, "dose": 100.0, "n_fourier": 6, "c0": 1e-12,
                 "logc_mean": 0.0, "logc_sd": 1.0}
    vae.form.rate_constant = michaelis_menten
    p = {k: torch.tensor([v], dtype=torch.float64) for k, v in params.items()}
    pred, _ = vae.predict(batch, torch.ones_like(batch.time), torch.zeros(1, 2, dtype=torch.float64), p,
                          get_model(model_name))
    return pred[0, batch.is_obs[0]].detach().numpy()


def scipy_reference(model_name, doses):
    p, _ = CASES[model_name]

    def rhs(t, a):
        if model_name == "2cmt_iv":
            c, per = a
            cc = c / p["V"]
            extra = p["V"] * VM * cc / (KM + cc)
            return [-p["CL"] * cc - p["Q"] * cc + p["Q"] * per / p["V2"] - extra, p["Q"] * cc - p["Q"] * per / p["V2"]]
        gut, c = a
        cc = c / p["V"]
        return [-p["KA"] * gut, p["KA"] * gut - p["CL"] * cc - p["V"] * VM * cc / (KM + cc)]

    central = 0 if model_name == "2cmt_iv" else 1
    out, state, t0 = [], [0.0, 0.0], 0.0
    for t1 in sorted(set([d for d, _ in doses] + [24.0])):
        if t1 > t0:
            ts = [t for t in TIMES if t0 < t < t1]
            sol = solve_ivp(rhs, (t0, t1), state, t_eval=ts + [t1], rtol=1e-10, atol=1e-12, max_step=0.01)
            out += list(sol.y[central, :len(ts)] / p["V"]) + ([sol.y[central, -1] / p["V"]] if t1 in TIMES else [])
            state = list(sol.y[:, -1])
        state[0] += sum(a for d, a in doses if d == t1)
        t0 = t1
    return np.array(out)


@pytest.mark.parametrize("model_name", list(CASES))
@pytest.mark.parametrize("doses", [[(0.0, 100.0)], [(0.0, 100.0), (8.0, 50.0)]])
def test_elimination_form_matches_the_ode_it_stands_for(model_name, doses):
    cmt = 1 if model_name == "2cmt_iv" else 2
    rows = [dict(ID=1, TIME=d, DV=0.0, AMT=a, EVID=1, MDV=1, CMT=1) for d, a in doses]
    rows += [dict(ID=1, TIME=t, DV=0.0, AMT=0.0, EVID=0, MDV=0, CMT=cmt) for t in TIMES]
    rows.sort(key=lambda r: (r["TIME"], -r["EVID"]))
    ref = scipy_reference(model_name, doses)
    err = [np.abs(form_prediction(model_name, rows, g) - ref).max() / ref.max() for g in (96, 384, 1536)]
    assert err[-1] < 1e-5, err
    assert err[1] < err[0] / 8 and err[2] < err[1] / 8, err    # second order in the interval width
    assert np.all(form_prediction(model_name, rows, 96) >= 0)


def test_without_extra_elimination_the_form_is_the_linear_model():
    """Rate network at k_e = 0 (its output far below the cap): the prediction is the ODE's."""
    rows = [dict(ID=1, TIME=0.0, DV=0.0, AMT=100.0, EVID=1, MDV=1, CMT=1)]
    rows += [dict(ID=1, TIME=t, DV=0.0, AMT=0.0, EVID=0, MDV=0, CMT=1) for t in TIMES]
    batch = hp.read_nonmem(pd.DataFrame(rows)).to_batch()
    vae = HybridVAE(28, 2, 8, joint=True, n_shift=4, form="elimination").double()
    vae.scale = {"input_dt": 0.25, "t": 1.0, "dose": 100.0, "n_fourier": 6, "c0": 0.01, "logc_mean": 0.0,
                 "logc_sd": 1.0}
    with torch.no_grad():
        vae.form.rate[-1].bias.fill_(-40.0)
    p = {k: torch.tensor([v], dtype=torch.float64) for k, v in CASES["2cmt_iv"][0].items()}
    model = get_model("2cmt_iv")
    ode = hp.simulate("2cmt_iv", p, batch).ipred
    with torch.no_grad():
        pred, r = vae.predict(batch, ode, torch.zeros(1, 2, dtype=torch.float64), p, model)
    assert torch.allclose(pred, ode, rtol=1e-9, atol=1e-12) and float(r.abs().max()) < 1e-9
