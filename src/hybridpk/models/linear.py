"""Linear mammillary models (1, 2, 3 compartments; IV or first-order absorption).

They have an exact closed-form solution (:mod:`hybridpk.solve.closed_form`), used by default; ``rhs``
gives the same system to the ODE path. Compartments for oral models: 1 DEPOT, 2 CENTRAL, 3.. PERIPHERAL;
for IV models: 1 CENTRAL, 2.. PERIPHERAL (as NONMEM's ADVAN1-4, 11, 12).
"""

from __future__ import annotations

import torch

from .base import ALAG, CL, KA, Q3, V2, V3, CompartmentModel, F, Q, V


class LinearMammillary(CompartmentModel):
    """A central compartment with 0-2 peripherals and optional first-order absorption."""

    linear = True
    n_peripheral = 0
    oral = False

    def __init__(self):
        cmts = (["DEPOT"] if self.oral else []) + ["CENTRAL"] + [f"PERIPHERAL{i + 1}" for i in
                                                                   range(self.n_peripheral)]
        self.compartments = tuple(cmts)
        self.dose_cmt = 1
        self.obs_cmt = 2 if self.oral else 1

    def mammillary(self, p):
        pairs = []
        if self.n_peripheral >= 1:
            pairs.append((p["Q"] / p["V"], p["Q"] / p["V2"]))
        if self.n_peripheral >= 2:
            pairs.append((p["Q3"] / p["V"], p["Q3"] / p["V3"]))
        return p["V"], p["CL"] / p["V"], pairs, (p["KA"] if self.oral else None)

    def system_matrix(self, p, t_mid=None):
        """A (N, S, S) (1/h) of d(amounts)/dt = A a + rate: the same system as ``rhs``, for the exact
        matrix-exponential path (taken when parameters change between records, see ``hybridpk.solve``)."""
        v, k10, pairs, ka = self.mammillary(p)
        n, s = k10.shape[0], self.n_states
        c = 1 if self.oral else 0
        a = k10.new_zeros(n, s, s)
        a[:, c, c] = -k10 - sum((k1j for k1j, _ in pairs), torch.zeros_like(k10))
        if self.oral:
            a[:, 0, 0] = -ka
            a[:, c, 0] = ka
        for j, (k1j, kj1) in enumerate(pairs):
            a[:, c + 1 + j, c] = k1j
            a[:, c + 1 + j, c + 1 + j] = -kj1
            a[:, c, c + 1 + j] = kj1
        return a

    def rhs(self, t, a, p, rate, ctx=None):
        v, k10, pairs, ka = self.mammillary(p)
        c = 1 if self.oral else 0                 # index of CENTRAL
        d = torch.zeros_like(a)
        central = a[..., c]
        dc = -k10 * central
        if self.oral:
            d[..., 0] = -ka * a[..., 0]
            dc = dc + ka * a[..., 0]
        for j, (k1j, kj1) in enumerate(pairs):
            per = a[..., c + 1 + j]
            d[..., c + 1 + j] = k1j * central - kj1 * per
            dc = dc - k1j * central + kj1 * per
        d[..., c] = dc
        return d + rate


def _params(n_peripheral: int, oral: bool) -> tuple:
    ps = [CL, V]
    if n_peripheral >= 1:
        ps += [Q, V2]
    if n_peripheral >= 2:
        ps += [Q3, V3]
    if oral:
        ps += [KA]
    return tuple(ps + [ALAG, F])


class OneCmtIV(LinearMammillary):
    name, description = "1cmt_iv", "one compartment, IV bolus/infusion, linear elimination (ADVAN1)"
    parameters = _params(0, False)


class OneCmtOral(LinearMammillary):
    name, description = "1cmt_oral", "one compartment, first-order absorption, linear elimination (ADVAN2)"
    parameters, oral = _params(0, True), True


class TwoCmtIV(LinearMammillary):
    name, description = "2cmt_iv", "two compartments, IV bolus/infusion (ADVAN3)"
    parameters, n_peripheral = _params(1, False), 1


class TwoCmtOral(LinearMammillary):
    name, description = "2cmt_oral", "two compartments, first-order absorption (ADVAN4)"
    parameters, n_peripheral, oral = _params(1, True), 1, True


class ThreeCmtIV(LinearMammillary):
    name, description = "3cmt_iv", "three compartments, IV bolus/infusion (ADVAN11)"
    parameters, n_peripheral = _params(2, False), 2


class ThreeCmtOral(LinearMammillary):
    name, description = "3cmt_oral", "three compartments, first-order absorption (ADVAN12)"
    parameters, n_peripheral, oral = _params(2, True), 2, True
