"""The hybrid's training curves: the -ELBO per patient of the training and held-out patients over the epochs,
and, when the correction form was selected, every candidate's held-out curve during its screening.

The -ELBO (residual-error -log-likelihood + beta KL + the correction penalty + the ETAs' OMEGA prior term,
per patient; :func:`hybridpk.residual.objective.neg_elbo`) is comparable between epochs only after the
warm-up of beta (its KL weight grows from 0 over the first ``warmup`` epochs), which the figure shades. The
held-out curve is what early stopping watches; the epoch training kept (its best held-out value after the
warm-up) is marked.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["training_figure"]


def training_figure(curves: pd.DataFrame, warmup: int = 0):
    """Training curves from :meth:`hybridpk.HybridFit.training_curves` (FORM, LATENT_DIM, EPOCH,
    TRAIN_NEG_ELBO, VAL_NEG_ELBO, CHOSEN): the chosen model's training and held-out -ELBO per epoch (left),
    and with several candidates each one's held-out -ELBO (right). ``warmup``: the epochs of beta's warm-up
    (shaded)."""
    from matplotlib.figure import Figure

    groups = list(curves.groupby(["FORM", "LATENT_DIM"], sort=False))
    fig = Figure(figsize=(10 if len(groups) > 1 else 5.5, 4))
    axes = fig.subplots(1, 2 if len(groups) > 1 else 1, squeeze=False)[0]
    chosen = curves[curves.CHOSEN == 1]
    ax = axes[0]
    ax.plot(chosen.EPOCH, chosen.TRAIN_NEG_ELBO, lw=1, label="training patients")
    ax.plot(chosen.EPOCH, chosen.VAL_NEG_ELBO, lw=1, label="held-out patients")
    after = chosen[chosen.EPOCH >= warmup]
    if len(after) and np.isfinite(after.VAL_NEG_ELBO).any():
        best = after.loc[after.VAL_NEG_ELBO.idxmin()]
        ax.plot([best.EPOCH], [best.VAL_NEG_ELBO], "k*", ms=10, label=f"kept (epoch {int(best.EPOCH) + 1})")
    form = f"{chosen.FORM.iloc[0]}, K={int(chosen.LATENT_DIM.iloc[0])}" if len(chosen) else ""
    ax.set_title(f"training of the chosen model ({form})", fontsize=10)
    for a in axes:
        if warmup:
            a.axvspan(0, warmup, color="grey", alpha=0.15, label="warm-up of beta")
        a.set_xlabel("epoch")
        a.set_ylabel("-ELBO per patient")
        _clip_to_after_warmup(a, curves, warmup)
    if len(groups) > 1:
        for (form, k), g in groups:
            axes[1].plot(g.EPOCH, g.VAL_NEG_ELBO, lw=1.5 if g.CHOSEN.iloc[0] else 0.8,
                         label=f"{form}, K={k}" + (" (chosen)" if g.CHOSEN.iloc[0] else ""))
        axes[1].set_title("held-out -ELBO of each candidate", fontsize=10)
        axes[1].legend(fontsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _clip_to_after_warmup(ax, curves: pd.DataFrame, warmup: int) -> None:
    """y limits from the values after the warm-up (the first epochs' -ELBO is far above and would flatten the
    rest)."""
    after = curves[curves.EPOCH >= warmup][["TRAIN_NEG_ELBO", "VAL_NEG_ELBO"]].to_numpy(float)
    after = after[np.isfinite(after)]
    if after.size:
        lo, hi = np.quantile(after, [0.0, 0.98])
        pad = 0.05 * max(hi - lo, 1e-9)
        ax.set_ylim(lo - pad, hi + pad)
