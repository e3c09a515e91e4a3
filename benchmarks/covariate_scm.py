"""Covariate discovery on simulated populations with known truth (issue 17's acceptance): CRCL on CL (power
0.75) and WT on V (power 1) simulated; decoys AGE (random), SEX (random, two levels) and HT (correlated with
WT, r about 0.6). For each seed: the screen (q < 0.05 pairs) and the stepwise search over every (CL, V) x
covariate pair; reported: whether both true relations were kept, whether any decoy was, and the time.
Acceptance: both found and no decoy kept in at least 9 of 10 seeds.

Run:  python benchmarks/covariate_scm.py [--seeds 1 2 ... 10] [--subjects 80]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridpk.classify import patient_covariates, screen_covariates, stepwise_covariates  # noqa: E402
from hybridpk.population import build_model, fit_population  # noqa: E402
from tests.integration.test_covariate_search import _population  # noqa: E402

TRUE = {"CL~CRCL", "V~WT"}


def one(seed: int, n: int) -> dict:
    t0 = time.perf_counter()
    ds = _population(seed, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(build_model("1cmt_iv", iiv=["CL", "V"], error="combined"), ds, progress=False,
                             covariance=False)
    screen = screen_covariates(fit.estimation.individual, patient_covariates(ds), permutations=300, seed=seed)
    found = {f"{r.target.removeprefix('ETA_')}~{r.covariate}" for r in screen.itertuples() if r.q_value < 0.05}
    search = stepwise_covariates(fit, ds, [(p, c) for p in ("CL", "V") for c in ("WT", "CRCL", "AGE", "HT", "SEX")])
    kept = set(search.selected)
    return {"seed": seed, "screen_q<0.05": ", ".join(sorted(found)), "kept": ", ".join(sorted(kept)),
            "both_true_kept": TRUE <= kept, "decoy_kept": bool(kept - TRUE),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 11)))
    ap.add_argument("--subjects", type=int, default=80)
    a = ap.parse_args()
    rows = []
    for s in a.seeds:
        rows.append(one(s, a.subjects))
        print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
    df = pd.DataFrame(rows)
    ok = int((df.both_true_kept & ~df.decoy_kept).sum())
    print(f"both true relations kept and no decoy: {ok} of {len(df)} seeds (acceptance: 9 of 10); "
          f"median {df.seconds.median():.0f} s per seed")


if __name__ == "__main__":
    main()
