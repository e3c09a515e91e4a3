"""A day's list: the same question for every patient of a file, one answer (or one refusal) per ID.

The patients' MAP estimates of a population model are found in one batched Newton search (the EBE code of
the fit, per-patient steps and line searches, so each estimate is the one the patient alone gets); the
posterior draws, safety checks and the question itself are per patient. A patient whose data or answer is
refused (HybridPKError) gets its message in ``error``; the others are answered as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HybridPKError
from . import safety
from .model import PopulationDosing, dosing_model
from .recommend import estimate_patient

__all__ = ["PatientAnswer", "estimate_patients", "for_each_patient"]


@dataclass(frozen=True)
class PatientAnswer:
    """One patient's answer: ``id``, ``result`` (what the question returns) or ``error`` (the refusal)."""

    id: object
    result: object = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def estimate_patients(model, dataset, n_samples: int | None = None, seed: int = 0) -> dict:
    """{ID: PatientPosterior, or the HybridPKError that refused the patient} for every patient of
    ``dataset``; the population model's MAP estimates in one batched call."""
    model = dosing_model(model)
    out, valid = {}, []
    filled, _ = safety.with_covariate_defaults(model, dataset)
    frame = filled.to_dataframe()
    for pid, records in frame.groupby("ID", sort=False):
        try:
            safety.check_patient(model, records)
            valid.append(pid)
        except HybridPKError as e:
            out[pid] = e
    estimates = _batched_map(model, filled, valid)
    for pid in valid:
        try:
            out[pid] = estimate_patient(model, dataset.subset([pid]), n_samples, seed, estimate=estimates.get(pid))
        except HybridPKError as e:
            out[pid] = e
    return {pid: out[pid] for pid in dataset.ids}


def _batched_map(model, dataset, ids) -> dict:
    """{ID: PatientEstimate} from one batched MAP (population models); {} when it cannot be batched (a
    hybrid, or a refusal that each patient's own call will name)."""
    if not isinstance(model, PopulationDosing) or len(ids) < 2:
        return {}
    try:
        est = model.fitted.estimate(dataset.subset(ids))
    except HybridPKError:
        return {}
    return {pid: model.from_estimate(est.patient(i)) for i, pid in enumerate(est.dataset.ids)}


def for_each_patient(question, model, dataset, *, n_samples: int | None = None, seed: int = 0,
                     **arguments) -> list:
    """[PatientAnswer] of ``question(model, patient_dataset, posterior=..., **arguments)`` (e.g.
    :func:`recommend_dose`, :func:`interval_for_dose`, :func:`time_to_concentration`, :func:`auc`,
    :func:`loading_dose`) for every patient of ``dataset``, in the file's order."""
    model = dosing_model(model)
    answers = []
    for pid, post in estimate_patients(model, dataset, n_samples, seed).items():
        if isinstance(post, HybridPKError):
            answers.append(PatientAnswer(pid, error=str(post)))
            continue
        try:
            answers.append(PatientAnswer(pid, result=question(model, dataset.subset([pid]), posterior=post,
                                                              **arguments)))
        except HybridPKError as e:
            answers.append(PatientAnswer(pid, error=str(e)))
    return answers
