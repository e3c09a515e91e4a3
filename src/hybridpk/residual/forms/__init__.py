"""Correction forms of the hybrid model, one strategy class per module, looked up by name."""

from __future__ import annotations

from .base import CorrectionForm
from .input import InputForm
from .log import LogForm
from .reservoir import ReservoirForm

__all__ = ["CorrectionForm", "LogForm", "InputForm", "ReservoirForm", "FORMS", "get_form", "default_form"]

#: name -> form class
FORMS = {cls.name: cls for cls in (InputForm, ReservoirForm, LogForm)}


def get_form(name: str) -> type:
    try:
        return FORMS[name]
    except KeyError:
        raise ValueError(f"the hybrid form must be one of {', '.join(FORMS)}, not {name!r}") from None


def default_form(joint: bool, linear: bool) -> str:
    """'auto': the input form where it can be carried by the structure (joint training, linear model),
    else the log form."""
    return "input" if (joint and linear) else "log"
