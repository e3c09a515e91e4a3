"""The evaluation of control-stream statements ($PK IF blocks, constants) with torch tensors: constants are not
narrowed to float32, nothing lands on a device the data are not on, and a branch an IF does not take gives no
NaN derivative."""

from __future__ import annotations

import math

import pytest
import sympy
import torch

from hybridpk.population._sympy_torch import compile_expression


def _x():
    return torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)


def test_if_block_with_constant_branches_keeps_float64():
    """IF (X.LT.1) THEN TV=0.1 ELSE TV=0.2: the branches are float64 values (float32 would make 0.1
    0.10000000149, 1.5e-8 off), on the condition's device."""
    x = sympy.Symbol("X")
    expr = sympy.Piecewise((0.1, x < 1), (0.2, True))
    env = {"X": _x()}
    with torch.device("meta"):            # a tensor made without the data's device would land here
        out = compile_expression(expr)(env)
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    assert out.tolist() == [0.1, 0.2, 0.2]


def test_functions_of_constants_stay_numbers():
    """exp, log, sqrt, relations and NOT of constants are Python numbers (they mix with tensors anywhere)."""
    x = sympy.Symbol("X")
    cases = {sympy.exp(sympy.Float(0.3)) * x: [math.exp(0.3) * v for v in (0.5, 2.0, 7.0)],
             sympy.sqrt(sympy.Float(2.0), evaluate=False) * x: [math.sqrt(2.0) * v for v in (0.5, 2.0, 7.0)],
             sympy.Piecewise((x, sympy.Not(sympy.Float(1.0) > 2, evaluate=False)), (2 * x, True)): [0.5, 2.0, 7.0]}
    env = {"X": _x()}
    with torch.device("meta"):
        got = {expr: compile_expression(expr)(env) for expr in cases}
    for expr, want in cases.items():
        assert got[expr].device.type == "cpu"
        torch.testing.assert_close(got[expr], torch.tensor(want, dtype=torch.float64), rtol=1e-15, atol=0)
    assert isinstance(compile_expression(sympy.log(sympy.Float(2.0), evaluate=False))({}), float)


def test_a_branch_an_if_does_not_take_gives_no_nan_derivative():
    """IF (F.GT.0) IPRED = LOG(F) after IPRED = LOG(0.0025), and a division and a square root under IFs: NM-TRAN
    computes only the branch taken; evaluated for every record at once, the untaken LOG(0) is discarded, but its
    derivative was NaN (0 * inf). Values and derivatives are those of the branch taken."""
    f = sympy.Symbol("F")
    cases = {
        sympy.Piecewise((sympy.log(f), f > 0), (sympy.log(sympy.Float(0.0025)), True)):
            ([math.log(0.0025), math.log(2.0)], [0.0, 0.5]),
        sympy.Piecewise((sympy.Float(1.0), sympy.Eq(f, 0)), (1 / f + sympy.sqrt(f), True)):
            ([1.0, 0.5 + math.sqrt(2.0)], [0.0, -0.25 + 0.5 / math.sqrt(2.0)]),
    }
    for expr, (value, slope) in cases.items():
        x = torch.tensor([0.0, 2.0], dtype=torch.float64, requires_grad=True)
        out = compile_expression(expr)({"F": x})
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert out.tolist() == [pytest.approx(v, rel=1e-12) for v in value]
        assert grad.tolist() == [pytest.approx(v, rel=1e-12, abs=1e-15) for v in slope]
