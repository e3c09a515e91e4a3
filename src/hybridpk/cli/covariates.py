"""hybridpk covariates: covariate discovery on a run (screen, then stepwise covariate modelling)."""

from __future__ import annotations

from ._common import RUN_DATA_HELP, ManualFormatter, out_folder_arg, run_dataset

HELP = """\
Which covariates explain what the model leaves unexplained, and which of them belong in the model.

1. Screen: each candidate covariate (its value on the patient's first record) against every ETA (the
   run's EBEs) and, for a hybrid run, every latent dimension Z: Spearman's rho, mutual information (sees
   non-monotone relations), a permutation p-value and Benjamini-Hochberg q-values over all pairs. A relation
   found only on a latent axis explains the residual the ODE misses, not a parameter.
2. Stepwise covariate modelling on the mechanistic model (the rules of PsN's SCM): forward inclusion of the
   relation that lowers the OFV most while dOFV > 3.84 (p < 0.05, 1 d.f.), then backward elimination while
   removing one raises the OFV by less than 6.63 (p < 0.01). Power (COV/median)^THETA for continuous
   covariates (--forms adds linear, exponential or a sigmoid maturation COV^HILL / (TM50^HILL + COV^HILL),
   each tried as a candidate of its own), (1 + THETA)^(COV == level) for two-level ones; every model fitted by
   FOCE-I.

Writes DIR/screen.csv, DIR/screen.png (the strongest relations), DIR/steps.csv (every model tried: relation,
form, OFV, dOFV, kept) and DIR/final (the final model as a run folder).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("covariates", help="covariate discovery: screen, then stepwise covariate modelling",
                       description=HELP, formatter_class=ManualFormatter,
                       epilog="example:\n  hybridpk covariates runs/mydrug --data data.csv --candidates WT,CRCL,AGE "
                              "--out covs\n")
    p.add_argument("run", metavar="RUN", help="run folder written by 'hybridpk fit'")
    p.add_argument("--data", metavar="DATA", help=RUN_DATA_HELP)
    p.add_argument("--candidates", help="covariates to try, comma-separated (default: every covariate column)")
    p.add_argument("--parameters", help="parameters to attach them to (default: those with IIV)")
    p.add_argument("--forms", default="power", help="forms tried for a continuous covariate, comma-separated: power, "
                   "linear, exponential, maturation (sigmoid COV^HILL/(TM50^HILL+COV^HILL)); default power")
    p.add_argument("--permutations", type=int, default=1000, help="permutations of the screen's p-values")
    p.add_argument("--no-stepwise", action="store_true", help="the screen only")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutations")
    p.add_argument("--out", required=True, metavar="DIR", type=out_folder_arg, help="output folder")
    p.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    import pandas as pd

    from hybridpk.classify import patient_covariates, screen_covariates, stepwise_covariates
    from hybridpk.diagnostics import covariate_relations_figure
    from hybridpk.errors import HybridPKError
    from hybridpk.io import atomic_write_text
    from hybridpk.residual import HybridFit, load_run

    model = load_run(args.run)
    pop = model.population if isinstance(model, HybridFit) else model
    if pop.estimation is None:
        raise HybridPKError(f"{args.run} holds no fit (a published model?): search covariates on a fitted run")
    ds = run_dataset(args.run, args.data, model)
    if pop.estimation.data_sha256 and pop.estimation.data_sha256 != ds.fingerprint():
        raise HybridPKError(f"{args.data or 'the recorded dataset'} is not the dataset {args.run} was fitted to (its "
                            "fingerprint differs)")
    names = [c.strip() for c in args.candidates.split(",")] if args.candidates else list(ds.covariates)
    if not names:
        raise HybridPKError("the data have no covariate columns; name them with --candidates")
    covs = patient_covariates(ds, names)
    individual = model.individual if isinstance(model, HybridFit) else pop.estimation.individual
    screen = screen_covariates(individual, covs, permutations=args.permutations, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "screen.csv", screen.to_csv(index=False))
    # the four strongest relations (lowest q, then highest mutual information) with their shape
    covariate_relations_figure(screen, individual.merge(covs, on="ID"), units=dict(ds.units)).savefig(
        out / "screen.png", dpi=100)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(screen.head(12).round(4).to_string(index=False))
    latent_only = sorted({r.covariate for r in screen.itertuples() if r.q_value < 0.05 and r.acts_on == "residual"}
                         - {r.covariate for r in screen.itertuples() if r.q_value < 0.05 and r.acts_on == "parameter"})
    for c in latent_only:
        print(f"{c}: related to the latent axes only (q < 0.05): it explains the residual the ODE misses, not a "
              "parameter")
    if not args.no_stepwise:
        params = [p.strip().upper() for p in args.parameters.split(",")] if args.parameters else \
            [e.removeprefix("ETA_") for e in pop.model.etas if not e.startswith("ETA_IOV_")]
        forms = tuple(f.strip().lower() for f in args.forms.split(",") if f.strip())
        search = stepwise_covariates(pop, ds, [(p, c) for p in params for c in names], forms=forms, progress=print)
        atomic_write_text(out / "steps.csv", search.steps.to_csv(index=False))
        search.final.save(out / "final")
        print(f"selected: {', '.join(search.selected) or 'none'} (final OFV {search.final.estimation.ofv:.3f}; "
              f"base {pop.estimation.ofv:.3f})")
    print(f"wrote {out}")
    return 0
