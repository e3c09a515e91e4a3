"""Import a NONMEM control stream (ADVAN1-4 with TRANS1/2/4 and $PK expressions) through pharmpy-core.

The $PK statements are evaluated as they are (THETA/ETA/covariate arithmetic and IF blocks), the ADVAN
selects the structural model, and the $ERROR model is recognised from dY/dEPS (additive, proportional or
combined). Parameter names are pharmpy's (e.g. POP_CL, IIV_CL, SIGMA). Requires ``hybridpk[nonmem]``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..errors import HybridPKError, ModelError
from ..models import get_model
from ._sympy_torch import evaluate
from .spec import ErrorModel, PopulationModel, Theta

# records named in messages (regular expressions for _where)
_EST, _OMEGA, _BLOCK, _SIGMA = r"\$EST", r"\$OMEGA", r"\$OMEGA\s+BLOCK", r"\$SIGMA"
_OMEGA_OR_SIGMA = r"\$(OMEGA|SIGMA)"
_ADVAN = {1: "1cmt_iv", 2: "1cmt_oral", 3: "2cmt_iv", 4: "2cmt_oral", 11: "3cmt_iv", 12: "3cmt_oral"}


def _pharmpy():
    try:
        from pharmpy.modeling import read_model
    except ImportError:
        raise HybridPKError("reading NONMEM control streams needs pharmpy-core: pip install 'hybridpk[nonmem]'") \
            from None
    return read_model


def _structural(env, advan, trans, oral):
    """Map $PK variables to hybridpk parameter names (V is the central scale S1/S2, as F = A/S)."""
    g = env.get
    central_scale = "S2" if oral else "S1"
    if trans == 1:
        scale = g(central_scale, g("V", g("V1" if not oral else "V2")))
        if scale is None:
            raise ModelError(f"TRANS1 needs the scale {central_scale} (the central volume)")
        p = {"V": scale, "CL": g("K") * scale}
        if advan in (3, 4):
            k12, k21 = (g("K12"), g("K21")) if advan == 3 else (g("K23"), g("K32"))
            p["Q"] = k12 * scale
            p["V2"] = p["Q"] / k21
    elif trans in (2, 4):
        if advan in (1, 2):
            p = {"CL": g("CL"), "V": g("V")}
        elif advan == 3:
            p = {"CL": g("CL"), "V": g("V1", g("V")), "Q": g("Q"), "V2": g("V2")}
        else:
            p = {"CL": g("CL"), "V": g("V2"), "Q": g("Q"), "V2": g("V3")}
    else:
        raise ModelError(f"TRANS{trans} is not supported (use TRANS1, TRANS2 or TRANS4)")
    missing = [k for k, v in p.items() if v is None]
    if missing:
        raise ModelError(f"the $PK does not define what ADVAN{advan} TRANS{trans} needs ({', '.join(missing)})")
    if oral:
        if g("KA") is None:
            raise ModelError(f"ADVAN{advan} needs KA in $PK")
        p["KA"] = g("KA")
    dose = "1"
    if g(f"F{dose}") is not None:
        p["F"] = g(f"F{dose}")
    if g(f"ALAG{dose}") is not None:
        p["ALAG"] = g(f"ALAG{dose}")
    return p


def _where(text: str, path, record: str) -> str:
    """'FILE line N' of the first record matching ``record`` (a regex such as r'\\$OMEGA'), for messages."""
    for i, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{record}", line, flags=re.I):
            return f"{Path(path).name} line {i}"
    return Path(path).name


def _where_fix(text: str, path) -> str:
    """'FILE line N' of the first FIX inside an $OMEGA or $SIGMA record."""
    record = ""
    for i, line in enumerate(text.splitlines(), 1):
        head = re.match(r"\s*\$(\w+)", line)
        if head:
            record = head.group(1).upper()
        code = line.split(";", 1)[0]
        if record.startswith(("OMEGA", "SIGMA")) and re.search(r"\bFIX", code, flags=re.I):
            return f"{Path(path).name} line {i}"
    return _where(text, path, _OMEGA_OR_SIGMA)


def _check_estimation(m, text: str, path) -> tuple[str, bool]:
    """(the estimation method the control stream asks for, whether it asks for evaluation only): "FOCE-I",
    "FOCE" or "FO" (NONMEM's METHOD=1 INTERACTION, METHOD=1, METHOD=0; without $ESTIMATION, FOCE-I), and
    MAXEVAL=0 (the OFV and POSTHOC EBEs at the initial estimates). A method hybridpk does not carry out as
    asked (Laplace, SAEM, IMP, BAYES, several $ESTIMATION steps) is refused by name."""
    steps = list(m.execution_steps)
    if len(steps) > 1:
        raise ModelError(f"{_where(text, path, _EST)}: {len(steps)} $ESTIMATION steps; hybridpk runs one "
                         "estimation method: keep the one whose results you want")
    for step in steps:
        method = str(step.method).upper()
        if method == "FOCE" and not step.laplace:
            return ("FOCE-I" if step.interaction else "FOCE"), bool(step.evaluation)
        if method == "FO" and not step.interaction:
            return "FO", bool(step.evaluation)
        if method == "FOCE":
            what = "METHOD=COND LAPLACE" + (" INTERACTION" if step.interaction else "")
        elif method == "FO":
            what = "METHOD=0 INTERACTION (not defined for FO)"
        else:
            what = f"METHOD={method}"
        raise ModelError(f"{_where(text, path, _EST)}: $ESTIMATION {what} is not implemented; hybridpk "
                         "estimates by FOCE-I (METHOD=1 INTERACTION), FOCE (METHOD=1) or FO (METHOD=0) and does "
                         "not replace one method by another")
    return "FOCE-I", False


def _omega(rvs, params, text: str, path):
    """The OMEGA of the control stream as its $OMEGA records define it: (labels (each ETA's variance name),
    initial OMEGA (variances, or the full (K, K) matrix when there are blocks), blocks (groups of correlated
    ETA indices), SAME pairs (block, the block it repeats: ``$OMEGA BLOCK(n) SAME``, inter-occasion
    variability), fixed ETA indices (FIX, which NONMEM applies to a whole block))."""
    import sympy

    etas = rvs.etas
    names = list(etas.names)
    labels = [None] * len(names)
    blocks, same, fixed = [], [], []
    first_of = {}     # the block that first used a set of OMEGA parameters (SAME repeats them)
    for dist in etas:
        b = tuple(names.index(n) for n in dist.names)
        pars = tuple(dist.parameter_names)
        var = dist.variance
        diag = [str(var[i, i]) for i in range(len(b))] if len(b) > 1 else [str(var)]
        for i, e in enumerate(b):
            labels[e] = diag[i]
        if len(b) > 1:
            blocks.append(b)
            if any(var[i, j] == 0 for i in range(len(b)) for j in range(len(b))):
                raise ModelError(f"{_where(text, path, _BLOCK)}: an OMEGA block with some covariances fixed at 0 "
                                 "is not supported")
        if pars in first_of:
            same.append((b, first_of[pars]))
            continue
        first_of[pars] = b
        if any(params[n].fix for n in pars):
            zero = [n for n in diag if float(params[n].init) == 0.0]
            if zero:
                raise ModelError(f"{_where_fix(text, path)}: {zero[0]} is 0 FIX (an ETA switched off); remove that "
                                 "ETA from $PK and its $OMEGA record instead: hybridpk estimates only ETAs with a "
                                 "variance")
            fixed += list(b)
    if not blocks and not same:
        return labels, tuple(float(params[n].init) for n in labels), (), (), tuple(fixed)
    matrix = etas.covariance_matrix
    k = len(names)
    init = matrix.subs({sympy.Symbol(p.name): p.init for p in params})
    return (labels, tuple(tuple(float(init[i, j]) for j in range(k)) for i in range(k)), tuple(blocks),
            tuple(same), tuple(fixed))


def read_control_stream(path):
    """(PopulationModel, Dataset) from a NONMEM control stream and the dataset its $DATA names."""
    import sympy

    from ..data.dataset import read_nonmem

    read_model = _pharmpy()
    path = Path(path)
    if not path.is_file():
        raise HybridPKError(f"control stream {path} not found")
    try:
        m = read_model(str(path))
    except Exception as exc:  # pharmpy's parser errors are not ours to enumerate
        raise HybridPKError(f"pharmpy could not read {path}: {exc}") from None
    text = path.read_text()
    sub = re.search(r"ADVAN(\d+)", text)
    tr = re.search(r"TRANS(\d+)", text)
    if not sub:
        raise ModelError(f"{path}: no $SUBROUTINE ADVANn found; only ADVAN1-4, 11, 12 models can be imported")
    advan, trans = int(sub.group(1)), int(tr.group(1)) if tr else 1
    if advan not in _ADVAN:
        raise ModelError(f"ADVAN{advan} is not supported; hybridpk imports ADVAN1-4, 11 and 12")
    structural = get_model(_ADVAN[advan])
    oral = advan in (2, 4, 12)

    estimation, evaluation_only = _check_estimation(m, text, path)
    rvs = m.random_variables
    eta_names = list(rvs.etas.names)
    params = m.parameters
    omega_names, omega_init, blocks, same, omega_fixed = _omega(rvs, params, text, path)
    eps_names = list(rvs.epsilons.names)
    sigma_names = list(rvs.epsilons.variance_parameters)
    if set(rvs.epsilons.parameter_names) != set(sigma_names):
        raise ModelError(f"{_where(text, path, _SIGMA)}: a $SIGMA BLOCK (correlated EPS) is not supported; "
                         "hybridpk estimates independent EPS (one $SIGMA per EPS)")
    special = set(rvs.etas.parameter_names) | set(rvs.epsilons.parameter_names)
    thetas = tuple(Theta(p.name, float(p.init), lower=float(p.lower) if p.lower is not None else -math.inf,
                         upper=float(p.upper) if p.upper is not None else math.inf, fixed=bool(p.fix))
                   for p in params if p.name not in special)

    statements = [(str(s.symbol), sympy.sympify(s.expression)) for s in m.statements.before_odes]
    data = m.dataset.copy()
    drops = [c.name for c in m.datainfo if c.drop]
    data = data.drop(columns=[c for c in drops if c in data.columns])
    columns = set(data.columns)
    assigned = set()
    used = set()
    for name, expr in statements:
        used |= {s.name for s in expr.free_symbols if s.name in columns and s.name not in assigned}
        assigned.add(name)
    covs = tuple(sorted(used - {"ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "II", "SS", "ADDL"}))
    ds = read_nonmem(data, covariates=list(covs))

    # residual error: dY/dEPS at EPS = 0, in terms of F
    after = {str(s.symbol): sympy.sympify(s.expression) for s in m.statements.after_odes
             if hasattr(s, "symbol")}
    if "Y" not in after:
        raise ModelError("$ERROR does not define Y")
    fsym = sympy.Symbol("F")
    y = after["Y"]
    for _ in range(10):  # substitute intermediate $ERROR variables (not F itself)
        y = y.subs({sympy.Symbol(k): v for k, v in after.items() if k not in ("Y", "F")})
    kinds = {}
    for eps, sig in zip(eps_names, sigma_names):
        d = sympy.simplify(sympy.diff(y, sympy.Symbol(eps)).subs({sympy.Symbol(e): 0 for e in eps_names}))
        if d.free_symbols == set() and float(d) == 1.0:
            kinds["ADD"] = sig
        elif sympy.simplify(d - fsym) == 0:
            kinds["PROP"] = sig
        else:
            raise ModelError(f"$ERROR: Y depends on {eps} through {d}; hybridpk imports additive (F + EPS), "
                             "proportional (F + F*EPS) and combined error models")
    kind = "combined" if len(kinds) == 2 else ("additive" if "ADD" in kinds else "proportional")
    inits = {k: math.sqrt(float(params[v].init)) for k, v in kinds.items()}
    sigma_fixed = tuple(k for k, v in kinds.items() if params[v].fix)
    zero = [kinds[k] for k in sigma_fixed if inits[k] == 0.0]
    if zero:
        raise ModelError(f"{_where_fix(text, path)}: {zero[0]} is 0 FIX; remove that EPS from $ERROR instead")
    error = ErrorModel(kind, add=inits.get("ADD", 0.5), prop=inits.get("PROP", 0.1))

    def individual(theta, eta, cov):
        env = dict(theta)
        env.update({name: eta[:, k] for k, name in enumerate(eta_names)})
        env.update(cov)
        for name, expr in statements:
            env[name] = evaluate(expr, env)
        p = _structural(env, advan, trans, oral)
        n = eta.shape[0]
        return {k: torch.as_tensor(v, dtype=eta.dtype).expand(n) if not torch.is_tensor(v) or v.dim() == 0 else v
                for k, v in p.items()}

    recipe = {"kind": "nonmem", "control_stream": str(path.resolve()), "advan": advan, "trans": trans,
              "estimation": estimation, **({"evaluate": True} if evaluation_only else {})}
    pm = PopulationModel(structural=structural, thetas=thetas, etas=tuple(eta_names), omega_init=omega_init,
                         error=error, individual=individual, covariates=covs, omega_blocks=blocks,
                         omega_labels=tuple(omega_names), sigma_labels=dict(kinds), sigma_scale="variance",
                         recipe=recipe, omega_fixed=omega_fixed, omega_same=same, sigma_fixed=sigma_fixed)
    return pm, ds
