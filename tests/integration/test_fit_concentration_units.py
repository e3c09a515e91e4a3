"""A fit does not depend on the units the levels are written in (the doses' staying). Theophylline's levels in
ug/L (ng/mL, x1000) with the doses in mg, fitted with the CLI's defaults (1cmt_oral, combined error), ended
'converged' after 3 iterations at OFV 328481.6 (the minimum: 1927.97), with CL 4.6x and V 8x the mg/L fit's:
the outer search's trust region (population.fit.TRUST_STEP) answered a trial point beyond it with the best OFV
seen plus a margin (and a zero gradient), which a line search's earlier trial had pushed below the iterate's OFV,
so scipy's BFGS accepted the point and stopped on its zero gradient. Once that was mended, the model library's
additive SD start (0.5, meant for mg/L) made the search take 78 iterations where the mg/L fit takes 17; the start
now follows the data's units, and the search the mg/L fit's path."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from hybridpk import read_nonmem
from hybridpk.data.bundled import bundled_dataset
from hybridpk.population import build_model, fit_population


def _theoph(tmp_path, factor: float):
    df = pd.read_csv(bundled_dataset("theoph"))
    df["DV"] = df["DV"] * factor
    path = tmp_path / f"theoph_x{factor:g}.csv"
    df.to_csv(path, index=False)
    return read_nonmem(path)


def _fit(ds, **kw):
    return fit_population(build_model("1cmt_oral", error="combined"), ds, progress=False, covariance=False, **kw)


@pytest.fixture(scope="module")
def mg_per_l(tmp_path_factory):
    return _fit(_theoph(tmp_path_factory.mktemp("units"), 1.0))


def test_levels_in_ug_per_l_reach_the_mg_per_l_minimum(mg_per_l, tmp_path):
    ds = _theoph(tmp_path, 1000.0)
    fit = _fit(ds)
    n_obs = ds.n_observations
    # -2LL of levels scaled by c is the same minimum plus 2 n log c
    assert fit.estimation.ofv == pytest.approx(mg_per_l.estimation.ofv + 2 * n_obs * math.log(1000.0), abs=1e-3)
    for mine, ref in zip(fit.theta.rows, mg_per_l.theta.rows):
        expected = ref.value if mine.name == "KA" else ref.value / 1000.0    # CL, V in mg / (ug/L) = kL
        assert mine.value == pytest.approx(expected, rel=1e-4), mine.name
    sd = {r.kind: r.sd for r in fit.sigma.rows}
    ref_sd = {r.kind: r.sd for r in mg_per_l.sigma.rows}
    assert sd["ADD"] == pytest.approx(1000.0 * ref_sd["ADD"], rel=1e-3)
    assert sd["PROP"] == pytest.approx(ref_sd["PROP"], rel=1e-3)
    # the mg/L fit's path (17 iterations here; 78 from the library's start of the additive SD)
    assert abs(fit.estimation.iterations - mg_per_l.estimation.iterations) <= 3


def test_a_given_additive_start_far_from_the_data_does_not_end_above_its_minimum(mg_per_l, tmp_path):
    """The library's start given explicitly (so not moved to the data's units): the search now ends at a minimum
    of the OFV, the mg/L fit's (in 78 iterations), not at the point beyond the trust region (OFV 328481.6 before)."""
    ds = _theoph(tmp_path, 1000.0)
    fit = _fit(ds, sigma={"ADD": 0.5, "PROP": 0.1})
    assert fit.estimation.converged
    assert fit.estimation.ofv == pytest.approx(mg_per_l.estimation.ofv + 2 * ds.n_observations * math.log(1000.0),
                                               abs=1e-3)

