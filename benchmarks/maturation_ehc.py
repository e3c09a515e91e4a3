"""A non-linear covariate relation found through the hybrid (issue 17's acceptance): CL matures with age as a
sigmoid, AGE^HILL / (TM50^HILL + AGE^HILL) (TM50 1 year, HILL 3; ages log-uniform over 0.05-12 years), on top of
an enterohepatic-recirculation population (simulate_ehc_population: every other patient recirculates). A decoy
covariate (WT-like, random) rides along.

Steps, as a user runs them: 1-cmt oral FOCE-I fit (no covariates), the hybrid on it (reservoir form; its
latent z takes up the recirculation), the covariate screen of every ETA and Z against AGE and the decoy
(Spearman, mutual information, permutation p, BH q), the shape of the strongest relation (ETA_CL against AGE,
running median: PNG), then the stepwise search on the mechanistic model with the power and the maturation
forms of CL~AGE. Reported per seed: q of AGE on ETA_CL, whether the decoy passes q < 0.05, the selected
relation, and the OFV of the power and maturation models (first forward step), TM50 and HILL.
Acceptance: AGE found, the maturation form kept, beating the power form by dOFV > 10.

Run:  python benchmarks/maturation_ehc.py [--seeds 1 2 3] [--n 160] [--out maturation]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd


def one(seed: int, n: int = 160, out: str | None = None) -> dict:
    from hybridpk.classify import patient_covariates, screen_covariates, stepwise_covariates
    from hybridpk.diagnostics import covariate_relations_figure
    from hybridpk.population import build_model, fit_population
    from hybridpk.residual import TrainConfig, fit_hybrid
    from hybridpk.solve.examples import simulate_ehc_population

    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 17])
    age = np.exp(rng.uniform(np.log(0.05), np.log(12.0), n))
    decoy = rng.normal(20.0, 8.0, n).clip(2.0, 60.0)
    ds, _ = simulate_ehc_population(n, seed, covariates={"AGE": age, "BW": decoy},
                                    cl_scale=age ** 3 / (1.0 + age ** 3))
    pm = build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pm, ds, progress=False, covariance=False)
        hyb = fit_hybrid(pm, ds, population=fit, config=TrainConfig(form="reservoir", progress=False), seed=seed,
                         progress=False)
        covs = patient_covariates(ds, ["AGE", "BW"])
        screen = screen_covariates(hyb.individual, covs, permutations=1000, seed=seed)
        if out:
            covariate_relations_figure(screen, hyb.individual.merge(covs, on="ID")).savefig(
                f"{out}_seed{seed}.png", dpi=90)
        search = stepwise_covariates(fit, ds, [("CL", "AGE"), ("CL", "BW")], forms=("power", "maturation"))
    first = search.steps[(search.steps.phase == "forward") & (search.steps.step == 1)]
    age_rows = first[first.relation.str.startswith("CL~AGE")].set_index("form")
    row = screen[(screen.covariate == "AGE") & (screen.target == "ETA_CL")].iloc[0]
    theta = search.final.theta
    names = [r.name for r in theta.rows]
    return {"seed": seed, "age_q_eta_cl": float(row.q_value), "age_rho": round(float(row.spearman_rho), 3),
            "decoy_found": bool(((screen.covariate == "BW") & (screen.q_value < 0.05)).any()),
            "selected": ", ".join(search.selected),
            "ofv_power": float(age_rows.loc["power", "OFV"]),
            "ofv_maturation": float(age_rows.loc["maturation", "OFV"]),
            "tm50": float(theta["CL_AGE_TM50"].value) if "CL_AGE_TM50" in names else float("nan"),
            "hill": float(theta["CL_AGE_HILL"].value) if "CL_AGE_HILL" in names else float("nan"),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--n", type=int, default=160)
    ap.add_argument("--out", default="maturation", help="prefix of the shape figures (PNG per seed)")
    a = ap.parse_args()
    rows = []
    for seed in a.seeds:
        rows.append(one(seed, a.n, a.out))
        rows[-1]["dofv_power_minus_maturation"] = rows[-1]["ofv_power"] - rows[-1]["ofv_maturation"]
        print(rows[-1], flush=True)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
