"""Evaluate sympy expressions (pharmpy's $PK statements) with torch tensors, without code generation."""

from __future__ import annotations

import torch

from ..errors import ModelError


def evaluate(expr, env: dict):
    """Value of sympy ``expr`` with symbols looked up (by name) in ``env`` (tensors or floats)."""
    import sympy

    if expr.is_Symbol:
        try:
            return env[expr.name]
        except KeyError:
            raise ModelError(f"$PK uses {expr.name}, which is neither a THETA, an ETA, a data column nor "
                             "assigned before") from None
    if expr.is_Number:
        return float(expr)
    if expr in (sympy.true, sympy.S.true):
        return True
    if expr in (sympy.false, sympy.S.false):
        return False
    args = [evaluate(a, env) for a in expr.args] if not isinstance(expr, sympy.Piecewise) else None
    if isinstance(expr, sympy.Add):
        out = args[0]
        for a in args[1:]:
            out = out + a
        return out
    if isinstance(expr, sympy.Mul):
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    if isinstance(expr, sympy.Pow):
        base, e = args
        if isinstance(e, float) and e == 0.5:
            return torch.sqrt(torch.as_tensor(base))
        return base ** e
    simple = {sympy.exp: torch.exp, sympy.log: torch.log, sympy.Abs: torch.abs}
    for cls, fn in simple.items():
        if isinstance(expr, cls):
            return fn(torch.as_tensor(args[0]))
    rel = {sympy.StrictLessThan: lambda a, b: a < b, sympy.LessThan: lambda a, b: a <= b,
           sympy.StrictGreaterThan: lambda a, b: a > b, sympy.GreaterThan: lambda a, b: a >= b,
           sympy.Equality: lambda a, b: a == b, sympy.Unequality: lambda a, b: a != b}
    for cls, fn in rel.items():
        if isinstance(expr, cls):
            return torch.as_tensor(fn(*args))
    if isinstance(expr, sympy.And):
        out = torch.as_tensor(args[0])
        for a in args[1:]:
            out = out & torch.as_tensor(a)
        return out
    if isinstance(expr, sympy.Or):
        out = torch.as_tensor(args[0])
        for a in args[1:]:
            out = out | torch.as_tensor(a)
        return out
    if isinstance(expr, sympy.Not):
        return ~torch.as_tensor(args[0])
    if isinstance(expr, sympy.Piecewise):
        result = None
        for value, cond in reversed(expr.args):
            v = evaluate(value, env)
            c = evaluate(cond, env)
            if result is None:
                result = v
            elif isinstance(c, bool):
                result = v if c else result
            else:
                result = torch.where(c, torch.as_tensor(v), torch.as_tensor(result))
        return result
    raise ModelError(f"cannot translate the expression {expr} ({type(expr).__name__}) from the control stream")
