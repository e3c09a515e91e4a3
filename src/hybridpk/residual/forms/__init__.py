"""Correction forms of the hybrid model, one strategy class per module, looked up by name."""

from __future__ import annotations

from .base import CorrectionForm
from .elimination import EliminationForm
from .input import InputForm
from .log import LogForm
from .none import NoCorrection
from .reservoir import ReservoirForm

__all__ = ["CorrectionForm", "LogForm", "InputForm", "ReservoirForm", "EliminationForm", "NoCorrection", "FORMS",
           "get_form", "default_form", "candidate_forms"]

#: name -> form class (the trained corrections; "none", the null model form selection compares them with, is
#: looked up too but never trained)
FORMS = {cls.name: cls for cls in (InputForm, ReservoirForm, EliminationForm, LogForm)}
_NULL = {NoCorrection.name: NoCorrection}


def get_form(name: str) -> type:
    try:
        return FORMS[name] if name in FORMS else _NULL[name]
    except KeyError:
        raise ValueError(f"the hybrid form must be one of {', '.join(FORMS)}, not {name!r}") from None


def default_form(joint: bool, linear: bool) -> str:
    """'auto': the input form where it can be carried by the structure (joint training, linear model),
    else the log form."""
    return "input" if (joint and linear) else "log"


def candidate_forms(joint: bool, linear: bool) -> tuple:
    """The forms that 'auto' chooses among by held-out evidence: on a linear structural model with joint
    training every form (input, reservoir, elimination, log); otherwise the log form, the only one that
    needs neither."""
    if joint and linear:
        return tuple(FORMS)
    return ("log",)
