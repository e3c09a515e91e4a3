"""What a default hybrid fit costs, phase by phase: 200 patients x about 10 samples (the EHC example), the
options of ``hybridpk fit DATA --model 1cmt_oral --hybrid vae`` (proportional error, form auto).

Phases: population fit (FOCE-I, with the sandwich covariance), the ODE-only per-patient MAP the training
starts from, the training of each candidate form (screening, then the winner to the end), the hybrid's OMEGA
and SIGMA (iterative two-stage steps), and the per-patient refinement of the training patients' (z, ETAs). Budgets (issue 14, point 5): one form under
2 minutes, the whole default fit (form selection) under 6 minutes, on 2 cores. Also printed: each phase
relative to the FOCE-I fit of the same run, the machine-independent part of the comparison.

Run:  python benchmarks/hybrid_cost.py [--n 200] [--seed 1] [--form auto]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

# OpenMP threads as the CLI runs them (OMP_WAIT_POLICY unset: spin, then sleep). PASSIVE, which the test
# suite sets for its parallel workers, doubles the cost of a training epoch on 2 cores (0.11 against 0.05 s).
OMP_POLICY = os.environ.get("OMP_WAIT_POLICY", "unset")

import torch  # noqa: E402

import hybridpk.residual.hybrid as hybrid_module  # noqa: E402
from hybridpk.population import build_model, fit_population  # noqa: E402
from hybridpk.residual import TrainConfig, fit_hybrid  # noqa: E402
from hybridpk.solve.examples import simulate_ehc_population  # noqa: E402


def timed(phases: dict, name: str, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--form", default="auto")
    ap.add_argument("--error", default="combined", help="residual error model (the CLI's default: combined)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    ds, _ = simulate_ehc_population(args.n, seed=args.seed)
    pm = build_model("1cmt_oral", error=args.error)
    phases: dict = {}
    t_all = time.perf_counter()
    fit = timed(phases, "population fit (FOCE-I + covariance)", fit_population)(pm, ds, progress=False)
    hybrid_module._ode_only = timed(phases, "ODE-only per-patient MAP", hybrid_module._ode_only)
    hybrid_module._per_patient = timed(phases, "refinement of (z, ETAs)", hybrid_module._per_patient)
    hybrid_module.its_omega = timed(phases, "hybrid OMEGA and SIGMA (ITS)", hybrid_module.its_omega)
    hyb = fit_hybrid(pm, ds, population=fit, seed=args.seed, progress=False, config=TrainConfig(form=args.form))
    total = time.perf_counter() - t_all
    n_obs = int(ds.to_batch().is_obs.sum())
    print(f"{args.n} patients, {n_obs} observations ({n_obs / args.n:.1f} per patient), form {args.form}, "
          f"{args.error} error; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY {OMP_POLICY}")
    base = phases["population fit (FOCE-I + covariance)"]
    for name, sec in phases.items():
        print(f"  {name:<40} {sec:7.1f} s  ({sec / base:5.2f}x the FOCE-I fit)")
    for c in hyb.candidates or []:
        what = f"screened {c.screen_epochs} epochs" + (f", then to {c.epochs}" if c.chosen else "")
        what_score = "predictive -2LL per held-out observation" if c.criterion == "predictive" else "held-out -ELBO"
        score = f"{what_score} {c.screen_score:.4f}" + (f" -> {c.score:.4f}" if c.chosen else "")
        print(f"  training {c.form:<12} K={c.latent_dim} {c.seconds:7.1f} s  ({what}; {score})")
    if not hyb.candidates:
        print(f"  training {hyb.vae.form_name:<12}        ({len(hyb.history)} epochs)")
    train = total - sum(phases.values())
    print(f"  {'training, all candidates':<40} {train:7.1f} s  ({train / base:5.2f}x the FOCE-I fit)")
    budget = 360.0 if args.form == "auto" else 120.0
    print(f"total {total:.1f} s: {total / budget:.2f}x the budget of {budget:.0f} s; chosen form "
          f"{hyb.vae.form_name}, {len(hyb.history)} epochs")


if __name__ == "__main__":
    main()
