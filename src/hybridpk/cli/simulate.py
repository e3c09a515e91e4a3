"""hybridpk simulate: individual predictions, or a simulated population, on a dataset's dosing design."""

from __future__ import annotations

from ._common import ManualFormatter, device_arg, nonnegative_float, out_file_arg, positive_int, read_dataset_arg

HELP = """\
Simulate concentrations on the dosing records and sampling times of DATA.

Individual mode (--params): PARAMS.csv holds one row per ID with columns named as listed by
'hybridpk models NAME' (e.g. ID,CL,V,KA). OUT.csv gets ID, TIME, IPRED for every record of DATA, in
the order of DATA.

Population mode (--typical): individual parameters are drawn from the typical values, log-normal
inter-individual variability (--omega, variances) and optional power covariate effects (--covariate),
and DV is simulated with residual error (--proportional, --additive SDs). OUT.csv is then a complete
NONMEM-style dataset (the design of DATA with the simulated DV); OUT.params.csv holds the true
individual parameters. The same --seed gives the same dataset.

Fitted mode (--model RUN, a run folder of 'hybridpk fit', or a fitted model: a published spec name, a
.toml spec, a NONMEM control stream at its estimates): the population is simulated from the model's own
THETA, OMEGA and SIGMA (as NONMEM's $SIMULATION with the final estimates): new ETAs from OMEGA (and, for a
hybrid, z from its latent prior, through its correction), the covariates of DATA, and DV with the model's
residual error. OUT.csv is the design of DATA with the simulated DV; OUT.params.csv holds each subject's
drawn ETAs (and z). --typical, --omega, --covariate and the residual SDs belong to the other modes and are
refused here.

Virtual populations (--n N): N patients on the design of DATA (its subjects cycled: one template patient
repeated, or several with their own covariates and dosing), IDs 1..N, simulated and written --chunk
patients at a time, so that memory stays bounded (10^6 patients with 10 samples each: about 1 GB peak,
a minute or two on 2 cores). OUT may end in .parquet (needs pyarrow: pip install 'hybridpk[parquet]'),
then OUT.params.parquet too; files appear only when the run completes. The same --seed and --chunk give
the same population.

Data with censored levels (CENS, BLQ or an LLOQ column; a control stream's M3): the simulated levels are
censored as the data's are, at the limits the data state (one LLOQ for all when every censored level has the
same; else each record's own): below it CENS = 1 with the limit as DV, as a lab reports them, so that the
simulated dataset can be fitted as the real one. DV are concentrations (a log-DV stream's levels too).
"""

EPILOG = """\
examples:
  hybridpk simulate theoph --model 1cmt_oral --params params.csv --out ipred.csv
  hybridpk simulate theoph --model runs/theoph --seed 3 --out sim.csv      # from the fit's own estimates
  hybridpk simulate design.csv --model 2cmt_iv --typical CL=5,V=20,Q=8,V2=60 \\
      --omega CL=0.09,V=0.04 --covariate CL=WT:70:0.75 --proportional 0.1 --seed 7 --out sim.csv
  hybridpk simulate one_patient.csv --model 1cmt_oral --typical CL=5,V=50,KA=1.2 \\
      --omega CL=0.09,V=0.04,KA=0.09 --proportional 0.1 --n 1000000 --out trial.parquet
"""


def _pairs(text, what):
    from hybridpk.errors import HybridPKError

    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise HybridPKError(f"{what}: expected NAME=VALUE pairs separated by commas, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().upper()] = v.strip()
    return out


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="simulate concentrations or a population on a dosing design",
                       description=HELP, epilog=EPILOG, formatter_class=ManualFormatter)
    p.add_argument("data", metavar="DATA", help="dataset (CSV), bundled dataset name or control "
                   "stream (its $DATA) giving doses and times")
    p.add_argument("--model", required=True, metavar="NAME|RUN", help="model name (see 'hybridpk models'), or a "
                   "fitted model to simulate from its own estimates: a run folder, a published spec, a .toml spec or "
                   "a NONMEM control stream")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--params", metavar="PARAMS.csv", help="individual parameters, one row per ID")
    mode.add_argument("--typical", metavar="P=V,...", help="typical values, e.g. CL=5,V=50")
    p.add_argument("--omega", metavar="P=VAR,...", help="IIV variances of log-normal ETAs, e.g. CL=0.09")
    p.add_argument("--covariate", action="append", default=[], metavar="P=COV:REF:EXP",
                   help="power covariate effect, e.g. CL=WT:70:0.75 (repeatable)")
    p.add_argument("--proportional", type=nonnegative_float, default=0.0, help="proportional residual error SD")
    p.add_argument("--additive", type=nonnegative_float, default=0.0, help="additive residual error SD (mg/L)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the population simulation")
    p.add_argument("--n", type=positive_int, metavar="N", help="population mode: N virtual patients on the design "
                   "of DATA (its subjects cycled), simulated and written in chunks")
    p.add_argument("--chunk", type=positive_int, default=10_000, metavar="K",
                   help="with --n: patients simulated and written at a time (default 10000)")
    p.add_argument("--method", choices=["auto", "closed_form", "ode"], default="auto", help="solver path")
    p.add_argument("--device", default="cpu", type=device_arg,
                   help="where the model is solved: cpu, cuda, cuda:N, or auto (a CUDA GPU when there is "
                        "one, else the CPU); in float64 on every device, the random draws on the CPU, so the same "
                        "seed gives the same population anywhere")
    p.add_argument("--out", required=True, metavar="OUT.csv", type=out_file_arg, help="output file")
    p.set_defaults(handler=run)


def run(args) -> int:

    import pandas as pd

    from hybridpk.errors import HybridPKError
    from hybridpk.io import atomic_write_text
    from hybridpk.solve import simulate, simulate_population, simulate_population_chunks

    ds = read_dataset_arg(args.data)
    fitted = _fitted_model(args.model)
    if fitted is not None:
        return _run_fitted(args, fitted, ds)
    if not (args.params or args.typical):
        raise HybridPKError(f"--model {args.model}: give --params (individual mode) or --typical (population mode) for "
                            "a structural model, or name a fitted model (a run folder, a spec) to simulate from its "
                            "estimates")
    if args.params and args.n is not None:
        raise HybridPKError("--n simulates a virtual population (population mode, --typical); with --params each "
                            "subject of DATA has its own parameters")
    if args.params:
        try:
            table = pd.read_csv(args.params)
        except (OSError, ValueError) as exc:
            raise HybridPKError(f"cannot read the parameter table {args.params}: {exc}") from None
        batch = ds.to_batch().to(args.device)
        try:
            pred = simulate(args.model, table, batch, method=args.method)
        except HybridPKError as exc:
            raise HybridPKError(f"--params {args.params}: {exc}") from None
        atomic_write_text(args.out, pred.to_dataframe(batch).to_csv(index=False))
        print(f"wrote {args.out}: IPRED at {int(batch.record_mask.sum())} records of {batch.n_subjects} subjects")
        return 0

    def floats(d, what):
        bad = [f"{k}={v}" for k, v in d.items() if not _is_number(v)]
        if bad:
            raise HybridPKError(f"{what}: {', '.join(bad)}: each value must be a number") from None
        return {k: float(v) for k, v in d.items()}

    typical = floats(_pairs(args.typical, "--typical"), "--typical")
    omega = floats(_pairs(args.omega, "--omega"), "--omega")
    cov = {}
    for item in args.covariate:
        try:
            par, rest = item.split("=", 1)
            name, ref, expo = rest.split(":")
            cov[par.strip().upper()] = (name.strip(), float(ref), float(expo))
        except ValueError:
            raise HybridPKError(f"--covariate: expected P=COV:REF:EXP (e.g. CL=WT:70:0.75), got {item!r}") from None
    options = dict(proportional=args.proportional, additive=args.additive, covariates=cov, method=args.method,
                   device=args.device)
    _check_output(args)
    if args.n is None:
        sims = (simulate_population(args.model, ds, typical, omega, seed=args.seed, **options) for _ in (0,))
    else:
        sims = simulate_population_chunks(args.model, ds, args.n, typical, omega, chunk=args.chunk, seed=args.seed,
                                          **options)
    chunks = ((sim.dataset.to_dataframe(), sim.parameters, sim.dataset.n_subjects, sim.dataset.n_observations)
              for sim in sims)
    return _write_population(args, chunks, ds.n_subjects if args.n is None else args.n, "", typical=typical,
                             omega=omega, proportional=args.proportional, additive=args.additive)


def _check_output(args) -> None:
    """Refuse, before any work, an OUT that cannot be written (Parquet without pyarrow) and --chunk without --n."""
    from hybridpk.errors import HybridPKError
    from hybridpk.io import TableWriter

    try:
        TableWriter(args.out)
    except ImportError as exc:
        raise HybridPKError(str(exc)) from None
    if args.n is None and args.chunk != 10_000:
        raise HybridPKError("--chunk applies to a virtual population: give --n as well")


def _write_population(args, chunks, total: int, note: str, **metadata) -> int:
    """Write each chunk of a simulated population (records, per-patient values, subjects, observations;
    ``chunks`` computes them as they are written) to OUT and OUT.params, then the run's metadata to OUT.json."""
    import json

    from hybridpk.io import TableWriter, atomic_write_text, run_metadata
    from hybridpk.progress import Progress

    side = _stem(args.out)
    suffix = ".parquet" if str(args.out).lower().endswith((".parquet", ".pq")) else ".csv"
    n_subjects = n_obs = n_censored = 0
    with TableWriter(args.out) as data_out, TableWriter(side + ".params" + suffix) as params_out, \
            Progress(total, "simulate", "patient", enabled=args.n is not None) as bar:
        for records, per_patient, subjects, observations in chunks:
            data_out.write(records)
            params_out.write(per_patient)
            n_subjects += subjects
            n_obs += observations
            n_censored += int((records["CENS"] != 0).sum()) if "CENS" in records else 0
            bar.update(subjects)
    if n_censored:
        note += f"; {n_censored} censored at the data's limits (CENS, the limit in DV)"
    atomic_write_text(side + ".json", json.dumps(run_metadata(
        seed=args.seed, model=str(args.model), **metadata, virtual_patients=args.n,
        chunk=args.chunk if args.n else None, device=args.device), indent=2))
    print(f"wrote {args.out} ({n_subjects} subjects, {n_obs} observations{note}, seed {args.seed}), "
          f"{side}.params{suffix} and {side}.json")
    return 0


def _fitted_model(name: str):
    """The fitted model ``name`` names (a run folder, a published spec name, a .toml spec or a control stream),
    or None for a structural model's name."""
    from pathlib import Path

    from hybridpk.population import load_model, model_specs

    path = Path(name)
    if path.is_dir():
        from hybridpk.residual import load_run

        return load_run(path)
    if path.suffix.lower() in (".toml", ".mod", ".ctl") or name in model_specs():
        return load_model(name)
    return None


def _run_fitted(args, fitted, ds) -> int:
    """Fitted mode: the design of DATA (or --n virtual patients on it, --chunk at a time) simulated from the
    fitted model's own THETA, OMEGA and SIGMA (``fitted.simulate``); chunk k draws from seed (SEED, k)."""
    import numpy as np

    from hybridpk.errors import HybridPKError
    from hybridpk.solve.population_sim import virtual_design

    given = [flag for flag, on in (("--params", args.params), ("--typical", args.typical), ("--omega", args.omega),
                                   ("--covariate", args.covariate), ("--proportional", args.proportional),
                                   ("--additive", args.additive), ("--method", args.method != "auto")) if on]
    if given:
        raise HybridPKError(f"--model {args.model} is a fitted model: it is simulated from its own THETA, OMEGA and "
                            f"SIGMA; drop {', '.join(given)}")
    _check_output(args)
    fitted = fitted.to(args.device)
    # one chunk's design at a time, as it is simulated and written (the memory of one chunk, whatever --n)
    parts = iter([ds]) if args.n is None else (virtual_design(ds, start, min(args.chunk, args.n - start))
                                               for start in range(0, args.n, args.chunk))

    def chunks():
        for k, part in enumerate(parts):
            seed = int(np.random.SeedSequence([int(args.seed) & 0xFFFFFFFF, k]).generate_state(1)[0])
            table = fitted.simulate(part, n=1, seed=seed)
            records = part.simulated_records(table["DV"].to_numpy())     # censored as the data's levels are
            drawn = [c for c in table.columns if c not in ("REP", "ID", "TIME", "EVID", "MDV", "IPRED", "DV")]
            yield (records, table.groupby("ID", sort=False)[drawn].first().reset_index(), part.n_subjects,
                   part.n_observations)

    return _write_population(args, chunks(), ds.n_subjects if args.n is None else args.n,
                             f", simulated from {args.model}'s estimates", fitted_model=getattr(fitted, "name", None))


def _stem(path) -> str:
    """OUT without its table suffix: the stem of OUT.params.csv and OUT.json."""
    text = str(path)
    for suffix in (".csv", ".parquet", ".pq"):
        if text.lower().endswith(suffix):
            return text[: -len(suffix)]
    return text
