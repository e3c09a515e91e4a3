"""The latent classifier on held-out patients (issue 17's acceptance): which patients need the complex model.

EHC population (simulate_ehc_population: every other patient recirculates): 1-cmt oral FOCE-I fit of 200
training patients, the hybrid (--form, default reservoir), the classifier trained on the training patients'
evidence labels (the per-patient likelihood-ratio test; the true recirculation flag is never used), then 100
new patients (another seed stream) encoded from their own levels and scored: AUROC of P_COMPLEX for the true
flag, the fraction with 0.25 < P_COMPLEX < 0.75, and the cross-validated training AUROC for the evidence
labels. ODE population (--population ode: the same design and IIV without recirculation): the fraction of
training (out of fold) and new patients flagged COMPLEX (acceptance: under 10%).

Run:  python benchmarks/classify_ehc.py [--seeds 1 2 3] [--population ehc|ode|both] [--form reservoir]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

from hybridpk.classify import classify_patients, train_classifier
from hybridpk.population import build_model, fit_population
from hybridpk.residual import TrainConfig, fit_hybrid
from hybridpk.solve.examples import simulate_ehc_population


def ode_population(n: int, seed: int):
    """The EHC design and IIV, no recirculation: the ODE (1-cmt oral) describes every patient."""
    from hybridpk.data.dataset import read_nonmem

    ds, truth = simulate_ehc_population(n, seed)
    df = ds.to_dataframe()
    rng = np.random.default_rng([seed, 7])
    t = truth.set_index("ID")
    obs = df.EVID == 0
    ka, cl, v = (t.loc[df.ID[obs], k].to_numpy() for k in ("KA", "CL", "V"))
    time_ = df.TIME[obs].to_numpy()
    k = cl / v
    c = 100.0 * ka / (v * (ka - k)) * (np.exp(-k * time_) - np.exp(-ka * time_))
    df.loc[obs, "DV"] = c * (1 + 0.10 * rng.standard_normal(c.size)) + 0.05 * rng.standard_normal(c.size)
    return read_nonmem(df), truth.assign(RECIRC=0)


def one(population: str, seed: int, form: str) -> dict:
    from sklearn.metrics import roc_auc_score

    make = simulate_ehc_population if population == "ehc" else ode_population
    train, _ = make(200, seed)
    test, truth = make(100, seed + 1000)
    t0 = time.perf_counter()
    pm = build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pm, train, progress=False, covariance=False)
    hyb = fit_hybrid(pm, train, population=fit, config=TrainConfig(progress=False, form=form), seed=seed,
                     progress=False)
    rc = train_classifier(hyb, seed=seed)
    flags = classify_patients(hyb, rc, test).merge(truth[["ID", "RECIRC"]], on="ID")
    out = {"population": population, "seed": seed, "form": hyb.vae.form_name,
           "train_complex_evidence": float(rc.table.COMPLEX_EVIDENCE.mean()),
           "train_flagged_oof": float(rc.table.COMPLEX.mean()), "cv_auroc_evidence": rc.report.get("auroc"),
           "new_flagged": float(flags.COMPLEX.mean()),
           "new_uncertain": float(((flags.P_COMPLEX > 0.25) & (flags.P_COMPLEX < 0.75)).mean()),
           "seconds": round(time.perf_counter() - t0, 1)}
    if population == "ehc":
        out["new_auroc_true_flag"] = float(roc_auc_score(flags.RECIRC, flags.P_COMPLEX))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--population", choices=["ehc", "ode", "both"], default="both")
    ap.add_argument("--form", default="reservoir")
    a = ap.parse_args()
    pops = ["ehc", "ode"] if a.population == "both" else [a.population]
    rows = []
    for seed in a.seeds:
        for pop in pops:
            rows.append(one(pop, seed, a.form))
            print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False), flush=True)
    print(pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
