"""The reservoir form of the hybrid: a hidden compartment filled from the central one and emptied on a schedule into the
dose compartment, checked against scipy's solution of the same three-compartment ODE."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.integrate import solve_ivp

import hybridpk as hp
from hybridpk.models import get_model
from hybridpk.residual.vae import HybridVAE

CL, V, KA, K_IN = 4.0, 40.0, 1.2, 0.3
TIMES = [0.5, 1.0, 2.0, 3.0, 4.2, 5.0, 7.0, 9.0, 10.3, 12.0, 13.9, 16.0, 20.0, 24.0]


def emptying(t):
    """Release rate (1/h): 3 during half an hour from 4 h after the first dose, every 6 h, else 0.001."""
    return np.where((t >= 4.0) & (np.remainder(t - 4.0, 6.0) < 0.5), 3.0, 1e-3)


class Schedule(torch.nn.Module):
    """Stands in for the release decoder: log k_out from the time since the first dose (feature 1, scale 1 h)."""

    def forward(self, z, x):
        return torch.log(torch.as_tensor(emptying(x[..., 1].detach().numpy())))


def reservoir_prediction(rows, cells: int):
    batch = hp.read_nonmem(pd.DataFrame(rows)).to_batch()
    vae = HybridVAE(28, 2, 8, joint=True, n_shift=3, form="reservoir").double()
    vae.scale = {"input_dt": 24.0 / cells, "t": 1.0, "dose": 100.0, "n_fourier": 6, "c0": 0.01}
    vae.form.decoder = Schedule()
    with torch.no_grad():
        vae.form.uptake[-1].bias.fill_(3.0 + math.log(K_IN / (CL / V)))    # k_in = k10 exp(a - 3)
    p = {k: torch.tensor([v], dtype=torch.float64) for k, v in (("CL", CL), ("V", V), ("KA", KA))}
    pred, _ = vae.predict(batch, torch.ones_like(batch.time), torch.zeros(1, 2, dtype=torch.float64), p,
                          get_model("1cmt_oral"))
    return pred[0, batch.is_obs[0]].detach().numpy()


def scipy_reference(doses):
    def rhs(t, a):
        k_out = float(emptying(np.array(t)))
        gut, central, res = a
        return [-KA * gut + k_out * res, KA * gut - (CL / V + K_IN) * central, K_IN * central - k_out * res]

    out, state, t0 = [], [0.0, 0.0, 0.0], 0.0
    bounds = sorted(set([d for d, _ in doses] + [24.0]))
    for t1 in bounds:
        if t1 > t0:
            ts = [t for t in TIMES if t0 < t < t1]
            sol = solve_ivp(rhs, (t0, t1), state, t_eval=ts + [t1], rtol=1e-10, atol=1e-12, max_step=0.01)
            out += list(sol.y[1, :len(ts)] / V) + ([sol.y[1, -1] / V] if t1 in TIMES else [])
            state = list(sol.y[:, -1])
        state[0] += sum(a for d, a in doses if d == t1)
        t0 = t1
    return np.array(out)


@pytest.mark.parametrize("doses", [[(0.0, 100.0)], [(0.0, 100.0), (8.0, 50.0)]])
def test_reservoir_matches_the_ode_it_stands_for(doses):
    rows = [dict(ID=1, TIME=d, DV=0.0, AMT=a, EVID=1, MDV=1, CMT=1) for d, a in doses]
    rows += [dict(ID=1, TIME=t, DV=0.0, AMT=0.0, EVID=0, MDV=0, CMT=2) for t in TIMES]
    rows.sort(key=lambda r: (r["TIME"], -r["EVID"]))
    ref = scipy_reference(doses)
    err = [np.abs(reservoir_prediction(rows, g) - ref).max() / ref.max() for g in (96, 384, 1536)]
    assert err[-1] < 2e-4, err
    assert err[1] < err[0] / 8 and err[2] < err[1] / 8, err    # second order in the interval width
