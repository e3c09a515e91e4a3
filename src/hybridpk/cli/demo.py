"""hybridpk demo: the main demonstration on bundled data."""

from __future__ import annotations

from ._common import ManualFormatter

HELP = """\
Run the main demonstration on the datasets bundled with hybridpk:

  1. validate and summarise every bundled dataset (as 'hybridpk check NAME');
  2. fit the theophylline population model by FOCE-I (1-compartment oral, IIV on KA, CL and V, additive
     error) and compare the estimates with nlmixr2's published fit of the same data;
  3. write the run (summary.json, individual.csv, predictions.csv, model.json) to --out.
"""

NLMIXR2 = {"KA": 1.57, "CL": 2.76, "V": 31.5}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the demonstration on bundled data", description=HELP,
                       epilog="example:\n  hybridpk demo --out runs/demo\n", formatter_class=ManualFormatter)
    p.add_argument("--out", default="runs/demo", metavar="RUN", help="folder for the fit outputs")
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
    print(f"   OFV {fit.ofv:.3f}, {'converged' if fit.converged else 'NOT converged'} in {fit.seconds:.1f} s")
    print(f"   {'':4}{'hybridpk':>10}{'nlmixr2':>10}")
    for k, v in NLMIXR2.items():
        print(f"   {k:<4}{fit.parameters[k]['estimate']:10.3f}{v:10.3f}")
    fit.save(args.out)
    print(f"\n3. wrote {args.out}/summary.json, individual.csv, predictions.csv, model.json")
    return status
