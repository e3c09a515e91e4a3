"""Censored levels as a control stream's $ERROR writes them (Beal's M3 as NONMEM users code it), read as hybridpk's
M3: the records where F_FLAG = 1 and Y is the likelihood of a level below the limit, PHI((LLOQ - IPRED)/W) (or above
an upper limit, 1 - PHI((ULOQ - IPRED)/W)), are censored at that limit; elsewhere (F_FLAG = 0) Y = IPRED + W*EPS is
the error model. NONMEM's F_FLAG (help "F_FLAG"): 0, Y is a prediction; 1, Y is a likelihood, and the record's
-2LL term is -2 log Y, which is hybridpk's M3 term when Y is the normal CDF at the limit with IPRED and the residual
SD W of the F_FLAG = 0 branch (Beal 2001; Ahn et al. 2008). Both are checked here, so the fit is NONMEM's OFV.

The condition of F_FLAG must read data items only (DV, MDV, a BLQ or LLOQ column ...; NPDE_MODE and COMACT are 0
in estimation), as it decides which records are censored; the limit may read data items too (an LLOQ column), and
is computed for each censored record from Y: L = a W + IPRED, with a the argument of PHI, must not depend on the
parameters. Anything else in Y where F_FLAG = 1 (M4's ratio, a -2LL with F_FLAG = 2, a Y that reads other terms)
is refused with its line, not approximated."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import DatasetError, ModelError

_M3_ONLY = ("hybridpk reads Beal's M3, Y = PHI((LLOQ - IPRED)/W) (or 1 - PHI((ULOQ - IPRED)/W) above an upper "
            "limit); M4's ratio of probabilities and other likelihoods are not imported")

#: NONMEM's reserved variables that an M3 $ERROR reads, at their values during estimation
RESERVED = {"NPDE_MODE": 0, "COMACT": 0}


@dataclass(frozen=True)
class StreamCensoring:
    """The censored records of a control stream's data (rows as in its $DATA after IGNORE).

    Attributes
    ----------
    y : sympy expression
        Y on the records with F_FLAG = 0 (the error model).
    cens : numpy.ndarray
        Per row: 1 (below the limit), -1 (above it) or 0.
    limit : numpy.ndarray
        Per row: the limit, in the units of the stream's DV (NaN where not censored).
    reads : tuple of str
        The data items F_FLAG's condition reads (DV, MDV, a BLQ column ...).
    rule : CensoringRule
        The same censoring for other data (a patient's levels).
    """

    y: object
    cens: np.ndarray
    limit: np.ndarray
    reads: tuple = ()
    rule: "CensoringRule | None" = field(default=None, repr=False)


def observation_rows(data) -> np.ndarray:
    """The rows NONMEM reads a level on: EVID = 0 and MDV = 0 (inferred from AMT when the data have neither)."""
    n = len(data)
    amt = data["AMT"].to_numpy(dtype=float) if "AMT" in data else np.zeros(n)
    mdv = data["MDV"].to_numpy(dtype=float) if "MDV" in data else None
    if "EVID" in data:
        evid = data["EVID"].to_numpy(dtype=float)
    else:
        evid = np.where(amt > 0, 1.0, np.where(mdv == 1, 2.0, 0.0) if mdv is not None else 0.0)
    if mdv is None:
        mdv = np.where(evid == 0, 0.0, 1.0)
    return (evid == 0) & (mdv == 0)


def read_censoring(fflag, y, data, eps_names, sigma_names, params, at: str, y_obs=None) -> StreamCensoring:
    """The censoring that ``fflag`` (F_FLAG's value) and ``y`` (Y's), both with the $PK and $ERROR variables
    substituted, give each row of ``data`` (a DataFrame of the stream's data items); ``at`` names the $ERROR's
    line in messages. ``y_obs``: Y where F_FLAG = 0 when it is known (read on the stream's own $DATA), for data
    whose every level may be censored (a patient's)."""
    import sympy

    reserved = {sympy.Symbol(k): v for k, v in RESERVED.items()}
    written = (fflag, y)
    fflag, y = sympy.sympify(fflag).subs(reserved), sympy.sympify(y).subs(reserved)
    columns = {sympy.Symbol(c): c for c in data.columns}
    leaves = _condition_leaves(fflag)
    reads = set().union(*(leaf.free_symbols for leaf in leaves)) if leaves else set()
    other = sorted(s.name for s in reads if s not in columns)
    if other:
        raise ModelError(f"{at}: F_FLAG's condition reads {other[0]}, which is not a data item; hybridpk censors the "
                         "records F_FLAG = 1 marks by their data (DV below an LLOQ, a BLQ column)")
    obs = observation_rows(data)
    truth = np.column_stack([_evaluate(leaf, columns, data) for leaf in leaves]) if leaves else \
        np.zeros((len(data), 0), dtype=bool)
    cens, limit = np.zeros(len(data)), np.full(len(data), np.nan)
    censored = []
    for rows, flag, y_here in _groups(fflag, y, leaves, truth, obs, data, columns, at):
        flag = 0 if flag == sympy.nan else flag
        if not flag.is_number or float(flag) not in (0.0, 1.0):
            raise ModelError(f"{at}: F_FLAG = {flag} on some levels; hybridpk reads F_FLAG = 0 (Y is a prediction) "
                             "and F_FLAG = 1 (Y is the likelihood of a censored level: M3)")
        if float(flag) == 0.0:
            if y_obs is not None and sympy.simplify(y_obs - y_here) != 0:
                raise ModelError(f"{at}: Y differs between records with F_FLAG = 0 ({y_obs} and {y_here}) by the "
                                 "data items F_FLAG reads; hybridpk reads one error model for the levels it fits")
            y_obs = y_here
        else:
            censored.append((rows, y_here))
    if y_obs is None:
        raise ModelError(f"{at}: F_FLAG is 1 on every level; there is no level to fit Y = IPRED + error on")
    limit_reads = set()
    for rows, y_cens in censored:
        cens[rows], limit[rows], items = _limits(y_cens, y_obs, rows, data, columns, eps_names, sigma_names,
                                                 params, at)
        limit_reads |= items
    reads |= {s for s in fflag.free_symbols if s in columns}
    reads = tuple(sorted(columns[s] for s in reads))
    rule = CensoringRule(*written, y_obs, tuple(eps_names), tuple(sigma_names), params, at,
                         tuple(sorted(set(reads) | {columns[s] for s in limit_reads})))
    return StreamCensoring(y=y_obs, cens=cens, limit=limit, reads=reads, rule=rule)


@dataclass(frozen=True)
class CensoringRule:
    """A control stream's M3 (F_FLAG and Y as written, and Y where F_FLAG = 0) as a rule for data other than the
    stream's own $DATA: a patient's levels read for MAP, dosing or prediction are censored where the stream would
    censor them had they been in its $DATA (:meth:`censor`). ``reads``: the data items F_FLAG and the limits read
    (DV, MDV, a BLQ or LLOQ column ...); ``log_dv``: the stream's DV are log concentrations (the rule is evaluated
    on LOG of a dataset's DV, its limits are EXP'd)."""

    fflag: object
    y: object
    y_obs: object
    eps_names: tuple
    sigma_names: tuple
    params: object = field(repr=False)
    at: str = ""
    reads: tuple = ()
    log_dv: bool = False
    synonyms: tuple = ()

    def for_stream(self, log_dv: bool, synonyms: dict) -> "CensoringRule":
        """The rule with the stream's DV scale and its $INPUT synonyms of reserved items ({"LNDV": "DV"}:
        ``LNDV=DV`` in $INPUT), by which F_FLAG may read them."""
        return replace(self, log_dv=bool(log_dv), synonyms=tuple(sorted(synonyms.items())))

    def censor(self, dataset, strict: bool = False):
        """``dataset`` with the levels this rule censors and the dataset does not (no CENS, BLQ or LLOQ marks
        them) marked CENS = 1 (below) or -1 (above), at the rule's limit (in the dataset's DV units; an LLOQ
        column takes it too). ``strict`` (a patient file as read, before any such marks were set): levels the
        dataset marks censored and the rule does not are refused by row, as the stream would fit them as
        measured. A dataset whose DV scale a log-DV stream cannot tell is returned as it is (the model refuses
        it: :meth:`PopulationModel.require_dv_scale`)."""
        obs = dataset.observation_mask
        if not obs.any() or (self.log_dv and not (dataset.dv_log or dataset.dv_stated)):
            return dataset
        records = dataset.to_dataframe()
        frame = self._stream_items(records, obs, dataset.source)
        found = read_censoring(self.fflag, self.y, frame, self.eps_names, self.sigma_names, self.params, self.at,
                               y_obs=self.y_obs)
        rule = (found.cens != 0) & obs
        marks = dataset.censoring()[0]
        marked = marks != 0
        if strict and (marked & ~rule).any():
            rows = np.flatnonzero(marked & ~rule)
            column = next(c for c in ("CENS", "BLQ", "LLOQ") if c in records)
            raise DatasetError([dataset.violation(rows, column, f"marked censored, but the control stream's M3 "
                                                  f"({self.at}) fits these levels as measured (its F_FLAG reads "
                                                  f"{', '.join(self.reads) or 'no data item'}); code them as the "
                                                  "stream's $DATA does")], dataset.source)
        new = rule & ~marked
        if not new.any():
            return dataset
        limit = np.exp(found.limit) if self.log_dv else found.limit
        cens = marks.copy()
        cens[new] = found.cens[new]
        records["CENS"] = cens.astype(int)
        records.loc[new, "DV"] = limit[new]
        if "LLOQ" in records:
            below = new & (found.cens == 1)
            records.loc[below, "LLOQ"] = limit[below]
        return dataset.with_records(records)

    def _stream_items(self, records, obs, source):
        """The records with the data items the rule reads by the stream's names (a BQL column read as BLQ ...) and
        DV on the stream's scale."""
        from ..data._columns import ALIASES

        frame = records.copy()
        if self.log_dv:
            with np.errstate(divide="ignore"):
                frame.loc[obs, "DV"] = np.log(records.loc[obs, "DV"].to_numpy(dtype=float))
        for name, reserved in self.synonyms:    # the stream's LNDV (LNDV=DV) is the data's DV
            if name in self.reads and reserved in frame:
                frame[name] = frame[reserved]
        for name in self.reads:
            if name in frame:
                continue
            role = next((r for r, names in ALIASES.items() if name.upper() in names and r in frame), None)
            if role is None:
                raise DatasetError(f"the control stream's M3 ({self.at}) reads the data item {name} to tell which "
                                   f"levels are censored, and the data have no {name} column; add it as the "
                                   "stream's $DATA has it", source)
            frame[name] = frame[role]
        return frame


#: at most this many distinct values of the data items F_FLAG is written with (F_FLAG = BLQ: two)
MAX_FLAG_VALUES = 50


def _groups(fflag, y, leaves, truth, obs, data, columns, at: str):
    """(rows, F_FLAG, Y) for each group of levels alike for F_FLAG: the truth values of its IF conditions, then the
    values of data items it is written with (F_FLAG = BLQ, Y = (1 - BLQ)*(IPRED + W*EPS(1)) + BLQ*PHI(...)),
    those substituted in F_FLAG and Y."""
    import sympy

    for key in sorted({tuple(row) for row in truth[obs]}):
        rows = np.flatnonzero(obs & (truth == np.array(key, dtype=bool)).all(1))
        values = dict(zip(leaves, (sympy.true if k else sympy.false for k in key)))
        flag, y_here = fflag.xreplace(values), y.xreplace(values)
        items = sorted((s for s in flag.free_symbols if s in columns), key=lambda s: s.name)
        if not items:
            yield rows, flag, y_here
            continue
        at_rows = np.column_stack([data[columns[s]].to_numpy(dtype=float)[rows] for s in items])
        distinct = np.unique(at_rows, axis=0)
        if len(distinct) > MAX_FLAG_VALUES:
            raise ModelError(f"{at}: F_FLAG = {flag} takes the values of {', '.join(s.name for s in items)} "
                             f"({len(distinct)} of them); hybridpk reads F_FLAG set to 0 or 1 by IF conditions on "
                             "data items, or equal to a 0/1 data item")
        for value in distinct:
            sub = dict(zip(items, (sympy.Float(v) if v != int(v) else sympy.Integer(int(v)) for v in value)))
            yield rows[(at_rows == value).all(1)], flag.subs(sub), sympy.simplify(y_here.subs(sub))


def _condition_leaves(fflag) -> list:
    """The atoms (relations, tests) of the conditions of F_FLAG's IF branches, outermost first."""
    import sympy

    found = []

    def leaves(cond):
        if isinstance(cond, (sympy.And, sympy.Or, sympy.Not, sympy.Xor)):
            for a in cond.args:
                leaves(a)
        elif cond not in (sympy.true, sympy.false) and cond not in found:
            found.append(cond)

    def chain(expr):
        if isinstance(expr, sympy.Piecewise):
            for value, cond in expr.args:
                leaves(cond)
                chain(value)

    chain(fflag)
    return found


def _evaluate(expr, columns: dict, data, extra=None):
    """``expr`` at every row of ``data`` (its data items from the columns; ``extra``: {symbol: value})."""
    import sympy
    from scipy.special import ndtr

    symbols = sorted(expr.free_symbols, key=lambda s: s.name)
    extra = extra or {}
    fn = sympy.lambdify(symbols, expr, modules=[{"PHI": ndtr}, "numpy"])
    args = [extra[s] if s in extra else data[columns[s]].to_numpy(dtype=float) for s in symbols]
    return np.broadcast_to(np.asarray(fn(*args)), (len(data),)).copy()


def _limits(y_cens, y_obs, rows, data, columns, eps_names, sigma_names, params, at: str):
    """(cens, limit, the data items the limit reads) of the censored ``rows``: Y = PHI(a) (+ a constant below 1e-6,
    e.g. 1E-30 against PHI = 0) or 1 - PHI(a), with a = (L - IPRED)/W (below L for PHI, above for 1 - PHI) or
    (IPRED - L)/W (the other way), IPRED and W = sqrt(sum SIGMA_k (dY/dEPS_k)^2) from the F_FLAG = 0 branch at
    EPS = 0; L must not depend on the parameters."""
    import sympy

    phis = [f for f in y_cens.atoms(sympy.Function) if type(f).__name__ == "PHI"]
    if len(phis) != 1:
        raise ModelError(f"{at}: where F_FLAG = 1, Y is {y_cens}; {_M3_ONLY}")
    phi = phis[0]
    tail = None
    for sign, rest in ((1, y_cens - phi), (-1, y_cens - (1 - phi))):
        rest = sympy.simplify(rest)
        if rest.is_number and abs(float(rest)) <= 1e-6:
            tail = sign
    if tail is None:
        raise ModelError(f"{at}: where F_FLAG = 1, Y is {y_cens}, not PHI(...) or 1 - PHI(...); {_M3_ONLY}")
    zero = {sympy.Symbol(e): 0 for e in eps_names}
    prediction = y_obs.subs(zero)
    variance = sum(sympy.Symbol(s) * sympy.diff(y_obs, sympy.Symbol(e)).subs(zero) ** 2
                   for e, s in zip(eps_names, sigma_names))
    fixed = {sympy.Symbol(p.name): sympy.nsimplify(float(p.init)) for p in params if p.fix}   # $SIGMA 1 FIX
    a, sd = phi.args[0], sympy.sqrt(variance.subs(fixed))
    sub = data.iloc[rows]
    rng = np.random.default_rng(0)
    for direction, limit_expr in ((1, a * sd + prediction), (-1, prediction - a * sd)):
        exact = sympy.simplify(limit_expr)
        if exact.free_symbols <= set(columns):      # the limit itself (LLOQ, LOG(2), a column): no rounding
            limit = _evaluate(exact, columns, sub)
            constant = True
        else:       # not simplified away: the limit must not move with the parameters
            points = [_evaluate(limit_expr, columns, sub, _random_values(limit_expr, columns, params, rng))
                      for _ in range(3)]
            limit = points[0]
            constant = all(np.allclose(p, limit, rtol=1e-8, atol=1e-10) for p in points[1:])
        if constant and np.isfinite(limit).all():
            # PHI((L - IPRED)/W) is below L; PHI((IPRED - L)/W) above; 1 - PHI the other way round
            return (1 if direction * tail > 0 else -1), limit, {s for s in exact.free_symbols if s in columns}
    raise ModelError(f"{at}: where F_FLAG = 1, Y = {y_cens}: its PHI does not read (LIMIT - IPRED)/W with the IPRED "
                     f"and the residual SD W (sqrt of the EPS variances) of Y where F_FLAG = 0 ({y_obs}); write the "
                     "M3 term with the same IPRED and W")


def _random_values(expr, columns: dict, params, rng) -> dict:
    """Values of the parameters (and the prediction F) ``expr`` reads, near their initial estimates: a test of
    whether the limit depends on them."""
    values = {}
    for s in sorted(expr.free_symbols, key=lambda x: x.name):
        if s in columns:
            continue
        name = s.name
        if name == "F":
            values[s] = float(rng.uniform(0.5, 5.0))
        elif name in params.names:     # a FIX one at its value ($SIGMA 1 FIX of W*EPS(1))
            init = float(params[name].init)
            values[s] = init if params[name].fix else \
                init * float(np.exp(rng.normal(0, 0.1))) if init != 0 else float(rng.normal(0, 0.1))
        elif name.startswith("ETA"):
            values[s] = float(rng.normal(0, 0.1))
        else:
            values[s] = float(rng.uniform(0.5, 2.0))
    return values
