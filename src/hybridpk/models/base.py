"""How a compartment model is declared: parameters with units and bounds, compartments, right-hand side.

A model is *data plus one function*: its parameters, its compartments, which compartment receives doses
and which is observed, and ``rhs`` (amounts in, d(amounts)/dt out). Linear mammillary models also give
their micro-constants through ``mammillary`` so the exact closed-form path can be used.

Adding a model is one small class::

    class OneCmtIVQuadratic(CompartmentModel):
        name = "1cmt_iv_quad"
        description = "one compartment, IV, elimination rate CL*(1 + GAMMA*C)"
        parameters = (CL, V, Parameter("GAMMA", "L/mg", 0.0, 10.0, "nonlinear elimination factor", 0.01))
        compartments = ("CENTRAL",)
        dose_cmt = obs_cmt = 1

        def rhs(self, t, a, p, rate, ctx=None):
            c = a[..., 0] / p["V"]
            return (rate[..., 0] - p["CL"] * c * (1 + p["GAMMA"] * c)).unsqueeze(-1)

and ``register(OneCmtIVQuadratic())``. Compartments are numbered from 1 in the order of
``compartments`` (NONMEM's CMT); CMT 0 in the data means ``dose_cmt`` for doses, ``obs_cmt`` for records.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError


@dataclass(frozen=True)
class Parameter:
    """One individual (natural-scale) model parameter.

    Attributes
    ----------
    name : str  NONMEM-style name (CL, V, KA ...)
    unit : str  unit on the natural scale, assuming doses in mg and time in h (e.g. "L/h")
    lower, upper : float  plausible bounds (used to validate and to bound estimation)
    description : str
    typical : float  a sensible typical value (simulations, starting values)
    """

    name: str
    unit: str
    lower: float
    upper: float
    description: str
    typical: float


class CompartmentModel:
    """Interface of every compartment model (subclass it; instances are immutable and stateless).

    Class attributes to set: ``name``, ``description``, ``parameters`` (tuple of :class:`Parameter`),
    ``compartments`` (names), ``dose_cmt`` and ``obs_cmt`` (1-based), ``linear`` (True when the state
    equation is linear in the amounts with constant coefficients).
    """

    name: str = ""
    description: str = ""
    parameters: tuple = ()
    compartments: tuple = ()
    dose_cmt: int = 1
    obs_cmt: int = 1
    linear: bool = False
    #: parameters that act on doses into the default dose compartment (NONMEM F1/ALAG1 semantics)
    bioavailability: str | None = "F"
    lag: str | None = "ALAG"

    # ---------------------------------------------------------------- declaration
    @property
    def parameter_names(self) -> tuple:
        return tuple(p.name for p in self.parameters)

    @property
    def n_states(self) -> int:
        return len(self.compartments)

    def rhs(self, t, a, p: dict, rate, ctx=None):
        """d(amounts)/dt, shape (N, S), from time ``t`` (h; tensor (N,) or scalar), amounts ``a`` (N, S),
        parameters ``p`` (name -> (N,) tensor), zero-order input ``rate`` (N, S) (amount/h) and the solver
        context ``ctx`` (segment midpoint time, transit doses), which most models ignore."""
        raise NotImplementedError

    def initial_state(self, p: dict, like):
        """Amounts at time 0 and after a reset (N, S); zeros unless the model has a baseline (TMDD target)."""
        return like.new_zeros(like.shape[0], self.n_states)

    #: models whose records may observe any compartment (CMT on the record; NONMEM's F = A(CMT)/S<CMT>) set
    #: this and take ``cmt`` in :meth:`observe`; the others observe ``obs_cmt`` only
    observes_compartments: bool = False
    #: whether an observation's CMT means a compartment to the model (NONMEM's $PRED has none: CMT is a data item
    #: like any other there)
    reads_cmt: bool = True

    def observe(self, a, p: dict, cmt=None):
        """Concentration in the observed compartment (amount/L) from amounts ``a`` (..., S); ``cmt`` (N,) the
        records' compartments, for models that observe any (:attr:`observes_compartments`)."""
        return a[..., self.obs_cmt - 1] / p[self.volume_parameter]

    volume_parameter: str = "V"

    def mammillary(self, p: dict):
        """Linear models: (V, k10, [(k1j, kj1) per peripheral], KA or None). Others: NotImplementedError."""
        raise NotImplementedError

    def system_matrix(self, p: dict, t_mid):
        """Models linear in the amounts between switch times (d(amounts)/dt = A a + rate, with A constant on
        each segment, e.g. EHC with meal-driven gallbladder emptying): A (N, S, S) (1/h) on the segment whose
        midpoint is ``t_mid`` (N,) h. The solver then steps each segment exactly by a matrix exponential
        instead of integrating. Others: NotImplementedError."""
        raise NotImplementedError

    @property
    def piecewise_linear(self) -> bool:
        """True when the model gives ``system_matrix`` (exact matrix-exponential solution)."""
        return type(self).system_matrix is not CompartmentModel.system_matrix

    def switch_times(self, p: dict, t_end, t_start=None):
        """Times (N, K) at which the right-hand side changes abruptly (e.g. meals) up to ``t_end`` (N,) h (from
        ``t_start`` (N,) h where given, which may be before 0: a steady-state dose's past cycles), or None."""
        return None

    # ---------------------------------------------------------------- checks
    def check_parameters(self, params: dict, n: int | None = None) -> dict:
        """Validate a parameter mapping: every name present, nothing unknown; returns it with defaults."""
        names = set(self.parameter_names)
        missing = [k for k in self.parameter_names if k not in params and not self._has_default(k)]
        unknown = [k for k in params if k not in names and k not in DOSE_PARAMETERS]   # of the doses (solve._events)
        if missing or unknown:
            msg = [f"model {self.name} needs parameters {', '.join(self.parameter_names)}"]
            if missing:
                msg.append(f"missing: {', '.join(missing)}")
            if unknown:
                msg.append(f"unknown: {', '.join(unknown)}")
            raise ModelError("; ".join(msg))
        return params

    def _has_default(self, name: str) -> bool:
        return name in ("F", "ALAG")

    def describe(self) -> str:
        lines = [f"{self.name}: {self.description}",
                 f"  compartments: {', '.join(f'{i + 1}={c}' for i, c in enumerate(self.compartments))}; "
                 f"doses into {self.dose_cmt}, observed {self.obs_cmt}"
                 + ("; closed form" if self.linear else
                    "; exact (matrix exponential between switches)" if self.piecewise_linear else "; ODE")]
        for p in self.parameters:
            lines.append(f"  {p.name:<7} {p.unit:<8} {p.description} (typical {p.typical:g}, "
                         f"bounds {p.lower:g}-{p.upper:g})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<model {self.name}>"


# shared parameter declarations
CL = Parameter("CL", "L/h", 1e-4, 1e4, "clearance", 5.0)
V = Parameter("V", "L", 1e-3, 1e5, "central volume of distribution (V1)", 50.0)
Q = Parameter("Q", "L/h", 1e-4, 1e4, "inter-compartmental clearance, central-peripheral 1", 10.0)
V2 = Parameter("V2", "L", 1e-3, 1e5, "peripheral volume 1", 80.0)
Q3 = Parameter("Q3", "L/h", 1e-4, 1e4, "inter-compartmental clearance, central-peripheral 2", 3.0)
V3 = Parameter("V3", "L", 1e-3, 1e5, "peripheral volume 2", 150.0)
KA = Parameter("KA", "1/h", 1e-4, 100.0, "first-order absorption rate constant", 1.0)
ALAG = Parameter("ALAG", "h", 0.0, 48.0, "absorption lag time (doses into the default dose compartment)", 0.0)
F = Parameter("F", "-", 0.0, 1.0, "bioavailability (doses into the default dose compartment)", 1.0)
#: the doses' own parameters with RATE = -2 (-1) (NONMEM's D1, R1, help "RATE"): the duration (rate) of the doses
#: into the default dose compartment, zero-order input, for every model (solve._events: the closed forms and the ODE
#: solvers); like F and ALAG they act on the doses only
D = Parameter("D", "h", 1e-3, 1e3, "duration of the doses with RATE = -2 (modelled zero-order input)", 1.0)
R = Parameter("R", "mg/h", 1e-6, 1e6, "rate of the doses with RATE = -1 (modelled zero-order input)", 10.0)
DOSE_PARAMETERS = (D.name, R.name)
VMAX = Parameter("VMAX", "mg/h", 1e-4, 1e5, "maximum elimination rate (Michaelis-Menten)", 10.0)
KM = Parameter("KM", "mg/L", 1e-6, 1e4, "concentration at half-maximal elimination", 2.0)
