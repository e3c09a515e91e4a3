"""hybridpk predict: predictions of a fitted model for (new) patients."""

from __future__ import annotations

from ._common import DEVICE_HELP, DV_HELP, ManualFormatter, device_arg, model_dataset, out_file_arg

HELP = """\
Predict concentrations with a model fitted by 'hybridpk fit' (the folder RUN).

Each subject of DATA gets empirical Bayes ETAs estimated from its own observations (MAP with the
population estimates as prior; subjects without observations keep ETA = 0), and OUT.csv gets ID, TIME,
DV, MDV, PRED (typical subject), IPRED (individual) and the ETAs for every record of DATA, including
EVID=2 / MDV=1 rows placed at the times you want predictions for. For a hybrid run (fitted with
--hybrid vae) each patient is also encoded from its own observations: IPRED then includes the VAE
correction, IPRED_ODE is the ODE-only prediction, and Z1.. are the latent means; with the run's latent
classifier (trained by 'hybridpk fit --hybrid vae'), P_COMPLEX and COMPLEX say whether the patient needs the
complex model.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict with a fitted model", description=HELP,
                       epilog="example:\n  hybridpk predict runs/theoph new_patients.csv --out pred.csv\n",
                       formatter_class=ManualFormatter)
    p.add_argument("run", metavar="RUN", help="run folder written by 'hybridpk fit'")
    p.add_argument("data", metavar="DATA", help="dataset (CSV), bundled dataset name, or a "
                   "control stream (.mod/.ctl: its $DATA, read as the stream reads it)")
    p.add_argument("--out", required=True, metavar="PRED.csv", type=out_file_arg, help="output file")
    p.add_argument("--dv", choices=["log", "conc"], help=DV_HELP)
    p.add_argument("--device", default="cpu", type=device_arg, help=DEVICE_HELP)
    p.set_defaults(handler=run)


def run(args) -> int:
    from hybridpk.io import atomic_write_text
    from hybridpk.residual import HybridFit, load_run

    model = load_run(args.run).to(args.device)
    ds = model_dataset(args.data, args.dv, model)
    pred = model.predict(ds)
    out = pred.table
    if isinstance(model, HybridFit):
        from hybridpk.classify import load_classifier

        rc = load_classifier(args.run)
        if rc is not None:   # which patients need the complex model, from the z just estimated
            flags = _flags(rc, pred.estimates, ds)
            out = out.join(flags, on="ID")
    atomic_write_text(args.out, out.to_csv(index=False))
    print(f"wrote {args.out}: PRED and IPRED at {len(out)} records of {ds.n_subjects} subjects")
    est = pred.estimates
    if isinstance(model, HybridFit) and est.n_unrefined:
        print(f"note: {est.n_unrefined} of {ds.n_subjects} patients kept the encoder's estimate of z (the "
              "per-patient MAP refinement did not improve it" + (f"; its optimiser failed: {est.refine_failure}"
                                                                   if est.refine_failure else "") + ")")
    return 0


def _flags(rc, est, ds):
    """P_COMPLEX and COMPLEX per patient (indexed by ID) from the estimates of the prediction."""
    from hybridpk.classify import classify_estimates

    return classify_estimates(rc, est, ds.ids).set_index("ID")[["P_COMPLEX", "COMPLEX"]]
