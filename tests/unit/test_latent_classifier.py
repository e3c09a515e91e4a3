"""The latent classifier: evidence labels, scikit-learn equivalence of the stored numbers, calibration,
cross-validated report, persistence without code."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2

from hybridpk.classify import LatentClassifier, complexity_threshold, evidence_labels
from hybridpk.classify.latent import latent_features
from hybridpk.errors import HybridPKError


def _latent_table(n=300, seed=0, shift=2.5):
    """Patients in a 2-D latent space: the complex ones shifted along Z1 and better determined (smaller SD)."""
    rng = np.random.default_rng(seed)
    y = rng.uniform(size=n) < 0.5
    z = rng.normal(size=(n, 2)) + np.where(y[:, None], [shift, 0.0], [0.0, 0.0])
    sd = np.exp(rng.normal(-1.0, 0.2, size=(n, 2)) - 0.3 * y[:, None])
    table = pd.DataFrame({"ID": np.arange(1, n + 1), "Z1": z[:, 0], "Z2": z[:, 1], "Z1_SD": sd[:, 0],
                          "Z2_SD": sd[:, 1], "WT": rng.normal(70, 10, n)})
    return table, y.astype(int)


def test_the_label_threshold_is_the_likelihood_ratio_test():
    assert complexity_threshold(2) == pytest.approx(chi2.ppf(0.95, 2)) == pytest.approx(5.991, abs=1e-3)
    assert complexity_threshold(1, alpha=0.01) == pytest.approx(6.635, abs=1e-3)
    labels = evidence_labels([0.0, -3.0, 5.9, 6.0, 40.0], latent_dim=2)
    assert labels.tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(HybridPKError, match="finite"):
        evidence_labels([1.0, np.nan], 2)
    # under 'the ODE suffices' (COMPLEXITY ~ chi-square(K)) about alpha of the patients are flagged
    rng = np.random.default_rng(1)
    assert evidence_labels(rng.chisquare(2, 20000), 2).mean() == pytest.approx(0.05, abs=0.005)


@pytest.mark.parametrize("calibration", ["sigmoid", "isotonic"])
def test_the_stored_numbers_predict_as_scikit_learn_does(calibration):
    """The classifier keeps only numbers; its probabilities equal scikit-learn's CalibratedClassifierCV
    (same pipeline and folds) to 1e-12, before and after a JSON round trip."""
    from sklearn.calibration import CalibratedClassifierCV

    table, y = _latent_table()
    x, names = latent_features(table)
    assert names == ["Z1", "Z2", "log Z1_SD", "log Z2_SD"]
    clf = LatentClassifier(calibration=calibration, random_state=3).fit(x, y)
    ref = CalibratedClassifierCV(clf._base(), method=calibration, cv=clf._splitter(5)).fit(x, y)
    assert clf.predict_proba(x) == pytest.approx(ref.predict_proba(x), abs=1e-12)
    loaded = LatentClassifier.from_dict(json.loads(json.dumps(clf.to_dict())))
    assert loaded.predict_proba(x) == pytest.approx(clf.predict_proba(x), abs=1e-15)
    assert loaded.get_params() == clf.get_params()
    assert (clf.predict(x) == (clf.predict_proba(x)[:, 1] >= 0.5)).all()


def test_the_cross_validated_report_and_calibration():
    table, y = _latent_table(n=600, seed=2)
    x, _ = latent_features(table, covariates=["WT"])
    rep = LatentClassifier().report(x, y)
    assert rep["auroc"] > 0.9 and rep["folds"] == 5 and len(rep["out_of_fold"]) == 600
    for row in rep["calibration"]:              # calibrated: each bin's observed rate near its prediction
        assert row["observed"] == pytest.approx(row["predicted"], abs=0.12)
    noise = LatentClassifier().report(np.random.default_rng(0).normal(size=(400, 4)), y[:400])
    assert 0.4 < noise["auroc"] < 0.6            # nothing to learn: chance


def test_degenerate_labels_and_damaged_files():
    table, _ = _latent_table(n=40)
    x, _ = latent_features(table)
    only = LatentClassifier().fit(x, np.zeros(40))
    assert only.predict_proba(x)[:, 1] == pytest.approx(np.full(40, 0.5 / 41))
    assert LatentClassifier().report(x, np.zeros(40))["auroc"] is None
    d = LatentClassifier().fit(x, np.arange(40) % 2).to_dict()
    d["members"][0]["coef"] = d["members"][0]["coef"][:2]
    with pytest.raises(HybridPKError, match="damaged"):
        LatentClassifier.from_dict(d)
    with pytest.raises(HybridPKError, match="format"):
        LatentClassifier.from_dict({**d, "format": 99})
    with pytest.raises(HybridPKError, match="latent columns"):
        latent_features(table.drop(columns=["Z1", "Z2"]))
    with pytest.raises(HybridPKError, match="trained on 4 features"):
        LatentClassifier().fit(x, np.arange(40) % 2).predict(x[:, :3])


def test_scikit_learn_conventions():
    from sklearn.base import clone

    clf = LatentClassifier(C=0.5, folds=3)
    assert clone(clf).get_params() == {"C": 0.5, "calibration": "sigmoid", "folds": 3, "random_state": 0}
    table, y = _latent_table(n=100)
    x, _ = latent_features(table)
    a = LatentClassifier(random_state=7).fit(x, y).predict_proba(x)
    b = LatentClassifier(random_state=7).fit(x, y).predict_proba(x)
    assert np.array_equal(a, b)                  # same seed, same result
