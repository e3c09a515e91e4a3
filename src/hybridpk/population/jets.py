"""Second-order forward-mode differentiation in numpy: a value with its gradient and Hessian in P variables,
carried through arithmetic and exp/sqrt (the chain rule written out once per operation).

The analytic FOCE-I path (:mod:`hybridpk.population.analytic_focei`) needs each closed form's value, first and
second derivatives in the log-parameters at every observation of every subject. The one-compartment forms
have them by hand; the two-compartment ones (their exponents are the roots of a quadratic) are written once as
ordinary arithmetic on :class:`Jet` values (:mod:`hybridpk.population.closed_form_jets`), which is exact to
rounding, like automatic differentiation, without a graph or per-operation overhead beyond numpy's.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Jet", "variables"]


class Jet:
    """``v`` (S), ``g`` = dv/dx (S, P), ``h`` = d2v/dx2 (S, P, P) for variables x (P,)."""

    __slots__ = ("v", "g", "h")

    def __init__(self, v, g, h):
        self.v, self.g, self.h = v, g, h

    # ------------------------------------------------------------------ shape
    def reshape(self, *shape) -> "Jet":
        p = self.g.shape[-1]
        return Jet(self.v.reshape(shape), self.g.reshape(shape + (p,)), self.h.reshape(shape + (p, p)))

    def sum(self) -> "Jet":
        """The sum over the last axis of the value (e.g. over the doses)."""
        return Jet(self.v.sum(-1), self.g.sum(-2), self.h.sum(-3))

    # ------------------------------------------------------------------ arithmetic
    def __add__(self, other):
        if isinstance(other, Jet):
            return Jet(self.v + other.v, self.g + other.g, self.h + other.h)
        c = np.asarray(other)
        return Jet(self.v + c, np.broadcast_to(self.g, np.shape(self.v + c) + self.g.shape[-1:]),
                   np.broadcast_to(self.h, np.shape(self.v + c) + self.h.shape[-2:]))

    __radd__ = __add__

    def __neg__(self):
        return Jet(-self.v, -self.g, -self.h)

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, other):
        if isinstance(other, Jet):
            a, b = self, other
            av, bv = a.v[..., None], b.v[..., None]
            outer = a.g[..., :, None] * b.g[..., None, :]
            return Jet(a.v * b.v, a.g * bv + b.g * av,
                       a.h * bv[..., None] + b.h * av[..., None] + outer + np.swapaxes(outer, -1, -2))
        c = np.asarray(other)
        return Jet(self.v * c, self.g * c[..., None], self.h * c[..., None, None])

    __rmul__ = __mul__

    def __truediv__(self, other):
        if isinstance(other, Jet):
            return self * other.reciprocal()
        return self * (1.0 / np.asarray(other))

    def __rtruediv__(self, other):
        return self.reciprocal() * other

    # ------------------------------------------------------------------ functions
    def apply(self, value, first, second) -> "Jet":
        """f(self) from f, f' and f'' at the value (arrays that broadcast with it, e.g. a function of one
        variable tabulated at several points per subject): g = f' g, h = f' h + f'' g g'."""
        d1, d2 = first[..., None], second[..., None, None]
        return Jet(value, d1 * self.g, d1[..., None] * self.h + d2 * self.g[..., :, None] * self.g[..., None, :])

    def apply2(self, other: "Jet", value, grad, hess) -> "Jet":
        """f(self, other) from f, its gradient (..., 2) and Hessian (..., 2, 2) in its two arguments at their
        values: g = f_1 g_x + f_2 g_y, h = f_1 h_x + f_2 h_y + f_11 g_x g_x' + f_12 (g_x g_y' + g_y g_x')
        + f_22 g_y g_y'."""
        x, y = self, other
        f1, f2 = grad[..., 0, None], grad[..., 1, None]
        xy = x.g[..., :, None] * y.g[..., None, :]
        h = (f1[..., None] * x.h + f2[..., None] * y.h
             + hess[..., 0, 0, None, None] * x.g[..., :, None] * x.g[..., None, :]
             + hess[..., 0, 1, None, None] * (xy + np.swapaxes(xy, -1, -2))
             + hess[..., 1, 1, None, None] * y.g[..., :, None] * y.g[..., None, :])
        return Jet(value, f1 * x.g + f2 * y.g, h)

    def where(self, condition) -> "Jet":
        """The jet where ``condition`` (broadcasting with the value) holds, 0 (value and derivatives) elsewhere."""
        c = np.asarray(condition)
        return Jet(np.where(c, self.v, 0.0), np.where(c[..., None], self.g, 0.0),
                   np.where(c[..., None, None], self.h, 0.0))

    def reciprocal(self) -> "Jet":
        r = 1.0 / self.v
        return self.apply(r, -r * r, 2 * r * r * r)

    def exp(self) -> "Jet":
        e = np.exp(self.v)
        return self.apply(e, e, e)

    def cos(self) -> "Jet":
        c, sn = np.cos(self.v), np.sin(self.v)
        return self.apply(c, -sn, -c)

    def arccos(self) -> "Jet":
        """acos, for |value| < 1."""
        w = 1.0 - self.v * self.v
        return self.apply(np.arccos(self.v), -1.0 / np.sqrt(w), -self.v / w ** 1.5)

    def sqrt(self) -> "Jet":
        s = np.sqrt(self.v)
        return self.apply(s, 0.5 / s, -0.25 / (s * self.v))


def variables(x) -> list[Jet]:
    """The columns of ``x`` (N, P) as jets in those P variables (each (N,): gradient e_k, Hessian 0)."""
    x = np.asarray(x, dtype=float)
    n, p = x.shape
    eye = np.eye(p)
    return [Jet(x[:, k], np.broadcast_to(eye[k], (n, p)), np.zeros((n, p, p))) for k in range(p)]
