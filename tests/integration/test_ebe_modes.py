"""EBEs on a posterior with more than one mode, on data not made here: pharmpy's moxonidine example (1-cmt oral with
lag, BLOCK(2) IIV, IOV on CL and KA, FOCE) at the estimates of a FOCE fit of it by hybridpk (eaece95), where the
proportional residual SD is 0.013 and FOCE's residual variance is taken at PRED, so that a patient's posterior
is narrow valleys between flip-flop branches.

Found: the EBEs and OFV of an evaluation there (MAXEVAL=0, the written final control stream) were not the
modes: subject 906's search from ETA = 0 crawled to -2 log posterior 1.4e11 in its 100 Newton iterations (OFV not
finite), 503 and 505 stopped at 1.3e5 and 6.9e4, where the fit's own EBEs are at about -200. And the tables a fit
wrote (individual.csv) came from such a search from 0, not from the EBEs behind its OFV."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from hybridpk.population import fit_population
from hybridpk.population.fit import Packing
from hybridpk.population.focei import Problem
from hybridpk.population.nonmem import read_control_stream

SUBJECTS = (110, 503, 505, 606, 906)
# the ETAs hybridpk's FOCE fit of moxo.mod ended with (its checkpoint at the estimates below), as the starts of the
# reference searches: the modes a search from them reaches are the ones an evaluation from ETA = 0 must not miss
FIT_EBES = {110: [-1.287, 0.5619, -2.1793, -0.0867, -0.1198, -0.3091, -0.0899],
            503: [-1.4716, -0.4218, -2.7642, 0.2756, -0.3873, -0.1733, -0.3327],
            505: [-1.0347, 0.2164, -2.7297, -0.0669, -0.0716, -0.3129, -0.1868],
            606: [-1.7778, 0.2313, -0.4605, 0.0359, -0.2575, 0.4415, -0.5258],
            906: [-1.1983, 0.3933, -1.9856, -0.3116, 0.1346, -0.3392, -0.0243]}
FIT_ESTIMATES = [("23.1329", "91.3392"), ("123.604", "85.5141"), ("8.02595", "8.26232"), ("0.237773", "0.241517"),
                 ("0.0751115", "0.517186"), ("0.0259926 0.144646", "0.278761 0.261031"), ("2.78268", "2.68827"),
                 ("0.0234871", "0.0240132"), ("0.51776", "0.492091"), ("0.0764969", "0.000177275")]


@pytest.fixture
def moxo_at_fit(tmp_path, pharmpy_examples):
    """moxo.mod with the fit's estimates and MAXEVAL=0, on the records of SUBJECTS."""
    return _moxo_at_fit(tmp_path, pharmpy_examples, SUBJECTS)


def _moxo_at_fit(tmp_path, pharmpy_examples, subjects):
    text = (pharmpy_examples / "moxo.mod").read_text().replace("moxo.csv", "five.csv")
    text = text.replace("MAXEVAL=9999", "MAXEVAL=0")
    for old, new in FIT_ESTIMATES:
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "moxo_fit.mod").write_text(text)
    df = pd.read_csv(pharmpy_examples / "moxo.csv")
    df[df.ID.isin(subjects)].to_csv(tmp_path / "five.csv", index=False)
    return read_control_stream(tmp_path / "moxo_fit.mod")


def test_an_evaluation_finds_the_modes_behind_a_fit_and_its_ofv_is_theirs(moxo_at_fit):
    pm, ds = moxo_at_fit
    assert ds.ids == SUBJECTS and pm.recipe["estimation"] == "FOCE" and pm.recipe["evaluate"]
    res = fit_population(pm, ds, progress=False, covariance=False)
    est = res.estimation
    assert math.isfinite(est.ofv)

    pack = Packing(pm)
    theta, omega, sd = pack.unpack(torch.tensor(pack.x0(), dtype=torch.float64))
    prob = Problem(pm, ds, estimation="FOCE")
    oinv = torch.linalg.inv(omega)
    start = torch.tensor([FIT_EBES[i] for i in SUBJECTS], dtype=torch.float64)
    reference = prob.ebe(theta, oinv, sd, start, tol=1e-10)
    with torch.no_grad():
        ref_obj = prob.objective(theta, oinv, sd, reference)
        reported = prob.objective(theta, oinv, sd, est.estimates.eta)
    assert bool((ref_obj < 0).all())                # the fit's modes fit the data (about -200 each)
    assert (reported <= ref_obj + 1e-6 * (1 + ref_obj.abs())).all(), (reported, ref_obj)
    # the OFV is the one at the EBEs reported (the tables and the OFV agree)
    assert est.ofv == pytest.approx(float(prob.ofv(theta, omega, sd, est.estimates.eta).detach()), abs=1e-6)
    table = est.individual.set_index("ID").loc[list(SUBJECTS), [f"ETA_{k}" for k in range(1, 8)]].to_numpy()
    torch.testing.assert_close(torch.tensor(table), est.estimates.eta, rtol=0, atol=1e-12)


def test_subjects_whose_ofv_is_not_finite_are_named(moxo_at_fit):
    """The warning of an OFV that is not finite names the subjects whose contribution is not and their -2 log
    posterior (an evaluation there once reported a bare 'OFV inf')."""
    from hybridpk.population.fit import _not_finite

    pm, ds = moxo_at_fit
    pack = Packing(pm)
    theta, omega, sd = pack.unpack(torch.tensor(pack.x0(), dtype=torch.float64))
    prob = Problem(pm, ds, estimation="FOCE")
    eta = torch.tensor([FIT_EBES[i] for i in SUBJECTS], dtype=torch.float64)
    eta[4, 2] = 800.0                      # KA = 8.3 exp(800): not finite
    message = _not_finite(prob, ds, theta, omega, sd, eta)
    assert message.startswith("the OFV is not finite: the contribution of subject 906 is not"), message
    assert "ID 906:" in message and "110" not in message


def test_searches_that_run_out_of_iterations_are_continued_to_their_modes(tmp_path, pharmpy_examples):
    """At the fit's estimates the posteriors of subjects 804, 807 and 1202 are valleys with condition number
    about 1e13 (a tiny proportional SD, FOCE's variance at PRED, IIV of KA 2.7), along which Newton's steps
    crawl: from ETA = 0 their 100 iterations ended away from a mode (Newton decrements 0.11, 0.0037, 0.0022)
    and were reported as EBEs without a word. Now their searches are continued: 807 and 1202 by more Newton
    iterations, 804 (which more iterations only crawl on with) by the homotopy in the residual SDs."""
    from hybridpk.population.estimates import DECREMENT_SEARCH_ON, map_estimate, newton_decrement
    from hybridpk.population.specfile import load_model

    subjects = (804, 807, 1202)
    pm, ds = _moxo_at_fit(tmp_path, pharmpy_examples, subjects)
    est = map_estimate(load_model(tmp_path / "moxo_fit.mod"), ds, "FOCE")
    assert (est.decrement < DECREMENT_SEARCH_ON).all(), est.decrement
    assert not len(est.not_at_mode()) and est.search_warning() is None
    # independently: Newton's method continued from the reported EBEs for 400 more iterations lowers no
    # subject's -2 log posterior by more than rounding (it lowered 807's and 1202's by 0.67 and 0.61, 804's by
    # over 5, before), and the exact derivatives there give the decrement reported
    pack = Packing(pm)
    theta, omega, sd = pack.unpack(torch.tensor(pack.x0(), dtype=torch.float64))
    prob = Problem(pm, ds, estimation="FOCE")
    oinv = torch.linalg.inv(omega)
    on = prob.ebe(theta, oinv, sd, est.eta, tol=1e-10, max_iter=400)
    with torch.no_grad():
        before, after = prob.objective(theta, oinv, sd, est.eta), prob.objective(theta, oinv, sd, on)
    assert (before - after <= 1e-6).all(), before - after
    assert float(before[0]) < -249.0, before      # 804: the from-0 search stopped at -243.67
    obj, grad, hess = prob.exact_hessian(theta, oinv, sd, est.eta)
    torch.testing.assert_close(newton_decrement(grad, hess).numpy(), est.decrement, rtol=1e-6, atol=1e-12)


def _lagged(t, ka, cl, v, lag, dose=100.0):
    k = cl / v
    tt = (t - lag).clip(lower=0.0)
    return dose * ka / (v * (ka - k)) * ((-k * tt).map(math.exp) - (-ka * tt).map(math.exp))


def test_a_long_lag_time_is_found_from_a_search_that_starts_at_a_short_one():
    """An ETA on ALAG: the posterior has a mode per interval between samples, and from ETA = 0 (ALAG 0.8 h) the
    search of a patient whose lag is 2.8 h (a first level of 0.3 mg/L at 1.5 h, then 3, 6, ... 48 h) stayed at
    ALAG 1.5 h with a slow absorption (ETA_KA -1.44): the evaluation's OFV 74.7 against 34.7 at the lag's mode. It
    was nlmixr2's warfarin run002 evaluated at NONMEM's final estimates (subject 13; OFV 260.01 where NONMEM has
    225.93). The searches from +-2 prior SDs on the lag's ETA find the lag (ETA_ALAG log(2.8/0.8) = 1.25)."""
    import hybridpk as hp
    from hybridpk.population import build_model

    times = pd.Series([1.5, 3.0, 6.0, 9.0, 24.0, 36.0, 48.0])
    rows = []
    for i, lag in enumerate([0.8, 0.6, 1.0, 0.8, 2.8], 1):
        level = _lagged(times, 1.0, 0.13, 8.0, lag)
        if i == 5:
            level.iloc[0] = 0.3
        rows.append(dict(ID=i, TIME=0.0, AMT=100.0, DV=0.0, EVID=1, MDV=1))
        rows += [dict(ID=i, TIME=t, AMT=0.0, DV=round(c, 3), EVID=0, MDV=0) for t, c in zip(times, level)]
    ds = hp.read_nonmem(pd.DataFrame(rows))
    pm = build_model("1cmt_oral", iiv=["KA", "CL", "V", "ALAG"], error="combined",
                     initial={"KA": 1.0, "CL": 0.13, "V": 8.0, "ALAG": 0.8})
    res = fit_population(pm, ds, evaluate=True, covariance=False, omega=[0.6, 0.08, 0.05, 0.39],
                         sigma={"ADD": 0.2, "PROP": 0.08}, progress=False)
    est = res.estimation.individual.set_index("ID")
    assert est.loc[5, "ETA_ALAG"] == pytest.approx(math.log(2.8 / 0.8), abs=0.05)
    prob = res.estimate(ds).problem
    theta, omega, sd = res.theta.tensors(), res.omega.tensor(), res.sigma.sd_tensors()
    oinv = torch.linalg.inv(omega)
    from_zero = prob.ebe(theta, oinv, sd, torch.zeros(ds.n_subjects, 4, dtype=torch.float64), tol=1e-10)
    found = torch.tensor(est[["ETA_KA", "ETA_CL", "ETA_V", "ETA_ALAG"]].to_numpy(), dtype=torch.float64)
    with torch.no_grad():
        worse = prob.objective(theta, oinv, sd, from_zero) - prob.objective(theta, oinv, sd, found)
    assert float(worse[4]) > 10.0 and float(worse.min()) > -1e-6


def test_a_foce_fit_whose_pred_left_the_data_is_warned_about(moxo_at_fit, tmp_path, pharmpy_examples):
    """FOCE without INTERACTION takes the residual variance at PRED. At the estimates a FOCE fit of moxo.mod (its
    data simulated without residual error) reached (typical CL 91 L/h against the stream's 23, proportional SD
    1.3%), PRED is under a tenth of IPRED at 48% of the observations (0.3% at the stream's estimates), so they
    weigh over 100 times what their individual predictions carry, and the fit's OFV went on falling (-2868 at
    the stream's estimates, -8561 there, -10146 eight iterations on from the stream's estimates). An evaluation
    there (on five of its subjects) says so, naming INTERACTION as the remedy; one at the stream's own estimates
    does not."""
    pm, ds = moxo_at_fit
    far = fit_population(pm, ds, progress=False, covariance=False).estimation
    said = [w for w in far.warnings if "without INTERACTION takes the residual variance at PRED" in w]
    assert len(said) == 1 and "METHOD=1 INTERACTION" in said[0] and "ETA_1" in said[0], far.warnings

    text = (pharmpy_examples / "moxo.mod").read_text().replace("moxo.csv", "five.csv")
    (tmp_path / "moxo_own.mod").write_text(text.replace("MAXEVAL=9999", "MAXEVAL=0"))
    pm_own, ds_own = read_control_stream(tmp_path / "moxo_own.mod")
    own = fit_population(pm_own, ds_own, progress=False, covariance=False).estimation
    assert not [w for w in own.warnings if "residual variance at PRED" in w], own.warnings


# the estimates of a FOCE-I fit of moxo.mod with INTERACTION (OFV -11676.88, 18 iterations): the proportional SD
# went to 0.025%, the DV's rounding, as moxo.csv was simulated without residual error
INTERACTION_FIT = [("23.1329", "30.09698"), ("123.604", "115.1948"), ("8.02595", "3.857204"),
                   ("0.237773", "0.2377027"), ("0.0751115", "0.004272677"),
                   ("0.0259926 0.144646", "0.01488512 0.0519273"), ("2.78268", "0.8741868"),
                   ("0.0234871", "0.02168442"), ("0.51776", "0.05172532"), ("0.0764969", "6.1019e-08")]


def test_data_fitted_as_if_measured_without_error_are_named(tmp_path, pharmpy_examples):
    """moxo.csv was simulated without residual error: fitted with INTERACTION, its IPRED are within 1e-5 of DV
    for half the observations and the proportional SD goes to 0.025%. An evaluation at those estimates (on five
    of its subjects) says the data fit as if measured without error; one at the stream's own estimates (SD 28%)
    does not."""
    df = pd.read_csv(pharmpy_examples / "moxo.csv")
    df[df.ID.isin(SUBJECTS)].to_csv(tmp_path / "five.csv", index=False)
    text = (pharmpy_examples / "moxo.mod").read_text().replace("moxo.csv", "five.csv")
    text = text.replace("METHOD=1 MAXEVAL=9999", "METHOD=1 INTERACTION MAXEVAL=0")
    said = {}
    for name, values in (("fit", INTERACTION_FIT), ("own", [])):
        stream = text
        for old, new in values:
            assert old in stream
            stream = stream.replace(old, new)
        (tmp_path / f"{name}.mod").write_text(stream)
        pm, ds = read_control_stream(tmp_path / f"{name}.mod")
        assert pm.recipe["estimation"] == "FOCE-I"
        est = fit_population(pm, ds, progress=False, covariance=False).estimation
        said[name] = [w for w in est.warnings if "as if measured without error" in w]
    assert len(said["fit"]) == 1 and "the DV's rounding" in said["fit"][0], said
    assert said["own"] == []
