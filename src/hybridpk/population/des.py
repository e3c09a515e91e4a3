"""The structural model of a control stream that writes its own differential equations: ``$DES`` with
ADVAN6, 8, 13 or 14, and the general linear ADVAN5/7 (rate constants K<i><j> in $PK), as pharmpy reads them;
and :class:`PredModel`, a $PRED control stream's prediction written directly at every record.

NONMEM numbers the compartments in the order of ``$MODEL``; doses go to the DEFDOSE compartment (else the
first), observations to the DEFOBS compartment (else the first), and F = A(obs) / S<obs> (S defaults to 1;
NONMEM help, "$MODEL", "ADVAN6", "S1 ... Sn"). The $DES statements (those that read T or an amount, directly or
through another $DES variable) are evaluated at every right-hand-side call with that call's time and amounts;
the rest of $PK, once per record (:class:`hybridpk.population.spec.PopulationModel`).

A system whose derivatives are linear in the amounts with coefficients that depend on neither T nor the
amounts (ADVAN5/7 always; a linear $DES too) gives :meth:`system_matrix`, and the solver steps it exactly by
matrix exponentials (:mod:`hybridpk.solve.ode`); any other is integrated by the batched Dormand-Prince
method at rtol 1e-8 (NONMEM's TOL only sets its own solvers' accuracy, so it is not read).
"""

from __future__ import annotations

import math

import torch

from ..errors import ModelError
from ..models.base import ALAG, F, CompartmentModel, Parameter
from ._sympy_torch import compile_expression, compile_statements

TIME_SYMBOL = "t"          # pharmpy's name for $DES's T
#: T in an IF on time: the midpoint of the solver's current segment, which ends at every switch time, so the
#: condition holds for the whole segment (at a switch, the step that starts there sees the new branch)
SEGMENT_SYMBOL = "_T_SEGMENT"


def _input(name: str) -> Parameter:
    return Parameter(name, "", -math.inf, math.inf, "$PK variable read by the differential equations", 1.0)


class StatementModel(CompartmentModel):
    """A compartment model whose right-hand side is the control stream's own statements.

    Parameters
    ----------
    name, description : for messages and ``hybridpk models``-style summaries
    compartments : names in $MODEL order (NONMEM's CMT numbers)
    amounts : pharmpy's amount names (``A_CENTRAL``), in the same order
    dose_cmt, obs_cmt : 1-based (DEFDOSE, DEFOBS)
    inputs : $PK variables (THETAs, ETAs, data items) the equations read; with ``F``, ``ALAG`` and the scale
        ``S<obs>`` they are the model's parameters (values per subject or per record)
    statements : ((name, sympy expression)) the $DES assignments, in order
    derivatives : sympy expressions of dA/dt, one per compartment
    initial : the compartments (1-based) whose amount at the start (each subject's first record, and after a
        reset, with the first record's $PK values) is the parameter ``A_0(n)``, NONMEM's initial amount set in
        $PK; the others start at 0
    """

    linear = False

    def __init__(self, name, description, compartments, amounts, dose_cmt, obs_cmt, inputs, statements,
                 derivatives, initial=()):
        self.name, self.description = name, description
        self.compartments = tuple(compartments)
        self.amounts = tuple(amounts)
        self.dose_cmt, self.obs_cmt = dose_cmt, obs_cmt
        self.volume_parameter = f"S{obs_cmt}"
        self.inputs = tuple(inputs)
        self.scales = tuple(f"S{k}" for k in range(1, len(self.compartments) + 1))
        self.initial = tuple(initial)
        self.parameters = tuple(_input(n) for n in self.inputs) + (F, ALAG) + tuple(
            Parameter(s, "L", 0.0, math.inf, f"scale of compartment {k} (F = A/S; NONMEM's default 1)", 1.0)
            for k, s in enumerate(self.scales, 1)) + tuple(
            Parameter(f"A_0({k})", "", -math.inf, math.inf, f"amount in compartment {k} at the start (NONMEM's "
                      "A_0)", 0.0) for k in self.initial)
        self.derivative_expressions = tuple(derivatives)
        thresholds, on_segment = _time_thresholds(statements, derivatives)
        self._statements = compile_statements([(n, e.xreplace(on_segment)) for n, e in statements])
        self._derivatives = [compile_expression(d.xreplace(on_segment)) for d in derivatives]
        self._thresholds = [compile_expression(x) for x in thresholds]
        self._threshold_text = [str(x) for x in thresholds]

    #: an observation record predicts A(CMT)/S<CMT> (CMT 0: the DEFOBS compartment), unless the importer finds
    #: the prediction written on one compartment's amount
    observes_compartments = True

    def _has_default(self, name: str) -> bool:
        return name in ("F", "ALAG") or name in self.scales

    def initial_state(self, p: dict, like):
        """Amounts at the start and after a reset (N, S): NONMEM's A_0(n) where $PK sets it, else 0."""
        x = like.new_zeros(like.shape[0], self.n_states)
        for k in self.initial:
            x[:, k - 1] = torch.as_tensor(p[f"A_0({k})"], dtype=x.dtype, device=x.device).expand(x.shape[0])
        return x

    def observe(self, a, p, cmt=None):
        if cmt is None:
            return a[..., self.obs_cmt - 1] / p[self.volume_parameter]
        k = (torch.where(cmt > 0, cmt, torch.full_like(cmt, self.obs_cmt)) - 1).clamp(0, self.n_states - 1)
        amount = a.gather(-1, k.unsqueeze(-1)).squeeze(-1)
        scales = torch.stack([torch.as_tensor(p[s], dtype=a.dtype, device=a.device).expand(a.shape[0])
                              for s in self.scales], -1)
        return amount / scales.gather(-1, k.unsqueeze(-1)).squeeze(-1)

    def switch_times(self, p: dict, t_end, t_start=None):
        """The times at which an IF on T in $DES switches (``T.GT.12``, ``T.GE.TLAG`` with TLAG from $PK, a model
        event time MTIME(n)), so that the solver steps to them instead of across the jump. The IF takes its branch
        on each segment between switches as a whole, so a switch time that changes between a subject's records
        (one reading a data item that changes in time) is refused: it would be crossed inside a segment."""
        if not self._thresholds:
            return None
        env = dict(p)
        like = t_end
        values = [torch.as_tensor(fn(env), dtype=like.dtype, device=like.device) for fn in self._thresholds]
        varying = [text for text, v in zip(self._threshold_text, values) if v.dim() > 1]
        if varying:
            raise ModelError(f"{self.name}: the switch time {varying[0]} of an IF on T (or a model event time "
                             "MTIME) changes between a subject's records (it reads a data item that changes in "
                             "time); hybridpk steps to switch times fixed for each subject: compute it from "
                             "THETAs, ETAs and covariates that are constant within a subject")
        return torch.stack([v.expand(like.shape[0]) if v.dim() == 0 else v for v in values], -1)

    def rhs(self, t, a, p, rate, ctx=None):
        env = dict(p)
        env[TIME_SYMBOL] = t
        mid = getattr(ctx, "segment_mid", None)
        env[SEGMENT_SYMBOL] = t if mid is None else mid
        for i, name in enumerate(self.amounts):
            env[name] = a[..., i]
        self._statements(env)
        zero = torch.zeros_like(a[..., 0])
        return torch.stack([zero + d(env) for d in self._derivatives], -1) + rate


class LinearStatementModel(StatementModel):
    """A :class:`StatementModel` linear in the amounts with coefficients constant between switch times (IFs on T,
    model event times): each segment is solved exactly by a matrix exponential."""

    def system_matrix(self, p: dict, t_mid):
        """A (N, S, S): column j is the derivative at the j-th unit amount (the system is linear)."""
        n = next(v for v in p.values() if torch.is_tensor(v)).shape[0]
        s = self.n_states
        like = next(v for v in p.values() if torch.is_tensor(v))
        dtype, device = like.dtype, like.device
        units = torch.eye(s, dtype=dtype, device=device).unsqueeze(0).expand(n, s, s)   # (N, S, S): column j = e_j
        cols = [self.rhs(t_mid, units[:, :, j], p, torch.zeros(n, s, dtype=dtype, device=device)) for j in range(s)]
        return torch.stack(cols, -1)


def _time_thresholds(statements, derivatives):
    """(thresholds, relations): the expressions X of the relations T < X, T >= X, ... in the $DES statements and
    derivatives where X reads neither T nor the amounts nor a $DES variable (an IF on time), and those relations
    mapped to the same relation on the segment's time (:data:`SEGMENT_SYMBOL`)."""
    import sympy

    t = sympy.Symbol(TIME_SYMBOL)
    local = {sympy.Symbol(name) for name, _ in statements}
    found, relations = [], {}
    for expr in [e for _, e in statements] + list(derivatives):
        for rel in expr.atoms(sympy.core.relational.Relational):
            for side, other in ((rel.lhs, rel.rhs), (rel.rhs, rel.lhs)):
                if side == t and not (other.free_symbols & (local | {t})) and \
                        not other.atoms(sympy.core.function.AppliedUndef):
                    relations[rel] = rel.xreplace({t: sympy.Symbol(SEGMENT_SYMBOL)})
                    if other not in found:
                        found.append(other)
    return found, relations


#: the most IF-on-T conditions whose branches :func:`is_linear` checks one by one (2^k combinations)
_MAX_SWITCHES = 6


def is_linear(derivatives, statements, amounts) -> bool:
    """True when every derivative, with the $DES assignments substituted, is linear in the amounts with
    coefficients free of T and of the amounts between the switch times: each IF on time (T.GE.X with X from $PK,
    MPAST(n) of a model event time; see :func:`_time_thresholds`) is taken true and false in turn, and each
    combination must be linear with constant coefficients (a gallbladder that empties from MTIME(1) to MTIME(2))."""
    import itertools

    import sympy

    _, relations = _time_thresholds(statements, derivatives)     # the switches the solver steps to
    if len(relations) > _MAX_SWITCHES:
        return False
    for branch in itertools.product((sympy.true, sympy.false), repeat=len(relations)):
        fixed = dict(zip(relations, branch))
        defs = {}
        for name, expr in statements:
            defs[sympy.Symbol(name)] = expr.xreplace(fixed).subs(defs)
        if not _linear_with_constant_coefficients([d.xreplace(fixed).subs(defs) for d in derivatives], amounts):
            return False
    return True


def _linear_with_constant_coefficients(derivatives, amounts) -> bool:
    """True when the derivatives ($DES assignments substituted) are linear in the amounts with coefficients free
    of T, of the amounts and of IFs."""
    import sympy

    t = sympy.Symbol(TIME_SYMBOL)
    syms = [sympy.Symbol(f"_amount_{i}") for i in range(len(amounts))]
    for d in derivatives:
        d = d.subs({fn: syms[amounts.index(str(fn.func))] for fn in d.atoms(sympy.core.function.AppliedUndef)
                    if str(fn.func) in amounts})
        if t in d.free_symbols or d.has(sympy.Piecewise):
            return False
        for s in syms:
            coef = sympy.diff(d, s)
            if coef.free_symbols & (set(syms) | {t}):
                return False
        if sympy.simplify(d.subs({s: 0 for s in syms})) != 0:
            return False
    return True


class PredModel(CompartmentModel):
    """NONMEM's $PRED: no compartments and no dosing; the prediction (Y at EPS = 0) is computed at every record
    from its data items, THETAs and ETAs, and given to the solver as the per-record parameter ``IPRED``
    (:func:`hybridpk.solve.simulate` returns it as it is)."""

    given_per_record = True
    prediction_parameter = "IPRED"
    compartments = ("PRED",)
    reads_cmt = False
    bioavailability = None
    lag = None

    def __init__(self, name: str, description: str):
        self.name, self.description = name, description
        self.parameters = (Parameter("IPRED", "", -math.inf, math.inf, "the $PRED prediction at each record", 0.0),)

    def rhs(self, t, a, p, rate, ctx=None):
        raise NotImplementedError("a $PRED model has no differential equations")
