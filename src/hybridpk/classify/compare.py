"""Model selection: candidate runs fitted to the same data, ranked by how well they predict patients they
were not fitted to.

For each run: the OFV (NONMEM's, -2 log-likelihood without the constant), the number of estimated parameters
p (THETAs, OMEGA elements and residual SDs not fixed), AIC = OFV + 2p and BIC = OFV + p ln(observations), as
NONMEM users and PsN report them. A hybrid's likelihood is conditional on each patient's z and its network
has thousands of weights: it has no OFV of the same kind, so AIC and BIC are not given for it (None), and it
is compared by cross-validation only.

Cross-validation (``folds`` K > 0): the patients are split into K folds (seeded); each run's model is fitted
again on the other folds (an ODE model by FOCE-I from the run's estimates; a hybrid with the run's chosen
form and latent dimension, its population part from the run's estimates), and each held-out patient is
predicted from its own levels: alternate samples predict the others (estimated from one half, scored on the
other, then swapped), as :mod:`hybridpk.residual.predictive` scores form selection. Reported per fold: the
held-out -2 log-likelihood per observation (without the constant; lower is better) and the RMSE of those
predictions (mg/L). The recommendation follows the one-standard-error rule: the simplest run (ODE runs by
their number of parameters, hybrids last) whose mean held-out -2LL is within one standard error (of the
paired fold differences) of the lowest, or whose held-out -2LL summed over all observations is within
``TIE`` (1 point) of the lowest's; the lowest run, and the folds it won, are reported too. Without the rule
a hybrid, flexible enough to mimic a second compartment, wins ties against the mechanistic model it imitates
(benchmarks/model_selection.py, 2-cmt truth, seed 1: by 0.0003 per observation). Without the tie margin a
2-cmt model fitted to 1-cmt data, whose second compartment vanishes (Q -> 0) so that it predicts what the
1-cmt model predicts, won by 1e-5 per observation in every fold: the SE of such identical differences is near
0, so one SE does not cover them (seed 4, 1-cmt truth).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from ..errors import HybridPKError

__all__ = ["RunScore", "Comparison", "compare_runs", "count_parameters"]


@dataclass(frozen=True)
class RunScore:
    """One run: ``name``, ``kind`` ("ODE" or "hybrid"), ``ofv``, ``n_parameters``, ``aic``, ``bic`` (None for a
    hybrid) and the per-fold held-out -2LL per observation (``cv_nll``) and RMSE (``cv_rmse``)."""

    name: str
    kind: str
    ofv: float | None
    n_parameters: int | None
    aic: float | None
    bic: float | None
    cv_nll: tuple = ()
    cv_rmse: tuple = ()

    @property
    def mean_cv_nll(self) -> float | None:
        return float(np.mean(self.cv_nll)) if self.cv_nll else None


@dataclass(frozen=True)
class Comparison:
    """The runs' scores, the number of folds and the recommendation with its reason."""

    scores: list
    folds: int
    recommended: str | None
    reason: str
    n_observations: int = 0
    table: pd.DataFrame = field(repr=False, default=None)


def count_parameters(fitted) -> int:
    """Estimated parameters of a FittedPopulation: THETAs, OMEGA elements (SAME blocks counted once) and residual
    SDs that are not fixed."""
    from ..population.fit import Packing

    return int(Packing(fitted.model).x0().size)


def compare_runs(runs: dict, dataset, folds: int = 5, seed: int = 0, progress=None) -> Comparison:
    """Rank ``runs`` ({name: FittedPopulation or HybridFit}, fitted to ``dataset``) as the module docstring
    says. Runs fitted to other data are refused (the data fingerprint recorded with each fit)."""
    from ..residual import HybridFit

    if len(runs) < 2:
        raise HybridPKError("give at least two runs to compare")
    fingerprint = dataset.fingerprint()
    n_obs = int(dataset.n_observations)
    scores = {}
    for name, model in runs.items():
        pop = model.population if isinstance(model, HybridFit) else model
        est = pop.estimation
        if est is None:
            raise HybridPKError(f"{name} is a published model, not a fit: compare runs fitted to the data")
        if est.data_sha256 and est.data_sha256 != fingerprint:
            raise HybridPKError(f"{name} was fitted to other data than the dataset given (its data fingerprint "
                                "differs): compare runs fitted to the same data")
        if isinstance(model, HybridFit):
            scores[name] = RunScore(name, "hybrid", None, None, None, None)
        else:
            p = count_parameters(pop)
            scores[name] = RunScore(name, "ODE", float(est.ofv), p, float(est.ofv) + 2 * p,
                                    float(est.ofv) + p * np.log(n_obs))
    if folds:
        scores = _cross_validate(runs, scores, dataset, int(folds), seed, progress)
    return _rank(list(scores.values()), int(folds), n_obs)


def _cross_validate(runs, scores, dataset, folds: int, seed: int, progress):
    ids = np.array(dataset.ids)
    if folds < 2 or folds > len(ids):
        raise HybridPKError(f"folds = {folds}: give 2 to {len(ids)} folds (or 0: no cross-validation)")
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = [ids[order[k::folds]] for k in range(folds)]
    nll = {n: [] for n in runs}
    rmse = {n: [] for n in runs}
    for k, held in enumerate(parts):
        train = dataset.subset([i for i in ids if i not in set(held)])
        for name, model in runs.items():
            refit = _refit(model, train, seed)
            a, b = _score(refit, dataset, held)
            nll[name].append(a)
            rmse[name].append(b)
            if progress:
                progress(f"fold {k + 1}/{folds}: {name} held-out -2LL/obs {a:.4f}, RMSE {b:.4g}")
    return {n: replace(s, cv_nll=tuple(nll[n]), cv_rmse=tuple(rmse[n])) for n, s in scores.items()}


def _refit(model, train, seed: int):
    """The run's model fitted again on ``train``: FOCE-I from its estimates; a hybrid with its chosen form and
    latent dimension."""
    import warnings

    from ..population import fit_population
    from ..residual import HybridFit, fit_hybrid

    pop = model.population if isinstance(model, HybridFit) else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pop.starting_model(), train, progress=False, covariance=False, seed=seed)
    if not isinstance(model, HybridFit):
        return fit
    config = replace(model.config, form=model.vae.form_name, progress=False)
    return fit_hybrid(fit.model, train, latent_dim=model.latent_dim, config=config, seed=seed, progress=False,
                      population=fit)


def _score(model, dataset, ids) -> tuple:
    """(-2LL per observation without the constant, RMSE mg/L) of the patients ``ids``, each half of a patient's
    levels predicted from the other half."""
    from ..residual import HybridFit
    from ..residual.objective import gaussian_nll, hybrid_error
    from ..residual.predictive import _observations_of, split_halves

    a, b, full = split_halves(dataset, ids)
    pop = model.population if isinstance(model, HybridFit) else model
    sd = pop.sigma.sd_tensors()
    total, sq, count = 0.0, 0.0, 0
    for given, scored in ((a, b), (b, a)):
        if isinstance(model, HybridFit):
            out = model.predict(given, design=full)
            batch, pred, error = out.batch, out.ipred, model.error
            floor = model.vae.variance_floor(error, sd)
        else:
            est = model.estimate(given)
            batch = full.to_batch(covariates=list(pop.covariates))
            with torch.no_grad():
                pred = model.concentrations(batch, est.eta)
            error, floor = hybrid_error(pop, 0.0, est.eta), 0.0
        mask = _observations_of(scored, batch)
        with torch.no_grad():
            total += float(2 * gaussian_nll(batch, pred, mask, error, sd, floor).sum())
        sq += float(torch.where(mask, (batch.dv - pred) ** 2, torch.zeros_like(pred)).sum())
        count += int(mask.sum())
    return total / max(count, 1), float(np.sqrt(sq / max(count, 1)))


#: held-out -2LL (summed over every observation, each held out once) within which two runs predict equally well
TIE = 1.0


def _rank(scores: list, folds: int, n_obs: int) -> Comparison:
    rows = [{"run": s.name, "kind": s.kind, "OFV": s.ofv, "parameters": s.n_parameters, "AIC": s.aic, "BIC": s.bic,
             "cv_nll_per_obs": s.mean_cv_nll, "cv_rmse": float(np.mean(s.cv_rmse)) if s.cv_rmse else None}
            for s in scores]
    table = pd.DataFrame(rows)
    if folds:
        best = min(scores, key=lambda s: s.mean_cv_nll)
        others = [s for s in scores if s is not best]
        wins = sum(all(best.cv_nll[k] < o.cv_nll[k] for o in others) for k in range(folds))
        # the one-standard-error rule (Breiman, Friedman, Olshen, Stone 1984; Hastie, Tibshirani, Friedman,
        # Elements of Statistical Learning, 7.10): the simplest run whose held-out -2LL is within one standard
        # error of the best's (SE of the paired fold differences) or within TIE of it in all; ODE runs by their
        # parameter count, hybrids last
        def se_of_difference(s):
            d = np.asarray(s.cv_nll) - np.asarray(best.cv_nll)
            return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0

        margin = TIE / max(n_obs, 1)           # per observation
        close = [s for s in scores if s.mean_cv_nll - best.mean_cv_nll <= max(se_of_difference(s), margin)]
        chosen = min(close, key=lambda s: (s.kind == "hybrid", s.n_parameters or 0, s.mean_cv_nll))
        runner = min(others, key=lambda s: s.mean_cv_nll)
        reason = (f"{best.name}: held-out -2LL per observation {best.mean_cv_nll:.4f}, lower than {runner.name}'s "
                  f"{runner.mean_cv_nll:.4f} by {runner.mean_cv_nll - best.mean_cv_nll:.4f}; lowest in {wins} of "
                  f"{folds} folds")
        if chosen is not best:
            d = chosen.mean_cv_nll - best.mean_cv_nll
            reason = (f"{chosen.name}: within one standard error of the lowest held-out -2LL ({best.name}'s "
                      f"{best.mean_cv_nll:.4f}; {chosen.name} {chosen.mean_cv_nll:.4f}, {d:.4f} higher; SE of the "
                      f"fold differences {se_of_difference(chosen):.4f}; summed over the {n_obs} observations "
                      f"{d * n_obs:.2f}, tie margin {TIE:g}) and simpler: the one-standard-error rule")
        table["within_1se_of_best"] = [s in close for s in scores]
        return Comparison(scores, folds, chosen.name, reason, n_obs, table.sort_values("cv_nll_per_obs"))
    ode = [s for s in scores if s.aic is not None]
    if not ode:
        return Comparison(scores, 0, None, "no AIC for hybrids: use cross-validation (folds > 0)", n_obs, table)
    best = min(ode, key=lambda s: s.aic)
    note = "; hybrids are compared by cross-validation only (folds > 0)" if len(ode) < len(scores) else ""
    return Comparison(scores, 0, best.name, f"{best.name}: lowest AIC ({best.aic:.2f}) without cross-validation"
                      + note, n_obs, table.sort_values("AIC"))
