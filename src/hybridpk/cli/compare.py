"""hybridpk compare: which of several runs fitted to the same data the data support."""

from __future__ import annotations

from ._common import ManualFormatter, out_file_arg, run_dataset

HELP = """\
Rank candidate runs fitted to the same data (e.g. 1-cmt, 2-cmt, 1-cmt + VAE, a mechanistic EHC model) by how
well they predict patients they were not fitted to.

Printed per run: OFV (NONMEM's), the number of estimated parameters (THETAs, OMEGA elements and residual SDs
not fixed), AIC = OFV + 2p and BIC = OFV + p ln(observations). A hybrid has no OFV of that kind (its
likelihood is conditional on each patient's z, and its network has thousands of weights), so it gets no AIC or
BIC and is compared by cross-validation: the patients are split into --folds groups; each run's model is
fitted again without one group (an ODE model from the run's estimates; a hybrid with its chosen form and
latent dimension), and each held-out patient's levels are predicted from its other levels (alternate samples).
The held-out -2 log-likelihood per observation (lower is better) and the RMSE are printed, and the run with
the lowest -2LL is recommended with the number of folds it won. Cross-validation refits every run --folds
times (a hybrid takes minutes per fold); --folds 0 ranks ODE runs by AIC alone.

DATA must be the dataset the runs were fitted to (runs fitted to other data are refused).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="rank runs fitted to the same data (AIC, BIC, cross-validation)",
                       description=HELP, formatter_class=ManualFormatter,
                       epilog="example:\n  hybridpk compare runs/ehc_1cmt runs/ehc_2cmt runs/ehc_vae --data ehc "
                              "--folds 5 --out compare.csv\n")
    p.add_argument("runs", metavar="RUN", nargs="+", help="run folders written by 'hybridpk fit'")
    p.add_argument("--data", metavar="DATA", help="the dataset the runs were fitted to: a NONMEM-style file, a "
                   "bundled dataset name, or a control stream (.mod: its $DATA); default: the one 'hybridpk fit' "
                   "read for the first RUN (RUN/data.json), refused if it has changed since")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds over patients (0: none; default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and of the refits")
    p.add_argument("--out", metavar="TABLE.csv", type=out_file_arg, help="write the comparison table")
    p.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    import pandas as pd

    from hybridpk.classify import compare_runs
    from hybridpk.errors import HybridPKError
    from hybridpk.io import atomic_write_text
    from hybridpk.residual import load_run

    if args.folds < 0:
        raise HybridPKError(f"--folds {args.folds}: give 0 (no cross-validation) or 2 or more")
    names = [Path(r).name or str(r) for r in args.runs]
    if len(set(names)) != len(names):
        names = [str(r) for r in args.runs]
    runs = {name: load_run(r) for name, r in zip(names, args.runs)}
    ds = run_dataset(args.runs[0], args.data, runs[names[0]])
    result = compare_runs(runs, ds, folds=args.folds, seed=args.seed, progress=print)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(result.table.round(4).to_string(index=False))
    print(f"recommended: {result.reason}" if result.recommended else result.reason)
    if args.out:
        atomic_write_text(args.out, result.table.to_csv(index=False))
        print(f"wrote {args.out}")
    return 0
