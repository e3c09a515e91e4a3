"""Hybrid (linear 2-cmt baseline + VAE correction) on a simulated TMDD population over three dose levels.

Truth: tmdd_qss (2-cmt with quasi-steady-state target binding); IV bolus 0.3, 1 or 10 mg/kg (70 kg: 21, 70,
700 mg); 10 samples per patient over 21 days; 10% proportional + 0.05 mg/L additive error; IIV 30% on CL, V
and KSYN. Baseline: FOCE-I fit of the linear 2cmt_iv model on the training patients (all dose levels).
Held-out patients are scored against their noise-free curves on a dense grid, per dose level.
--ceiling adds MAP with the true structure (tmdd_qss) at the true population values: what any model can
reach from these samples (on seeds 1-2 only 0.64-0.66x the linear baseline at the lowest dose).
--no-hybrid scores only the linear baseline (and --ceiling); --set NAME=VALUE changes a typical value of the
true model, to explore designs: on seed 1 stronger TMDD (KSS 0.01-0.05, KSYN 0.04, KINT 0.1, alone or
together) leaves the lowest-dose ceiling at 0.43-0.55x, and 15 samples instead of 10 at 0.44x.

Run:  python benchmarks/vae_tmdd.py [--train 150] [--test 60] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

# OpenMP threads as the CLI runs them (OMP_WAIT_POLICY unset: spin, then sleep). PASSIVE, which the test
# suite sets for its parallel workers, doubles the cost of a training epoch on 2 cores (0.11 against 0.05 s).
OMP_POLICY = os.environ.get("OMP_WAIT_POLICY", "unset")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import hybridpk as hp  # noqa: E402
from hybridpk.population import FittedPopulation, build_model, fit_population  # noqa: E402
from hybridpk.residual import ODEBaseline, TrainConfig, fit_hybrid  # noqa: E402
from hybridpk.solve import observe  # noqa: E402

TRUE = dict(CL=0.01, V=3.0, Q=0.02, V2=2.5, KSS=0.5, KINT=0.04, KSYN=0.02, KDEG=0.02)
DOSES = (21.0, 70.0, 700.0)
TIMES = np.array([1, 6, 24, 48, 96, 168, 240, 336, 420, 504], dtype=float)
GRID = np.linspace(1.0, 504.0, 120)


def simulate(n, seed):
    rng = np.random.default_rng([seed, 0x7DD])
    rows, truth = [], []
    for i in range(n):
        dose = DOSES[i % 3]
        p = dict(TRUE)
        for k in ("CL", "V", "KSYN"):
            p[k] *= float(np.exp(rng.normal(0, 0.3)))
        t = np.unique(np.round(np.maximum(TIMES * np.exp(rng.normal(0, 0.1, len(TIMES))), 0.5), 3))
        rows.append(dict(ID=i + 1, TIME=0.0, DV=0.0, AMT=dose, EVID=1, MDV=1))
        rows += [dict(ID=i + 1, TIME=float(round(tt, 3)), DV=0.0, AMT=0.0, EVID=0, MDV=0) for tt in t]
        truth.append(dict(ID=i + 1, DOSE=dose, **p))
    par = pd.DataFrame(truth)
    ds, _ = observe("tmdd_qss", hp.read_nonmem(pd.DataFrame(rows)), {k: par[k].to_numpy() for k in TRUE}, rng,
                    proportional=0.1, additive=0.05)
    return ds, par


def map_curves(model, data, batch):
    """IPRED (N, R) on ``batch`` at each patient's MAP ETAs from ``data`` under ``model``."""
    return ODEBaseline(model).ipred(batch, model.estimate(data).eta)


def dense(ds):
    """The patients' dose records plus EVID=2 records on the grid."""
    return ds.prediction_design(GRID, cmt=0)



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=150)
    ap.add_argument("--test", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--learn-sigma", action="store_true",
                    help="learn the residual error SDs in training (TrainConfig.learn_sigma)")
    ap.add_argument("--staged", action="store_true", help="keep the ODE-only ETAs (no joint ETA estimation)")
    ap.add_argument("--form", choices=("auto", "log", "input", "reservoir", "elimination"), default=TrainConfig.form,
                    help="log: IPRED exp(r(t)); input: learnt input rate into the central compartment")
    ap.add_argument("--ceiling", action="store_true",
                    help="also score MAP with the true structure (tmdd_qss) at the true population values")
    ap.add_argument("--no-hybrid", action="store_true", help="score only the linear baseline and --ceiling")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                    help="override typical values of the true TMDD model (design exploration)")
    args = ap.parse_args()
    for item in args.set:
        k, v = item.split("=")
        TRUE[k] = float(v)
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    print(f"seed {args.seed}; hybridpk {hp.__version__}, torch {torch.__version__}; form {args.form}; "
          f"OMP_WAIT_POLICY {OMP_POLICY}")
    train, _ = simulate(args.train, args.seed)
    test, truth = simulate(args.test, args.seed + 100)
    pm = build_model("2cmt_iv", iiv=["CL", "V"], error="combined", initial=dict(CL=0.02, V=3.0, Q=0.02, V2=2.5))
    t0 = time.perf_counter()
    fit = fit_population(pm, train, progress=False, covariance=False)
    weight = None
    if args.no_hybrid:
        bd = dense(test).to_batch()
        base = map_curves(fit, test, bd)
        hyb_pred = alone = base
    else:
        cfg = TrainConfig(joint=not args.staged, form=args.form, learn_sigma=args.learn_sigma)
        hyb = fit_hybrid(pm, train, population=fit, config=cfg, seed=args.seed, progress=False)
        print(f"linear fit + hybrid training {time.perf_counter() - t0:.1f} s ({len(hyb.history)} epochs, "
              f"{'joint ETAs' if cfg.joint else 'staged'})")
        sds = {"ODE-only fit": {r.kind: r.sd for r in fit.sigma.rows},
               "in training": getattr(hyb.vae, "trained_sd", None) or {}, "the hybrid's (ITS)": hyb.sigma or {}}
        print("SIGMA (SD): " + "; ".join(f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(d.items()))
                                         for name, d in sds.items()))
        out = hyb.predict(test, design=dense(test))
        bd, base, hyb_pred, alone, weight = out.batch, out.ode, out.ipred, out.hybrid, out.estimates.weight
    true = hp.simulate("tmdd_qss", {k: torch.tensor(truth[k].to_numpy()) for k in TRUE}, bd).ipred
    on = bd.evid == 2
    ceiling = None
    if args.ceiling:
        tpm = build_model("tmdd_qss", iiv=["CL", "V", "KSYN"], error="combined")
        truth_model = FittedPopulation.from_values(tpm, TRUE, dict(CL=0.09, V=0.09, KSYN=0.09),
                                                   {"ADD": 0.05, "PROP": 0.10})
        ceiling = map_curves(truth_model, test, bd)
    for dose in DOSES:
        sel = torch.tensor(truth.DOSE.to_numpy() == dose)
        def rmse(pred):
            err = ((pred - true) ** 2 * on).sum(1) / on.sum(1)
            return float(torch.sqrt(err[sel].mean()))
        a, b, c = rmse(base), rmse(hyb_pred), rmse(alone)
        w = float(weight[sel].mean()) if weight is not None else float("nan")
        extra = f"; true-structure MAP {rmse(ceiling) / a:.3f}" if ceiling is not None else ""
        print(f"dose {dose:6.0f} mg: RMSE linear baseline {a:.4f}, hybrid {b:.4f}, ratio {b / a:.3f} "
              f"(hybrid alone {c / a:.3f}, mean weight {w:.2f}){extra}")


if __name__ == "__main__":
    main()
