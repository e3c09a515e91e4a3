"""Covariate discovery: which covariates explain the individual differences the model leaves, then a stepwise
covariate model on the mechanistic parameters.

**Screen** (:func:`screen_covariates`): every candidate covariate (its baseline value per patient) against
every ETA (the EBEs) and, for a hybrid, every latent dimension Z: Spearman's rank correlation, the mutual
information (scikit-learn's k-nearest-neighbour estimator, Kraskov et al. 2004: it sees non-monotone
relations), a permutation p-value of |rho| (``permutations`` shuffles of the covariate), and Benjamini-
Hochberg q-values over all pairs (scipy.stats.false_discovery_control). A relation found only on a latent axis
explains the residual the ODE misses, not a parameter; it is reported as such.

**Stepwise covariate modelling** (:func:`stepwise_covariates`, as PsN's SCM: Jonsson and Karlsson 1998):
forward inclusion, each step adding the (parameter, covariate) relation that lowers the OFV most, if by more
than ``forward`` (3.84: chi-square, 1 d.f., p < 0.05); then backward elimination, each step removing the
relation whose removal raises the OFV least, if by less than ``backward`` (6.63: p < 0.01). Forms: power
(COV/median)^THETA for a continuous covariate, (1 + THETA)^(COV == level) for a two-level one. Every model is
fitted by FOCE-I from the current estimates. Only models built by hybridpk (``fit --model``, specs) can be
extended; a control stream's $PK is not rewritten.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd

from ..errors import HybridPKError

__all__ = ["screen_covariates", "stepwise_covariates", "CovariateSearch", "patient_covariates"]

#: dOFV thresholds of PsN's SCM defaults (p < 0.05 forward, p < 0.01 backward, 1 d.f.)
FORWARD, BACKWARD = 3.84, 6.63


def patient_covariates(dataset, names=None) -> pd.DataFrame:
    """ID and each covariate's value on the patient's first record (the baseline)."""
    df = dataset.to_dataframe()
    names = list(names) if names else [c for c in dataset.covariates]
    missing = [c for c in names if c not in df.columns]
    if missing:
        raise HybridPKError(f"covariate(s) {', '.join(missing)} not in the data (it has {', '.join(df.columns)})")
    return df.groupby("ID", sort=False)[names].first().reset_index()


def screen_covariates(individual: pd.DataFrame, covariates: pd.DataFrame, targets=None, permutations: int = 1000,
                      seed: int = 0) -> pd.DataFrame:
    """One row per (covariate, target): n, Spearman rho, mutual information (nats), permutation p-value,
    BH q-value, and what the target is ("parameter" for an ETA, "residual" for a latent Z), strongest first."""
    from scipy.stats import false_discovery_control, spearmanr
    from sklearn.feature_selection import mutual_info_regression

    table = individual.merge(covariates, on="ID")
    if targets is None:
        targets = [c for c in individual.columns if c.startswith("ETA_")
                   or (c.startswith("Z") and c[1:].isdigit())]
    if not targets:
        raise HybridPKError("nothing to screen against: the individual table has no ETA_ or Z columns")
    rng = np.random.default_rng(seed)
    rows = []
    for cov in [c for c in covariates.columns if c != "ID"]:
        x = table[cov].to_numpy(float)
        if np.unique(x).size < 2:
            continue
        perms = np.array([rng.permutation(x) for _ in range(int(permutations))])
        for tgt in targets:
            y = table[tgt].to_numpy(float)
            rho = float(spearmanr(x, y).statistic)
            null = np.abs([spearmanr(p, y).statistic for p in perms]) if permutations else np.array([])
            p = float((1 + (null >= abs(rho) - 1e-12).sum()) / (1 + len(null))) if permutations else float("nan")
            mi = float(mutual_info_regression(x[:, None], y, random_state=seed)[0])
            rows.append({"covariate": cov, "target": tgt, "acts_on": "parameter" if tgt.startswith("ETA_")
                         else "residual", "n": len(x), "spearman_rho": rho, "mutual_information": mi, "p_value": p})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["q_value"] = false_discovery_control(out.p_value.to_numpy()) if permutations else np.nan
    return out.sort_values(["q_value", "mutual_information"], ascending=[True, False]).reset_index(drop=True)


@dataclass(frozen=True)
class CovariateSearch:
    """A stepwise search: ``steps`` (one row per model tried: phase, step, relation, form, OFV, dOFV, kept),
    ``selected`` (the relations of the final model), ``final`` (its FittedPopulation)."""

    steps: pd.DataFrame
    selected: list
    final: object = field(repr=False)


def stepwise_covariates(fitted, dataset, candidates, forward: float = FORWARD, backward: float = BACKWARD,
                        forms=("power",), progress=None) -> CovariateSearch:
    """PsN-style SCM from ``fitted`` (a FittedPopulation fitted to ``dataset``) over ``candidates`` ((parameter,
    covariate) pairs); see the module docstring. ``forms`` of a continuous covariate tried for each relation
    ("power", "linear", "exponential", "maturation": a sigmoid COV^HILL / (TM50^HILL + COV^HILL)); each form
    is a candidate of its own, and once one form of a relation is in the model the others are not tried."""
    recipe = fitted.model.recipe
    if recipe.get("kind") != "build":
        raise HybridPKError("a covariate search extends models built by hybridpk (fit --model, a spec); an imported "
                            "control stream's $PK is not rewritten: add the relation to the control stream")
    base = fitted.estimation.ofv if fitted.estimation is not None else None
    if base is None:
        raise HybridPKError("the covariate search starts from a fit (a run), not a published model")
    params = {t.name for t in fitted.model.thetas}
    cov_table = patient_covariates(dataset, sorted({c for _, c in candidates}))
    effects = {}
    for par, cov in candidates:
        if par.upper() not in params:
            raise HybridPKError(f"candidate {par}~{cov}: the model has no parameter {par}")
        for form in forms:
            e = _effect(par.upper(), cov, cov_table[cov], form)
            effects[(par.upper(), cov, e.kind)] = e
    existing = [_from_recipe(e) for e in recipe.get("covariates", [])]
    present = {(e.parameter, e.covariate) for e in existing}
    effects = {k: e for k, e in effects.items() if k[:2] not in present}     # already in the model: kept as is
    current, ofv, chosen, rows = fitted, float(base), [], []

    def fit_with(selected, start):
        return _fit(start, existing + [effects[k] for k in selected], dataset)

    step = 0
    while True:   # forward inclusion
        step += 1
        trials = []
        for key in effects:
            if key[:2] in {c[:2] for c in chosen}:    # one form per relation
                continue
            f = fit_with(chosen + [key], current)
            trials.append((f.estimation.ofv, key, f))
            rows.append({"phase": "forward", "step": step, "relation": _label(key),
                         "form": effects[key].kind, "OFV": f.estimation.ofv, "dOFV": ofv - f.estimation.ofv,
                         "kept": False})
            if progress:
                progress(f"forward step {step}: {key[0]}~{key[1]} dOFV {ofv - f.estimation.ofv:.2f}")
        if not trials:
            break
        best_ofv, key, f = min(trials, key=lambda t: t[0])
        if ofv - best_ofv <= forward:
            break
        rows[[i for i, r in enumerate(rows) if r["phase"] == "forward" and r["step"] == step
              and r["relation"] == _label(key)][0]]["kept"] = True
        chosen.append(key)
        current, ofv = f, float(best_ofv)
    step = 0
    while len(chosen) > 0:   # backward elimination
        step += 1
        trials = []
        for key in chosen:
            rest = [k for k in chosen if k != key]
            f = fit_with(rest, current)
            trials.append((f.estimation.ofv, key, f))
            rows.append({"phase": "backward", "step": step, "relation": _label(key),
                         "form": effects[key].kind, "OFV": f.estimation.ofv, "dOFV": f.estimation.ofv - ofv,
                         "kept": True})
            if progress:
                progress(f"backward step {step}: without {key[0]}~{key[1]} dOFV {f.estimation.ofv - ofv:.2f}")
        worst_ofv, key, f = min(trials, key=lambda t: t[0])
        if worst_ofv - ofv >= backward:
            break
        rows[[i for i, r in enumerate(rows) if r["phase"] == "backward" and r["step"] == step
              and r["relation"] == _label(key)][0]]["kept"] = False
        chosen.remove(key)
        current, ofv = f, float(worst_ofv)
    return CovariateSearch(pd.DataFrame(rows), [_label(k) for k in chosen], current)


def _label(key) -> str:
    """'CL~CRCL' for the default forms (power, two-level), 'CL~AGE (maturation)' for another."""
    par, cov, kind = key
    return f"{par}~{cov}" + ("" if kind in ("power", "categorical") else f" ({kind})")


def _effect(parameter: str, covariate: str, values: pd.Series, form: str = "power"):
    from ..population.spec import CovariateEffect

    v = values.to_numpy(float)
    levels = np.unique(v)
    if levels.size < 2:
        raise HybridPKError(f"covariate {covariate} takes one value in the data: nothing to estimate")
    if levels.size == 2:
        return CovariateEffect(parameter, covariate, "categorical", level=float(levels.max()))
    if form not in ("power", "linear", "exponential", "maturation"):
        raise HybridPKError(f"form {form!r}: use power, linear, exponential or maturation")
    if form in ("power", "maturation") and (v <= 0).any():
        raise HybridPKError(f"covariate {covariate} has values <= 0: a {form} form needs positive values")
    return CovariateEffect(parameter, covariate, form, reference=float(np.median(v)))


def _from_recipe(d: dict):
    from ..population.spec import CovariateEffect

    return CovariateEffect(**d)


def _fit(start, effects, dataset):
    """FOCE-I fit of the model of ``start`` with exactly the covariate ``effects``, from ``start``'s estimates."""
    import warnings

    from ..population import fit_population
    from ..population.spec import model_from_recipe

    pm = model_from_recipe({**start.model.recipe, "covariates": [asdict(e) for e in effects]})
    cur = start.starting_model()
    inits = {t.name: t.init for t in cur.thetas}
    pm = replace(pm, thetas=tuple(replace(t, init=inits.get(t.name, t.init)) for t in pm.thetas),
                 omega_init=cur.omega_init, error=cur.error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_population(pm, dataset, progress=False, covariance=False)
