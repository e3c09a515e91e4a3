"""Choosing the hybrid's correction form and latent dimension by held-out evidence.

Every candidate is trained on the same training patients and scored on the same held-out ones (the split
is drawn from the seed, not from the candidate). The score given to :func:`select` is, from :func:`fit_hybrid`,
the predictive score (:mod:`.predictive`: each held-out patient's levels predicted from its other levels,
-2 log-likelihood per observation); without one, the held-out -ELBO per patient that training keeps (the
residual-error -log-likelihood at the encoder's z, plus beta KL and the ETAs' OMEGA prior term). With
``screen_epochs`` every candidate is trained that many epochs, and only the best continues to the end; it
continues from its own training state (the checkpoint), so that its result is the one it would have had if
it had been trained alone. This is successive halving cut to one round (Jamieson and Talwalkar 2016).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields

from .forms import candidate_forms

__all__ = ["Candidate", "candidates", "select"]


@dataclass
class Candidate:
    """One (form, latent dimension) tried: its score after ``screen_epochs`` (``screen_score``; None without
    screening) and at the end of its training (``score``; None when it was not continued), what the score is
    (``criterion``: "predictive" or "elbo"), the epochs it ran and the seconds it took. An ELBO score is the best
    held-out -ELBO per patient after the warm-up of beta (with fewer epochs than the warm-up, the last epoch's);
    a predictive score is that of the model training kept (its best held-out -ELBO state). ``history``: its
    training curve, (epoch, train -ELBO, validation -ELBO) per epoch (kept beside the run as training.csv, not in
    ``to_dict``)."""

    form: str
    latent_dim: int
    screen_epochs: int = 0
    screen_score: float | None = None
    score: float | None = None
    epochs: int = 0
    seconds: float = 0.0
    chosen: bool = False
    criterion: str = "elbo"
    history: list = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "history"}

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def candidates(form: str, latent_dim, default_dim: int, joint: bool, linear: bool) -> list:
    """The (form, K) pairs to try: ``form`` "auto" -> the forms that suit the structure
    (:func:`candidate_forms`), ``latent_dim`` "auto" -> 1, 2 and 4, None -> ``default_dim``."""
    forms = candidate_forms(joint, linear) if form == "auto" else (form,)
    dims = [1, 2, 4] if latent_dim == "auto" else [int(default_dim if latent_dim is None else latent_dim)]
    return [Candidate(f, k) for f in forms for k in dims]


def select(cands: list, train, epochs: int, screen_epochs: int, warmup: int = 0, score=None, null=None):
    """Train the candidates with ``train(candidate, epochs) -> (model, history)`` and return (model,
    history, candidate) of the best, with every candidate's record filled in ``cands``. ``train`` must resume
    a candidate's training when called again for it with more epochs. ``warmup``: epochs before the held-out
    -ELBO counts (the training's warm-up of beta). ``score(candidate, model) -> float`` (lower is better): the
    criterion, e.g. :func:`hybridpk.residual.predictive.predictive_score`; None: the held-out -ELBO.

    ``null(latent_dim) -> model``: the hybrid without a correction (the "none" form, nothing to train). With a
    ``score``, the best trained candidate at the end of its training must score better than the null model;
    otherwise the null model is chosen (ties too: the simpler model). It joins ``cands`` as form "none"."""
    screen = len(cands) > 1 and 0 < screen_epochs < epochs

    def judge(c, model, hist, upto):
        c.criterion = "predictive" if score is not None else "elbo"
        return float(score(c, model)) if score is not None else _best(hist, upto, warmup)

    results = {}
    for c in cands:
        t0 = time.perf_counter()
        model, hist = train(c, screen_epochs if screen else epochs)
        if screen:
            # from the history: a resumed run whose winner had trained on already reports its screening score
            c.epochs = c.screen_epochs = min(len(hist), screen_epochs)
            c.screen_score = judge(c, model, hist, screen_epochs)
        else:
            c.epochs, c.score = len(hist), judge(c, model, hist, len(hist))
        c.seconds = time.perf_counter() - t0
        c.history = list(hist)
        results[id(c)] = (model, hist)
    if screen:
        best = min(cands, key=_rank(lambda c: c.screen_score))
        t0 = time.perf_counter()
        model, hist = train(best, epochs)
        best.epochs, best.score = len(hist), judge(best, model, hist, len(hist))
        best.seconds += time.perf_counter() - t0
        best.history = list(hist)
        results[id(best)] = (model, hist)
    else:
        best = min(cands, key=_rank(lambda c: c.score))
    if null is not None and score is not None:
        t0 = time.perf_counter()
        none = Candidate("none", best.latent_dim, screen_epochs=0, criterion="predictive")
        model0 = null(best.latent_dim)
        none.score = float(score(none, model0))
        none.screen_score = none.score if screen else None
        none.seconds = time.perf_counter() - t0
        cands.append(none)
        results[id(none)] = (model0, [])
        if not (best.score is not None and best.score == best.score and best.score < none.score):
            best = none
    best.chosen = True
    model, hist = results[id(best)]
    return model, hist, best


def _best(history, epochs: int, warmup: int) -> float:
    """The best finite held-out -ELBO of the first ``epochs`` epochs after ``warmup`` (the last finite one
    when training was shorter than the warm-up; NaN when there is none): the score training keeps."""
    finite = [(e, v) for e, _, v in history if e < epochs and math.isfinite(v)]
    after = [v for e, v in finite if e >= warmup]
    if after:
        return float(min(after))
    return float(finite[-1][1]) if finite else float("nan")


def _rank(score):
    """Sort key: the score, a NaN or missing score last, ties to the earlier candidate (min keeps the first)."""
    def key(c):
        s = score(c)
        return (0, s) if s is not None and s == s else (1, 0.0)
    return key
