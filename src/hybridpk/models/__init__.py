"""Model library: every compartment model, declared once, by name.

>>> from hybridpk.models import get_model
>>> get_model("2cmt_iv").parameter_names
('CL', 'V', 'Q', 'V2', 'ALAG', 'F')
"""

from __future__ import annotations

from ..errors import ModelError
from .base import CompartmentModel, Parameter
from .linear import LinearMammillary, OneCmtIV, OneCmtOral, ThreeCmtIV, ThreeCmtOral, TwoCmtIV, TwoCmtOral
from .nonlinear import OneCmtIVMM, OneCmtOralEHC, OneCmtOralMM, OneCmtOralTransit, TMDDFull, TMDDQSS

MODELS: dict[str, CompartmentModel] = {}


def register(model: CompartmentModel) -> CompartmentModel:
    """Add a model instance to the library under ``model.name``."""
    if not model.name:
        raise ModelError("a model needs a name")
    MODELS[model.name] = model
    return model


for _cls in (OneCmtIV, OneCmtOral, TwoCmtIV, TwoCmtOral, ThreeCmtIV, ThreeCmtOral, OneCmtOralTransit,
             OneCmtIVMM, OneCmtOralMM, TMDDFull, TMDDQSS, OneCmtOralEHC):
    register(_cls())


def get_model(name: str | CompartmentModel) -> CompartmentModel:
    """The model called ``name`` (e.g. '1cmt_oral'); a model instance is returned unchanged."""
    if isinstance(name, CompartmentModel):
        return name
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(MODELS)} "
                         "(see 'hybridpk models')") from None


def list_models() -> list[str]:
    """Names of every model in the library, in registration order."""
    return list(MODELS)


__all__ = ["CompartmentModel", "LinearMammillary", "Parameter", "MODELS", "get_model", "list_models", "register"]
