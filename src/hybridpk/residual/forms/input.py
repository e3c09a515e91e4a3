"""The input form: a learnt input rate into the dose compartment, carried by the linear structural model."""

from __future__ import annotations

from ...solve.closed_form import input_response
from ..networks import CorrectionDecoder
from .base import CorrectionForm, grid_inputs, log_ratio, require_structure

__all__ = ["InputForm"]


class InputForm(CorrectionForm):
    """IPRED plus the response of the structural model (the patient's own parameters) to an input rate
    u(t) = (last dose) g(z, t) / T (mg/h) into the dose compartment, constant on grid intervals: drug that
    re-enters (e.g. enterohepatic recirculation) or, negative, extra elimination; concentrations are
    clamped at 0. Suits deviations of any shape on linear models."""

    name = "input"
    average = False
    structural = True
    intervals = 96

    def __init__(self, n_features: int, latent_dim: int, hidden: int):
        super().__init__(n_features, latent_dim, hidden)
        # a rate on a time grid: the record features without log IPRED
        self.decoder = CorrectionDecoder(n_features - 1, latent_dim, hidden)

    def cells(self, records: int, intervals: int, doses: int, scale: dict) -> int:
        return records * (intervals + max(doses, 1))      # every record's response to every interval and dose

    def forward(self, batch, ipred, z, scale, params=None, structural=None):
        require_structure(self, params, structural)
        g = grid_inputs(batch, scale)
        rate = g.amt * self.decoder(z, g.x) * g.gate / scale["t"]                              # (N, G) mg/h
        resp = input_response(structural, params, batch.time, g.starts, g.dt)                  # (N, R, G)
        pred = (ipred + (resp * rate.unsqueeze(1)).sum(-1) * batch.record_mask).clamp(min=0.0)
        return pred, log_ratio(pred, ipred, scale)
