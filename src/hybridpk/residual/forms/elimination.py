"""The elimination form: a latent-conditioned, concentration-dependent extra elimination from the central
compartment inside the structural model (target-mediated drug disposition, saturable clearance)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...solve.closed_form import input_response
from ..networks import mlp
from .base import StructuralGridForm, grid_concentrations, midpoint_response

__all__ = ["EliminationForm"]


class _CentralInput:
    """The structural model with its input into the central compartment (an oral model's depot bypassed):
    :func:`input_response` of it is the response to a rate into (or, negative, out of) the central one."""

    def __init__(self, model):
        self._model = model

    def mammillary(self, p):
        v, k10, pairs, _ = self._model.mammillary(p)
        return v, k10, pairs, None

    def __getattr__(self, name):
        return getattr(self._model, name)


class EliminationForm(StructuralGridForm):
    """The structural model with an extra elimination from the central compartment at the rate
    V k_e(C, z) C (mg/h), where k_e >= 0 (1/h) is a learnt function of the central concentration C, the
    patient's z (an MLP of log C, log(1 + time since the first dose) and z; zero-initialised to k10 e^-4, a small
    fraction of the linear elimination). It carries what a linear model cannot: elimination whose rate
    constant changes with concentration and so with dose, as target-mediated drug disposition does (at
    concentrations well below the target's KSS the extra clearance is kint Rtot / KSS, saturating above it;
    Gibiansky 2008, the QSS approximation) and Michaelis-Menten elimination (k_e = VM / (KM + C)).

    Solved on the form's time grid (``intervals`` intervals over the observed span), with the exact closed- form
    response of the linear model to a rate constant on each interval, so that the peripheral compartments see the
    extra elimination. Each interval's rate uses the concentration at its midpoint, from the linear prediction, the
    earlier intervals' removals and its own, semi-implicitly: C_g = C_g^0 / (1 + V k_e a_g) with a_g the interval's
    own response at its midpoint and k_e taken at a predicted C_g (one predictor-corrector step: second order in the
    interval width; stable for any k_e). Only drug that is present is removed (k_e dt is kept below 2, removal never
    exceeds the central amount) and concentrations are clamped at 0. Needs a linear structural model and joint
    training. Not a form for drug that comes back (EHC): see the reservoir.
    """

    name = "elimination"
    average = False
    conserves_mass = True
    intervals = 96

    def __init__(self, n_features: int, latent_dim: int, hidden: int):
        super().__init__(n_features, latent_dim, hidden)
        # (scaled log C, log(1 + scaled time since the first dose), z) -> log(k_e / k10) + 4. The time input
        # carries the target's turnover (Rtot falls while drug binds), which changes k_e at a given C: on
        # benchmarks/vae_tmdd.py seed 1 the lowest dose's error went from 0.845x to 0.745x the linear baseline
        self.rate = mlp(2 + latent_dim, 32, 1, layers=2)
        nn.init.zeros_(self.rate[-1].weight)
        nn.init.zeros_(self.rate[-1].bias)

    def rate_constant(self, z, k10, scale, dt: float, tfd):
        """The function (C (N,) mg/L, interval j) -> k_e (N,) 1/h for latent ``z`` (N, K) and the scaled
        times since the first dose ``tfd`` (N, G) of the grid's midpoints, capped smoothly at 1.5 / dt (cap
        tanh(k / cap): a relative change of (k dt / 1.5)^2 / 3, second order like the scheme). Each interval's
        call is the solver's inner loop, so what does not depend on C is computed once for every interval: the
        first layer's (time, z) part with the normalisation of log C folded in, and log(k10 / cap)
        (k_e = cap tanh(exp(net - 4 + log(k10 / cap))))."""
        (first, _, second, _, last) = self.rate
        w_c = first.weight[:, 0] / scale["logc_sd"]
        zb = (z @ first.weight[:, 2:].T + first.bias - scale["logc_mean"] * w_c).unsqueeze(1) \
            + torch.log1p(tfd).unsqueeze(-1) * first.weight[:, 1]                           # (N, G, H)
        c0, cap = scale["c0"], 1.5 / dt
        offset = torch.log(k10 / cap)                                                       # (N,)
        w2, b2, w3, b3 = second.weight, second.bias, last.weight[0], last.bias - 4.0

        zb = zb.unbind(1)          # one tensor per interval (indexing in the loop would cost O(G) in backward)

        def k_e(c, j: int):
            h = F.silu(torch.addcmul(zb[j], torch.log(c + c0).unsqueeze(-1), w_c))
            net = torch.addmv(b3, F.silu(F.linear(h, w2, b2)), w3).clamp(max=30.0)
            return cap * torch.tanh(torch.exp(net + offset))

        return k_e

    def _concentration(self, batch, z, params, structural, g, scale):
        dt, starts = g.dt, g.starts
        n_grid = starts.shape[1]
        v, k10, _, _ = structural.mammillary(params)
        central = _CentralInput(structural)
        c_mid, c_rec = grid_concentrations(structural, params, batch, g)                   # (N, G), (N, R) mg/L
        # the midpoints' response to a unit rate on the first interval, by lag
        r_lag = midpoint_response(central, params, g)                                       # (N, G)
        # interval j's effect on every midpoint: window G - j of the lags padded with G zeros in front
        effect = torch.cat([torch.zeros_like(r_lag), r_lag], 1).unfold(1, n_grid, 1).unbind(1)
        v_own = v * r_lag[:, 0]                               # V a_g: the interval's own removal at its midpoint
        k_e = self.rate_constant(z, k10, scale, dt, g.x[..., 1].clamp(min=0))
        gate, c_lin = g.gate.unbind(1), c_mid.unbind(1)
        removed = torch.zeros_like(c_mid)                     # earlier intervals' removal at each midpoint, mg/L
        k, one = torch.zeros_like(v), torch.ones_like(v)
        rates = []                                                                          # removal, mg/h
        for j in range(n_grid):
            c0 = (c_lin[j] - removed[:, j]).clamp(min=0.0)
            # predictor: the previous interval's k_e; corrector: k_e at the predicted midpoint concentration
            k = k_e(c0 / torch.addcmul(one, v_own, k), j) * gate[j]
            rate = v * k * c0 / torch.addcmul(one, v_own, k)
            rates.append(rate)
            if j + 1 < n_grid:
                removed = torch.addcmul(removed, rate.unsqueeze(1), effect[n_grid - j])
        rate = torch.stack(rates, 1)                                                        # (N, G) mg/h
        r_rec = input_response(central, params, batch.time, starts, dt)                     # (N, R, G)
        return (c_rec - (r_rec * rate.unsqueeze(1)).sum(-1) * batch.record_mask).clamp(min=0.0)
