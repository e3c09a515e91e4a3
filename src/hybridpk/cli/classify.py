"""hybridpk classify: which patients need the complex model (the latent classifier of a hybrid run)."""

from __future__ import annotations

from ._common import ManualFormatter, out_file_arg, read_dataset_arg, resolve_data_path

HELP = """\
Which patients need the complex model: a classifier on the latent space of a hybrid run (fitted with
--hybrid vae).

Each training patient is labelled COMPLEX when the hybrid explains its own data significantly better than
the ODE alone: COMPLEXITY (its -2LL under ODE-only minus under the hybrid) above the chi-square quantile
1 - ALPHA with K degrees of freedom (K the latent dimension: the hybrid is the ODE plus K values per
patient, so this is a likelihood-ratio test at level ALPHA per patient; about ALPHA of the patients the ODE
describes are flagged). Or give your own labels (--labels FILE with ID and COMPLEX columns). A logistic
regression on each patient's latent mean and SD (Z1.., log Z1_SD..) then gives P_COMPLEX, calibrated (Platt)
and cross-validated over patients; the cross-validated AUROC, Brier score and calibration table are printed.

'hybridpk fit ... --hybrid vae' trains the classifier with the run (classifier.json; individual.csv gains
COMPLEX_EVIDENCE, P_COMPLEX (out of fold) and COMPLEX), and 'hybridpk predict' adds P_COMPLEX and COMPLEX for
new patients. This command prints the run's classifier (training it first if the run has none, or with
--retrain, --alpha or --labels), and with NEW.csv scores new patients, each encoded from its own levels.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("classify", help="which patients need the complex model (latent classifier)", description=HELP,
                       epilog="examples:\n  hybridpk classify runs/ehc\n  hybridpk classify runs/ehc new_patients.csv "
                              "--out flags.csv\n", formatter_class=ManualFormatter)
    p.add_argument("run", metavar="RUN", help="run folder of a hybrid fit (--hybrid vae)")
    p.add_argument("data", metavar="NEW.csv", nargs="?", help="new patients to score (NONMEM-style)")
    p.add_argument("--alpha", type=float, default=None, help="level of the per-patient test that labels a training "
                   "patient COMPLEX (default 0.05; retrains)")
    p.add_argument("--labels", metavar="FILE", help="CSV with ID and COMPLEX (0/1) per training patient: your labels "
                   "in place of the test's (retrains)")
    p.add_argument("--retrain", action="store_true", help="train the classifier again and save it with the run")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds")
    p.add_argument("--out", metavar="FLAGS.csv", type=out_file_arg, help="write the patients' P_COMPLEX and COMPLEX")
    p.set_defaults(handler=run)


def run(args) -> int:
    import pandas as pd

    from hybridpk.classify import classify_patients, load_classifier, save_classifier, train_classifier
    from hybridpk.errors import HybridPKError
    from hybridpk.io import atomic_write_text
    from hybridpk.residual import HybridFit, load_run

    if args.alpha is not None and not 0 < args.alpha < 1:
        raise HybridPKError(f"--alpha {args.alpha!r}: the test level must lie between 0 and 1")
    model = load_run(args.run)
    if not isinstance(model, HybridFit):
        raise HybridPKError(f"{args.run} is an ODE-only run: the classifier reads a hybrid's latent space; fit with "
                            "--hybrid vae")
    rc = None if (args.retrain or args.alpha is not None or args.labels) else load_classifier(args.run)
    if rc is None:
        labels = _labels(args.labels, model.individual.ID) if args.labels else None
        rc = train_classifier(model, alpha=0.05 if args.alpha is None else args.alpha, seed=args.seed, labels=labels)
        save_classifier(args.run, rc)
        print(f"trained the classifier on {len(rc.table)} patients and saved it with the run")
    _print_report(rc, model)
    if args.data:
        ds = read_dataset_arg(args.data)
        table = classify_patients(model, rc, ds)
        with pd.option_context("display.max_rows", None, "display.width", 200):
            print(table[["ID", "P_COMPLEX", "COMPLEX"]].round(4).to_string(index=False))
        print(f"{int(table.COMPLEX.sum())} of {len(table)} new patients flagged COMPLEX (P_COMPLEX >= 0.5)")
    else:
        table = pd.read_csv(f"{args.run}/individual.csv")[["ID", "COMPLEXITY", "COMPLEX_EVIDENCE", "P_COMPLEX",
                                                            "COMPLEX"]]
    if args.out:
        atomic_write_text(args.out, table.to_csv(index=False))
        print(f"wrote {args.out}")
    return 0


def _labels(path, ids):
    import pandas as pd

    from hybridpk.errors import HybridPKError

    try:
        lab = pd.read_csv(resolve_data_path(path))
    except (OSError, ValueError) as exc:
        raise HybridPKError(f"--labels {path}: cannot read it ({exc})") from None
    if not {"ID", "COMPLEX"} <= set(lab.columns):
        raise HybridPKError(f"--labels {path}: needs the columns ID and COMPLEX (0/1); it has {', '.join(lab.columns)}")
    got = lab.set_index("ID").COMPLEX.reindex(list(ids))
    if got.isna().any() or not set(got.unique()) <= {0, 1}:
        missing = [i for i, v in got.items() if v != v]
        raise HybridPKError(f"--labels {path}: every training patient needs COMPLEX 0 or 1"
                            + (f" (missing IDs {', '.join(map(str, missing[:5]))})" if missing else ""))
    return got.astype(int).to_numpy()


def _print_report(rc, model) -> None:
    r = rc.report
    flagged = int(rc.table.COMPLEX.sum()) if len(rc.table) else None
    print(f"{model.name}: latent classifier (latent dimension {rc.latent_dim}; label: COMPLEXITY > {rc.threshold:.3g}, "
          f"the chi-square({rc.latent_dim}) test at alpha {rc.alpha:g}, or given labels)")
    counts = r.get("class_counts", [0, 0])
    print(f"  training patients: {counts[1]} labelled COMPLEX, {counts[0]} not"
          + (f"; {flagged} flagged by the classifier (out-of-fold P_COMPLEX >= 0.5)" if flagged is not None else ""))
    if r.get("auroc") is None:
        print(f"  {r.get('note', 'no cross-validated report')}")
        return
    print(f"  cross-validated over patients ({r['folds']} folds): AUROC {r['auroc']:.3f}, Brier score {r['brier']:.3f}")
    print("  calibration (mean predicted -> observed rate per bin): "
          + ", ".join(f"{c['predicted']:.2f}->{c['observed']:.2f}" for c in r["calibration"]))
