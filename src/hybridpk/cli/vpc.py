"""hybridpk vpc: visual predictive check of a run."""

from __future__ import annotations

from ._common import DV_HELP, RUN_DATA_HELP, ManualFormatter, figure_arg, model_dataset, positive_int, run_dataset

HELP = """\
Simulate the study design N times from the fitted model (new ETAs from OMEGA; for a hybrid also z from its
latent prior; residual error), bin the observations by time, and compare the observed 5th, 50th and 95th
percentiles of each bin with the simulated percentiles' 90% intervals (shaded). Observed lines leaving their
bands in adjacent bins point to model misspecification. --pc corrects every observed and simulated value
by its record's population prediction (Bergstrand et al. 2011): use it when doses or covariates differ
within a bin. --idv TAD bins by the time after the most recent dose instead of the time since the start
(PsN vpc's -idv=TAD): for TDM records over days or weeks, where doses and samples fall at irregular times,
bins of TIME mix peaks and troughs. TAD is the data's TAD column when it has one, else computed from the dose
records; observations without one (before any dose) are left out, and the count is printed.
Writes the figure and, beside it, the numbers as CSV (same name, .csv).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("vpc", help="visual predictive check (VPC / pcVPC)", description=HELP,
                       formatter_class=ManualFormatter,
                       epilog="example:\n  hybridpk vpc runs/theoph --data theoph --n 500 --pc --out vpc.png\n")
    p.add_argument("run", metavar="RUN", help="run folder written by 'hybridpk fit'")
    p.add_argument("--data", metavar="DATA", help="the dataset (its design and observations); " + RUN_DATA_HELP)
    p.add_argument("--dv", choices=["log", "conc"], help="with --data: " + DV_HELP)
    p.add_argument("--n", type=positive_int, default=500, help="replicates (default 500)")
    p.add_argument("--bins", type=positive_int, default=8,
                   help="bins (of TIME, or TAD with --idv TAD) with equal numbers of observations")
    p.add_argument("--pc", action="store_true", help="prediction-corrected VPC")
    p.add_argument("--idv", choices=("TIME", "TAD"), default="TIME",
                   help="bin and draw by TIME (default) or by TAD, the time after the most recent dose (ADDL doses "
                        "included; a dose at a sample's time counts when its record comes first)")
    p.add_argument("--stratify", metavar="COL", help="one panel per value of this column")
    p.add_argument("--log", action="store_true", help="log concentration axis")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulations")
    p.add_argument("--out", required=True, metavar="VPC.png", type=figure_arg, help="the figure")
    p.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    from hybridpk.diagnostics import axis_units, plot_vpc, vpc
    from hybridpk.errors import HybridPKError
    from hybridpk.io import atomic_write_text
    from hybridpk.residual import load_run

    if args.n < 20:
        raise HybridPKError(f"--n {args.n}: a VPC needs at least 20 replicates (500 is usual)")
    model = load_run(args.run)
    if args.dv and not args.data:
        raise HybridPKError("--dv states the scale of the DV of a file given as --data; the run's own dataset is "
                            "read as it was fitted")
    ds = model_dataset(args.data, args.dv, model) if args.data else run_dataset(args.run, None)
    result = vpc(model, ds, n=args.n, bins=args.bins, pc=args.pc, seed=args.seed, stratify=args.stratify,
                 progress=print, idv=args.idv)
    if result.idv == "TAD":
        print(f"TAD: {result.tad_source}" + (f"; left out: {result.left_out} observation(s) without one (before any "
                                              "dose)" if result.left_out else ""))
    t_unit, c_unit = axis_units(ds)
    plot_vpc(result, time_unit=t_unit, conc_unit=c_unit, log=args.log).savefig(args.out, dpi=100)
    table = Path(args.out).with_suffix(".csv")
    atomic_write_text(table, result.table.to_csv(index=False))
    for kind in result.censored:
        inside = result.table[f"INSIDE_{kind}"]
        print(f"censored levels ({'below the LLOQ' if kind == 'BLQ' else 'above the ULOQ'}): the observed fraction is "
              f"inside its simulated 90% band in {int(inside.sum())} of {len(inside)} bins (Bergstrand and Karlsson "
              "2009: observed and simulated levels censored alike; percentiles among censored levels not drawn)")
    print(f"{'pcVPC' if args.pc else 'VPC'}: {result.fraction_inside:.0%} of the observed percentiles (bins x "
          f"5/50/95th) inside their simulated 90% bands; wrote {args.out} and {table}")
    return 0
