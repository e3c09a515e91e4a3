"""Clamped covariate effects (``lower`` / ``upper``): NONMEM's MIN/MAX hockey-stick, against the formula written
out by hand; THETA names; refusals; the recipe and a written spec give the same model back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridpk.errors import ModelError
from hybridpk.population import (CovariateEffect, ErrorModel, FittedPopulation, build_model, load_model,
                                 model_from_recipe, write_spec)

AGE = torch.tensor([0.1, 1.0, 6.0, 11.9, 12.0, 12.1, 14.0, 24.0], dtype=torch.float64)


def test_two_clamped_linear_effects_are_long_boyles_hockey_stick():
    below = CovariateEffect("CLIN", "AGE", "linear", reference=0.0, upper=12.0)
    above = CovariateEffect("CLIN", "AGE", "linear", reference=12.0, lower=12.0)
    theta = {below.theta_name: torch.tensor(0.032, dtype=torch.float64),
             above.theta_name: torch.tensor(-0.0138, dtype=torch.float64)}
    factor = below.factor_of(AGE, theta) * above.factor_of(AGE, theta)
    age = AGE.numpy()
    by_hand = (1 + 0.032 * np.minimum(age, 12)) * (1 - 0.0138 * (np.maximum(age, 12) - 12))
    assert factor.numpy() == pytest.approx(by_hand, rel=1e-15)
    assert (below.theta_name, above.theta_name) == ("CLIN_AGE_TO12", "CLIN_AGE_FROM12")
    assert CovariateEffect("CL", "WT", "power", 70.0, lower=2.5, upper=150.0).theta_name == "CL_WT_FROM2P5_TO150"
    assert CovariateEffect("CL", "WT", "power", 70.0).theta_name == "CL_WT"     # unclamped: as before


def test_a_clamped_power_effect_holds_outside_its_range():
    e = CovariateEffect("CL", "WT", "power", 70.0, exponent=0.75, lower=40.0, upper=100.0)
    wt = torch.tensor([20.0, 40.0, 70.0, 100.0, 150.0], dtype=torch.float64)
    assert e.factor_of(wt, {}).numpy() == pytest.approx((np.clip(wt.numpy(), 40, 100) / 70) ** 0.75, rel=1e-15)


def test_bad_bounds_are_refused():
    with pytest.raises(ModelError, match="lower .* must be below upper"):
        CovariateEffect("CL", "AGE", "linear", 0.0, lower=12.0, upper=12.0)
    with pytest.raises(ModelError, match="categorical effect cannot be clamped"):
        CovariateEffect("CL", "SEX", "categorical", level=1.0, upper=1.0)


def _hockey_model():
    effects = [CovariateEffect("CL", "AGE", "linear", 0.0, upper=12.0),
               CovariateEffect("CL", "AGE", "linear", 12.0, lower=12.0),
               CovariateEffect("V", "WT", "power", 22.0, exponent=1.0)]
    return build_model("1cmt_iv", iiv=["CL", "V"], covariates=effects, error=ErrorModel("proportional"))


def _parameters(pm_or_fit, theta=None):
    n = AGE.numel()
    cov = {"AGE": AGE, "WT": torch.full((n,), 20.0, dtype=torch.float64)}
    eta = torch.zeros(n, 2, dtype=torch.float64)
    if theta is None:
        return pm_or_fit.individual_parameters(eta, cov)
    return pm_or_fit.individual(theta, eta, cov)


def test_the_recipe_and_a_written_spec_rebuild_the_clamped_model(tmp_path):
    pm = _hockey_model()
    assert [t.name for t in pm.thetas] == ["CL", "V", "CL_AGE_TO12", "CL_AGE_FROM12"]
    values = {"CL": 4.32, "V": 15.7, "CL_AGE_TO12": 0.032, "CL_AGE_FROM12": -0.0138}
    theta = {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
    again = model_from_recipe(pm.recipe)
    assert [t.name for t in again.thetas] == [t.name for t in pm.thetas]
    assert _parameters(again, theta)["CL"].numpy() == pytest.approx(_parameters(pm, theta)["CL"].numpy(), rel=0)
    fit = FittedPopulation.from_values(pm, values, {"CL": 0.05, "V": 0.08}, {"PROP": 0.15}, name="hockey",
                                       citation="test", ranges={"AGE": (0.1, 24.0), "WT": (3.0, 101.0)})
    path = write_spec(fit, tmp_path / "hockey.toml", name="hockey", ranges={"AGE": (0.1, 24.0)})
    text = path.read_text()
    assert "upper = 12.0" in text and "lower = 12.0" in text and "coefficient = -0.0138" in text
    loaded = load_model(path)
    cl = _parameters(loaded)["CL"].numpy()
    age = AGE.numpy()
    assert cl == pytest.approx(4.32 * (1 + 0.032 * np.minimum(age, 12)) * (1 - 0.0138 * (np.maximum(age, 12) - 12)),
                               rel=1e-12)


def test_a_maturation_effect_is_written_as_tm50_and_hill(tmp_path):
    """write_spec wrote a maturation effect's 'coefficient' from a THETA it does not have (the effect has
    <P>_<COV>_TM50 and _HILL): the spec now carries tm50 and hill, and loads back to the same clearance."""
    pm = build_model("1cmt_iv", iiv=["CL"], covariates=[CovariateEffect("CL", "PMA", "maturation", 47.0)],
                     error=ErrorModel("proportional"))
    values = {"CL": 6.2, "V": 30.0, "CL_PMA_TM50": 47.7, "CL_PMA_HILL": 3.4}
    fit = FittedPopulation.from_values(pm, values, {"CL": 0.1}, {"PROP": 0.2}, name="mat", citation="test")
    loaded = load_model(write_spec(fit, tmp_path / "mat.toml", name="mat", ranges={"PMA": (25.0, 200.0)}))
    pma = torch.tensor([30.0, 47.7, 100.0], dtype=torch.float64)
    cl = loaded.individual_parameters(torch.zeros(3, 1, dtype=torch.float64), {"PMA": pma})["CL"].numpy()
    assert cl == pytest.approx(6.2 * pma.numpy() ** 3.4 / (47.7 ** 3.4 + pma.numpy() ** 3.4), rel=1e-12)
