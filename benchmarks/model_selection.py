"""Model selection on simulated data of known structure (issue 17's acceptance): does cross-validation pick
the true structure among 1-cmt, 2-cmt and 1-cmt + VAE?

Truths (one oral dose of 100 mg, 8-12 samples per patient over 24 h, 10% proportional + 0.05 mg/L additive
error, 30% IIV on CL and KA, 20% on V): 1-cmt (CL 4, V 40, KA 1.2), 2-cmt (the same plus Q 6, V2 60) and EHC
(simulate_ehc_population: every other patient recirculates). Candidates fitted to the same patients: 1-cmt
and 2-cmt ODE models (FOCE-I) and 1-cmt + VAE (reservoir form); compare_runs with --folds folds. Reported per
truth and seed: the recommended run and whether it is the true structure ("1-cmt + VAE" for EHC).
Acceptance: the true structure picked in at least 4 of 5 seeds for each truth.

Run:  python benchmarks/model_selection.py [--seeds 1 2 3 4 5] [--subjects 120] [--folds 5]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

import hybridpk as hp
from hybridpk.classify import compare_runs
from hybridpk.population import build_model, fit_population
from hybridpk.residual import TrainConfig, fit_hybrid
from hybridpk.solve.examples import simulate_ehc_population

TRUE = {"1cmt": "1-cmt", "2cmt": "2-cmt", "ehc": "1-cmt + VAE"}


def simulate(truth: str, n: int, seed: int):
    if truth == "ehc":
        return simulate_ehc_population(n, seed)[0]
    rng = np.random.default_rng([seed, 11])
    grid = np.round(np.arange(0.25, 24.0, 0.25), 2)
    rows = []
    for i in range(1, n + 1):
        k = int(rng.integers(8, 13))
        times = np.sort(rng.choice(grid, k, replace=False))
        rows.append(dict(ID=i, TIME=0.0, DV=0.0, AMT=100.0, EVID=1, MDV=1, CMT=1))
        rows += [dict(ID=i, TIME=float(t), DV=0.0, AMT=0.0, EVID=0, MDV=0, CMT=2) for t in times]
    design = hp.read_nonmem(pd.DataFrame(rows))
    model = "1cmt_oral" if truth == "1cmt" else "2cmt_oral"
    typical = dict(CL=4.0, V=40.0, KA=1.2, **({} if truth == "1cmt" else {"Q": 6.0, "V2": 60.0}))
    return hp.simulate_population(model, design, typical, dict(CL=0.09, V=0.04, KA=0.09), proportional=0.1,
                                  additive=0.05, seed=seed).dataset


def one(truth: str, seed: int, n: int, folds: int) -> dict:
    t0 = time.perf_counter()
    ds = simulate(truth, n, seed)
    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model in (("1-cmt", "1cmt_oral"), ("2-cmt", "2cmt_oral")):
            runs[name] = fit_population(build_model(model, iiv=["CL", "V", "KA"], error="combined"), ds,
                                        progress=False, covariance=False)
        runs["1-cmt + VAE"] = fit_hybrid(build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined"), ds,
                                         population=runs["1-cmt"], config=TrainConfig(progress=False,
                                                                                      form="reservoir"),
                                         seed=seed, progress=False)
    result = compare_runs(runs, ds, folds=folds, seed=seed)
    return {"truth": truth, "seed": seed, "recommended": result.recommended,
            "correct": result.recommended == TRUE[truth], "reason": result.reason,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--truths", nargs="+", default=["1cmt", "2cmt", "ehc"])
    ap.add_argument("--subjects", type=int, default=120)
    ap.add_argument("--folds", type=int, default=5)
    a = ap.parse_args()
    rows = []
    for seed in a.seeds:
        for truth in a.truths:
            rows.append(one(truth, seed, a.subjects, a.folds))
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    print(df.groupby("truth").correct.agg(["sum", "count"]).rename(columns={"sum": "correct", "count": "seeds"}))


if __name__ == "__main__":
    main()
