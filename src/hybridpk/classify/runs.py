"""The latent classifier of a hybrid run: trained on the run's patients, saved with the run, applied to new
patients.

A run's classifier is trained on its training patients (``individual.csv``: Z1..ZK, Z1_SD..ZK_SD and
COMPLEXITY), labelled by the per-patient likelihood-ratio test (:func:`~.latent.evidence_labels`). It is saved
as ``classifier.json`` (numbers only) and listed in the run's manifest; ``individual.csv`` gains
COMPLEX_EVIDENCE (the test's label), P_COMPLEX (the probability out of fold: each patient scored by a
classifier trained without it, so the training patients' values are honest) and COMPLEX (P_COMPLEX >= 0.5).
New patients are encoded by the hybrid from their own observations and scored by the saved classifier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import HybridPKError
from ..io import atomic_write_text
from ..population.manifest import read_manifest, write_manifest
from .latent import LatentClassifier, complexity_threshold, evidence_labels, latent_features

__all__ = ["RunClassifier", "train_classifier", "save_classifier", "load_classifier", "classify_patients",
           "classify_estimates", "CLASSIFIER_FILE"]

CLASSIFIER_FILE = "classifier.json"


@dataclass(frozen=True)
class RunClassifier:
    """A hybrid run's classifier: ``classifier`` (fitted), ``features`` (their names), the label rule
    (``alpha``, ``threshold`` on COMPLEXITY, ``latent_dim``), ``report`` (cross-validated AUROC, Brier,
    calibration) and ``table`` (the training patients: ID, COMPLEXITY, COMPLEX_EVIDENCE, P_COMPLEX out of
    fold, COMPLEX)."""

    classifier: LatentClassifier
    features: list
    alpha: float
    threshold: float
    latent_dim: int
    report: dict
    table: pd.DataFrame = field(repr=False)

    def to_dict(self) -> dict:
        rep = {k: v for k, v in self.report.items() if k != "out_of_fold"}
        return {"classifier": self.classifier.to_dict(), "features": self.features, "alpha": self.alpha,
                "threshold": self.threshold, "latent_dim": self.latent_dim, "report": rep,
                "labels": "COMPLEX_EVIDENCE = COMPLEXITY > chi-square(latent_dim) quantile 1 - alpha (a "
                          "likelihood-ratio test per patient)"}


def train_classifier(hybrid, alpha: float = 0.05, seed: int = 0, calibration: str = "sigmoid",
                     labels=None) -> RunClassifier:
    """The classifier of a HybridFit's training patients. ``labels``: 0/1 per training patient (ID order of
    ``individual``; e.g. a known flag) in place of the evidence labels."""
    ind = hybrid.individual
    if "COMPLEXITY" not in ind:
        raise HybridPKError("the run's individual table has no COMPLEXITY: classify a hybrid run (--hybrid vae)")
    x, names = latent_features(ind)
    k = int(hybrid.latent_dim)
    y = evidence_labels(ind.COMPLEXITY, k, alpha) if labels is None else np.asarray(labels).astype(int)
    if len(y) != len(ind):
        raise HybridPKError(f"{len(y)} labels for {len(ind)} training patients")
    clf = LatentClassifier(calibration=calibration, random_state=seed).fit(x, y)
    rep = clf.report(x, y)
    p = np.asarray(rep["out_of_fold"]) if rep.get("out_of_fold") is not None else clf.predict_proba(x)[:, 1]
    table = pd.DataFrame({"ID": ind.ID.to_numpy(), "COMPLEXITY": ind.COMPLEXITY.to_numpy(),
                          "COMPLEX_EVIDENCE": evidence_labels(ind.COMPLEXITY, k, alpha), "LABEL": y,
                          "P_COMPLEX": p, "COMPLEX": (p >= 0.5).astype(int)})
    return RunClassifier(clf, names, float(alpha), complexity_threshold(k, alpha), k, rep, table)


def save_classifier(run_dir, rc: RunClassifier) -> Path:
    """classifier.json into the run, the training patients' columns into individual.csv, and the manifest
    rewritten with both (the other files are checked first: a damaged run is refused, not re-signed)."""
    run = Path(run_dir)
    names = list(read_manifest(run))                   # verifies every file before anything is changed
    atomic_write_text(run / CLASSIFIER_FILE, json.dumps(rc.to_dict(), indent=2))
    ind = pd.read_csv(run / "individual.csv")
    extra = rc.table.drop(columns=["COMPLEXITY"]).set_index("ID")
    ind = ind.drop(columns=[c for c in extra.columns if c in ind]).join(extra, on="ID")
    atomic_write_text(run / "individual.csv", ind.to_csv(index=False))
    write_manifest(run, names + [CLASSIFIER_FILE, "individual.csv"])
    return run / CLASSIFIER_FILE


def load_classifier(run_dir) -> RunClassifier | None:
    """The run's saved classifier (checked against the manifest), or None when the run has none."""
    run = Path(run_dir)
    files = read_manifest(run)
    if CLASSIFIER_FILE not in files:
        return None
    try:
        d = json.loads((run / CLASSIFIER_FILE).read_text())
        return RunClassifier(LatentClassifier.from_dict(d["classifier"]), list(d["features"]), float(d["alpha"]),
                             float(d["threshold"]), int(d["latent_dim"]), dict(d["report"]), pd.DataFrame())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HybridPKError(f"{run / CLASSIFIER_FILE} is damaged ({type(exc).__name__}: {exc})") from None


def classify_patients(hybrid, rc: RunClassifier, dataset) -> pd.DataFrame:
    """ID, Z1.., Z1_SD.., P_COMPLEX and COMPLEX of each patient of ``dataset``, encoded by the hybrid from its
    own observations."""
    return classify_estimates(rc, hybrid.estimate(dataset), dataset.ids)


def classify_estimates(rc: RunClassifier, est, ids) -> pd.DataFrame:
    """The same from a hybrid's estimates ``est`` (a HybridEstimate: z and z_sd per patient) of the patients
    ``ids``."""
    k = est.z.shape[1]
    table = pd.DataFrame({"ID": list(ids), **{f"Z{j + 1}": est.z[:, j].cpu().numpy() for j in range(k)},
                          **{f"Z{j + 1}_SD": est.z_sd[:, j].cpu().numpy() for j in range(k)}})
    x, names = latent_features(table)
    if names != rc.features:
        raise HybridPKError(f"the classifier was trained on {', '.join(rc.features)}; this run gives "
                            f"{', '.join(names)}")
    p = rc.classifier.predict_proba(x)[:, 1]
    return table.assign(P_COMPLEX=p, COMPLEX=(p >= 0.5).astype(int))
