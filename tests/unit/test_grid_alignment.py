"""The grid forms' time grid under repeated dosing: a width that divides the training's dosing interval makes a
predicted steady state periodic (the same however many doses are simulated), and the networks' time since the first
dose is held at the training's span beyond it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import hybridpk as hp
from hybridpk.models import get_model
from hybridpk.residual.features import aligned_width, fit_scale, input_features
from hybridpk.residual.vae import HybridVAE

CL, V, KA, K_IN, TAU = 4.0, 40.0, 1.2, 0.3, 12.0


def batch_of(rows):
    return hp.read_nonmem(pd.DataFrame(rows)).to_batch()


def regimen(n_doses: int, tau: float = TAU, samples=(), step: float | None = None, amt: float = 100.0):
    rows = [dict(ID=1, TIME=0.0, DV=0.0, AMT=amt, ADDL=n_doses - 1, II=tau, EVID=1, MDV=1, CMT=1)]
    times = list(samples) if step is None else list(np.round(np.arange(step, n_doses * tau + 1e-9, step), 6))
    rows += [dict(ID=1, TIME=float(t), DV=1.0, AMT=0.0, ADDL=0, II=0.0, EVID=0, MDV=0, CMT=2) for t in times]
    return rows


def test_width_divides_the_most_frequent_dosing_interval():
    b = batch_of(regimen(6, samples=[1.0, 30.0, 83.75]))
    assert aligned_width(b, 83.75 / 48) == pytest.approx(12.0 / 7, rel=1e-12)     # 1.745 h -> 12/7 h
    assert aligned_width(b, 4.5) == pytest.approx(4.0, rel=1e-12)                  # nearest whole fraction
    assert aligned_width(b, 13.0) == pytest.approx(12.0, rel=1e-12)                # the nearest: one interval
    assert aligned_width(b, 30.0) == pytest.approx(24.0, rel=1e-12)                # wider: whole intervals
    single = batch_of(regimen(1, samples=[1.0, 24.0]))
    assert aligned_width(single, 0.5) == 0.5                                         # no repeated doses: unchanged
    rows = regimen(4, tau=8.0, samples=[1.0]) + [dict(r, ID=2) for r in regimen(6, samples=[2.0])] \
        + [dict(r, ID=3) for r in regimen(6, samples=[3.0])]
    assert aligned_width(batch_of(rows), 1.75) == pytest.approx(12.0 / 7, rel=1e-12)  # 12 h is the commonest gap


def test_grid_of_a_long_record_keeps_about_its_number_of_intervals():
    """Months of TDM records (R's nlme::Quinidine: up to 8095 h at 6-h dosing) get cells of whole dosing
    intervals, about ``intervals`` of them over the span (at most 1.5 times as many: the nearest multiple), not
    one per dosing interval (1350 there)."""
    from hybridpk.residual.features import input_grid

    b = batch_of(regimen(240, tau=6.0, samples=[2.0, 700.0, 1439.0]))               # 60 days every 6 h
    for intervals in (48, 96):
        scale = fit_scale(b, torch.ones_like(b.time), n_fourier=6, intervals=intervals)
        dt = scale["input_dt"]
        assert dt / 6.0 == pytest.approx(round(dt / 6.0), abs=1e-12) and dt > 6.0    # whole dosing intervals
        assert input_grid(b, dt).shape[1] <= 1.5 * intervals + 1                      # (the nearest multiple)
    short = batch_of(regimen(6, samples=[1.0, 30.0, 83.75]))                          # a few days: unchanged
    assert fit_scale(short, torch.ones_like(short.time), intervals=48)["input_dt"] == pytest.approx(12.0 / 7)


def test_time_since_first_dose_is_held_beyond_the_training_span():
    train = batch_of(regimen(6, samples=[1.0, 30.0, 83.75]))
    scale = fit_scale(train, torch.ones_like(train.time), n_fourier=6, intervals=48)
    assert scale["tfd_max"] == pytest.approx(83.75)
    b = batch_of(regimen(20, samples=[1.0]))
    starts = torch.tensor([[10.0, 83.0, 83.75, 100.0, 200.0]], dtype=torch.float64)
    x, _, _ = input_features(b, starts - 0.5, 1.0, scale)                              # features at ``starts``
    tfd_cols = [1] + list(range(3 + 12, 3 + 24))                                      # scaled tfd, its Fourier terms
    held = x[0, 2:, tfd_cols]
    assert torch.equal(held, held[:1].expand_as(held))                               # 83.75, 100 and 200 h alike
    assert not torch.equal(x[0, 0, tfd_cols], x[0, 1, tfd_cols])                      # earlier times still differ
    assert not torch.equal(x[0, 2, 0], x[0, 3, 0])                                   # time since last dose: not held
    old = {k: v for k, v in scale.items() if k != "tfd_max"}                         # a run saved before: not held
    x_old, _, _ = input_features(b, starts - 0.5, 1.0, old)
    assert not torch.equal(x_old[0, 3, tfd_cols], x_old[0, 4, tfd_cols])


class MealRelease(torch.nn.Module):
    """Stands in for the release decoder: log k_out from the time since the last dose (feature 0, scale 1 h): 3/h
    during the half hour from 4 h after each dose, else 0.001/h."""

    def forward(self, z, x):
        tsd = x[..., 0]
        on = (tsd >= 4.0) & (tsd < 4.5)
        return torch.log(torch.where(on, torch.full_like(tsd, 3.0), torch.full_like(tsd, 1e-3)))


def interval_aucs(width: float, n_doses: int = 80, fill_points: int = 8):
    """AUC (mg h/L) over each 12-h dosing interval of 100 mg every 12 h, the reservoir form on a grid of ``width`` h
    filled with the central amount averaged over each interval at ``fill_points`` points."""
    rows = regimen(n_doses, step=0.1)
    batch = batch_of(rows)
    vae = HybridVAE(28, 2, 8, joint=True, n_shift=3, form="reservoir").double()
    vae.scale = {"input_dt": width, "t": 1.0, "dose": 100.0, "n_fourier": 6, "c0": 0.01, "tfd_max": 84.0,
                 "fill_points": fill_points}
    vae.form.decoder = MealRelease()
    with torch.no_grad():
        vae.form.uptake[-1].bias.fill_(3.0 + math.log(K_IN / (CL / V)))                # k_in = k10 exp(a - 3)
    p = {k: torch.tensor([v], dtype=torch.float64) for k, v in (("CL", CL), ("V", V), ("KA", KA))}
    with torch.no_grad():
        pred, _ = vae.predict(batch, torch.ones_like(batch.time), torch.zeros(1, 2, dtype=torch.float64), p,
                              get_model("1cmt_oral"))
    t = batch.time[0, batch.is_obs[0]].numpy()
    c = pred[0, batch.is_obs[0]].numpy()
    out = []
    for k in range(n_doses):
        s = (t >= k * TAU - 1e-9) & (t <= (k + 1) * TAU + 1e-9)
        out.append(np.trapezoid(c[s], t[s]))
    return np.array(out)


def steady_states(a):
    """Aitken's extrapolation of the sequence ``a`` from each three successive values: the limit of a geometric
    approach (the slowest mode of a linear system under a periodic regimen)."""
    d1, d2 = a[1:-1] - a[:-2], a[2:] - a[1:-1]
    return a[2:] - d2 ** 2 / (d2 - d1)


def test_aligned_grid_gives_a_periodic_steady_state():
    aligned = interval_aucs(aligned_width(batch_of(regimen(6, samples=[83.75])), 83.75 / 48))
    limits = steady_states(aligned[-12:])
    assert np.abs(limits / limits[-1] - 1).max() < 1e-9, limits                     # one steady state ...
    assert np.abs(aligned[-1] / limits[-1] - 1) < 1e-5                              # ... that the regimen reaches
    drifting = interval_aucs(83.75 / 48)                                             # 1.745 h: the phase drifts
    assert np.abs(drifting[-10:] / drifting[-1] - 1).max() > 0.01, drifting[-10:]


def test_reservoir_conserves_mass_at_steady_state():
    """At a steady state every dose is eliminated by CL alone (the reservoir returns what it takes): AUC over a
    dosing interval = dose / CL. The fill averaged at 8 points per interval gets it to 0.1%; the interval's midpoint
    alone (runs saved before) created 3.7% of the dose."""
    width = 12.0 / 7
    for points, low, high in ((8, 0.999, 1.001), (1, 1.03, 1.05)):
        a = interval_aucs(width, fill_points=points)
        ratio = steady_states(a[-5:])[-1] * CL / 100.0
        assert low < ratio < high, (points, ratio)
