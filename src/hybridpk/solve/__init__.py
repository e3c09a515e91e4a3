"""Solving compartment models for a whole population: closed form (linear) or torchdiffeq (any model)."""

from .device import resolve_device
from .population_sim import (
    PopulationSimulation,
    make_design,
    observe,
    simulate_population,
    simulate_population_chunks,
    virtual_design,
)
from .simulate import Prediction, as_parameters, simulate

__all__ = ["Prediction", "simulate", "as_parameters", "PopulationSimulation", "simulate_population",
           "simulate_population_chunks", "virtual_design", "make_design", "observe", "resolve_device"]
