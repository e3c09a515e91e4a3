"""Command-line interface. Thin: parse, one library call, write files.

Each sub-command lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``.
Nothing heavy (torch, pandas) is imported until a command runs, so ``hybridpk --version`` is instant.
"""

from __future__ import annotations

import argparse
import sys

from ._common import EXIT_BAD_INPUT, ManualFormatter, fail

_COMMANDS = ("check", "models", "simulate", "fit", "predict", "classify", "compare", "covariates", "report", "vpc",
             "dose", "demo")

DESCRIPTION = """\
hybridpk: mechanistic population-PK models with a VAE correction (hybrid models) and precision dosing.

Data are NONMEM-style CSV files (ID, TIME, DV, AMT, EVID, MDV, CMT, RATE, ADDL, II, SS, covariates).
Every command reads files, calls one library function and writes files; run
'hybridpk COMMAND --help' for the manual of a command.
"""

EPILOG = """\
examples:
  hybridpk check data.csv            validate a dataset and print a summary
  hybridpk check theoph              the same, on a bundled example dataset
  hybridpk models                    list the compartment models and their parameters
  hybridpk simulate theoph --model 1cmt_oral --params params.csv --out ipred.csv
  hybridpk fit theoph --model 1cmt_oral --iiv KA,CL,V --error additive --out runs/theoph
  hybridpk predict runs/theoph new.csv --out pred.csv
  hybridpk classify runs/ehc new.csv  which patients need the complex model (a hybrid run)
  hybridpk compare runs/a runs/b --data data.csv   rank runs fitted to the same data
  hybridpk covariates runs/a --data data.csv --out covs   screen covariates, then stepwise (SCM)
  hybridpk report runs/theoph --data theoph --out report  HTML report with the diagnostic figures
  hybridpk vpc runs/theoph --data theoph --pc --out vpc.png   visual predictive check
  hybridpk dose vancomycin_goti2018 patient.csv --target auc24=400:600 --interval 12 --out rec.json
  hybridpk map vancomycin_goti2018 patient.csv --plot forecast.png
  hybridpk demo                      the main demonstration on bundled data

exit status: 0 success, 2 bad input (every problem is listed), 1 internal error.
"""


def build_parser() -> argparse.ArgumentParser:
    from importlib import import_module

    parser = argparse.ArgumentParser(prog="hybridpk", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=ManualFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:   # the dose module also adds 'map'
        import_module(f"hybridpk.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("--version", "-V"):
        from importlib.metadata import version

        print(f"hybridpk {version('hybridpk')}")
        return 0
    renamed = {"--residual": "--hybrid", "--vae-residual": "--hybrid-form"}
    for arg in argv:
        old = arg.split("=", 1)[0]
        if old in renamed:
            return fail(f"{old} was renamed {renamed[old]} (the VAE part is the hybrid's correction; 'residual' "
                        "is the residual error, --error)", EXIT_BAD_INPUT)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import version

        print(f"hybridpk {version('hybridpk')}")
        return 0
    if not args.command:
        parser.print_help()
        return 0
    from hybridpk.errors import HybridPKError

    try:
        return int(args.handler(args) or 0)
    except HybridPKError as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    except BrokenPipeError:   # the reader went away (e.g. '| head'): stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit's flush
        return 0
    except KeyboardInterrupt as exc:   # Ctrl-C: one line (an Interrupted says what was kept and how to resume)
        return fail(str(exc) or "interrupted", 130)
    except Exception as exc:  # an internal error: a bug, not the user's fault
        if args.debug:
            raise
        return fail(f"internal error ({type(exc).__name__}: {exc}). This is a bug in hybridpk; rerun with "
                    "--debug for the traceback and report it.", 1)
