"""hybridpk check: validate a dataset and summarise it."""

from __future__ import annotations

from ._common import ManualFormatter, read_dataset_arg, resolve_data_path

HELP = """\
Validate a NONMEM-style dataset and print a summary.

Reads DATA (a CSV file, the name of a bundled dataset such as 'theoph', or a NONMEM control stream .mod/.ctl,
whose $DATA is read as the stream reads it: IGNORE, DROP, its $INPUT names, censoring by its F_FLAG) through the
same code path every other command uses, checks it against NONMEM's conventions and prints the number of
subjects, observations (and how many are censored), doses (ADDL expanded), routes, covariates and the time span.

If anything is wrong, every problem is printed, each with its row number(s) (1-based data rows and
the file line), the column and what was expected; the exit status is then 2.

Roles of columns come from a sidecar next to the file (DATA.datainfo, DATA.columns.json or
DATA.columns.toml) when there is one, otherwise from standard NONMEM names, case-insensitively.
"""

EPILOG = """\
examples:
  hybridpk check mydata.csv
  hybridpk check mydata.csv --columns mydata.columns.json --covariates WT,CRCL
  hybridpk check theoph --json
  hybridpk check run1.mod            the dataset of a control stream, as the stream reads it
"""


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="validate a dataset and print a summary", description=HELP,
                       epilog=EPILOG, formatter_class=ManualFormatter)
    p.add_argument("data", nargs="+", metavar="DATA", help="dataset file(s), bundled dataset name(s) or NONMEM "
                   "control stream(s) (.mod/.ctl: their $DATA)")
    p.add_argument("--columns", metavar="SIDECAR", help="column sidecar (JSON/TOML) declaring roles and units")
    p.add_argument("--covariates", metavar="A,B", help="comma-separated covariate columns "
                   "(default: sidecar, else every numeric column without a role)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=run)


def format_summary(s: dict) -> str:
    units = s["units"]
    lo, hi = s["time_span"]
    tu = units.get("TIME", "h")
    routes = ", ".join(f"{k}: {v}" for k, v in s["routes"].items()) or "none"
    cov = ", ".join(f"{c}{' [' + units[c] + ']' if c in units else ''}" for c in s["covariates"]) or "none"
    tv = ", ".join(s["time_varying_covariates"]) or "none"
    opsmin, opsmax = s["observations_per_subject"]
    lines = [
        f"dataset        {s['source']}",
        f"records        {s['records']}",
        f"subjects       {s['subjects']}",
        f"observations   {s['observations']} ({opsmin}-{opsmax} per subject; {s['censored_observations']} censored)",
        f"doses          {s['doses']} (from {s['dose_records']} dose records; {s['steady_state_doses']} steady-state)",
        f"routes         {routes}",
        f"covariates     {cov}",
        f"time-varying   {tv}",
        f"time span      {lo:g} to {hi:g} {tu}",
    ]
    if s.get("decimal_comma"):
        lines.append("numbers        written with decimal commas (0,5), read as 0.5: the file is not comma-separated "
                     "and no number in it has a decimal point")
    if s.get("commented_out"):
        where = s["commented_out"]
        plural = "s" if len(where) > 1 else ""
        lines.append(f"commented out  {len(where)} record{plural} marked C in the comment column C, left out as "
                     f"NM-TRAN's IGNORE=C does (line{plural} {', '.join(map(str, where[:10]))}"
                     f"{', ...' if len(where) > 10 else ''})")
    if s.get("time_translation"):
        origin = s.get("time_origin") or {}
        first = next(iter(origin.items()), None)
        lines.append(f"time           {s['time_translation']}"
                     + (f"; subject {first[0]} starts {first[1]}" if first else ""))
    if s["reset_records"]:
        lines.insert(6, f"resets         {s['reset_records']} (EVID 3/4)")
    return "\n".join(lines)


def run(args) -> int:
    import json
    import warnings

    from hybridpk.data.dataset import read_nonmem
    from hybridpk.errors import DatasetError, DatasetWarning, HybridPKError

    covariates = [c.strip() for c in args.covariates.split(",") if c.strip()] if args.covariates else None
    status = 0
    for i, item in enumerate(args.data):
        stream = str(item).lower().endswith((".mod", ".ctl"))
        if stream and (args.columns or covariates):
            raise HybridPKError(f"{item}: a control stream's $INPUT names its columns and its code the data items it "
                                "reads; --columns and --covariates are for data files")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DatasetWarning)
            try:
                ds = read_dataset_arg(item) if stream else \
                    read_nonmem(resolve_data_path(item), columns=args.columns, covariates=covariates)
            except DatasetError as exc:
                import sys

                print(str(exc), file=sys.stderr)
                status = 2
                continue
        if i:
            print()
        summary = ds.summary()
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
        for w in caught:
            print(f"warning: {w.message}")
    return status
