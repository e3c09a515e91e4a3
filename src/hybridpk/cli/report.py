"""hybridpk report: a run's estimates and diagnostic figures in one HTML file that opens offline."""

from __future__ import annotations

from ._common import RUN_DATA_HELP, ManualFormatter, out_folder_arg, run_dataset

HELP = """\
Write DIR/report.html: one self-contained file (figures embedded; opens offline) with the run's metadata
(versions, seed, data fingerprint), OFV, AIC and BIC, THETA with RSE, OMEGA (variance and CV%), the residual
error, shrinkage, and the diagnostics: DV vs PRED and IPRED (linear and log axes), CWRES vs TIME and PRED,
the QQ plot of CWRES, the ETAs against their OMEGA, a VPC (--vpc N simulations, default 200; 0: none),
individual fits (levels, PRED and IPRED on a fine grid;
for a hybrid also the ODE-only part) and, for a hybrid, the latent space coloured by P_COMPLEX. The PNGs and
report.json are written beside it. DATA is the dataset the run was fitted to (default: the one the fit read).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="HTML report of a run (estimates and diagnostic figures)", description=HELP,
                       formatter_class=ManualFormatter,
                       epilog="example:\n  hybridpk report runs/theoph --data theoph --out runs/theoph/report\n")
    p.add_argument("run", metavar="RUN", help="run folder written by 'hybridpk fit'")
    p.add_argument("--data", metavar="DATA", help=RUN_DATA_HELP)
    p.add_argument("--vpc", type=int, default=200, metavar="N", help="replicates of the VPC (0: no VPC)")
    p.add_argument("--seed", type=int, default=0, help="seed of the VPC's simulations")
    p.add_argument("--out", required=True, metavar="DIR", type=out_folder_arg, help="output folder")
    p.set_defaults(handler=run)


def run(args) -> int:
    from hybridpk.report import write_report

    from hybridpk.errors import HybridPKError

    if args.vpc != 0 and args.vpc < 20:
        raise HybridPKError(f"--vpc {args.vpc}: give 0 (no VPC) or at least 20 replicates")
    path = write_report(args.run, run_dataset(args.run, args.data), args.out, vpc_replicates=args.vpc,
                        seed=args.seed)
    print(f"wrote {path} (open it in a browser; the figures are embedded)")
    return 0
