"""Solving compartment models for a whole population: closed form (linear) or torchdiffeq (any model)."""

from .simulate import Prediction, as_parameters, simulate

__all__ = ["Prediction", "simulate", "as_parameters"]
