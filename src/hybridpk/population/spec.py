"""The statistical model: THETA (natural scale), log-normal ETA ~ N(0, OMEGA), covariates, residual error.

A :class:`PopulationModel` joins a structural model (from :mod:`hybridpk.models`) with a function that
turns (THETA, ETA, covariates) into individual parameters, as NONMEM's $PK does, and an error model.
Build one with :func:`build_model` (named options) or from a NONMEM control stream
(:mod:`hybridpk.population.nonmem`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import ModelError
from ..models import get_model
from ..models.base import D as DOSE_D
from ..models.base import R as DOSE_R
from .omega import band_zeros_problem, lower_pairs, normalise_blocks

__all__ = ["Theta", "ErrorModel", "PopulationModel", "CovariateEffect", "build_model", "parse_covariate",
           "model_from_recipe"]


@dataclass(frozen=True)
class Theta:
    """A fixed effect on its natural scale, with NONMEM-style bounds (lower, upper) and optional FIX."""

    name: str
    init: float
    lower: float = 0.0
    upper: float = math.inf
    fixed: bool = False
    unit: str = ""
    label: str = ""     # a control stream's comment name where pharmpy's name is THETA_n (see ThetaEstimate)


@dataclass(frozen=True)
class ErrorModel:
    """Residual error: additive (SD in concentration units), proportional (SD as a fraction), combined,
    combined1, or general (a control stream's $ERROR of another form).

    Var(DV | IPRED) = ADD^2 + (PROP * IPRED)^2 (combined; NONMEM's Y = F + F*EPS(1) + EPS(2), Monolix's
    "combined2"), or (ADD + PROP * IPRED)^2 (combined1: the SDs add, as Monolix and posologyr define
    "combined1"); ``ltbs`` fits log(DV) with an additive error on the log scale.

    ``log_dv``: a control stream's log-transform-both-sides model (Y = LOG(F) + EPS, DV in log units in its data):
    the data's DV are log concentrations, read through the stream as EXP(DV) (:meth:`Dataset.dv_from_log`), so
    that the fit's log(DV) is the stream's DV. ``log_guard`` = (offset, value) gives the stream's own log-scale
    prediction, LOG(F + offset) where F > 0 and LOG(value) elsewhere (IF (F.GT.0) IPRED = LOG(F) after
    IPRED = LOG(0.0025); LOG(ABS(F) + 1E-30)); empty: log(max(F, 1e-30)).

    "general" is NONMEM's definition for any $ERROR (NONMEM Users Guide I, "the residual variance"): with
    H_k = dY/dEPS(k) at EPS = 0, Var = sum_k SIGMA(k) H_k^2 (independent EPS). ``eps`` names the EPS (the
    residual parameters' kinds, e.g. "EPS1"), ``sd_init`` their initial SDs (sqrt SIGMA), and ``h`` computes the
    H_k (N, R) from an environment: F (the prediction) and whatever else they read (THETAs, ETAs, data items),
    which :meth:`PopulationModel.residual_variance` provides. W = SQRT(THETA(4)**2 + THETA(5)**2*IPRED**2)
    with $SIGMA 1 FIX, ETA on EPS (W*EXP(ETA(3))) and error models that differ by DVID are of this kind.
    """

    kind: str = "proportional"
    add: float = 0.5
    prop: float = 0.1
    ltbs: bool = False
    log_dv: bool = False
    log_guard: tuple = ()
    eps: tuple = ()
    sd_init: tuple = ()
    h: Callable | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in ("additive", "proportional", "combined", "combined1", "general"):
            raise ModelError(f"error model must be additive, proportional, combined or combined1, not {self.kind!r}")
        if self.kind == "combined1" and self.ltbs:
            raise ModelError("combined1 (SD = ADD + PROP IPRED) has no log-transform-both-sides form; use additive")
        if (self.log_dv or self.log_guard) and not self.ltbs:
            raise ModelError("DV in log units and a guarded LOG(F) belong to log-transform-both-sides (ltbs=True)")
        if self.kind == "general" and (self.h is None or len(self.eps) != len(self.sd_init) or not self.eps):
            raise ModelError("a general error model needs its EPS, their initial SDs and H")

    @property
    def names(self) -> tuple:
        if self.kind == "general":
            return tuple(self.eps)
        return {"additive": ("ADD",), "proportional": ("PROP",), "combined": ("ADD", "PROP"),
                "combined1": ("ADD", "PROP")}[self.kind]

    def init_values(self) -> dict:
        if self.kind == "general":
            return dict(zip(self.eps, self.sd_init))
        return {"ADD": self.add, "PROP": self.prop}

    def log_scale(self, f):
        """The log-scale prediction of log-transform-both-sides from the concentration ``f``: log(f) floored at
        1e-30, or the control stream's guarded LOG(F) (``log_guard``)."""
        if not self.log_guard:
            return torch.log(f.clamp(min=1e-30))
        offset, value = self.log_guard
        return torch.log(torch.where(f > 0, f + offset, torch.full_like(f, value)))

    def variance(self, f, sd: dict, env: dict | None = None):
        """Residual variance (same shape as f) from SDs {"ADD": ..., "PROP": ...} (tensors); a general model
        from SDs {EPS: ...} and ``env`` (what its H read besides F; see :meth:`PopulationModel.residual_variance`)."""
        if self.kind == "general":
            if env is None:
                raise ModelError("this residual error model reads THETAs, ETAs or data items; its variance needs "
                                 "them (PopulationModel.residual_variance)")
            hs = self.h({**env, "F": f})
            v = torch.zeros_like(f)
            for name, hk in zip(self.eps, hs):
                v = v + sd[name] ** 2 * hk ** 2
            return v
        if self.kind == "combined1":
            return (sd["ADD"] + sd["PROP"] * f) ** 2
        v = torch.zeros_like(f)
        if "ADD" in sd:
            v = v + sd["ADD"] ** 2
        if "PROP" in sd and not self.ltbs:
            v = v + (sd["PROP"] * f) ** 2
        return v

    def variance_slope(self, f, sd: dict):
        """dVar/dIPRED at ``f`` (the interaction term of FOCE-I): 2 PROP^2 f, or 2 PROP (ADD + PROP f) for
        combined1; 0 without a proportional part (and for log-transform-both-sides)."""
        if "PROP" not in sd or self.ltbs:
            return torch.zeros_like(f)
        if self.kind == "combined1":
            return 2 * sd["PROP"] * (sd["ADD"] + sd["PROP"] * f)
        return 2 * sd["PROP"] ** 2 * f


@dataclass(frozen=True)
class CovariateEffect:
    """How a covariate acts on a typical value: power (COV/REF)^THETA, linear 1 + THETA (COV - REF),
    categorical (1 + THETA)^(COV == level), exponential exp(THETA (COV - REF)), or maturation
    COV^HILL / (TM50^HILL + COV^HILL) (the sigmoid maturation of clearance with age, Anderson and Holford,
    Annu Rev Pharmacol Toxicol 2008; 48:303: two THETAs, ``<P>_<COV>_TM50`` and ``<P>_<COV>_HILL``, started
    at REF and 2; the typical value is then the mature one). ``exponent`` fixes the power instead of
    estimating it.

    ``lower`` / ``upper`` clamp the covariate before the effect acts, as NONMEM's ``MAX(COV, lower)`` /
    ``MIN(COV, upper)``: two clamped linear effects of one covariate make a hockey-stick (broken-line) effect,
    e.g. Long-Boyle 2015's age on busulfan clearance, (1 + 0.032 MIN(AGE, 12)) (1 - 0.0138 (MAX(AGE, 12) - 12)).
    A clamped effect's THETA is named ``<P>_<COV>_FROM<lower>`` / ``_TO<upper>`` so that both halves can have
    one."""

    parameter: str
    covariate: str
    kind: str = "power"
    reference: float | None = None
    exponent: float | None = None
    level: float = 1.0
    lower: float | None = None
    upper: float | None = None

    def __post_init__(self):
        if self.lower is not None and self.upper is not None and not self.lower < self.upper:
            raise ModelError(f"covariate effect {self.parameter}~{self.covariate}: lower ({self.lower:g}) must be "
                             f"below upper ({self.upper:g})")
        if (self.lower is not None or self.upper is not None) and self.kind == "categorical":
            raise ModelError(f"covariate effect {self.parameter}~{self.covariate}: a categorical effect cannot "
                             "be clamped (lower/upper)")

    @property
    def theta_name(self) -> str:
        def bound(v):
            return f"{float(v):g}".replace("-", "M").replace(".", "P").replace("+", "")

        return (f"{self.parameter}_{self.covariate}" + (f"_FROM{bound(self.lower)}" if self.lower is not None else "")
                + (f"_TO{bound(self.upper)}" if self.upper is not None else ""))

    def clamped(self, value):
        """The covariate value the effect sees: clamped to [lower, upper] where they are set."""
        if self.lower is None and self.upper is None:
            return value
        return value.clamp(min=self.lower, max=self.upper)

    @property
    def theta_names(self) -> tuple:
        """The THETAs this effect estimates (none for a power with a fixed exponent)."""
        if self.kind == "power" and self.exponent is not None:
            return ()
        if self.kind == "maturation":
            return (f"{self.theta_name}_TM50", f"{self.theta_name}_HILL")
        return (self.theta_name,)

    def factor_of(self, value, theta: dict):
        """The factor on the typical value for covariate values ``value``, the THETAs read from ``theta``."""
        value = self.clamped(value)
        if self.kind == "maturation":
            tm50, hill = (theta[n] for n in self.theta_names)
            a = value.clamp(min=0.0) ** hill
            return a / (tm50 ** hill + a)
        return self.factor(value, theta.get(self.theta_name))

    def factor(self, value, theta):
        ref = self.reference
        if self.kind == "power":
            e = theta if self.exponent is None else self.exponent
            return (value / ref) ** e
        if self.kind == "linear":
            return 1.0 + theta * (value - ref)
        if self.kind == "exponential":
            return torch.exp(theta * (value - ref))
        if self.kind == "categorical":
            return torch.where(value == self.level, 1.0 + theta, torch.ones_like(value))
        raise ModelError(f"unknown covariate effect {self.kind!r}")


def parse_covariate(text: str, reference: dict | None = None) -> CovariateEffect:
    """'CL~WT' (power, reference = median), 'CL~WT:power:70', 'CL~WT:power:70:0.75' (fixed exponent),
    'CL~CRCL:linear:90', 'V~SEX:categorical:1' (effect when SEX == 1), 'CL~AGE:exponential:40',
    'CL~PMA:maturation:47' (sigmoid maturation, TM50 started at 47)."""
    try:
        par, rest = text.split("~", 1)
        parts = rest.split(":")
        cov = parts[0].strip()
        kind = parts[1].strip().lower() if len(parts) > 1 and parts[1].strip() else "power"
        kind = {"pow": "power", "lin": "linear", "cat": "categorical", "exp": "exponential",
                "hill": "maturation"}.get(kind, kind)
        ref = float(parts[2]) if len(parts) > 2 and parts[2].strip() else None
        expo = float(parts[3]) if len(parts) > 3 and parts[3].strip() else None
    except (ValueError, IndexError):
        raise ModelError(f"cannot read covariate effect {text!r}; write e.g. 'CL~WT', 'CL~WT:power:70:0.75', "
                         "'CL~CRCL:linear:90' or 'V~SEX:categorical:1'") from None
    if kind not in ("power", "linear", "categorical", "exponential", "maturation"):
        raise ModelError(f"covariate effect kind must be power, linear, categorical, exponential or maturation, "
                         f"not {kind!r}")
    if kind == "categorical":
        return CovariateEffect(par.strip().upper(), cov, kind, None, None, ref if ref is not None else 1.0)
    if ref is None and reference is not None:
        ref = reference.get(cov)
    return CovariateEffect(par.strip().upper(), cov, kind, ref, expo)


@dataclass(frozen=True)
class PopulationModel:
    """Structural model + THETA + OMEGA + error model + the $PK-like map to individual parameters.

    ``individual(theta, eta, cov)`` gets ``theta`` {name: scalar tensor}, ``eta`` (N, K) and ``cov``
    {covariate: (N,) tensor at baseline}, and returns {parameter: (N,) tensor} on the natural scale.
    ``omega_init`` are the initial OMEGA variances (ETA order), or for a block the full initial matrix (a
    tuple of rows). How the estimates are reported:
    ``omega_labels`` (default: the ETA names; NONMEM imports: pharmpy's OMEGA names such as IIV_CL),
    ``sigma_labels`` {"ADD" | "PROP": name} (default: the kinds; NONMEM imports: the $SIGMA names) and
    ``sigma_scale`` "sd" (hybridpk's ADD/PROP) or "variance" (NONMEM's $SIGMA); ``parameter_labels``
    {structural parameter: the name it is reported under} (NONMEM imports: the control stream's names, so that
    ADVAN4's central volume, hybridpk's V, is reported as V2 and its peripheral one as V3); ``omega_blocks`` the groups
    of correlated ETAs (indices; ETAs in no group have a variance only). NONMEM's FIX and SAME:
    ``omega_fixed`` ETA indices whose OMEGA (their whole block, as NONMEM fixes it) stays at ``omega_init``;
    ``omega_same`` pairs (block, source block) of equal size whose OMEGA is the source's (``$OMEGA BLOCK(n)
    SAME``: one variance for every occasion's ETA, inter-occasion variability); ``omega_zeros`` pairs of ETA indices
    whose covariance is held at 0 inside a block (a banded ``$OMEGA BLOCK(n)`` with covariances given as 0, see
    :mod:`hybridpk.population.omega`); ``sigma_fixed`` residual error
    parameters ("ADD", "PROP") held at their initial values. ``record_items``: data items (covariate columns,
    TIME) that ``individual`` reads at every record, as NONMEM evaluates $PK (see :meth:`parameters`), and
    ``covariate_rule`` which record's values hold between two records ("nonmem": the later one's; "locf": the
    earlier one's).
    ``recipe`` rebuilds the
    model from plain data (saved in model.json; see :func:`model_from_recipe`).
    """

    structural: object
    thetas: tuple
    etas: tuple
    omega_init: tuple
    error: ErrorModel
    individual: Callable = field(repr=False)
    covariates: tuple = ()
    effects: tuple = ()
    omega_blocks: tuple = ()    # groups of correlated ETAs (indices); ETAs in none are alone (diagonal)
    omega_labels: tuple = ()
    sigma_labels: dict = field(default_factory=dict)
    sigma_scale: str = "sd"
    recipe: dict = field(default_factory=dict, repr=False)
    omega_fixed: tuple = ()
    omega_same: tuple = ()
    omega_zeros: tuple = ()
    sigma_fixed: tuple = ()
    record_items: tuple = ()
    covariate_rule: str = "nonmem"
    #: a general error model's environment: (theta, eta (N, K), batch) -> {name: (N, R) or scalar}
    error_inputs: Callable | None = field(default=None, repr=False)
    #: ``individual`` with the model's own parameters kept beside the structure's (a spec's new parameters,
    #: e.g. busulfan's CLIN, from which VMAX = CLIN KM is computed): what a patient's estimate reports
    every_parameter: Callable | None = field(default=None, repr=False)
    parameter_labels: dict = field(default_factory=dict)
    #: a control stream's M3 (F_FLAG) as a rule for data other than its own $DATA (:meth:`read_levels`)
    censoring_rule: object | None = field(default=None, repr=False)
    #: how the predicted levels differ from amount/L, when they do: a control stream's central scale that is not its
    #: volume ("S2 = V/1000: F = A/S2", levels in ng/mL for doses in mg); "" for amount/L
    concentration_scale: str = ""

    def label(self, name: str) -> str:
        """The name the structural parameter ``name`` is reported under (see ``parameter_labels``)."""
        return self.parameter_labels.get(name, name)

    def reports(self, name: str) -> bool:
        """Whether an individual parameter is reported (individual.csv, a patient's MAP): all but the scales
        S1..Sn of a control stream's own equations ($DES), which divide amounts into concentrations."""
        return name not in getattr(self.structural, "scales", ())

    @property
    def reads_dvid(self) -> bool:
        """Whether the error model tells observation kinds (DVID) apart (a general $ERROR reading DVID)."""
        return self.error.kind == "general" and "DVID" in self.error.h.reads

    def residual_variance(self, theta, eta, batch, f, sd, records=None):
        """Var(DV) (N, R) at the predictions ``f`` (N, R) of ``batch``'s subjects with ETAs ``eta`` (N, K): the
        error model's variance, evaluated with the THETAs, ETAs and data items a general $ERROR reads.
        ``records`` (N, R), where a likelihood reads the variance (observations, censored levels): a general
        $ERROR's H is evaluated at F = 1 elsewhere. It is evaluated at every record, and at a dose record's F = 0
        an H such as SQRT(PROP**2*IPRED**2 + ADD**2) with ADD 0 has an infinite derivative, whose product with
        that record's zero weight made every ETA gradient NaN (the EBE search then stopped at 0); NONMEM never
        differentiates there."""
        if self.error.kind != "general":
            return self.error.variance(f, sd)
        if records is not None:
            f = torch.where(records, f, torch.ones_like(f))
        return self.error.variance(f, sd, self.error_inputs(theta, eta, batch))

    def __post_init__(self):
        if self.sigma_scale not in ("sd", "variance"):
            raise ModelError(f"sigma_scale must be 'sd' or 'variance', not {self.sigma_scale!r}")
        blocks = self.blocks
        for b in blocks:
            if any(i in self.omega_fixed for i in b) and not all(i in self.omega_fixed for i in b):
                raise ModelError(f"OMEGA block of {', '.join(self.etas[i] for i in b)} is partly fixed; NONMEM fixes "
                                 "a block as a whole")
        for b, src in self.omega_same:
            if tuple(b) not in blocks or tuple(src) not in blocks or len(b) != len(src):
                raise ModelError(f"OMEGA SAME: ETAs {b} must form a block of the size of the block {src} they copy")
        problem = band_zeros_problem(blocks, self.omega_zeros)
        if problem:
            raise ModelError(f"OMEGA covariances held at 0: {problem}")
        zeros = lower_pairs(self.omega_zeros)
        for b, src in self.omega_same:
            pattern = [[(b[i], b[j]) in zeros for j in range(i)] for i in range(len(b))]
            if pattern != [[(src[i], src[j]) in zeros for j in range(i)] for i in range(len(src))]:
                raise ModelError(f"OMEGA SAME: the block of ETAs {b} must hold the covariances of its source {src} "
                                 "at 0 in the same places")
        unknown = [k for k in self.sigma_fixed if k not in self.error.names]
        if unknown:
            raise ModelError(f"fixed residual error parameter(s) {unknown} not in the {self.error.kind} error model")

    @property
    def blocks(self) -> tuple:
        """The OMEGA block structure: a partition of the ETA indices (see :mod:`hybridpk.population.omega`)."""
        return normalise_blocks(self.omega_blocks, self.n_eta)

    @property
    def omega_block(self) -> bool:
        """True when some ETAs are correlated (an OMEGA block of two or more)."""
        return any(len(b) > 1 for b in self.blocks)

    @property
    def theta_names(self) -> tuple:
        return tuple(t.name for t in self.thetas)

    @property
    def n_eta(self) -> int:
        return len(self.etas)

    def parameters(self, theta, eta, batch, records=None) -> dict:
        """Individual parameters for the solver at the records of ``batch``: {name: (N,) tensor}, or (N, R)
        for a parameter whose value changes between a subject's records.

        A model with ``record_items`` is evaluated as NONMEM evaluates $PK: at every record, with that
        record's data items (``batch.cov`` and TIME); the solver then applies each record's values over the
        interval that the record ends (see :func:`hybridpk.solve.simulate`). Parameters that come out equal
        at every record of every subject are returned per subject (the closed form applies). Other models
        take each subject's baseline covariates.

        ``records`` (N, R), for a $PRED (whose one parameter is the prediction): the records whose values are
        differentiated (those with a level); the others are evaluated without derivatives, so that a value that is
        not finite there (LOG(0) on a dose record) gives no NaN derivative."""
        if not self.record_items:
            return self.individual(theta, eta, batch.baseline_covariates())
        mask = batch.record_mask
        items = {c: batch.cov[..., k] for k, c in enumerate(batch.covariate_names)}
        items["TIME"] = batch.time
        items = {c: torch.where(mask, v, v[:, :1]) for c, v in items.items()}    # padding: the first record's
        if records is not None and bool(records.any()) and not bool(records[mask].all()):
            first = records.to(torch.int8).argmax(1, keepdim=True)          # a subject's first such record
            has = records.any(1, keepdim=True)
            s0, r0 = (int(i) for i in torch.nonzero(records)[0])            # for a subject without one: any
            safe = {c: torch.where(records, v, torch.where(has, v.gather(1, first), v[s0, r0])) for c, v in
                    items.items()}
            with torch.no_grad():
                elsewhere = self.individual(theta, eta, items)
            p = self.individual(theta, eta, safe)
            p = {k: torch.where(records, torch.as_tensor(v).expand(records.shape),
                                torch.as_tensor(elsewhere[k]).expand(records.shape)) for k, v in p.items()}
        else:
            p = self.individual(theta, eta, items)
        out = {}
        for k, v in p.items():
            v = torch.as_tensor(v, dtype=batch.time.dtype, device=batch.time.device)
            if v.dim() < 2:
                out[k] = v.expand(eta.shape[0]) if v.dim() == 0 else v
                continue
            v = v.expand(mask.shape)
            same = bool(((v.detach() == v.detach()[:, :1]) | ~mask).all())
            out[k] = v[:, 0] if same else v
        return out

    def require_occasions(self, dataset) -> None:
        """An IOV model's occasion column holds whole numbers 1..occasions (else refused, naming the row)."""
        if self.recipe.get("iov"):
            _occasion_count(self.recipe["iov"], self.recipe["occasion"], self.recipe["occasions"], dataset)

    def read_levels(self, dataset, strict: bool = False):
        """``dataset`` with its levels censored as the model's control stream censors levels (Beal's M3 written
        with F_FLAG: :class:`~hybridpk.population.nonmem_m3.CensoringRule`), for data other than the stream's own
        $DATA: a patient's levels below the stream's LLOQ are censored there, not fitted as measured. ``strict``
        (a data file as read): levels the file marks censored (CENS, BLQ, an LLOQ column) that the stream would fit
        as measured are refused by row. Other models: ``dataset`` as it is."""
        return dataset if self.censoring_rule is None else self.censoring_rule.censor(dataset, strict=strict)

    def require_dv_scale(self, dataset) -> None:
        """A model whose control stream fits LOG(F) to DV in log units (``error.log_dv``) takes its observations
        read through that stream (DV = EXP(DV), :meth:`Dataset.dv_from_log`) or stated to be concentrations
        (:meth:`Dataset.dv_stated_concentrations`); other data are refused, since their DV could be either."""
        if self.error.log_dv and not (dataset.dv_log or dataset.dv_stated) and dataset.n_observations:
            from ..errors import DatasetError

            stream = self.recipe.get("control_stream", "its control stream")
            raise DatasetError(f"the model's control stream ({stream}) fits LOG(F) to DV in log units, and a data "
                               "file does not say whether its DV are logs: state it (--dv log or --dv conc; "
                               "Dataset.dv_from_log() or .dv_stated_concentrations()), or give the data through a "
                               "control stream, which reads its DV as log concentrations", dataset.source)

    def varying_items(self, batch) -> tuple:
        """The ``record_items`` that change within some subject of ``batch`` (TIME always does)."""
        out = []
        for c in self.record_items:
            if c == "TIME":
                out.append(c)
            elif c in batch.covariate_names:
                v = batch.cov[..., batch.covariate_names.index(c)]
                if bool(((v != v[:, :1]) & batch.record_mask).any()):
                    out.append(c)
        return tuple(out)

    def require_per_subject(self, batch, user: str) -> None:
        """Refuse, naming them, data items the parameters read at every record that change within a subject
        of ``batch``, for a ``user`` that takes one set of parameters per subject."""
        varying = self.varying_items(batch)
        if varying:
            verb = "it changes" if len(varying) == 1 else "they change"
            raise ModelError(f"the model's $PK reads {', '.join(varying)} at every record and {verb} within "
                             f"subjects, so its parameters change in time; {user} takes one set of parameters per "
                             "subject and does not follow them yet")


def _within(value, param) -> bool:
    """``value`` is a finite number inside the parameter's range (positive parameters: > 0)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and param.lower <= v <= param.upper and (v > 0 or param.lower < 0)


def build_model(model, *, iiv=None, covariates=(), error="proportional", initial: dict | None = None,
                data=None, fixed: dict | None = None, omega_block=False,
                time_varying: str = "nonmem", derived: dict | None = None, iov=None, occasion: str = "OCC",
                occasions: int | None = None) -> PopulationModel:
    """A population model from named options, as the CLI builds it.

    Parameters
    ----------
    model : str  structural model name (``hybridpk models``)
    iiv : list of str  parameters with log-normal IIV (default: every parameter except F, ALAG and, for
        mechanistic models, those without one by convention); ETA names are ETA_<param>
    covariates : list of str or CovariateEffect  e.g. ['CL~WT'] (see :func:`parse_covariate`)
    error : 'additive', 'proportional' or 'combined'
    initial : dict  initial typical values {param: value} (defaults: the model's typical values)
    data : Dataset  used for covariate reference values (medians) when not given
    fixed : dict  parameters fixed at a value (e.g. {"F": 1.0}); not estimated
    time_varying : how a covariate that changes within a subject acts: "nonmem" (NONMEM's rule: the value on a
        record holds over the interval that record ends, back to the previous record) or "locf" (last
        observation carried forward: the value on a record holds from it to the next record, as nlmixr2 and
        Monolix interpolate by default). Either way each observation's V (the scale) is its own record's value
    omega_block : True to estimate the covariances between all ETAs (one full OMEGA block), or groups of
        parameters whose ETAs are correlated, e.g. [["CL", "V"]] (the others keep a variance only); False
        (default) for a diagonal OMEGA
    derived : structural parameters computed from others, e.g. {"CL": "K * V"} (a micro-constant
        parameterisation: K and V have a THETA, covariate effects and an ETA each; CL_i = K_i V_i, so ETA_V acts
        on both CL and V). An expression is arithmetic of the individual values of the other parameters (a name
        that is not one of the structure's is a new parameter, positive, log-normal like the others) and
        exp/log/sqrt (:func:`hybridpk.population.expressions.parse_expression`; never evaluated as code)
    iov : parameters with inter-occasion variability (log-normal, like NONMEM's ``CL = TVCL*EXP(ETA(1) +
        OCC1*ETA(3) + OCC2*ETA(4))`` with ``$OMEGA BLOCK(1) SAME`` per occasion): each occasion k = 1..``occasions``
        has its own ETAs ETA_IOV_<param>_<k>, all with one variance; the data column ``occasion`` (integers
        1..occasions, read at every record with the ``time_varying`` rule) says which occasion a record belongs
        to. ``occasions`` defaults to the largest occasion in ``data``
    """
    sm = get_model(model)
    fixed = dict(fixed or {})
    derived, extra = _derived_parameters(sm, derived, initial, fixed)
    est = [p for p in sm.parameters if p.name not in ("F", "ALAG") and p.name not in fixed and p.name not in derived]
    est += extra
    initial = {k.upper(): v for k, v in (initial or {}).items()}
    dosing = {p.name: p for p in (DOSE_D, DOSE_R)}          # RATE = -2/-1 doses: D, R if given (solve._events)
    extra += [dosing[k] for k in list(initial) + list(fixed) if k in dosing and dosing[k] not in extra]
    est += [p for p in extra if p.name in dosing and p.name not in fixed and p not in est]
    names = list(sm.parameter_names) + [p.name for p in extra]
    asked = list(initial) + list(iiv or []) + list(iov or [])
    unknown = list(dict.fromkeys(k for k in asked if k.upper() not in names))
    if unknown:
        raise ModelError(f"model {sm.name} has no parameter(s) {', '.join(unknown)}; it has "
                         f"{', '.join(names)}")
    taken = [k for k in list(initial) + list(iiv or []) if k.upper() in derived]
    if taken:
        k = taken[0].upper()
        raise ModelError(f"{k} is computed by its expression ({k} = {derived[k][0]}): give the typical value and "
                         "IIV of the parameters it is computed from instead")
    params = {p.name: p for p in [*sm.parameters, *extra]}
    bad = [f"{k}={v!r} (allowed {params[k].lower:g} <= {k} <= {params[k].upper:g} {params[k].unit})"
           for k, v in initial.items() if not _within(v, params[k])]
    if bad:
        raise ModelError(f"initial value(s) outside the parameter's range: {'; '.join(bad)}")
    for k in initial:
        if k in ("F", "ALAG") and k not in fixed:
            est.append(next(p for p in sm.parameters if p.name == k))
    iiv = [p.upper() for p in (iiv if iiv is not None else [p.name for p in est if p.name not in ("TMEAL",
                                                                                                   "MEALII")])]
    medians = {}
    if data is not None:
        df = data.to_dataframe()
        first = df.groupby("ID", sort=False).first()
        medians = {c: float(first[c].median()) for c in data.covariates}
    effects = [c if isinstance(c, CovariateEffect) else parse_covariate(c, medians) for c in covariates]
    for e in effects:
        if e.parameter not in names or e.parameter in derived:
            raise ModelError(f"covariate effect on {e.parameter}: model {sm.name} has no such parameter"
                             + (" with a THETA (it is computed by its expression)" if e.parameter in derived else ""))
        if data is not None and e.covariate not in data.covariates:
            raise ModelError(f"covariate {e.covariate} is not a covariate of the dataset (it has "
                             f"{', '.join(data.covariates) or 'none'})")
        if e.kind != "categorical" and e.reference is None:
            raise ModelError(f"covariate effect {e.parameter}~{e.covariate} needs a reference value")
    thetas = [Theta(p.name, float(initial.get(p.name, p.typical)), lower=0.0 if p.lower >= 0 else -math.inf,
                    unit=p.unit) for p in est]
    for e in effects:
        if e.kind == "power" and e.exponent is not None:
            continue
        if e.kind == "maturation":   # TM50 (covariate units) and the Hill coefficient, both positive
            thetas += [Theta(e.theta_names[0], float(e.reference), lower=0.0),
                       Theta(e.theta_names[1], 2.0, lower=0.0)]
            continue
        init = {"power": 0.75 if e.parameter in ("CL", "Q", "Q3") else 1.0, "linear": 0.01, "categorical": 0.1,
                "exponential": 0.01}[e.kind]
        thetas.append(Theta(e.theta_name, init, lower=-0.99 if e.kind == "categorical" else -math.inf))
    iov = [p.upper() for p in (iov or [])]
    occasions = _occasion_count(iov, occasion, occasions, data)
    etas = tuple(f"ETA_{p}" for p in iiv) + tuple(f"ETA_IOV_{p}_{k}" for k in range(1, occasions + 1) for p in iov)
    est_names = [p.name for p in est]
    missing_iiv = [p for p in iiv if p not in est_names]
    if missing_iiv:
        raise ModelError(f"IIV requested on {', '.join(missing_iiv)}, which is not estimated")
    missing_iov = [p for p in iov if p not in est_names]
    if missing_iov:
        raise ModelError(f"IOV requested on {', '.join(missing_iov)}, which is not estimated")
    eta_index = {p: k for k, p in enumerate(iiv)}
    iov_index = {p: [len(iiv) + (k - 1) * len(iov) + j for k in range(1, occasions + 1)] for j, p in enumerate(iov)}
    cov_names = tuple(sorted({e.covariate for e in effects} | ({occasion} if iov else set())))

    if time_varying not in ("nonmem", "locf"):
        raise ModelError(f"time_varying={time_varying!r}: give 'nonmem' or 'locf'")

    def every_parameter(theta, eta, cov):
        n = eta.shape[0]
        per_record = any(torch.is_tensor(v) and v.dim() == 2 for v in cov.values())   # (N, R) covariates
        out = {}
        for name in est_names:
            v = theta[name].expand(n, 1) if per_record else theta[name].expand(n)
            for e in effects:
                if e.parameter == name:
                    v = v * e.factor_of(cov[e.covariate], theta)
            if name in eta_index:
                k = eta_index[name]
                v = v * torch.exp(eta[:, k:k + 1] if per_record else eta[:, k])
            if name in iov_index:      # the ETA of the record's occasion
                occ = cov[occasion]
                e = sum((occ == k).to(eta.dtype) * (eta[:, i:i + 1] if per_record else eta[:, i])
                        for k, i in enumerate(iov_index[name], 1))
                v = v * torch.exp(e)
            out[name] = v
        for name, value in fixed.items():
            out[name] = torch.full((n,), float(value), dtype=eta.dtype, device=eta.device)
        for name, (_, _, fn) in derived.items():
            out[name] = fn(out)
        return out

    def individual(theta, eta, cov):
        out = every_parameter(theta, eta, cov)
        for p in extra:
            if p.name not in dosing:        # D and R go to the solver with the doses
                del out[p.name]
        return out

    omega = tuple(0.09 for _ in iiv) + tuple(0.04 for _ in etas[len(iiv):])
    kind = error if isinstance(error, str) else error.kind
    err = error if isinstance(error, ErrorModel) else ErrorModel(kind)
    blocks = _omega_blocks(omega_block, list(iiv))
    same = tuple(((i,), (idx[0],)) for idx in iov_index.values() for i in idx[1:])   # one IOV variance each
    # F, ALAG, D and R are estimated when given an initial value: the rebuilt model (model_from_recipe) needs them
    optional = {k: float(v) for k, v in initial.items() if k in ("F", "ALAG", *dosing) and k not in fixed}
    modelled = [f"{'duration' if p.name == 'D' else 'rate'} ({p.name})" for p in extra if p.name in dosing]
    recipe = {"kind": "build", "model": sm.name, "iiv": list(iiv), "error": err.kind, "ltbs": bool(err.ltbs),
              "fixed": fixed, "time_varying": time_varying, "omega_block": [[iiv[i] for i in b] for b in blocks],
              **({"estimated_optional": optional} if optional else {}),
              **({"modelled_input": modelled} if modelled else {}),
              **({"derived": {k: text for k, (text, _, _) in derived.items()}} if derived else {}),
              **({"iov": iov, "occasion": occasion, "occasions": occasions} if iov else {}),
              "covariates": [{"parameter": e.parameter, "covariate": e.covariate, "kind": e.kind,
                              "reference": e.reference, "exponent": e.exponent, "level": e.level,
                              **({"lower": e.lower} if e.lower is not None else {}),
                              **({"upper": e.upper} if e.upper is not None else {})} for e in effects]}
    return PopulationModel(structural=sm, thetas=tuple(thetas), etas=etas, omega_init=omega, error=err,
                           individual=individual, covariates=cov_names, effects=tuple(effects),
                           omega_blocks=blocks, recipe=recipe, record_items=cov_names,
                           covariate_rule=time_varying, omega_same=same,
                           every_parameter=every_parameter if extra else None)


def _derived_parameters(sm, derived, initial, fixed) -> tuple:
    """({structural parameter: (text, sympy expression, compiled function)}, [new Parameter]) of build_model's
    ``derived`` expressions, checked: each computes a structural parameter that is not fixed, from parameters
    that have a value (estimated, fixed, or new) and are not computed themselves."""
    from ..models.base import Parameter
    from ._sympy_torch import compile_expression
    from .expressions import parse_expression

    texts = {str(k).upper(): str(v) for k, v in (derived or {}).items()}
    initial = {str(k).upper(): v for k, v in (initial or {}).items()}
    out, new = {}, {}
    for name, text in texts.items():
        where = f"[parameters] {name}"
        if name not in sm.parameter_names:
            raise ModelError(f"{where}: model {sm.name} has no parameter {name}; it has "
                             f"{', '.join(sm.parameter_names)}")
        if name in fixed:
            raise ModelError(f"{where}: {name} is fixed; a parameter is either fixed or computed")
        expr = parse_expression(text, None, where)
        symbols = sorted(str(x) for x in expr.free_symbols)
        computed = [x for x in symbols if x in texts]
        unset = [x for x in symbols if x in ("F", "ALAG") and x not in fixed and x not in initial]
        if computed or unset:
            raise ModelError(f"{where} = {text!r}: {', '.join(computed + unset)} "
                             + ("is computed itself (write its expression in)" if computed else
                                "has no value (give it in [typical] or fix it)"))
        for x in symbols:
            if x not in sm.parameter_names:
                new.setdefault(x, Parameter(x, "", 0.0, math.inf, f"a parameter of {name} = {text}",
                                            float(initial.get(x, 1.0))))
        out[name] = (text, expr, compile_expression(expr))
    return out, list(new.values())


def _occasion_count(iov: list, occasion: str, occasions, data) -> int:
    """How many occasions an IOV model has: ``occasions``, or the largest value of the ``occasion`` column of
    ``data``; the column must hold whole numbers from 1 (checked by row)."""
    if not iov:
        return 0
    if data is not None:
        if occasion not in data.covariates:
            raise ModelError(f"IOV on {', '.join(iov)} needs the occasion column {occasion} (integers 1, 2, ... "
                             f"per record); the dataset has {', '.join(data.covariates) or 'no covariate columns'}")
        occ = data.to_dataframe()[occasion].to_numpy(dtype=float)
        bad = np.flatnonzero((occ < 1) | (occ != np.round(occ)))
        if bad.size:
            raise ModelError(f"column {occasion}, row {int(bad[0]) + 1}: occasion {occ[bad[0]]:g} is not a whole "
                             "number from 1 (number each subject's occasions 1, 2, ...)")
        largest = int(occ.max())
        if occasions is not None and largest > int(occasions):
            raise ModelError(f"column {occasion}: occasion {largest} in the data, but the model has {occasions}")
        occasions = occasions or largest
    if occasions is None or int(occasions) < 1:
        raise ModelError(f"IOV on {', '.join(iov)}: give the number of occasions (occasions >= 1) or data with an "
                         f"{occasion} column")
    return int(occasions)


def _omega_blocks(omega_block, iiv: list) -> tuple:
    """ETA index groups from build_model's ``omega_block`` (False, True, or groups of parameter names)."""
    if omega_block is False or omega_block is None:
        return ()
    if omega_block is True:
        return (tuple(range(len(iiv))),) if len(iiv) > 1 else ()
    blocks = []
    for group in omega_block:
        names = [g.upper() for g in group]
        missing = [g for g in names if g not in iiv]
        if missing:
            raise ModelError(f"OMEGA block {', '.join(names)}: {', '.join(missing)} has no IIV (the IIV is on "
                             f"{', '.join(iiv)})")
        if len(names) > 1:
            blocks.append(tuple(iiv.index(g) for g in names))
    try:
        normalise_blocks(blocks, len(iiv))
    except ValueError:
        raise ModelError(f"OMEGA blocks {omega_block!r}: a parameter may be in one block only") from None
    return tuple(blocks)


def model_from_recipe(recipe: dict) -> PopulationModel:
    """Rebuild a PopulationModel from its ``recipe`` (plain data, as saved in a run's model.json)."""
    kind = recipe.get("kind")
    if kind == "build":
        try:
            effects = [CovariateEffect(**e) for e in recipe.get("covariates", [])]
            error = ErrorModel(recipe["error"], ltbs=bool(recipe.get("ltbs", False)))
            return build_model(recipe["model"], iiv=recipe["iiv"], covariates=effects, error=error,
                               initial=recipe.get("estimated_optional"),
                               fixed=recipe.get("fixed") or {}, omega_block=recipe.get("omega_block", False),
                               time_varying=recipe.get("time_varying", "nonmem"), derived=recipe.get("derived"),
                               iov=recipe.get("iov"), occasion=recipe.get("occasion", "OCC"),
                               occasions=recipe.get("occasions"))
        except (KeyError, TypeError) as exc:
            raise ModelError(f"the model recipe in model.json is incomplete ({exc}); refit the model") from None
    if kind == "nonmem":
        from .nonmem import read_control_stream

        return read_control_stream(recipe["control_stream"])[0]
    raise ModelError(f"unknown model recipe kind {kind!r} in model.json")
