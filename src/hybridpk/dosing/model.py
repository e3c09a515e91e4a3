"""Which model a dosing question is answered with: any fitted model, a run folder, or a published spec."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..population import FittedPopulation, load_model
from ..residual import HybridFit, load_run

__all__ = ["dosing_model"]


def dosing_model(model) -> FittedPopulation:
    """The population model the dosing functions use for ``model``: a FittedPopulation (a fit, or a
    published spec loaded by ``load_model``), a HybridFit, a run folder, or a spec name / .toml file.

    A hybrid is dosed with its population ODE model for now; every estimate and recommendation then says so
    (its ``notes``)."""
    if isinstance(model, FittedPopulation):
        return model
    if isinstance(model, HybridFit):
        note = (f"{model.name} is a hybrid model (ODE + VAE term); estimates, forecasts and doses here use its "
                "population ODE model only (the VAE term is not used by the dosing functions yet)")
        return replace(model.population, notes=tuple(model.population.notes) + (note,))
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        return dosing_model(load_run(model))
    return load_model(model)
