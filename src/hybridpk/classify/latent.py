"""A classifier on the hybrid's latent space: which patients need the complex model.

**Labels from each patient's own evidence** (:func:`evidence_labels`). COMPLEXITY is the patient's -2 log-
likelihood under the ODE-only fit minus that under the hybrid (``individual.csv``). The hybrid adds K latent
values per patient (Z1..ZK) to the same ODE model, so for that patient it is the ODE model plus K parameters,
and COMPLEXITY is a likelihood-ratio statistic: under "the ODE suffices" it is approximately chi-square with K
degrees of freedom (Wilks 1938). A patient is labelled COMPLEX when it exceeds the chi-square(K) quantile
1 - ``alpha`` (default 0.05: 5.99 for K = 2), a test at level alpha per patient, so about alpha of the
patients the ODE describes are flagged. An AIC-type cut (COMPLEXITY > 2K) would flag 13.5% of them for K = 2
(P(chi-square(2) > 4)); the test keeps that rate stated and small. Since z has a prior and is fitted with
the ODE's ETAs, the statistic is approximate; the rate on a population the ODE fully describes is measured
in the tests.

**The classifier** (:class:`LatentClassifier`, scikit-learn's estimator interface): a logistic regression on
the standardised features (Z1..ZK, log Z1_SD..log ZK_SD: where the patient sits in the latent space and how
sure the encoder is; optionally covariates), with probabilities calibrated by Platt's sigmoid (or isotonic
regression) cross-validated over patients (scikit-learn's CalibratedClassifierCV: one logistic regression and
one calibrator per fold, their probabilities averaged). The cross-validated AUROC, Brier score and
calibration table are computed with an outer split of the patients (``report``). The fitted classifier is
stored as plain numbers (:meth:`LatentClassifier.to_dict`, JSON) and predicts from them alone, so a saved one
loads without executing code.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin

from ..errors import HybridPKError

__all__ = ["LatentClassifier", "complexity_threshold", "evidence_labels"]

#: format version of :meth:`LatentClassifier.to_dict`
FORMAT = 1


def complexity_threshold(latent_dim: int, alpha: float = 0.05) -> float:
    """The COMPLEXITY (-2LL units) above which a patient is labelled COMPLEX: the chi-square quantile 1 - alpha
    with ``latent_dim`` degrees of freedom (see the module docstring)."""
    from scipy.stats import chi2

    if not 0 < alpha < 1:
        raise HybridPKError(f"alpha = {alpha!r}: the per-patient test level must lie between 0 and 1")
    return float(chi2.ppf(1.0 - alpha, int(latent_dim)))


def evidence_labels(complexity, latent_dim: int, alpha: float = 0.05) -> np.ndarray:
    """COMPLEX (0/1) per patient from its COMPLEXITY (-2LL of ODE-only minus that of the hybrid)."""
    c = np.asarray(complexity, dtype=float)
    if not np.isfinite(c).all():
        raise HybridPKError("COMPLEXITY has missing or infinite values; the patients' -2LL must be finite")
    return (c > complexity_threshold(latent_dim, alpha)).astype(int)


def latent_features(table: pd.DataFrame, covariates=()) -> tuple[np.ndarray, list]:
    """(features (N, F), names): Z1..ZK, log Z1_SD..log ZK_SD and the ``covariates``, from a table such as
    ``individual.csv``."""
    zs = sorted((c for c in table.columns if c.startswith("Z") and c[1:].isdigit()), key=lambda c: int(c[1:]))
    if not zs:
        raise HybridPKError("the table has no latent columns Z1..ZK: classify a hybrid run (fit with --hybrid vae)")
    names = list(zs)
    cols = [table[z].to_numpy(float) for z in zs]
    for z in zs:
        if f"{z}_SD" in table:
            names.append(f"log {z}_SD")
            cols.append(np.log(np.clip(table[f"{z}_SD"].to_numpy(float), 1e-12, None)))
    for c in covariates:
        if c not in table:
            raise HybridPKError(f"covariate {c!r} is not in the table (it has {', '.join(map(str, table.columns))})")
        names.append(c)
        cols.append(table[c].to_numpy(float))
    x = np.column_stack(cols)
    if not np.isfinite(x).all():
        raise HybridPKError("the latent features have missing or infinite values")
    return x, names


class LatentClassifier(ClassifierMixin, BaseEstimator):
    """P(COMPLEX) from a patient's latent posterior (see the module docstring).

    Parameters: ``calibration`` "sigmoid" (Platt) or "isotonic"; ``folds`` of the calibration's and the
    report's cross-validation over patients; ``C`` the inverse L2 penalty of the logistic regression;
    ``random_state`` the seed of the folds. ``fit(X, y)`` takes features (N, F) (:func:`latent_features`)
    and 0/1 labels."""

    def __init__(self, calibration: str = "sigmoid", folds: int = 5, C: float = 1.0, random_state: int = 0):
        self.calibration = calibration
        self.folds = folds
        self.C = C
        self.random_state = random_state

    # ------------------------------------------------------------------ fit
    def fit(self, X, y):
        from sklearn.calibration import CalibratedClassifierCV

        x, y = self._check(X), np.asarray(y).astype(int).ravel()
        if len(y) != len(x):
            raise HybridPKError(f"{len(x)} patients but {len(y)} labels")
        if self.calibration not in ("sigmoid", "isotonic"):
            raise HybridPKError(f"calibration = {self.calibration!r}: use 'sigmoid' (Platt) or 'isotonic'")
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = x.shape[1]
        counts = np.bincount(y, minlength=2)
        self.class_counts_ = counts.tolist()
        folds = min(int(self.folds), int(counts.min()))
        if folds < 2:   # one class (or a single example of one): the observed rate, nothing to learn
            self.constant_ = float((y.sum() + 0.5) / (len(y) + 1.0))   # never exactly 0 or 1
            self.members_ = []
            return self
        self.constant_ = None
        cal = CalibratedClassifierCV(self._base(), method=self.calibration, cv=self._splitter(folds))
        cal.fit(x, y)
        self.members_ = [self._member(c) for c in cal.calibrated_classifiers_]
        self.folds_used_ = folds
        return self

    def _base(self):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(C=float(self.C), max_iter=1000))

    def _splitter(self, folds: int):
        from sklearn.model_selection import StratifiedKFold

        return StratifiedKFold(n_splits=folds, shuffle=True, random_state=int(self.random_state))

    @staticmethod
    def _member(calibrated) -> dict:
        """One fold's scaler, logistic regression and calibrator as plain numbers."""
        pipe = calibrated.estimator
        scaler, lr = pipe[0], pipe[-1]
        (cal,) = calibrated.calibrators
        out = {"mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist(), "coef": lr.coef_[0].tolist(),
               "intercept": float(lr.intercept_[0])}
        if hasattr(cal, "a_"):
            out["sigmoid"] = [float(cal.a_), float(cal.b_)]
        else:
            out["isotonic"] = [cal.X_thresholds_.tolist(), cal.y_thresholds_.tolist()]
        return out

    # ------------------------------------------------------------------ predict
    def predict_proba(self, X) -> np.ndarray:
        """(N, 2): P(not COMPLEX), P(COMPLEX)."""
        x = self._check(X)
        if getattr(self, "constant_", None) is not None:
            p = np.full(len(x), self.constant_)
        else:
            p = np.mean([_member_proba(m, x) for m in self.members_], axis=0)
        return np.column_stack([1.0 - p, p])

    def predict(self, X) -> np.ndarray:
        """COMPLEX (0/1): P(COMPLEX) >= 0.5."""
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(int)

    def _check(self, X) -> np.ndarray:
        x = np.asarray(X, dtype=float)
        if x.ndim != 2 or not np.isfinite(x).all():
            raise HybridPKError("the classifier's features must be a finite (patients x features) table")
        if hasattr(self, "n_features_in_") and x.shape[1] != self.n_features_in_:
            raise HybridPKError(f"the classifier was trained on {self.n_features_in_} features, not {x.shape[1]}")
        return x

    # ------------------------------------------------------------------ report
    def report(self, X, y, bins: int = 5) -> dict:
        """Cross-validated performance over patients (an outer stratified split with ``folds`` folds; each
        fold's classifier trained, calibration included, on the other patients): AUROC, Brier score, the
        calibration table (mean predicted vs observed rate per quantile bin) and the out-of-fold
        probabilities."""
        from sklearn.calibration import calibration_curve
        from sklearn.metrics import brier_score_loss, roc_auc_score

        x, y = self._check(X), np.asarray(y).astype(int).ravel()
        counts = np.bincount(y, minlength=2)
        folds = min(int(self.folds), int(counts.min()))
        if folds < 2:
            return {"auroc": None, "brier": None, "calibration": [], "folds": 0, "class_counts": counts.tolist(),
                    "note": "one class only (or a single patient of one): nothing to discriminate"}
        oof = np.empty(len(y))
        for train, test in self._splitter(folds).split(x, y):
            inner = LatentClassifier(self.calibration, self.folds, self.C, self.random_state).fit(x[train], y[train])
            oof[test] = inner.predict_proba(x[test])[:, 1]
        observed, predicted = calibration_curve(y, oof, n_bins=bins, strategy="quantile")
        return {"auroc": float(roc_auc_score(y, oof)), "brier": float(brier_score_loss(y, oof)),
                "calibration": [{"predicted": float(p), "observed": float(o)} for p, o in zip(predicted, observed)],
                "folds": folds, "class_counts": counts.tolist(), "out_of_fold": oof.tolist()}

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        """The fitted classifier as plain numbers (JSON): its parameters and each fold's member."""
        if not hasattr(self, "classes_"):
            raise HybridPKError("the classifier is not fitted")
        return {"format": FORMAT, "params": self.get_params(), "n_features": int(self.n_features_in_),
                "class_counts": self.class_counts_, "constant": self.constant_, "members": self.members_}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentClassifier":
        """The classifier :meth:`to_dict` wrote (no code is executed: numbers only)."""
        try:
            if d.get("format") != FORMAT:
                raise HybridPKError(f"classifier format {d.get('format')!r}: this hybridpk reads format {FORMAT}")
            self = cls(**{k: d["params"][k] for k in ("calibration", "folds", "C", "random_state")})
            self.classes_ = np.array([0, 1])
            self.n_features_in_ = int(d["n_features"])
            self.class_counts_ = list(d["class_counts"])
            self.constant_ = None if d["constant"] is None else float(d["constant"])
            self.members_ = [_checked_member(m, self.n_features_in_) for m in d["members"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise HybridPKError(f"the saved classifier is damaged ({type(exc).__name__}: {exc})") from None
        if self.constant_ is None and not self.members_:
            raise HybridPKError("the saved classifier is damaged (no members and no constant)")
        return self


def _checked_member(m: dict, n: int) -> dict:
    out = {"mean": [float(v) for v in m["mean"]], "scale": [float(v) for v in m["scale"]],
           "coef": [float(v) for v in m["coef"]], "intercept": float(m["intercept"])}
    if not all(len(out[k]) == n for k in ("mean", "scale", "coef")):
        raise ValueError(f"a member has the wrong number of features (expected {n})")
    if "sigmoid" in m:
        out["sigmoid"] = [float(v) for v in m["sigmoid"]]
    else:
        out["isotonic"] = [[float(v) for v in m["isotonic"][0]], [float(v) for v in m["isotonic"][1]]]
    return out


def _member_proba(m: dict, x: np.ndarray) -> np.ndarray:
    """P(COMPLEX) of one fold's member: the logistic regression's decision value, calibrated (Platt:
    1 / (1 + exp(a f + b)); isotonic: the step function's linear interpolation, clipped at its ends)."""
    f = ((x - np.asarray(m["mean"])) / np.asarray(m["scale"])) @ np.asarray(m["coef"]) + m["intercept"]
    if "sigmoid" in m:
        a, b = m["sigmoid"]
        z = a * f + b
        return np.where(z >= 0, np.exp(-np.clip(z, 0, None)) / (1 + np.exp(-np.clip(z, 0, None))),
                        1 / (1 + np.exp(np.clip(z, None, 0))))
    xs, ys = m["isotonic"]
    return np.interp(f, xs, ys)
