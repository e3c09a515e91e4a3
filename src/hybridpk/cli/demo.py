"""hybridpk demo: the main demonstration on bundled data."""

from __future__ import annotations

from ._common import ManualFormatter, out_folder_arg

HELP = """\
Run the main demonstration on the datasets bundled with hybridpk:

  1. validate and summarise every bundled dataset (as 'hybridpk check NAME');
  2. fit the theophylline population model by FOCE-I (1-compartment oral, IIV on KA, CL and V, additive
     error) and compare the estimates with nlmixr2's published fit of the same data;
  3. fit the hybrid model on the bundled enterohepatic-recirculation example (data/ehc.csv): a
     1-compartment oral FOCE-I fit, then the VAE correction (reservoir form); compare ODE-only and hybrid against the
     noise-free true curves (data/ehc_truth.txt) for recirculating and other patients;
  4. flag the patients who need the complex model (the run's latent classifier) and score the flags against
     the truth (who recirculates; never used in training);
  5. recommend a vancomycin dose for an example patient (published model, two TDM levels);
  6. write both runs and the EHC run's HTML report (figures embedded; opens offline) under --out.
"""

NLMIXR2 = {"KA": 1.57, "CL": 2.76, "V": 31.5}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the demonstration on bundled data", description=HELP,
                       epilog="example:\n  hybridpk demo --out runs/demo\n", formatter_class=ManualFormatter)
    p.add_argument("--out", default="runs/demo", metavar="RUN", type=out_folder_arg, help="folder for the fit outputs")
    p.set_defaults(handler=run)


def run(args) -> int:
    from types import SimpleNamespace

    from hybridpk.data.bundled import bundled_dataset, bundled_datasets
    from hybridpk.data.dataset import read_nonmem
    from hybridpk.population import build_model, fit_population

    from . import check

    names = bundled_datasets()
    print(f"hybridpk demo\n\n1. bundled datasets: {', '.join(names)}\n")
    status = check.run(SimpleNamespace(data=names, columns=None, covariates=None, json=False))
    print("\n2. FOCE-I fit of theophylline (1cmt_oral, IIV on KA, CL, V; additive error)")
    ds = read_nonmem(bundled_dataset("theoph"))
    pm = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="additive", data=ds)
    fit = fit_population(pm, ds, progress=True)
    e = fit.estimation
    print(f"   OFV {e.ofv:.3f}, {'converged' if e.converged else 'NOT converged'} in {e.seconds:.1f} s")
    print(f"   {'':4}{'hybridpk':>10}{'nlmixr2':>10}")
    for k, v in NLMIXR2.items():
        print(f"   {k:<4}{fit.theta[k].value:10.3f}{v:10.3f}")
    fit.save(f"{args.out}/theoph")
    print("\n3. hybrid model on the enterohepatic-recirculation example (1cmt_oral + VAE correction, reservoir form)")
    hybrid, table = ehc_comparison(progress=True)
    hybrid.save(f"{args.out}/ehc")
    print(table)
    print("\n4. who needs the complex model: the latent classifier of the EHC run")
    print(_flags(hybrid, f"{args.out}/ehc"))
    print("\n5. a vancomycin dose (vancomycin_goti2018; 1000 mg q12h so far, peak 28.5 and trough 12.1 mg/L)")
    print(_dose())
    print("\n6. the report of the EHC run")
    from hybridpk.report import write_report

    path = write_report(f"{args.out}/ehc", read_nonmem(bundled_dataset("ehc")), f"{args.out}/ehc/report",
                        vpc_replicates=100)
    print(f"   wrote {args.out}/theoph and {args.out}/ehc (summary.json, individual.csv, predictions.csv, model.json, "
          f"vae.pt, classifier.json)\n   report: {path} (open it in a browser)")
    return status


def _flags(hybrid, run) -> str:
    """Train and save the run's classifier; its out-of-fold flags against the true recirculation."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from hybridpk.classify import save_classifier, train_classifier
    from hybridpk.data.bundled import bundled_dataset

    rc = train_classifier(hybrid)
    save_classifier(run, rc)
    truth = pd.read_csv(bundled_dataset("ehc").with_name("ehc_truth.txt"))
    t = rc.table.merge(truth[["ID", "RECIRC"]], on="ID")
    auroc = roc_auc_score(t.RECIRC, t.P_COMPLEX) if t.RECIRC.nunique() == 2 else float("nan")
    hit = int(((t.COMPLEX == 1) & (t.RECIRC == 1)).sum())
    return (f"   {int(t.COMPLEX.sum())} of {len(t)} patients flagged COMPLEX (P_COMPLEX >= 0.5, out of fold); "
            f"{hit} of {int(t.RECIRC.sum())} recirculating patients flagged; AUROC of P_COMPLEX for the true flag "
            f"{auroc:.3f}")


def _dose() -> str:
    import pandas as pd

    from hybridpk.data.dataset import read_nonmem
    from hybridpk.dosing import recommend_dose

    patient = read_nonmem(pd.DataFrame([
        dict(ID=1, TIME=0.0, AMT=1000.0, RATE=1000.0, DV=0.0, EVID=1, MDV=1, ADDL=3, II=12.0, CRCL=80, WT=70),
        dict(ID=1, TIME=37.5, AMT=0.0, RATE=0.0, DV=28.5, EVID=0, MDV=0, ADDL=0, II=0.0, CRCL=80, WT=70),
        dict(ID=1, TIME=47.5, AMT=0.0, RATE=0.0, DV=12.1, EVID=0, MDV=0, ADDL=0, II=0.0, CRCL=80, WT=70)]))
    rec = recommend_dose("vancomycin_goti2018", patient, "auc24=400:600")
    e = rec.exposure["auc24"]
    return (f"   {rec.dose:g} mg every {rec.interval:g} h as {rec.duration:g}-h infusions: MAP AUC24 {e['map']:.0f} "
            f"mg*h/L (posterior median {e['median']:.0f}, 90% interval {e['p05']:.0f}-{e['p95']:.0f}); probability "
            f"of 400-600: {rec.pta:.0%}")


def ehc_comparison(progress=True, latent_dim=2, seed=0):
    """Fit ODE-only and hybrid on the bundled EHC data; RMSE against the true curves on a dense grid."""
    import numpy as np
    import pandas as pd
    import torch

    from hybridpk.data.bundled import bundled_dataset
    from hybridpk.data.dataset import read_nonmem
    from hybridpk.population import build_model
    from hybridpk.residual import TrainConfig, fit_hybrid
    from hybridpk.solve import simulate
    from hybridpk.solve.examples import EHC_TYPICAL

    path = bundled_dataset("ehc")
    ds = read_nonmem(path)
    truth = pd.read_csv(path.with_name("ehc_truth.txt"))
    pm = build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined")
    # recirculation: drug that leaves the central compartment and comes back later, the reservoir form
    hybrid = fit_hybrid(pm, ds, latent_dim=latent_dim, config=TrainConfig(form="reservoir"), seed=seed,
                        progress=progress)
    dense = ds.prediction_design(np.arange(0.25, 24.01, 0.25), cmt=2)
    out = hybrid.predict(ds, design=dense)
    bd, base, hyb = out.batch, out.ode, out.ipred
    with torch.no_grad():
        tp = {k: torch.tensor(truth.set_index("ID").loc[list(ds.ids), k].to_numpy()) for k in EHC_TYPICAL}
        true = simulate("1cmt_oral_ehc", tp, bd).ipred
    on = bd.evid == 2
    rec = torch.tensor(truth.set_index("ID").loc[list(ds.ids), "RECIRC"].to_numpy() == 1)

    def rmse(pred, sel):
        err = ((pred - true) ** 2 * on).sum(1) / on.sum(1)
        return float(torch.sqrt(err[sel].mean()))

    lines = [f"   {'patients':<20}{'ODE-only':>10}{'hybrid':>10}{'ratio':>8}   (RMSE vs true curves, mg/L)"]
    for label, sel in (("recirculating", rec), ("not recirculating", ~rec)):
        a, b = rmse(base, sel), rmse(hyb, sel)
        lines.append(f"   {label:<20}{a:10.4f}{b:10.4f}{b / a:8.3f}")
    return hybrid, "\n".join(lines)
