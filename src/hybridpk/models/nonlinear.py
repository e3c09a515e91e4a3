"""Models without a closed form: Michaelis-Menten, transit absorption, TMDD, enterohepatic recirculation.

Solved by the ODE path (:mod:`hybridpk.solve.ode`). Time in h, doses in mg, volumes in L, so
concentrations are mg/L; the target (TMDD) is expressed in the same concentration unit as the drug.
"""

from __future__ import annotations

import torch

from .base import ALAG, CL, KA, KM, VMAX, CompartmentModel, F, Parameter, Q, V, V2

MTT = Parameter("MTT", "h", 1e-3, 100.0, "mean transit time through the transit chain", 1.5)
NN = Parameter("NN", "-", 0.0, 100.0, "number of transit compartments (continuous, Savic 2007)", 3.0)
KON = Parameter("KON", "L/mg/h", 1e-6, 1e4, "second-order binding rate constant drug-target", 0.5)
KOFF = Parameter("KOFF", "1/h", 1e-6, 1e4, "dissociation rate constant of the complex", 0.05)
KINT = Parameter("KINT", "1/h", 1e-6, 1e3, "internalisation (elimination) rate of the complex", 0.05)
KSYN = Parameter("KSYN", "mg/L/h", 1e-8, 1e3, "zero-order synthesis rate of the target", 0.01)
KDEG = Parameter("KDEG", "1/h", 1e-6, 1e3, "first-order degradation rate of the free target", 0.1)
KSS = Parameter("KSS", "mg/L", 1e-8, 1e4, "quasi-steady-state constant (KOFF+KINT)/KON", 0.2)
KGB = Parameter("KGB", "1/h", 0.0, 100.0, "transfer rate constant central -> gallbladder (biliary excretion)",
                0.2)
KEMPT = Parameter("KEMPT", "1/h", 0.0, 100.0, "gallbladder emptying rate constant into the gut during a meal",
                  2.0)
TMEAL = Parameter("TMEAL", "h", 0.0, 1e4, "time of the first meal (gallbladder emptying), from time 0", 4.0)
MEALII = Parameter("MEALII", "h", 0.5, 1e4, "interval between meals", 6.0)
TEMPT = Parameter("TEMPT", "h", 1e-3, 24.0, "duration of gallbladder emptying after each meal", 0.5)


def _mm(p, c):
    return p["VMAX"] * c / (p["KM"] + c)


class OneCmtIVMM(CompartmentModel):
    name = "1cmt_iv_mm"
    description = "one compartment, IV, Michaelis-Menten elimination VMAX*C/(KM+C)"
    parameters = (V, VMAX, KM, ALAG, F)
    compartments = ("CENTRAL",)

    def rhs(self, t, a, p, rate, ctx=None):
        return torch.stack([-_mm(p, a[..., 0] / p["V"])], -1) + rate


class OneCmtOralMM(CompartmentModel):
    name = "1cmt_oral_mm"
    description = "one compartment, first-order absorption, Michaelis-Menten elimination"
    parameters = (V, VMAX, KM, KA, ALAG, F)
    compartments = ("DEPOT", "CENTRAL")
    obs_cmt = 2

    def rhs(self, t, a, p, rate, ctx=None):
        absorbed = p["KA"] * a[..., 0]
        return torch.stack([-absorbed, absorbed - _mm(p, a[..., 1] / p["V"])], -1) + rate


class OneCmtOralTransit(CompartmentModel):
    """Savic et al. (2007) J Pharmacokinet Pharmacodyn 34:711: doses pass a chain of NN transit compartments
    (mean transit time MTT) before first-order absorption KA; NN is continuous (analytical chain input)."""

    name = "1cmt_oral_transit"
    description = "one compartment, transit-compartment absorption (MTT, NN; Savic 2007), linear elimination"
    parameters = (CL, V, KA, MTT, NN, F)
    compartments = ("ABSORPTION", "CENTRAL")
    obs_cmt = 2
    lag = None
    #: doses into the dose compartment enter through the transit chain, not as a jump
    dose_as_input = True
    #: the chain input is taken at s >= S_FLOOR (h) after a dose (see input_rate)
    S_FLOOR = 1e-12

    def input_rate(self, t, dose_time, dose_amt, p, mid=None):
        """Rate (mg/h) into ABSORPTION at time t (N,) from doses (N, D) given at dose_time.

        ``mid`` (N,), the midpoint of the solver's current segment (dose times are segment boundaries): a dose
        is in the input of the segments after it, and its chain input is taken at s = max(t - dose time,
        S_FLOOR) there. For NN between 0 and 1 the input s^NN rises from 0 with an infinite slope (for NN near 0
        it is a step within 1e-300 h), which no step-size control resolves; the floor makes the start a jump at
        the boundary and changes the input on [0, 1e-12] h only. Without ``mid``: the doses before t."""
        ktr = (p["NN"] + 1.0) / p["MTT"]
        s = t.unsqueeze(-1) - dose_time
        if mid is None:
            pos = s > 0
        else:
            pos = dose_time < mid.unsqueeze(-1)
            s = s.clamp(min=self.S_FLOOR)
        s_safe = torch.where(pos, s, torch.ones_like(s))
        nn = p["NN"].unsqueeze(-1)
        lk = ktr.unsqueeze(-1)
        log_rate = torch.log(lk) * (nn + 1) + nn * torch.log(s_safe) - lk * s_safe - torch.lgamma(nn + 1)
        return (torch.where(pos, torch.exp(log_rate), torch.zeros_like(s)) * dose_amt).sum(-1)

    def rhs(self, t, a, p, rate, ctx=None):
        inp = (self.input_rate(t, ctx.transit_time, ctx.transit_amt, p, getattr(ctx, "segment_mid", None))
               if ctx is not None else 0.0)
        absorbed = p["KA"] * a[..., 0]
        return torch.stack([inp - absorbed, absorbed - p["CL"] / p["V"] * a[..., 1]], -1) + rate


class _TMDD(CompartmentModel):
    obs_cmt = 1

    def initial_state(self, p, like):
        x = like.new_zeros(like.shape[0], self.n_states)
        x[:, 2] = p["KSYN"] / p["KDEG"]
        return x


class TMDDFull(_TMDD):
    """Mager & Jusko (2001) J Pharmacokinet Pharmacodyn 28:507, with a peripheral compartment."""

    name = "tmdd_full"
    description = "target-mediated drug disposition, full binding model (Mager-Jusko), 2 compartments, IV"
    parameters = (CL, V, Q, V2, KON, KOFF, KINT, KSYN, KDEG, ALAG, F)
    compartments = ("CENTRAL", "PERIPHERAL", "TARGET", "COMPLEX")

    def rhs(self, t, a, p, rate, ctx=None):
        v = p["V"]
        c = a[..., 0] / v
        r, rc = a[..., 2], a[..., 3]
        bind = p["KON"] * c * r - p["KOFF"] * rc
        dist = p["Q"] * c - p["Q"] / p["V2"] * a[..., 1]
        return torch.stack([
            -p["CL"] * c - bind * v - dist,
            dist,
            p["KSYN"] - p["KDEG"] * r - bind,
            bind - p["KINT"] * rc,
        ], -1) + rate


class TMDDQSS(_TMDD):
    """Quasi-steady-state TMDD (Gibiansky et al. 2008, J Pharmacokinet Pharmacodyn 35:573). State: total drug
    amount in the central compartment, peripheral amount, total target concentration. Observed: free drug."""

    name = "tmdd_qss"
    description = "target-mediated drug disposition, quasi-steady-state approximation (KSS), 2 compartments, IV"
    parameters = (CL, V, Q, V2, KSS, KINT, KSYN, KDEG, ALAG, F)
    compartments = ("CENTRAL", "PERIPHERAL", "TARGET")

    @staticmethod
    def free(ctot, rtot, kss):
        b = ctot - rtot - kss
        return 0.5 * (b + torch.sqrt(b * b + 4.0 * kss * ctot))

    def observe(self, a, p, cmt=None):
        return self.free(a[..., 0] / p["V"], a[..., 2], p["KSS"])

    def rhs(self, t, a, p, rate, ctx=None):
        v = p["V"]
        ctot = a[..., 0] / v
        rtot = a[..., 2]
        c = self.free(ctot, rtot, p["KSS"])
        complex_ = ctot - c
        dist = p["Q"] * c - p["Q"] / p["V2"] * a[..., 1]
        return torch.stack([
            -p["CL"] * c - p["KINT"] * complex_ * v - dist,
            dist,
            p["KSYN"] - p["KDEG"] * rtot - (p["KINT"] - p["KDEG"]) * complex_,
        ], -1) + rate


class OneCmtOralEHC(CompartmentModel):
    """Enterohepatic recirculation: drug moves from the central compartment into the gallbladder (KGB) and
    is released into the gut at meals (every MEALII h from TMEAL, for TEMPT h, rate KEMPT), where it is
    reabsorbed (KA). Meal times are parameters; the solver steps to meal starts/ends as discontinuities, and
    the solution is differentiated through them (TMEAL, MEALII, TEMPT can be estimated). The system is linear
    between meal switches, so it is solved exactly by matrix exponentials (``system_matrix``)."""

    name = "1cmt_oral_ehc"
    description = "one compartment, first-order absorption, enterohepatic recirculation via a gallbladder"
    parameters = (CL, V, KA, KGB, KEMPT, TMEAL, MEALII, TEMPT, ALAG, F)
    compartments = ("GUT", "CENTRAL", "GALLBLADDER")
    obs_cmt = 2

    @staticmethod
    def interval(p):
        """MEALII (N,) h, at least its lower bound: an estimation's trial point below it (MEALII -> 0) would ask
        for unboundedly many meals."""
        return p["MEALII"].clamp(min=MEALII.lower)

    def emptying(self, t, p):
        """1 while the gallbladder empties (within TEMPT h after a meal), else 0; t (N,) in h. Meals are every
        MEALII h from TMEAL on, and before time 0 (no record lies there: a steady-state dose's past cycles) every
        MEALII h in the same phase, so that a regimen at steady state has had its meals."""
        since = t - p["TMEAL"]
        phase = torch.remainder(since, self.interval(p))
        return (((since >= 0) | (t < 0)) & (phase < p["TEMPT"])).to(t.dtype)

    def switch_times(self, p, t_end, t_start=None):
        ii = self.interval(p)

        def count(span):
            return int(torch.ceil(torch.nan_to_num((span.clamp(min=0) / ii).detach(), nan=0.0, posinf=0.0)
                                  .max()).item()) + 1

        k = torch.arange(count(t_end - p["TMEAL"]), dtype=ii.dtype, device=ii.device)
        past = t_start is not None and bool((t_start < 0).any())
        if past:        # the meals before 0 (see emptying), and 0, where the schedule changes
            k = torch.cat([-torch.arange(count(p["TMEAL"] - t_start), 0, -1, dtype=ii.dtype, device=ii.device), k])
        starts = p["TMEAL"].unsqueeze(-1) + k * ii.unsqueeze(-1)
        times = [starts, starts + p["TEMPT"].unsqueeze(-1)] + ([torch.zeros_like(starts[:, :1])] if past else [])
        return torch.cat(times, -1)

    def system_matrix(self, p, t_mid):
        on = self.emptying(t_mid, p)
        zero = torch.zeros_like(on)
        k_out = p["KEMPT"] * on
        return torch.stack([
            torch.stack([-p["KA"], zero, k_out], -1),
            torch.stack([p["KA"], -p["CL"] / p["V"] - p["KGB"], zero], -1),
            torch.stack([zero, p["KGB"], -k_out], -1)], -2)

    def rhs(self, t, a, p, rate, ctx=None):
        on = self.emptying(ctx.segment_mid if ctx is not None else t, p)
        gut, central, gb = a[..., 0], a[..., 1], a[..., 2]
        release = p["KEMPT"] * gb * on
        absorbed = p["KA"] * gut
        to_gb = p["KGB"] * central
        return torch.stack([release - absorbed, absorbed - p["CL"] / p["V"] * central - to_gb,
                            to_gb - release], -1) + rate
