"""Evaluate sympy expressions (pharmpy's $PK, $DES and $ERROR statements) with torch tensors, without code
generation: :func:`compile_expression` turns an expression into a tree of closures once (each node a small
Python function of its children), so a statement evaluated on every objective call or ODE right-hand-side
call is not re-dispatched on sympy's types each time; :func:`evaluate` is the one-off form."""

from __future__ import annotations

import functools
import operator

import torch

from ..errors import ModelError


def evaluate(expr, env: dict):
    """Value of sympy ``expr`` with symbols looked up (by name) in ``env`` (tensors or floats)."""
    return compile_expression(expr)(env)


def _lookup(name):
    def value(env):
        try:
            return env[name]
        except KeyError:
            raise ModelError(f"$PK uses {name}, which is neither a THETA, an ETA, a data column nor "
                             "assigned before") from None
    return value


def _constant(v):
    return lambda env: v


def _fold(op, parts):
    def value(env):
        return functools.reduce(op, (p(env) for p in parts))
    return value


def _number_or_tensor(fn, v):
    """``fn`` (a torch function) of ``v``; for a Python number (a constant part of an expression) the value as a
    Python number, computed in float64, so that it mixes with tensors on any device."""
    if torch.is_tensor(v):
        return fn(v)
    dtype = torch.bool if isinstance(v, bool) else torch.float64
    return fn(torch.tensor(v, dtype=dtype, device="cpu")).item()


def _unary(fn, part):
    return lambda env: _number_or_tensor(fn, part(env))


def _power(base, exponent, sqrt: bool):
    if sqrt:
        return lambda env: _number_or_tensor(torch.sqrt, base(env))
    return lambda env: base(env) ** exponent(env)


def _relation(fn, a, b):
    return lambda env: fn(a(env), b(env))     # a bool tensor, or a Python bool of two constants


def _logical(op, parts):
    def value(env):
        return functools.reduce(op, (p(env) for p in parts))
    return value


def _where(cond, a, b):
    """torch.where with the branches as float64 tensors on the condition's device (a Python number is not
    narrowed to float32)."""
    def tensor(v):
        return v if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64, device=cond.device)
    return torch.where(cond, tensor(a), tensor(b))


def _piecewise(branches):
    """``branches``: (value, condition) closures in sympy's order; the first condition that holds wins."""
    def value(env):
        result = None
        for val, cond in reversed(branches):
            v = val(env)
            c = cond(env)
            if result is None:
                result = v
            elif isinstance(c, bool):
                result = v if c else result
            else:
                result = _where(c, v, result)
        return result
    return value


def _guarded(value, taken):
    """The branch ``value`` of a Piecewise with the arguments of its logarithms and of its powers that are not
    whole numbers >= 0 (divisions, square roots) replaced by 1 where the branch is not ``taken``. NM-TRAN computes
    only the branch an IF takes; evaluated for every record at once, an untaken LOG(0) (IF (F.GT.0) IPRED =
    LOG(F)) is -inf, the same where discards it, but its derivative 0 * inf is NaN and would make every gradient
    NaN (a $PRED fit stayed at its start)."""
    import sympy

    if taken == sympy.true:
        return value

    def safe(arg):
        return sympy.Piecewise((arg, taken), (1, True))

    def guard(e):      # conditions (relations, And/Or/Not) are left as they are
        if not e.args or isinstance(e, sympy.logic.boolalg.Boolean):
            return e
        args = [guard(a) for a in e.args]
        if isinstance(e, sympy.log):
            return sympy.log(safe(args[0]), evaluate=False)
        if isinstance(e, sympy.Pow) and not (e.exp.is_Integer and e.exp >= 0) and e.base.free_symbols:
            return sympy.Pow(safe(args[0]), args[1], evaluate=False)
        return e.func(*args) if args != list(e.args) else e

    return guard(value)


@functools.lru_cache(maxsize=4096)
def compile_expression(expr):
    """A function env -> value of sympy ``expr`` (symbols and applied functions such as pharmpy's amounts
    ``A_CENTRAL(t)`` looked up by name in ``env``: tensors or floats). Supports +, *, powers, exp, log, Abs,
    relations, And/Or/Not and Piecewise (NONMEM's IF blocks); anything else is refused by name."""
    import sympy

    if expr.is_Symbol:
        return _lookup(expr.name)
    if isinstance(expr, sympy.core.function.AppliedUndef):   # pharmpy's A_NAME(t)
        return _lookup(str(expr.func))
    if expr.is_Number:
        return _constant(float(expr))
    if expr in (sympy.true, sympy.S.true):
        return _constant(True)
    if expr in (sympy.false, sympy.S.false):
        return _constant(False)
    if isinstance(expr, sympy.Piecewise):
        branches, before = [], []
        for v, c in expr.args:
            taken = sympy.And(c, *[sympy.Not(b) for b in before])
            branches.append((compile_expression(_guarded(v, taken)), compile_expression(c)))
            before.append(c)
        return _piecewise(branches)
    parts = [compile_expression(a) for a in expr.args]
    if isinstance(expr, sympy.Add):
        return _fold(operator.add, parts)
    if isinstance(expr, sympy.Mul):
        return _fold(operator.mul, parts)
    if isinstance(expr, sympy.Pow):
        return _power(parts[0], parts[1], sqrt=expr.args[1].is_Number and float(expr.args[1]) == 0.5)
    simple = {sympy.exp: torch.exp, sympy.log: torch.log, sympy.Abs: torch.abs}
    for cls, fn in simple.items():
        if isinstance(expr, cls):
            return _unary(fn, parts[0])
    rel = {sympy.StrictLessThan: operator.lt, sympy.LessThan: operator.le, sympy.StrictGreaterThan: operator.gt,
           sympy.GreaterThan: operator.ge, sympy.Equality: operator.eq, sympy.Unequality: operator.ne}
    for cls, fn in rel.items():
        if isinstance(expr, cls):
            return _relation(fn, *parts)
    if isinstance(expr, sympy.And):
        return _logical(operator.and_, parts)
    if isinstance(expr, sympy.Or):
        return _logical(operator.or_, parts)
    if isinstance(expr, sympy.Not):
        return _unary(operator.invert, parts[0])
    raise ModelError(f"cannot translate the expression {expr} ({type(expr).__name__}) from the control stream")


def compile_statements(statements):
    """A function env -> env updated by the assignments ``statements`` ((name, sympy expression) in order),
    each compiled once."""
    compiled = [(name, compile_expression(expr)) for name, expr in statements]

    def run(env):
        for name, fn in compiled:
            env[name] = fn(env)
        return env
    return run
