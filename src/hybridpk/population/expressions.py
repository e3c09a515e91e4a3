"""Parameter expressions written in a model spec (``[parameters] CL = "K * V"``), read without executing them.

The text is parsed by Python's :mod:`ast` and only arithmetic (+, -, *, /, ** and unary minus), numbers, names
and the functions exp, log and sqrt are accepted; the result is a sympy expression that
:func:`hybridpk.population._sympy_torch.compile_expression` evaluates with tensors. ``sympy.sympify`` is not
used because it evaluates its input as Python code, and a spec or a run's model.json must never execute code;
powers are kept unevaluated, so that ``9**9**9`` is not computed as an exact integer.
"""

from __future__ import annotations

import ast

from ..errors import ModelError

__all__ = ["parse_expression"]

_FUNCTIONS = ("exp", "log", "sqrt")


def parse_expression(text: str, names, where: str):
    """The sympy expression of ``text`` over the symbols ``names`` (None: any name that is not a function);
    anything else is refused with ``where`` (e.g. ``"[parameters] CL"``) in the message."""
    import sympy

    allowed = None if names is None else set(names)

    def fail(why: str):
        raise ModelError(f"{where} = {text!r}: {why}; write arithmetic (+ - * / **) of numbers, "
                         f"{'names' if allowed is None else ', '.join(sorted(allowed)) or 'no names'} and "
                         "exp/log/sqrt")

    def build(node):
        if isinstance(node, ast.Expression):
            return build(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, bool):
            return sympy.Float(node.value) if isinstance(node.value, float) else sympy.Integer(node.value)
        if isinstance(node, ast.Name):
            if node.id in _FUNCTIONS or (allowed is not None and node.id not in allowed):
                fail(f"{node.id} is not a parameter of the model")
            return sympy.Symbol(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = build(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
                   ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: sympy.Pow(a, b, evaluate=False)}
            op = ops.get(type(node.op))
            if op is None:
                fail(f"the operator {type(node.op).__name__} is not allowed")
            left, right = build(node.left), build(node.right)
            if isinstance(node.op, ast.Pow) and right.is_number and not abs(float(right)) <= 100:
                fail("an exponent above 100 in magnitude")
            return op(left, right)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
                and len(node.args) == 1 and not node.keywords:
            return getattr(sympy, node.func.id)(build(node.args[0]))
        fail("only exp(x), log(x) and sqrt(x) may be called" if isinstance(node, ast.Call)
             else f"{type(node).__name__} ({ast.unparse(node)[:40]}) is not allowed")

    try:
        tree = ast.parse(str(text).strip(), mode="eval")
    except SyntaxError as exc:
        fail(f"not an expression ({exc.msg})")
    return build(tree)
