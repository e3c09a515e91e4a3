"""The THETA step of the hybrid's ITS: which ETAs act as P = TV exp(ETA) (found numerically), and that moving a
typical value to the patients' mean ETA leaves every patient's prediction unchanged."""

from __future__ import annotations

import pandas as pd
import torch

import hybridpk as hp
from hybridpk.population import FittedPopulation, build_model
from hybridpk.residual.baseline import ODEBaseline
from hybridpk.residual.omega import exponential_etas


def two_patients():
    rows = [dict(ID=i, TIME=0.0, DV=0.0, AMT=100.0, EVID=1, MDV=1, CMT=1, WT=w) for i, w in ((1, 50.0), (2, 90.0))]
    rows += [dict(ID=i, TIME=2.0, DV=1.0, AMT=0.0, EVID=0, MDV=0, CMT=2, WT=w) for i, w in ((1, 50.0), (2, 90.0))]
    return hp.read_nonmem(pd.DataFrame(rows).sort_values(["ID", "TIME"])).to_batch()


def test_exponential_etas_of_a_native_model_with_a_covariate():
    b = two_patients()
    pm = build_model("1cmt_oral", iiv=["CL", "KA"], error="combined", covariates=["CL~WT:power:70"])
    pop = FittedPopulation.from_values(pm, dict(CL=4.0, V=40.0, KA=1.2, CL_WT=0.75), dict(CL=0.09, KA=0.09),
                                       {"ADD": 0.05, "PROP": 0.1})
    base = ODEBaseline(pop)
    assert exponential_etas(base, b) == [(0, base.names.index("CL")), (1, base.names.index("KA"))]


class Stub:
    """A baseline whose ETA 1 acts additively on CL and ETA 2 on both V and KA: neither is TV exp(ETA); ETA 0 is
    (KA = 1.2 exp(ETA 0 + ETA 2): its mean can move into KA's typical value)."""

    names = ["CL", "V", "KA"]
    n_eta = 3

    def parameters(self, batch, eta, log_shift=None):
        return {"CL": 4.0 + eta[:, 1], "V": 40.0 * torch.exp(eta[:, 2]),
                "KA": 1.2 * torch.exp(eta[:, 0] + eta[:, 2]), "F": torch.ones_like(eta[:, 0])}


class Doubled(Stub):
    """ETA 0 as exp(2 ETA) on KA: not TV exp(ETA) either (and ETA 2 now acts on V alone)."""

    def parameters(self, batch, eta, log_shift=None):
        return dict(super().parameters(batch, eta), KA=1.2 * torch.exp(2 * eta[:, 0]))


class Shared(Stub):
    """ETAs 0 and 2 each act on KA alone as exp(ETA) (an inter-occasion pair, say): neither owns KA's typical value."""

    def parameters(self, batch, eta, log_shift=None):
        return dict(super().parameters(batch, eta), V=torch.full_like(eta[:, 0], 40.0))


def test_etas_that_are_not_exponential_on_one_parameter_are_left_out():
    assert exponential_etas(Stub(), two_patients()) == [(0, 2)]
    assert exponential_etas(Doubled(), two_patients()) == [(2, 1)]     # ETA 2 now moves V alone
    assert exponential_etas(Shared(), two_patients()) == []


def test_shifting_a_typical_value_by_the_mean_eta_keeps_predictions():
    pm = build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined")
    pop = FittedPopulation.from_values(pm, dict(CL=4.0, V=40.0, KA=1.2), dict(CL=0.09, V=0.04, KA=0.09),
                                       {"ADD": 0.05, "PROP": 0.1})
    base = ODEBaseline(pop)
    b = two_patients()
    eta = torch.tensor([[0.2, -0.1, 0.3], [-0.4, 0.05, 0.1]], dtype=torch.float64)
    mean = eta.mean(0)
    shift = torch.zeros(3, dtype=torch.float64)
    for i, j in exponential_etas(base, b):
        shift[j] = mean[i]
    before = base.ipred(b, eta, torch.zeros(3, dtype=torch.float64))
    after = base.ipred(b, eta - mean, shift)
    assert torch.allclose(before, after, rtol=1e-12, atol=1e-14)
