"""``simulate``: individual predictions for a whole population in one call."""

from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ModelError, SolverError
from ..models import get_model
from ..models.base import DOSE_PARAMETERS
from . import closed_form, ode

__all__ = ["Prediction", "simulate", "as_parameters"]


@dataclass(frozen=True)
class Prediction:
    """Result of :func:`simulate`.

    Attributes
    ----------
    ipred : Tensor (N, R)  concentration (amount/L) at every record; NaN for failed subjects, 0 on padding
    amounts : Tensor (N, R, S) or None  compartment amounts (ODE path, when asked)
    ok : Tensor (N,) bool  False for subjects whose solve failed
    failures : dict  subject ID -> reason
    method : str  'closed_form' or 'ode'
    """

    ipred: torch.Tensor
    amounts: torch.Tensor | None
    ok: torch.Tensor
    failures: dict
    method: str

    def to_dataframe(self, batch):
        """ID, TIME, IPRED for every record (padding dropped), in dataset order."""
        import pandas as pd

        ids = np.array(batch.ids, dtype=object)[batch.subject_of_rows()]
        return pd.DataFrame({"ID": ids, "TIME": batch.to_rows(batch.time), "IPRED": batch.to_rows(self.ipred)})


def as_parameters(model, params, batch) -> dict:
    """Parameters as {name: tensor (N,)} in the batch's dtype/device, from a dict of scalars/arrays/tensors
    or a DataFrame with one row per ID (column ID plus one column per parameter). A tensor (N, R) gives a
    value at every record (parameters that change in time, see :func:`simulate`)."""
    import pandas as pd

    n = batch.n_subjects
    dtype, device = batch.time.dtype, batch.time.device
    if isinstance(params, pd.DataFrame):
        cols = {c.upper(): c for c in params.columns}
        if "ID" not in cols:
            raise ModelError("the parameter table needs an ID column (one row per subject)")
        table = params.set_index(cols["ID"])
        dup = table.index[table.index.duplicated()].unique().tolist()
        if dup:
            raise ModelError(f"the parameter table has several rows for ID(s) {dup[:5]}")
        missing = [i for i in batch.ids if i not in table.index]
        if missing:
            raise ModelError(f"the parameter table has no row for ID(s) {missing[:10]}")
        table = table.loc[list(batch.ids)]
        params = {c.upper(): table[c].to_numpy(dtype=float) for c in table.columns}
    out = {}
    names = set(model.parameter_names) | set(DOSE_PARAMETERS)    # D, R: of doses with RATE = -2/-1 (_events)
    for k, v in params.items():
        if k not in names:
            continue
        t = torch.tensor(np.asarray(v, dtype=float), dtype=dtype, device=device) if not isinstance(v, torch.Tensor) \
            else v.to(device)
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape not in ((n,), tuple(batch.time.shape)):
            raise ModelError(f"parameter {k} has shape {tuple(t.shape)}; expected one value per subject ({n}) or "
                             f"one per record {tuple(batch.time.shape)}")
        out[k] = t
    unknown = [k for k in params if k not in names]
    model.check_parameters({**out, **{k: None for k in unknown}})
    if "F" in names and "F" not in out:
        out["F"] = torch.ones(n, dtype=dtype, device=device)
    if "ALAG" in names and "ALAG" not in out:
        out["ALAG"] = torch.zeros(n, dtype=dtype, device=device)
    return out


def _bad_parameters(model, p, mask=None) -> dict[int, str]:
    """{subject position: why} for parameters that are not finite, or negative where the parameter cannot be
    (its lower bound is >= 0) (per-record parameters: on the real records, ``mask`` (N, R); the first bad
    record's value is reported)."""
    def per_subject(v, floor):
        v = v.detach()
        if v.dim() == 1:
            return v
        ok = (torch.isfinite(v) & (v >= floor)) | ~mask
        first_bad = (~ok).to(torch.int8).argmax(1)
        return torch.where(ok.all(1), v[:, 0], v.gather(1, first_bad.unsqueeze(1)).squeeze(1))

    floors = {spec.name: 0.0 if spec.lower >= 0 else -math.inf for spec in model.parameters}
    values = [per_subject(p[spec.name], floors[spec.name]) for spec in model.parameters]
    if all(bool((torch.isfinite(v) & (v >= floors[spec.name])).all()) for v, spec in zip(values, model.parameters)):
        return {}
    bad = {}
    for v, spec in zip(values, model.parameters):
        for i in torch.nonzero(~torch.isfinite(v)).flatten().tolist():
            bad.setdefault(i, f"parameter {spec.name} is {v[i].item()}")
        low = torch.nonzero(v < floors[spec.name]).flatten().tolist()
        for i in low:
            bad.setdefault(i, f"parameter {spec.name} = {v[i].item():g} is negative")
    return bad


def require_observable(model, batch) -> None:
    """Refuse observations the model does not predict, naming their rows: a record observed in another
    compartment than the model's (NONMEM would predict A(CMT)/S<CMT> there, e.g. the depot for CMT=1 in an oral
    model). (Several kinds of observation in one compartment: :func:`require_one_kind`.)"""
    from ..errors import DatasetError, Violation

    if not model.reads_cmt:
        return
    obs = batch.is_obs & batch.record_mask
    if model.observes_compartments:
        other = obs & ((batch.cmt < 0) | (batch.cmt > model.n_states))
    else:
        other = obs & (batch.cmt != 0) & (batch.cmt != model.obs_cmt)
    if bool(other.any()) and model.observes_compartments:
        raise DatasetError(Violation(tuple(int(r) + 1 for r in batch.row[other].tolist()), "CMT",
                                     f"observations in compartment(s) {sorted({int(c) for c in batch.cmt[other]})}, "
                                     f"but model {model.name} has compartments 1-{model.n_states} "
                                     f"({', '.join(model.compartments)})"))
    if bool(other.any()):
        cmts = sorted({int(c) for c in batch.cmt[other].tolist()})
        names = ", ".join(f"{c} ({model.compartments[c - 1]})" if 0 < c <= model.n_states else str(c) for c in cmts)
        raise DatasetError(Violation(tuple(int(r) + 1 for r in batch.row[other].tolist()), "CMT",
                                     f"observations in compartment {names}, but model {model.name} predicts the "
                                     f"concentration in compartment {model.obs_cmt} "
                                     f"({model.compartments[model.obs_cmt - 1]}); set CMT to {model.obs_cmt} (or 0) "
                                     "on observations of it, and leave out observations of other compartments (a "
                                     "control stream with $DES or ADVAN5/7 observes any compartment by CMT)"))


def require_one_kind(model, batch) -> None:
    """Refuse, naming their rows, observations of several kinds (DVID values) in one compartment of ``model``:
    one prediction there with one error model does not describe them (the caller skips this check for an error
    model that reads DVID)."""
    from ..errors import DatasetError, Violation

    obs = batch.is_obs & batch.record_mask
    if not bool(obs.any()):
        return
    cmt = torch.where(batch.cmt > 0, batch.cmt, torch.full_like(batch.cmt, model.obs_cmt))
    kinds, kind = torch.unique(batch.dvid[obs], return_inverse=True)
    compartments, where = torch.unique(cmt[obs], return_inverse=True)
    pairs = torch.unique(where * kinds.numel() + kind)            # (compartment, DVID) pairs seen (1-d: fast)
    if pairs.numel() > compartments.numel():    # one compartment observed as several kinds
        kinds = torch.unique(batch.dvid[obs])
        minority = obs & (batch.dvid != torch.mode(batch.dvid[obs]).values)
        raise DatasetError(Violation(tuple(int(r) + 1 for r in batch.row[minority].tolist()), "DVID",
                                     f"observations of {kinds.numel()} kinds "
                                     f"(DVID {', '.join(str(int(k)) for k in kinds)}) in one compartment, but the "
                                     "model predicts one concentration there with one error model; keep the "
                                     "observations of one DVID (MDV=1 or drop the others), or give each kind its "
                                     "compartment (CMT) or its error model (a $ERROR that reads DVID)"))


def simulate(model, params, batch, *, method: str = "auto", rtol: float = 1e-8, atol: float = 1e-10,
             solver: str = "auto", throw: bool = True, return_amounts: bool = False,
             rule: str = "nonmem", step_groups=None) -> Prediction:
    """Predict concentrations at every record of every subject.

    Parameters
    ----------
    model : str or CompartmentModel  e.g. "2cmt_iv" (see ``hybridpk models``)
    params : dict or DataFrame  individual parameters on the natural scale (units as listed by the model),
        scalars (shared), arrays/tensors of shape (N,), or a table with ID and one column per parameter
    batch : EventBatch  from ``Dataset.to_batch()``
    method : "auto" (closed form for linear models, else ODE), "closed_form" or "ode"
    rtol, atol : ODE tolerances (per subject, max norm)
    solver : ODE path only. "auto" (default): "expm" for models linear between switch times (exact matrix
        exponentials, e.g. 1cmt_oral_ehc), else "dp5" (batched Dormand-Prince 5(4) with per-subject step
        control and events); or a torchdiffeq method ("dopri5", "bosh3", "rk4", ...: all subjects in local
        time between events)
    throw : raise SolverError when any subject fails (default); if False, failed subjects get NaN and are
        listed in ``Prediction.failures`` while the others are returned normally
    return_amounts : also return compartment amounts (forces the ODE path)
    rule : for parameters given per record: "nonmem" (a record's values hold over the interval it ends) or
        "locf" (they hold from the record to the next one); an observation is predicted with its own record's
        values (its scale V) either way
    step_groups : (N,) long tensor or None: subjects with the same number share the ODE solver's step-size
        decisions ("dp5"), as copies of a subject in a finite-difference stencil should (differences between
        them then carry no step-selection noise). When such a batch cannot be solved together, every subject is
        reported failed rather than solved one by one

    Gradients flow to every parameter tensor that requires them, through either path.

    Parameters that change in time are given as (N, R) tensors, one value per record; they follow NONMEM's
    rule: the values at a record hold from the previous record (exclusive) to it, so an observation is
    predicted with its own record's values and a dose uses its record's F, ALAG and, at steady state, its
    record's parameters for the whole history. Such a batch takes the ODE path (exact matrix exponentials for
    linear models), or the closed form when the values change only at resets (EVID 3/4, SS=1: occasions).
    """
    model = get_model(model)
    require_observable(model, batch)
    p = as_parameters(model, params, batch)
    varying = sorted(k for k, v in p.items() if v.dim() == 2)
    if method == "auto":
        exact = not varying or closed_form.constant_between_resets(p, batch)
        method = "closed_form" if (model.linear and not return_amounts and exact) else "ode"
    if method not in ("closed_form", "ode"):
        raise ModelError(f"method must be 'auto', 'closed_form' or 'ode', not {method!r}")
    if getattr(model, "given_per_record", False):   # NONMEM's $PRED: nothing to solve, whatever the method
        method = "closed_form"
    if method == "closed_form" and not model.linear and not getattr(model, "given_per_record", False):
        raise ModelError(f"model {model.name} is nonlinear and has no closed form; use method='ode'")
    if method == "closed_form" and varying and not getattr(model, "given_per_record", False) \
            and not closed_form.constant_between_resets(p, batch):
        raise ModelError(f"parameter(s) {', '.join(varying)} change between records without a reset, which the "
                         "closed form (one set of parameters from each reset on) cannot follow; use method='auto' "
                         "or 'ode'")
    if rule not in ("nonmem", "locf"):
        raise ModelError(f"rule={rule!r}: give 'nonmem' or 'locf'")
    if solver == "auto":
        solver = "expm" if model.piecewise_linear else "dp5"
    # $PRED's "parameter" is the prediction itself: a LOG(0) on a record without an observation is NONMEM's too
    bad = {} if getattr(model, "given_per_record", False) else _bad_parameters(model, p, batch.record_mask)
    if bad:  # keep the batch healthy: solve failed subjects with typical values, report them
        idx = torch.tensor(sorted(bad), device=batch.time.device)
        fixed = dict(p)     # D and R (of the doses) as they are
        for spec in model.parameters:
            v = p[spec.name].clone()
            v[idx] = spec.typical if spec.name not in ("F", "ALAG") else (1.0 if spec.name == "F" else 0.0)
            hit = torch.isin(torch.arange(len(v), device=v.device), idx)
            fixed[spec.name] = torch.where(hit.view(-1, *([1] * (v.dim() - 1))), v.detach(), p[spec.name])
        p = fixed
    failures = {batch.ids[i]: why for i, why in bad.items()}
    amounts = None
    if getattr(model, "given_per_record", False):   # NONMEM's $PRED: the prediction is the parameter itself
        if return_amounts:
            raise ModelError(f"model {model.name} predicts records directly ($PRED): it has no amounts")
        ipred = p[model.prediction_parameter].expand(batch.time.shape)
    elif method == "closed_form":
        ipred = closed_form.concentration(model, p, batch)
    else:
        try:
            ipred, amounts = ode.solve(model, p, batch, rtol=rtol, atol=atol, method=solver,
                                       return_amounts=return_amounts, rule=rule, step_groups=step_groups)
        except (AssertionError, RuntimeError) as exc:
            if step_groups is not None:
                raise SolverError(f"ODE solve of the grouped batch failed: {exc}",
                                  {i: str(exc) for i in batch.ids}) from None
            if batch.n_subjects == 1:
                raise SolverError(f"ODE solve failed for subject {batch.ids[0]}: {exc}",
                                  {batch.ids[0]: str(exc)}) from None
            ipred, amounts, more = _one_by_one(model, p, batch, rtol, atol, solver, return_amounts, rule)
            failures.update(more)
    ipred = ipred * batch.record_mask
    ok = torch.ones(batch.n_subjects, dtype=torch.bool, device=batch.time.device)
    finite = torch.isfinite(ipred.detach())
    if getattr(model, "given_per_record", False):    # $PRED: what counts is the prediction at the observations
        finite = finite | ~batch.is_obs
    nonfinite = ~finite.all(1)
    for i in torch.nonzero(nonfinite).flatten().tolist():
        failures.setdefault(batch.ids[i], "the solution is not finite (NaN/inf); check the parameters")
    if failures:
        fail_idx = [batch.ids.index(k) for k in failures]
        ok[fail_idx] = False
        ipred = torch.where(ok.unsqueeze(-1), ipred, torch.full_like(ipred, float("nan")))
        if throw:
            listing = "; ".join(f"ID {k}: {v}" for k, v in list(failures.items())[:10])
            raise SolverError(f"{len(failures)} of {batch.n_subjects} subjects failed: {listing}", failures)
    return Prediction(ipred=ipred, amounts=amounts, ok=ok, failures=failures, method=method)


def _one_by_one(model, p, batch, rtol, atol, solver, return_amounts, rule="nonmem"):
    """After a failed batched solve: solve each subject alone to find which ones fail, and why."""
    n, r = batch.time.shape
    ipred = torch.full((n, r), float("nan"), dtype=batch.time.dtype, device=batch.time.device)
    amounts = None
    failures = {}
    rows_c, rows_a = [], []
    for i in range(n):
        sub = batch.select([i])
        pi = {k: v[i:i + 1] for k, v in p.items()}
        try:
            c, a = ode.solve(model, pi, sub, rtol=rtol, atol=atol, method=solver, return_amounts=return_amounts,
                             rule=rule)
            rows_c.append(c[0])
            rows_a.append(a[0] if a is not None else None)
        except (AssertionError, RuntimeError) as exc:
            failures[batch.ids[i]] = f"ODE solve failed ({exc}); the system may be stiff or the parameters extreme"
            rows_c.append(ipred[i])
            rows_a.append(None)
    ipred = torch.stack(rows_c)
    if return_amounts:
        s = model.n_states
        amounts = torch.stack([a if a is not None else torch.full((r, s), float("nan"), dtype=ipred.dtype,
                                                                  device=ipred.device) for a in rows_a])
    return ipred, amounts, failures
