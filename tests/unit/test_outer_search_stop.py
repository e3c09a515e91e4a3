"""The FOCE-I outer search's stop at the OFV's rounding (population.fit.ROUNDING_EVALUATIONS): it ends the search
where BFGS's line search only probes rounding, so it must give the minimum the search without it reaches (to well
within the convergence tolerance), in fewer evaluations. Found on 100 subjects of benchmarks/fit_scale.py's
design: the OFV settled to 1e-9 after 23 evaluations and the line search spent 45 more within 1.5e-9 of it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import hybridpk as hp
from hybridpk.population import build_model, fit_population
from hybridpk.population import analytic_focei
from hybridpk.population import fit as fit_module

TIMES = np.array([0.25, 0.5, 1, 2, 4, 6, 8, 12], dtype=float)


def one_cmt_oral(n: int, seed: int) -> pd.DataFrame:
    """benchmarks/fit_scale.py's design: KA 1.5, CL 3, V 30, 30% IIV on each, 100 mg, additive SD 0.1 mg/L."""
    rng = np.random.default_rng([seed, n])
    rows = []
    for i in range(1, n + 1):
        ka, cl, v = (t * math.exp(rng.normal(0.0, 0.3)) for t in (1.5, 3.0, 30.0))
        k = cl / v
        rows.append(dict(ID=i, TIME=0.0, AMT=100.0, DV=0.0, EVID=1, MDV=1))
        c = 100.0 * ka / (v * (ka - k)) * (np.exp(-k * TIMES) - np.exp(-ka * TIMES))
        rows += [dict(ID=i, TIME=float(t), AMT=0.0, DV=round(float(y), 6), EVID=0, MDV=0)
                 for t, y in zip(TIMES, c + rng.normal(0.0, 0.1, TIMES.size))]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def two_fits():
    """The general path's search (automatic differentiation; its OFV carries the rounding of the central-difference
    g = df/deta) with and without the stop at rounding, and the analytic path's (the default for this model), on
    the first of seeds 1-12 whose search reaches the stop. Where BFGS's line search ends in rounding depends on the
    machine's floating point: on the Intel machines of stop 38 seed 1 did (after 23 evaluations the line search
    spent 45 more within 1.5e-9), on an AMD EPYC BFGS ends seed 1 itself after 27 evaluations and seed 3 reaches
    the stop, and on the AMD EPYC of stop 57 scipy ends seeds 1-4 itself and seeds 5, 7 and 9 reach the stop."""
    pm = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="additive")
    saved = fit_module.ROUNDING_EVALUATIONS, analytic_focei.analytic_problem
    for seed in range(1, 13):
        ds = hp.read_nonmem(one_cmt_oral(100, seed))
        analytic_focei.analytic_problem = lambda *a: (None, "the general path's search is tested")
        try:
            stopped = fit_population(pm, ds, progress=False, covariance=False)
            if "at its minimum to rounding" not in stopped.estimation.message:
                continue
            fit_module.ROUNDING_EVALUATIONS = 10 ** 9          # the search as it was: scipy's own ending only
            full = fit_population(pm, ds, progress=False, covariance=False)
        finally:
            fit_module.ROUNDING_EVALUATIONS, analytic_focei.analytic_problem = saved
        analytic = fit_population(pm, ds, progress=False, covariance=False)
        return stopped, full, analytic
    pytest.fail("no search of seeds 1-12 reached the stop at rounding")


def test_the_search_stops_at_rounding_with_the_same_minimum(two_fits):
    stopped, full, _ = two_fits
    assert "at its minimum to rounding" in stopped.estimation.message
    assert stopped.estimation.converged
    assert "rounding" not in full.estimation.message
    assert abs(stopped.estimation.ofv - full.estimation.ofv) < 1e-6
    for name in stopped.theta.names:
        assert stopped.theta[name].value == pytest.approx(full.theta[name].value, rel=1e-5)
    np.testing.assert_allclose(np.asarray(stopped.omega.matrix), np.asarray(full.omega.matrix), rtol=1e-4)
    assert stopped.estimation.evaluations < full.estimation.evaluations


def test_the_analytic_paths_search_reaches_the_same_minimum(two_fits):
    _, full, analytic = two_fits
    assert analytic.estimation.derivatives == fit_module.ANALYTIC and analytic.estimation.converged
    assert abs(analytic.estimation.ofv - full.estimation.ofv) < 1e-6
    for name in analytic.theta.names:
        assert analytic.theta[name].value == pytest.approx(full.theta[name].value, rel=1e-5)
    np.testing.assert_allclose(np.asarray(analytic.omega.matrix), np.asarray(full.omega.matrix), rtol=1e-4)
