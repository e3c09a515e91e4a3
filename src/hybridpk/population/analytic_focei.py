"""FOCE-I of one- and two-compartment models with analytic derivatives, in numpy: the same OFV and gradient as
:mod:`hybridpk.population.focei`, at a fraction of the cost for the models it covers.

The general path (:class:`~hybridpk.population.focei.Problem`) differentiates any model by automatic
differentiation; at 1000 subjects its cost is torch's per-operation overhead, not arithmetic
(benchmarks/fit_scale.py). NONMEM's ADVAN1/ADVAN2 and nlmixr2's linear compartment solutions use the closed
form's own derivatives instead; so does this module, for what it covers:

- the structures 1cmt_oral (ADVAN2: KA, CL, V), 1cmt_iv (ADVAN1: CL, V), 2cmt_oral (ADVAN4: KA, CL, V, Q, V2),
  2cmt_iv (ADVAN3: CL, V, Q, V2), 3cmt_oral (ADVAN12: KA, CL, V, Q, V2, Q3, V3) and 3cmt_iv (ADVAN11), with
  their derivatives by forward-mode jets (:mod:`hybridpk.population.closed_form_jets`), and by hand for
  1cmt_oral without steady-state doses, lag, F or IV doses (the common case, at half the jets' cost); a
  bioavailability F of the dose compartment's doses (not with
  infusions) and a lag time ALAG (log-parameters like the others; the doses' times since their lagged time a jet
  in it; a steady-state bolus's earlier doses act from its record on) without steady-state infusions; built by
  :func:`~hybridpk.population.build_model` (derived and fixed parameters included), a published spec or an
  imported control stream (ADVAN1-4, 11, 12, any TRANS), with covariates (effects, IF blocks) constant within each
  subject; no IOV or log-transform-both-sides;
- IIV log-affine in the ETAs, log PARAM = log TV(THETA, covariates) + sum_k P_pk ETA_k with one constant matrix
  P (PARAM = TV exp(ETA), MU referencing, K = CL/V, an ETA scaled by a number), read from the model's own
  parameter map and checked (:func:`eta_placement`); any OMEGA (diagonal or blocks);
- FOCE with interaction, additive, proportional or combined (ADD^2 + PROP^2 IPRED^2) error;
- doses by superposition: oral boluses into the depot; IV boluses and infusions (RATE given, or RATE=-2 with
  the duration in DUR) into the central compartment, of IV structures or beside the oral doses of oral ones;
  steady-state doses (SS=1 or 2 with II) and resets (EVID 3/4); no modelled rates. Which dose acts on which
  observation is decided by the solvers' own rules (:mod:`hybridpk.solve._events`: a dose acts on the records
  after it, and on a record at its time that comes after it in the data; a reset or an SS=1 dose ends every
  earlier one); observations without censoring (M3).

Anything else takes the general path. Before it is used on a dataset, its predictions are checked against the
general path's (:func:`analytic_problem`), so a convention it does not follow (e.g. which compartment a
dose goes to) sends the fit to the general path instead of changing its numbers.

Per subject, with phi = phi0 + P eta (phi0 the subject's typical log-parameters, e.g. log(KA, CL, V):
THETA and covariates act only through it; P places the ETAs), f_j(phi) the prediction at observation j,
V_j = ADD^2 + PROP^2 f_j^2 and r_j = y_j - f_j (Wang, J Pharmacokinet Pharmacodyn 2007;34:575-93):

    obj(eta) = sum_j (r_j^2 / V_j + log V_j) + eta' OMEGA^-1 eta
    M        = OMEGA^-1 + sum_j c_j g_j g_j',   c = 1/V + 1/2 V'^2 / V^2,   g = df/deta,   V' = dV/df
    OFV_i    = obj(eta_i) + log|OMEGA| + log|M|          (eta_i: the mode of obj; NONMEM's OFV convention)

The gradient of sum_i OFV_i with respect to phi0 (each subject's), OMEGA and the SDs is exact: the ETAs'
dependence on them enters by implicit differentiation, d eta_i / dp = -H^-1 d(grad obj)/dp with H the exact
Hessian of obj at eta_i; it needs second derivatives of f only (log|M| holds first derivatives of f). From phi0
to THETA (covariate effects included) the chain rule runs by automatic differentiation of the model's small
parameter map (hybridpk.population.fit._analytic_at). The general path gets the same numbers by one Newton step
re-attached to the parameters and automatic differentiation (tests/integration/test_analytic_focei.py compares
them).
"""

from __future__ import annotations

import numpy as np

from . import closed_form_jets

__all__ = ["AnalyticFOCEI", "analytic_problem", "analytic_reason"]

#: the structures covered, with their parameters in the order of phi (log scale)
STRUCTURES = closed_form_jets.PARAMETERS
#: the error models covered (V = ADD^2 + PROP^2 f^2 with the SDs the kind has)
ERRORS = ("additive", "proportional", "combined")
#: the predictions must agree with the general path's to this (relative to max(1, |f|)) before it is used
AGREEMENT = 1e-9


def analytic_reason(pm, prob) -> str | None:
    """Why the analytic path cannot fit ``pm`` on the data of ``prob`` (a focei.Problem), or None when it can
    (still to be confirmed on the data by :func:`analytic_problem`: the parameter map, then the predictions)."""
    recipe = pm.recipe or {}
    if prob.estimation != "FOCE-I":
        return f"estimation method {prob.estimation}"
    if pm.structural.name not in STRUCTURES:
        return f"structural model {pm.structural.name}"
    if recipe.get("iov") or pm.error.ltbs:
        return "IOV or log-transform-both-sides"
    if pm.error.kind not in ERRORS:
        return f"error model {pm.error.kind}"
    if prob.method == "ode":
        return "predictions by the ODE solver were asked for"
    if pm.omega_fixed or pm.sigma_fixed or pm.omega_same:
        return "fixed or SAME OMEGA/SIGMA"
    b = prob.batch
    if b.time.device.type != "cpu":
        return f"data on {b.time.device} (the analytic path computes on the CPU)"
    varying = pm.varying_items(b) if pm.record_items else ()
    if varying:
        return f"covariates that change within a subject ({', '.join(varying)})"
    m = b.dose_mask
    if bool(prob.cens.any()):
        return "censored observations (M3)"
    oral = pm.structural.name.endswith("_oral")
    if bool((m & (b.dose_mode < 0)).any()):
        return "modelled infusion rates or durations (RATE=-1/-2)"
    if oral and bool((m & (b.dose_cmt <= 1) & (b.dose_mode != 0)).any()):     # CMT 0: the dose compartment
        return "infusions into the depot"
    if bool((m & (b.dose_cmt > (2 if oral else 1))).any()):
        return "doses into a compartment other than the " + ("depot or the central one" if oral else "central one")
    return None


def analytic_problem(pm, prob, theta0: dict):
    """The :class:`AnalyticFOCEI` of ``prob`` when the analytic path covers it (:func:`analytic_reason`), the
    model's parameters are log-affine in the ETAs (:func:`eta_placement`) and its predictions agree with the
    general path's at ``theta0`` ({name: tensor}) at ETA = 0 and at ETAs of +-0.5 (to :data:`AGREEMENT`), else
    (None, the reason)."""
    reason = analytic_reason(pm, prob)
    if reason is not None:
        return None, reason
    import torch

    theta = {k: torch.as_tensor(float(v.detach()) if torch.is_tensor(v) else float(v), dtype=torch.float64,
                                device="cpu") for k, v in theta0.items()}
    place, params, reason = eta_placement(pm, prob, theta)
    if reason is not None:
        return None, reason
    engine = AnalyticFOCEI(pm, prob, place, params)
    with torch.no_grad():
        phi0 = engine.typical(theta).numpy()
    k = pm.n_eta
    rng = np.random.default_rng(0)
    for eta in (np.zeros((engine.n, k)), rng.uniform(-0.5, 0.5, (engine.n, k))):
        with torch.no_grad():
            ref = prob.predict(theta, torch.as_tensor(eta, device="cpu"))
        ref = ref.numpy()[engine.obs_index]
        f = engine.predict(phi0 + eta @ engine.place.T)
        bad = np.abs(f - ref)[engine.mask] > AGREEMENT * np.maximum(1.0, np.abs(ref[engine.mask]))
        if bad.any() or not np.isfinite(f[engine.mask]).all():
            return None, "its predictions differ from the general path's on these data"
    return engine, None


def eta_placement(pm, prob, theta: dict):
    """(P, the log-parameters' names, None) when the structure's log-parameters (and log ALAG and log F, when the
    model has a lag time or a bioavailability) are phi = phi0(THETA, covariates) + P ETA with one constant matrix
    P (params x ETAs) for every subject and THETA: PARAM = TV exp(ETA) and its MU-referenced forms
    (``CL = EXP(MU_1 + ETA(1))``), an ETA shared by parameters (``CL = K*V``) or scaled by a constant; else
    (None, None, the reason). Read from the
    model's own parameter map (a control stream's $PK, a spec's or :func:`~hybridpk.population.build_model`'s),
    as a difference per ETA at ``theta``, then checked at random ETAs and at a THETA moved by 0.1% (an ETA whose
    coefficient is a THETA or a covariate is refused)."""
    import torch

    params = STRUCTURES[pm.structural.name]
    n, k = prob.batch.n_subjects, pm.n_eta
    with torch.no_grad():
        first = pm.individual(theta, torch.zeros(n, k, dtype=torch.float64, device="cpu"), prob.cov)
    if "ALAG" in first and pm.structural.lag == "ALAG":
        if not bool((first["ALAG"] > 0).all()):
            return None, None, "a lag time ALAG of 0 for some subjects"
        b = prob.batch
        if bool((b.dose_mask & (b.dose_ss > 0) & (b.dose_mode != 0)).any()):
            return None, None, "a lag time ALAG with steady-state infusions"
        params = params + ("ALAG",)
    if "F" in first and pm.structural.bioavailability == "F":
        b = prob.batch
        if not bool((first["F"] > 0).all()):
            return None, None, "a bioavailability F of 0 for some subjects"
        if not pm.structural.name.endswith("_oral") and bool((b.dose_mask & (b.dose_mode != 0)).any()):
            return None, None, "a bioavailability F with infusions (F changes their duration or rate)"
        params = params + ("F",)

    def log_params(th, eta):
        with torch.no_grad():
            p = pm.individual(th, torch.as_tensor(eta, dtype=torch.float64, device="cpu"), prob.cov)
        extra = sorted(set(p) - set(params))
        if extra:
            raise _NotCovered(f"parameters other than the structure's ({', '.join(extra)})")
        if set(params) - set(p) or any(p[name].dim() > 1 for name in params):
            raise _NotCovered("parameters that change within a subject or are not the structure's own")
        with np.errstate(all="ignore"):
            return np.log(np.stack([np.broadcast_to(p[name].numpy(), (n,)) for name in params], 1))

    def placement(th):
        base = log_params(th, np.zeros((n, k)))
        cols = np.stack([log_params(th, np.tile(np.eye(k)[j], (n, 1))) - base for j in range(k)], -1)  # (N, P, K)
        return base, cols

    try:
        base, cols = placement(theta)
        place = cols[0] if n else np.zeros((len(params), k))
        place = np.where(np.abs(place - np.round(place)) < 1e-12, np.round(place), place)
        if not (np.isfinite(cols).all() and np.abs(cols - place).max(initial=0.0) < 1e-10):
            return None, None, "ETAs that enter the parameters other than as exp(ETA) with a constant exponent"
        eta = np.random.default_rng(1).uniform(-0.5, 0.5, (n, k))
        if not np.abs(log_params(theta, eta) - base - eta @ place.T).max(initial=0.0) < 1e-9:
            return None, None, "ETAs that enter the parameters other than as exp(ETA) with a constant exponent"
        moved = {name: v * 1.001 + 1e-4 for name, v in theta.items()}
        _, cols2 = placement(moved)
        if not (np.isfinite(cols2).all() and np.abs(cols2 - place).max(initial=0.0) < 1e-9):
            return None, None, "an ETA whose exponent depends on a THETA"
    except _NotCovered as exc:
        return None, None, str(exc)
    return place, params, None


class _NotCovered(Exception):
    """A parameter map the analytic path does not cover (the message says what)."""


class AnalyticFOCEI:
    """The FOCE-I objective of one problem (see the module docstring), on the observations of its batch."""

    def __init__(self, pm, prob, place, params=None):
        b = prob.batch
        self.params = tuple(params or STRUCTURES[pm.structural.name])     # with "ALAG" last for a lag time
        self._pm, self._cov = pm, prob.cov
        self.place = np.asarray(place, dtype=float)        # P (params x ETAs): phi = phi0 + P eta (eta_placement)
        p = len(self.params)
        self.identity = self.place.shape == (p, p) and bool((self.place == np.eye(p)).all())
        self.oral = pm.structural.name.endswith("_oral")
        self.fallback_steps = 0      # EBE Newton steps that met a singular Hessian and took a gradient step
        obs = prob.obs.numpy()
        self.n = obs.shape[0]
        counts = obs.sum(1)
        j = int(counts.max()) if self.n else 0
        # the observed records of each subject, packed to the left: (N, J) positions, mask and values
        order = np.argsort(~obs, axis=1, kind="stable")[:, :j]
        self.obs_index = (np.arange(self.n)[:, None], order)
        self.mask = np.take_along_axis(obs, order, 1)
        time = b.time.numpy()[self.obs_index]
        self.y = np.where(self.mask, prob.y.numpy()[self.obs_index], 0.0)
        # which dose acts on which observation: the solvers' own rules (solve/_events: a dose acts on the records
        # after it in time, or at its time on a later record; a reset (EVID 3/4, SS=1) ends every earlier dose)
        from ..solve._events import applies, applies_ss, dose_events

        ev = dose_events(pm.structural, {}, b)         # F = 1 (eta_placement) and no lag (lagged doses: _doses)
        key = b.row.to(b.time.dtype)
        after = applies(ev, b.time, key).numpy()[self.obs_index]                     # (N, J, D)
        steady = (ev.active & (ev.ss > 0)).numpy()
        ss = (applies_ss(ev, b, b.time, key).numpy()[self.obs_index] & after) if steady.any() else \
            np.zeros_like(after)
        dm, td = ev.active.numpy(), ev.time.numpy()
        amt = np.where(dm, ev.amt.numpy(), 0.0)
        # time since each dose (N, J, D), 0 before it (the unit response and its derivatives vanish there)
        self.tau = np.where(after, time[:, :, None] - td[:, None, :], 0.0)
        self.amt = np.where(after, amt[:, None, :], 0.0)
        # infusions (IV models): duration (N, 1, D); 0 for a bolus
        self.duration = np.where(dm, ev.duration.numpy(), 0.0)[:, None, :]
        self.steady_state = bool(ss.any())
        # oral structures: the doses straight into the central compartment (CMT 2, an IV dose), which skip the
        # depot's absorption, its F and ALAG (ev.default_route: the depot)
        self._central = (~ev.default_route.numpy() & dm)[:, None, :] if pm.structural.name.endswith("_oral") \
            else None
        if self._central is not None and not self._central.any():
            self._central = None
        self.doses = closed_form_jets.Doses(self.tau, self.amt, self.duration, ss,
                                            np.where(steady, ev.ii.numpy(), 1.0)[:, None, :], central=self._central)
        # a lag time (eta_placement: no steady-state infusions then): which dose acts where, and since when, depends
        # on each subject's ALAG; recomputed from it by the same rules (_doses)
        self.lag = self.params.index("ALAG") if "ALAG" in self.params else None
        # (with its steady-state doses' earlier doses, which act from the SS dose's record on, whatever the lag)
        self._lag_data = ((pm.structural, b, key, time, amt,
                           applies_ss(ev, b, b.time, key).numpy()[self.obs_index] if steady.any() else
                           np.zeros_like(after)) if self.lag is not None else None)
        # 1cmt_oral without steady state or lag: the derivatives by hand (half the jets' time at 1000 subjects,
        # benchmarks/fit_scale.py); everything else by jets (1cmt_iv: the same time either way)
        self.by_hand = (pm.structural.name == "1cmt_oral" and not self.steady_state and self.lag is None
                        and "F" not in self.params and self._central is None)

    # ------------------------------------------------------------------ the structure
    def typical(self, theta: dict):
        """The subjects' typical log-parameters (N, P) tensor (``params``' order), phi0 = log of the individual
        parameters at ETA = 0 with their covariates, differentiable in the THETAs {name: 0-d tensor} (the model's
        own $PK-like map)."""
        import torch

        zero = torch.zeros(self.n, self.place.shape[1], dtype=torch.float64, device="cpu")   # the engine's data
        p = self._pm.individual(theta, zero, self._cov)
        return torch.log(torch.stack([p[name].expand(self.n) for name in self.params], 1))

    def predict(self, phi):
        """Concentrations (N, J) at the observations for log-parameters ``phi`` (N, P)."""
        if self.by_hand:
            return self._predict_oral(phi)
        return closed_form_jets.jet(phi, self.params, self._doses(phi), value_only=True)

    def jet(self, phi):
        """(f (N, J), G = df/dphi (N, J, P), HF = d2f/dphi2 (N, J, P, P)) of the structure's closed form, by hand
        for 1cmt_oral without steady-state doses or lag, else by forward-mode jets
        (:mod:`hybridpk.population.closed_form_jets`); superposition: each dose's term and its derivatives add."""
        return self._jet_oral(phi) if self.by_hand else closed_form_jets.jet(phi, self.params, self._doses(phi))

    def _doses(self, phi):
        """The doses acting at each observation for the log-parameters ``phi``: fixed, or with a lag time, those
        of the subjects' ALAG = exp(phi[:, lag]) (a dose into the default compartment is given ALAG after its
        record: it acts on the records after that time, by the solvers' rules, hybridpk.solve._events)."""
        if self.lag is None:
            return self.doses
        import torch

        from ..solve._events import applies, dose_events

        structural, b, key, time, amt, ss = self._lag_data
        ev = dose_events(structural, {"ALAG": torch.as_tensor(np.exp(phi[:, self.lag]), device="cpu")}, b)
        after = applies(ev, b.time, key).numpy()[self.obs_index]                               # (N, J, D)
        given = after | ss
        lagged = given & ev.default_route.numpy()[:, None, :]
        tau = np.where(given, time[:, :, None] - ev.time.numpy()[:, None, :], 0.0)
        return closed_form_jets.Doses(tau, np.where(given, amt[:, None, :], 0.0), self.duration, ss, self.doses.ii,
                                      lagged, central=self._central, acts=after)

    def _predict_oral(self, phi):
        ka, k, v = np.exp(phi[:, 0]), np.exp(phi[:, 1] - phi[:, 2]), np.exp(phi[:, 2])
        ka, k, v = ka[:, None, None], k[:, None, None], v[:, None, None]
        unit = ka / (v * (ka - k)) * (np.exp(-k * self.tau) - np.exp(-ka * self.tau))
        return (self.amt * unit).sum(-1)

    def _jet_oral(self, phi):
        """(f (N, J), G = df/dphi (N, J, 3), HF = d2f/dphi2 (N, J, 3, 3)) of the ADVAN2 closed form
        f = sum_d AMT_d KA / (V (KA - K)) (exp(-K tau_d) - exp(-KA tau_d)), K = CL/V, by hand (superposition:
        each dose's term and its derivatives add)."""
        ka, k, v = np.exp(phi[:, 0]), np.exp(phi[:, 1] - phi[:, 2]), np.exp(phi[:, 2])
        ka, k, v = ka[:, None, None], k[:, None, None], v[:, None, None]
        t = self.tau
        d = ka - k
        # f = sum_d r (E - A) with r = KA / (KA - K), E = AMT/V exp(-K tau), A = AMT/V exp(-KA tau)
        s = self.amt / v
        e, a = s * np.exp(-k * t), s * np.exp(-ka * t)
        te, ta = t * e, t * a
        r, r_ka, r_k = ka / d, -k / d ** 2, ka / d ** 2
        r_kaka, r_kk, r_kak = 2 * k / d ** 3, 2 * ka / d ** 3, -(ka + k) / d ** 3
        b = e - a

        def total(x):            # the sum over the doses (one dose: a view)
            return x[..., 0] if t.shape[-1] == 1 else x.sum(-1)

        f = total(r * b)
        f_ka, f_k = total(r_ka * b + r * ta), total(r_k * b - r * te)
        f_kaka = total(r_kaka * b + (2 * r_ka - r * t) * ta)
        f_kk = total(r_kk * b + (r * t - 2 * r_k) * te)
        f_kak = total(r_kak * b + r_k * ta - r_ka * te)
        ka, k = ka[..., 0], k[..., 0]
        # to log KA (a), log CL (c), log V (v): KA = e^a, K = e^(c - v), and f carries 1/V
        g = np.empty(f.shape + (3,))
        hf = np.empty(f.shape + (3, 3))
        g_a = g[..., 0] = ka * f_ka
        g_c = g[..., 1] = k * f_k
        g[..., 2] = -g_c - f
        h_ac = hf[..., 0, 1] = hf[..., 1, 0] = ka * k * f_kak
        hf[..., 0, 0] = g_a + ka * ka * f_kaka
        h_cc = hf[..., 1, 1] = g_c + k * k * f_kk
        hf[..., 0, 2] = hf[..., 2, 0] = -h_ac - g_a
        hf[..., 1, 2] = hf[..., 2, 1] = -h_cc - g_c
        hf[..., 2, 2] = h_cc + 2 * g_c + f
        return f, g, hf

    def near_flip_flop(self, phi) -> bool:
        """Some subject's exponents meet, KA = CL/V for one compartment (the closed forms' removable 0/0:
        :func:`closed_form_jets.singular`)."""
        return closed_form_jets.singular(phi, self.params)

    # ------------------------------------------------------------------ the residual error
    def _sds(self, sd: dict):
        return float(sd.get("ADD", 0.0)), float(sd.get("PROP", 0.0))

    def _error_terms(self, f, a, b):
        """V, V' = dV/df, V'' (N, J) with V = a^2 + b^2 f^2; unobserved entries get V = 1."""
        v = np.where(self.mask, a * a + b * b * f * f, 1.0)
        dv = np.where(self.mask, 2 * b * b * f, 0.0)
        return v, dv, np.where(self.mask, 2 * b * b, 0.0)

    def _objective(self, phi, eta, w, a, b):
        f = self.predict(phi)
        v, _, _ = self._error_terms(f, a, b)
        r = self.y - f
        data = np.where(self.mask, r * r / v + np.log(v), 0.0).sum(1)
        return data + _quadratic(eta, w)

    def _information_weight(self, d):
        """c = 1/V + 1/2 V'^2 / V^2 (N, J): each level's weight in M = OMEGA^-1 + sum_j c_j g_j g_j'."""
        return np.where(self.mask, 1 / d["v"] + 0.5 * d["dv"] ** 2 / d["v"] ** 2, 0.0)

    def _derivatives(self, phi, eta, w, a, b):
        """Everything the Newton step and the OFV's gradient need at (phi, eta)."""
        f, gphi, hphi = self.jet(phi)
        v, dv, ddv = self._error_terms(f, a, b)
        r = np.where(self.mask, self.y - f, 0.0)
        m = self.mask
        if b == 0.0:        # additive: V does not depend on f
            e1, e2 = np.where(m, -2 * r / v, 0.0), np.where(m, 2 / v, 0.0)
        else:
            e1 = np.where(m, -2 * r / v - r * r * dv / v ** 2 + dv / v, 0.0)                  # de/df
            e2 = np.where(m, 2 / v + 4 * r * dv / v ** 2 + 2 * r * r * dv ** 2 / v ** 3 - r * r * ddv / v ** 2
                          + ddv / v - dv ** 2 / v ** 2, 0.0)                                  # d2e/df2
        p = self.place
        g = gphi if self.identity else gphi @ p                                               # (N, J, K)
        hf = hphi if self.identity else p.T @ hphi @ p                                        # (N, J, K, K)
        obj = np.where(m, r * r / v + np.log(v), 0.0).sum(1) + _quadratic(eta, w)
        grad = _weighted_sum(e1, g) + 2 * eta @ w
        n, j, k = g.shape
        hess = _outer_sum(e2, g) + _weighted_sum(e1, hf.reshape(n, j, k * k)).reshape(n, k, k) + 2 * w
        return dict(f=f, gphi=gphi, hphi=hphi, v=v, dv=dv, ddv=ddv, r=r, e1=e1, e2=e2, g=g, obj=obj, grad=grad,
                    hess=hess)

    # ------------------------------------------------------------------ EBEs
    def ebe(self, phi0, omega_inv, sd: dict, eta0, max_iter: int = 100, tol: float = 1e-9):
        """Modes of obj_i from ``eta0`` (N, K) for the subjects' typical log-parameters ``phi0`` (N, P)
        (:meth:`typical`) and OMEGA^-1 ``omega_inv``: Newton with the exact Hessian (the
        first-order one, 2M, where it is not positive definite), steps capped at 2 per ETA, per-subject
        backtracking; the stopping rules of :meth:`hybridpk.population.focei.Problem.ebe`. Raises
        FloatingPointError where a subject's KA reaches its CL/V (:meth:`near_flip_flop`)."""
        return self._mode(phi0, np.asarray(omega_inv, dtype=float), sd, eta0, max_iter, tol)[0]

    def derivatives(self, phi0, omega_inv, sd: dict, eta):
        """(obj_i (N,), its gradient (N, K), its exact Hessian (N, K, K)) at ``eta``."""
        eta = np.asarray(eta, dtype=float)
        a, b = self._sds(sd)
        d = self._derivatives(phi0 + eta @ self.place.T, eta, np.asarray(omega_inv, dtype=float), a, b)
        return d["obj"], d["grad"], d["hess"]

    def _mode(self, mu, w, sd, eta0, max_iter=100, tol=1e-9):
        """(the EBEs, the derivatives at them when the search ended where it last took them, else None), for the
        typical log-parameters ``mu`` (N, P)."""
        a, b = self._sds(sd)
        eta = np.array(eta0, dtype=float)
        n = self.n
        active = np.ones(n, bool)
        steepest = np.zeros(n, bool)
        stalled = np.zeros(n, int)
        for _ in range(max_iter):
            phi = mu + eta @ self.place.T
            if self.near_flip_flop(phi):
                raise FloatingPointError("KA = CL/V")
            d = self._derivatives(phi, eta, w, a, b)
            obj, grad, hess = d["obj"], d["grad"], d["hess"]
            inverse = d["hess_inv"] = _inverse(hess)
            pd_ok = _positive_definite(hess, inverse[1])
            if not pd_ok.all():
                fo = 2 * (w + _outer_sum(self._information_weight(d), d["g"]))
                hess = np.where(pd_ok[:, None, None], hess, fo)
                inverse = _inverse(hess)
            step, bad = _solve(hess, grad, inverse)
            self.fallback_steps += bad
            gs = np.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            gs = gs / np.maximum(np.abs(gs).max(1, keepdims=True), 1.0)
            step = np.where(steepest[:, None], gs, step)
            big = np.abs(step).max(1, keepdims=True)
            step = np.where(big > 2.0, step * 2.0 / np.maximum(big, 1e-300), step)
            active &= np.abs(step).max(1) >= tol
            if not active.any():
                return eta, d
            eta, todo, new = self._backtrack(mu, eta, step, obj, active.copy(), w, a, b)
            flat = active & ~todo & (obj - new <= 1e-12 * (1 + np.abs(obj)))
            stalled = np.where(flat, stalled + 1, 0)
            tiny = todo & (np.abs(step).max(1) < 1e-6)
            active &= ~(todo & steepest) & ~tiny & (stalled < 3)
            steepest = todo & ~steepest
        return eta, None

    def _backtrack(self, mu, eta, step, cur, todo, w, a, b, halvings: int = 30):
        tol = 1e-12 * (1 + np.abs(cur))
        alpha = np.ones(self.n)
        value = cur.copy()
        out = eta.copy()
        size = np.abs(step).max(1)
        trying = todo.copy()
        for _ in range(halvings):
            if not trying.any():
                break
            trial = eta - alpha[:, None] * step
            with np.errstate(all="ignore"):
                new = self._objective(mu + trial @ self.place.T, trial, w, a, b)
            ok = trying & np.isfinite(new) & (new <= cur + tol)
            out[ok], value[ok] = trial[ok], new[ok]
            todo, trying = todo & ~ok, trying & ~ok
            alpha = np.where(trying, alpha * 0.5, alpha)
            trying &= alpha * size > 1e-12
        return out, todo, value

    # ------------------------------------------------------------------ OFV and its gradient
    def ofv(self, phi0, omega, sd: dict, eta0, guess=None):
        """(OFV_i (N,), the EBEs (N, K), per-subject gradients: {"phi": (N, P) by the subject's own typical
        log-parameters (``params``), "omega": (N, K, K) by OMEGA entry, "sd": {kind: (N,)}}, a function giving
        the EBEs' sensitivities d eta_i / d(value): the same keys, with an ETA axis: (N, K, P), (N, K, K, K),
        {kind: (N, K)}) at the typical log-parameters ``phi0`` (N, P) (:meth:`typical`: THETAs and covariates
        reach the OFV only through them), OMEGA (K, K) and SDs {kind: float}, the EBE search starting per subject
        at ``eta0`` or, where its objective is lower, at ``guess`` (e.g. a prediction from the sensitivities)."""
        omega = np.asarray(omega, dtype=float)
        w = np.linalg.inv(omega)
        a, b = self._sds(sd)
        mu = np.asarray(phi0, dtype=float)
        if guess is not None:
            with np.errstate(all="ignore"):
                o0 = self._objective(mu + eta0 @ self.place.T, eta0, w, a, b)
                o1 = self._objective(mu + guess @ self.place.T, guess, w, a, b)
            eta0 = np.where((np.isfinite(o1) & ~(o1 >= o0))[:, None], guess, eta0)
        eta, d = self._mode(mu, w, sd, eta0)
        if d is None:
            d = self._derivatives(mu + eta @ self.place.T, eta, w, a, b)
        m = self.mask
        v, dv, ddv, g, gphi, hphi, r = (d[k] for k in ("v", "dv", "ddv", "g", "gphi", "hphi", "r"))
        c = self._information_weight(d)
        dc = np.where(m, -dv / v ** 2 + dv * ddv / v ** 2 - dv ** 3 / v ** 3, 0.0)                # dc/df
        big_m = w + _outer_sum(c, g)
        m_inv, det_m = _inverse(big_m)
        _, logdet_o = np.linalg.slogdet(omega)
        with np.errstate(all="ignore"):
            ofv_i = d["obj"] + logdet_o + np.log(det_m)
        mg = g @ m_inv                                                            # M^-1 g_j (N, J, K)
        q = (g * mg).sum(-1)                                                      # g' M^-1 g
        pm_g = mg if self.identity else mg @ self.place.T                        # P M^-1 g_j
        # d log|M| / dphi (N, P) and / deta (N, K)
        l_phi = _weighted_sum(dc * q, gphi) + 2 * _weighted_sum(c, np.einsum("njpq,njq->njp", hphi, pm_g))
        l_eta = l_phi @ self.place
        h_inv = (d.get("hess_inv") or _inverse(d["hess"]))[0]
        h_inv_l = (h_inv @ l_eta[..., None])[..., 0]                               # H^-1 L (N, K)
        e1, e2 = d["e1"], d["e2"]
        # the subject's typical log-parameters mu: direct terms, then -C' H^-1 L with C = d(grad obj)/dmu (N, K, P)
        n, j = e1.shape
        c_mu = ((g * e2[..., None]).transpose(0, 2, 1) @ gphi
                + self.place.T @ _weighted_sum(e1, hphi.reshape(n, j, -1)).reshape(hphi.shape[0], *hphi.shape[2:]))
        d_mu = _weighted_sum(e1, gphi) + l_phi - (c_mu * h_inv_l[..., None]).sum(1)
        # OMEGA entries (W = OMEGA^-1): -W eta eta' W + W - W M^-1 W + (u v' + v u'), u = W H^-1 L, v = W eta
        we = eta @ w
        u = h_inv_l @ w
        d_omega = (-we[:, :, None] * we[:, None, :] + w - w @ m_inv @ w
                   + u[:, :, None] * we[:, None, :] + we[:, :, None] * u[:, None, :])
        # the SDs: V = a^2 + b^2 f^2
        dsd, dgrad_sd = {}, {}
        for kind, dvar, ddvprime in (("ADD", 2 * a * np.ones_like(v), np.zeros_like(v)),
                                     ("PROP", 2 * b * d["f"] ** 2, 4 * b * d["f"])):
            if kind not in sd:
                continue
            dvar = np.where(m, dvar, 0.0)
            ddvprime = np.where(m, ddvprime, 0.0)
            de = (-r * r / v ** 2 + 1 / v) * dvar
            dcs = (-1 / v ** 2 - dv ** 2 / v ** 3) * dvar + dv / v ** 2 * ddvprime
            de1 = ((2 * r / v ** 2 + 2 * r * r * dv / v ** 3 - dv / v ** 2) * dvar
                   + (-r * r / v ** 2 + 1 / v) * ddvprime)
            direct = np.where(m, de + dcs * q, 0.0).sum(1)
            dgrad_sd[kind] = _weighted_sum(np.where(m, de1, 0.0), g)                 # d(grad obj)/dSD
            dsd[kind] = direct - (h_inv_l * dgrad_sd[kind]).sum(1)
        # the EBEs' sensitivities -H^-1 d(grad obj)/d(value) (computed when asked: only a search's best points
        # need them); d(grad obj)/dOMEGA_ab = -(W_.a (W eta)_b + W_.b (W eta)_a)

        def sensitivity():
            n, k = eta.shape
            dgrad_omega = -(w[None, :, :, None] * we[:, None, None, :] + w[None, :, None, :] * we[:, None, :, None])
            kinds = list(dgrad_sd)
            rhs = np.concatenate([c_mu, dgrad_omega.reshape(n, k, k * k)]
                                 + [dgrad_sd[kind][..., None] for kind in kinds], -1)
            with np.errstate(all="ignore"):
                sens = -(h_inv @ rhs)
            sens = np.where(np.isfinite(sens).all((1, 2))[:, None, None], sens, 0.0)   # singular H: no prediction
            q = mu.shape[1]
            return {"phi": sens[..., :q], "omega": sens[..., q:q + k * k].reshape(n, k, k, k),
                    "sd": {kind: sens[..., q + k * k + j] for j, kind in enumerate(kinds)}}

        return ofv_i, eta, {"phi": d_mu, "omega": d_omega, "sd": dsd}, sensitivity


def _quadratic(x, a):
    """x' a x per subject (x (N, K), a (K, K))."""
    return ((x @ a) * x).sum(1)


def _weighted_sum(w, x):
    """sum_j w_j x_j per subject (w (N, J), x (N, J, P)) -> (N, P)."""
    return (w[:, None, :] @ x)[:, 0]


def _outer_sum(w, x):
    """sum_j w_j x_j x_j' per subject (w (N, J), x (N, J, K)) -> (N, K, K)."""
    return (x * w[..., None]).transpose(0, 2, 1) @ x


def _inverse(a):
    """(inverse (N, K, K), determinant (N,)) of symmetric matrices a (N, K, K): by cofactors for K <= 3 (a tenth of
    LAPACK's time on 1000 blocks of 3 x 3), by LAPACK otherwise. Singular blocks give non-finite entries."""
    k = a.shape[-1]
    if k > 3:
        with np.errstate(all="ignore"):
            try:
                return np.linalg.inv(a), np.linalg.det(a)
            except np.linalg.LinAlgError:
                return np.stack([_inverse(x[None])[0][0] for x in a]), np.linalg.det(a)
    s = 0.5 * (a + a.transpose(0, 2, 1))
    with np.errstate(all="ignore"):
        if k == 1:
            det = s[:, 0, 0]
            return (1.0 / det)[:, None, None], det
        if k == 2:
            det = s[:, 0, 0] * s[:, 1, 1] - s[:, 0, 1] ** 2
            adj = np.stack([np.stack([s[:, 1, 1], -s[:, 0, 1]], -1), np.stack([-s[:, 0, 1], s[:, 0, 0]], -1)], -1)
            return adj / det[:, None, None], det
        a00, a01, a02, a11, a12, a22 = s[:, 0, 0], s[:, 0, 1], s[:, 0, 2], s[:, 1, 1], s[:, 1, 2], s[:, 2, 2]
        adj = np.empty_like(s)
        adj[:, 0, 0] = a11 * a22 - a12 * a12
        adj[:, 0, 1] = adj[:, 1, 0] = a02 * a12 - a01 * a22
        adj[:, 0, 2] = adj[:, 2, 0] = a01 * a12 - a02 * a11
        adj[:, 1, 1] = a00 * a22 - a02 * a02
        adj[:, 1, 2] = adj[:, 2, 1] = a01 * a02 - a00 * a12
        adj[:, 2, 2] = a00 * a11 - a01 * a01
        det = a00 * adj[:, 0, 0] + a01 * adj[:, 0, 1] + a02 * adj[:, 0, 2]
        return adj / det[:, None, None], det


def _positive_definite(a, det=None):
    """(N,) whether each of the symmetric matrices a (N, K, K) is positive definite (Sylvester: every leading
    principal minor positive); ``det`` their determinants when known."""
    k = a.shape[-1]
    if k > 3:
        try:
            np.linalg.cholesky(a)
            return np.ones(len(a), bool)
        except np.linalg.LinAlgError:
            return np.linalg.eigvalsh(a)[:, 0] > 0
    with np.errstate(all="ignore"):
        ok = a[:, 0, 0] > 0
        if k >= 2:
            ok &= a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0] > 0
        if k == 3:
            ok &= (_inverse(a)[1] if det is None else det) > 0
    return ok


def _solve(a, b, inverse=None):
    """(x with a x = b per subject (a (N, K, K) symmetric, b (N, K)), how many subjects took a gradient step
    instead: a singular or non-finite system, as :meth:`hybridpk.population.focei.Problem._direction` does);
    ``inverse``: :func:`_inverse` of ``a`` when known."""
    inv, det = _inverse(a) if inverse is None else inverse
    with np.errstate(all="ignore"):
        x = (inv @ b[..., None])[..., 0]
    bad = ~np.isfinite(x).all(-1) | ~(np.abs(det) > 0)
    if bad.any():
        g = np.nan_to_num(b, nan=0.0, posinf=0.0, neginf=0.0)
        x = np.where(bad[:, None], g / np.maximum(np.abs(g).max(-1, keepdims=True), 1.0), x)
    return x, int(bad.sum())
