"""hybridpk fit: population fit (FOCE-I, FOCE or FO) of a library model to a dataset, or of a NONMEM control stream."""

from __future__ import annotations

from ._common import (ManualFormatter, device_arg, latent_dim_arg, out_folder_arg, positive_int, record_run_data,
                      resolve_data_path)

HELP = """\
Fit a population PK model by FOCE with interaction (NONMEM's METHOD=1 INTERACTION), or as --method or a
control stream's $ESTIMATION asks: FOCE without interaction (METHOD=1), FO (METHOD=0) or Laplace (METHOD=1
LAPLACE [INTERACTION]), with NONMEM's objective functions (Wang, J Pharmacokinet Pharmacodyn 2007;34:575-93).
Other methods are refused by name.

With DATA.csv and --model, the model is built from options: log-normal IIV on the parameters named by
--iiv, covariate effects by --covariate, and the residual error by --error. --model may also name a published
model ('hybridpk models' lists them, or a spec .toml): its covariates, IIV and error model are kept and its
estimates are where the fit starts (with --hybrid vae: a published model extended by the correction).
With MODEL.mod (a NONMEM control stream: ADVAN1-4/11/12 with the TRANS NONMEM allows, $DES with ADVAN6/8/13/14,
the general linear ADVAN5/7, or $PRED), the model, its initial estimates and its dataset are read through
pharmpy-core (pip install 'hybridpk[nonmem]') and parameter names are pharmpy's (POP_CL...). $PK is evaluated
at every record with that record's data items (covariates, TIME, occasion flags), as NONMEM does: a record's
values hold over the interval it ends. $OMEGA BLOCK(n), SAME (inter-occasion variability), FIX and THETA
bounds are honoured; $ERROR may be written on F, IPRED or the amounts A(n), with any residual variance NONMEM
defines (THETA SDs with $SIGMA 1 FIX, ETA on EPS, an SD read from DVID or another data item), on the log scale
(Y = LOG(F) + ..., DV in log units), and with Beal's M3 written as NONMEM users write it (F_FLAG = 1 and
Y = PHI((LLOQ - IPRED)/W) where a level is below the limit; 1 - PHI(...) above an upper one): those levels are
censored at the limit the code gives. A BLQ, LLOQ, CENS or DUR column of its data is a data item, read only where
the code reads it. $ESTIMATION MCETA=n adds EBE searches from n random ETAs for the EBEs reported. What hybridpk
cannot do as written (e.g. SAEM, a $SIGMA block, a variable carried over from the previous record, A_0 with an
ADVAN, M4) is refused with the construct and its line, never replaced.
With a covariate that changes within a subject, a model built from options follows it record by record by the
same rule (--time-varying locf carries each record's value forward instead). --iov CL gives a built model
inter-occasion variability: each occasion of the --occasion column (OCC: 1, 2, ... per record) has its own ETA
on CL, all with one variance, as NONMEM's $OMEGA BLOCK(1) SAME.

The OFV is -2 log-likelihood without the constant, as NONMEM reports it. RUN/ receives:
  summary.json      OFV, convergence, estimates with standard errors (RSE %), OMEGA, SIGMA, shrinkage,
                    counts, seed, software versions, and how each quantity was computed ("methods":
                    covariance of the estimates, CWRES, shrinkage)
  individual.csv    ID, ETAs (empirical Bayes estimates), individual parameters
  predictions.csv   ID, TIME, DV, MDV, PRED, IPRED, CWRES, IWRES for every record
  model.json        the fitted model as plain data, for 'hybridpk predict' and 'hybridpk dose'
  NAME_final.mod    (a control stream NAME.mod) the same control stream with the final estimates as initial
                    estimates, to continue or check the run in NONMEM
  data.json         where the data were read (DATA.csv, a bundled name, or MODEL.mod) and their fingerprint:
                    report, vpc, covariates and compare read them again when --data is not given

With --hybrid vae, a VAE then learns per patient what the ODE misses: an encoder reads each patient's
samples into a latent z, and a correction (the hybrid term; --hybrid-form says how it enters) adds what the
ODE misses, zero before the first dose:
  input        an input rate u(t; z) into the dose compartment (drug that re-enters, as in enterohepatic
               recirculation; negative: extra elimination), carried by the structural model with the
               patient's own parameters (linear models);
  reservoir    a hidden compartment that takes up drug from the central one (rate set by the patient's z)
               and releases it into the dose compartment on a learnt schedule, e.g. enterohepatic
               recirculation (linear models; conserves mass);
  elimination  an extra elimination from the central compartment whose rate constant is a learnt function
               of the concentration and z: target-mediated drug disposition, saturable clearance (linear
               models; conserves mass);
  log          the ODE prediction times exp(r(t; z)) (any model).
auto (the default) fits every form that suits the structural model (all four on a linear model with joint
training, log otherwise) and keeps the best on 20% of the patients held out: each
candidate is trained --screen-epochs epochs, and only the best is trained to the end (as if trained alone).
The score is predictive: each held-out patient's levels are predicted from its other levels (alternate samples),
-2 log-likelihood per observation, so that a correction that follows each patient's samples but is wrong between
them does not win.
Every candidate's score and the choice are printed and go into summary.json ("hybrid": "candidates").
Screening costs 4 x 300 epochs and each candidate's scoring: on 200 EHC patients x 10 samples (2 idle cores)
the default fit took 227 s, 100 s of it the winning reservoir form trained to the end (the reservoir alone:
93 s in all); give a form to train only that one.
By default (--training joint) each patient's ETAs are re-estimated together with z while the VAE learns,
so the correction acts on the ODE at its best individual fit; --training staged keeps the ODE-only ETAs
(log form only). With the log form each patient's prediction averages hybrid and ODE-only with the hybrid's
Akaike weight (HYBRID_WEIGHT), so patients the ODE already describes keep the ODE prediction. After training,
the ETAs' OMEGA and the residual error are estimated again with the correction in place (an iterative two-stage
step on the training patients): the ODE-only fit's absorbed what the ODE missed (on the EHC example OMEGA of V
0.24 and KA 0.56 against the truth's 0.04 and 0.09, additive SD 0.16 against 0.05), and the hybrid's
estimates, predictions and doses use its own. RMSE and
-2LL of ODE-only vs hybrid are printed; individual.csv gains Z1.., Z1_SD.., COMPLEXITY, HYBRID_WEIGHT, and,
from the latent classifier trained with the run (unless --no-classifier; see 'hybridpk classify'),
COMPLEX_EVIDENCE, P_COMPLEX and COMPLEX: which patients need the complex model.
The VAE part is called the correction throughout; "residual" always means the residual error (--error,
NONMEM's EPS).

Progress goes to stderr: a bar on a terminal, one line per 10% in a log file.

Interrupting (Ctrl-C) stops with a one-line message and keeps the work done: the FOCE-I fit writes a
checkpoint after every outer iteration, a finished population fit is written to RUN before the VAE starts
(and is usable on its own), and the VAE training writes a checkpoint every 20 epochs (RUN/checkpoint/).
Repeat the same command with --resume to continue: the VAE ends with the weights an uninterrupted run
would have; a resumed FOCE-I fit restarts BFGS at the saved iterate and agrees with an uninterrupted fit to
the convergence tolerance. Without --resume an earlier checkpoint in RUN is discarded; a checkpoint of
other data or options is refused. RUN/checkpoint/ is removed when the run is complete.

Covariate effects: 'CL~WT' (power, reference = median, exponent estimated), 'CL~WT:power:70:0.75'
(fixed exponent), 'CL~CRCL:linear:90', 'V~SEX:categorical:1', 'CL~AGE:exponential:40'.
"""

EPILOG = """\
examples:
  hybridpk fit theoph --model 1cmt_oral --iiv KA,CL,V --error additive --out runs/theoph
  hybridpk fit data.csv --model 2cmt_iv --covariate CL~WT:power:70 --iiv CL,V --out runs/vanco
  hybridpk fit pheno.mod --out runs/pheno
  hybridpk fit ehc --model 1cmt_oral --error combined --hybrid vae --hybrid-form reservoir --out runs/ehc
"""


def add_parser(sub) -> None:
    p = sub.add_parser("fit", help="fit a population model (FOCE-I)", description=HELP, epilog=EPILOG,
                       formatter_class=ManualFormatter)
    p.add_argument("source", metavar="DATA.csv|MODEL.mod", help="dataset (with --model) or NONMEM control stream")
    p.add_argument("--model", metavar="NAME", help="structural model (see 'hybridpk models'), or a published model "
                   "spec (name or .toml): its IIV, covariates, error model and estimates as the starting point")
    p.add_argument("--out", required=True, metavar="RUN", type=out_folder_arg, help="output folder")
    p.add_argument("--iiv", metavar="P,P", help="parameters with IIV (default: all estimated parameters)")
    p.add_argument("--covariate", action="append", default=[], metavar="P~COV[:kind[:ref[:exp]]]",
                   help="covariate effect (repeatable)")
    p.add_argument("--error", choices=["additive", "proportional", "combined", "combined1"], default=None,
                   help="residual error model: Var = ADD^2 + (PROP IPRED)^2, or one of its two terms (default: "
                        "combined, which also describes levels where the model predicts ~0, such as pre-dose "
                        "samples); combined1: SD = ADD + PROP IPRED (Monolix/posologyr)")
    p.add_argument("--ltbs", action="store_true",
                   help="log-transform both sides: fit log(DV) with an additive error on the log scale")
    p.add_argument("--init", metavar="P=V,...", help="initial typical values, e.g. CL=3,V=30; also estimates F, "
                                                     "ALAG, and D (h) or R (mg/h), the duration or rate of doses "
                                                     "with RATE = -2 or -1 (zero-order input, as NONMEM's D1/R1)")
    p.add_argument("--omega-block", nargs="?", const="all", metavar="P,P[;P,P]",
                   help="estimate covariances between ETAs: alone, one block over all ETAs; with parameters, "
                        "blocks of them, e.g. CL,V (the others keep a variance only) or CL,V;KA,ALAG")
    p.add_argument("--iov", metavar="P,P", help="parameters with inter-occasion variability: each occasion (the "
                   "--occasion column: 1, 2, ... per record) has its own log-normal ETA, all with one variance (as "
                   "NONMEM's $OMEGA BLOCK(1) SAME)")
    p.add_argument("--occasion", default="OCC", metavar="COL", help="the occasion column of --iov (default OCC)")
    p.add_argument("--time-varying", choices=["nonmem", "locf"], default="nonmem",
                   help="a covariate that changes within a subject: nonmem (a record's value holds over the interval "
                        "that record ends, back to the previous record) or locf (it holds from the record to the "
                        "next)")
    p.add_argument("--hybrid", choices=["none", "vae"], default="none",
                   help="add a VAE correction (the hybrid model) on top of the fitted ODE model")
    p.add_argument("--hybrid-form", choices=["auto", "input", "reservoir", "elimination", "log"], default="auto",
                   help="how the correction enters (see above); auto: the best of the forms that suit the model, "
                        "by the predictive score on held-out patients")
    p.add_argument("--screen-epochs", type=positive_int, default=300, metavar="N",
                   help="with several candidate forms or latent dimensions (auto): epochs each is trained before "
                        "only the best continues")
    p.add_argument("--latent-dim", default="2", type=latent_dim_arg, metavar="K|auto",
                   help="latent dimension of the VAE; 'auto' picks 1, 2 or 4 by the predictive score on held-out "
                        "patients")
    p.add_argument("--epochs", type=positive_int, default=1500, help="maximum VAE training epochs (early stopping)")
    p.add_argument("--training", choices=["joint", "staged"], default="joint",
                   help="joint: re-estimate each patient's ETAs with z while training (default); staged: keep "
                        "the ODE-only ETAs (log form)")
    p.add_argument("--device", default="cpu", type=device_arg,
                   help="torch device of the population fit and the VAE training: cpu, cuda, cuda:N, or auto (a "
                        "CUDA GPU when there is one, else the CPU), in float64. On a GPU the fit takes FOCE-I's "
                        "automatic-differentiation path (the analytic derivatives of 1- and 2-compartment models are "
                        "numpy code, on the CPU; summary.json's 'derivatives' says which path ran); the outer "
                        "search and the hybrid's assembly run on the CPU")
    p.add_argument("--distributed", action="store_true",
                   help="with --hybrid vae, under torchrun (torchrun --nproc_per_node=N -m hybridpk fit ... "
                        "--distributed): train the networks data-parallel over the N processes (gloo on the CPU, "
                        "nccl with --device cuda, one GPU per process); every process fits the population alike, "
                        "each takes its share of every minibatch's patients, the gradients are summed over the "
                        "processes, and the first process alone writes RUN and shows progress")
    p.add_argument("--report", action="store_true", help="write the HTML report (estimates, diagnostic figures, VPC) "
                   "into OUT/report right after the fit ('hybridpk report')")
    p.add_argument("--no-classifier", action="store_true", help="with --hybrid vae: do not train the latent "
                   "classifier (which patients need the complex model; 'hybridpk classify')")
    p.add_argument("--seed", type=int, default=0, help="random seed (VAE training; recorded with the run)")
    p.add_argument("--maxiter", type=positive_int, default=300, help="maximum outer iterations")
    p.add_argument("--method", choices=["FOCE-I", "FOCE", "FO", "LAPLACE-I", "LAPLACE"], type=str.upper,
                   default=None,
                   help="estimation method, NONMEM's: FOCE-I (METHOD=1 INTERACTION), FOCE (METHOD=1: the residual "
                        "variance at ETA = 0), FO (METHOD=0: the model linearised at ETA = 0), LAPLACE-I / LAPLACE "
                        "(METHOD=1 LAPLACE [INTERACTION]: the exact second derivative of each subject's objective "
                        "instead of FOCE's first-order one). A control stream's $ESTIMATION decides for a .mod file "
                        "(default: FOCE-I)")
    p.add_argument("--evaluate", action="store_true",
                   help="estimate nothing: the OFV, EBEs, tables and standard errors at the initial estimates "
                        "(NONMEM's MAXEVAL=0; a control stream with MAXEVAL=0 is evaluated without this flag)")
    p.add_argument("--covariance", choices=["sandwich", "R", "S"], default=None,
                   help="standard errors from the sandwich R^-1 S R^-1 (NONMEM's default $COVARIANCE, and the default "
                        "here), 2 R^-1 (MATRIX=R) or 4 S^-1 (MATRIX=S); R: Hessian of the OFV, S: sum of the "
                        "subjects' gradient outer products. A control stream's $COVARIANCE decides for a .mod file "
                        "(none without the record)")
    p.add_argument("--no-covariance", action="store_true", help="skip standard errors")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command from RUN's checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=run)


def run(args) -> int:
    if getattr(args, "distributed", False):
        return _run_distributed(args)
    return _run(args)


def _run_distributed(args) -> int:
    """The command in one of torchrun's processes: the first writes RUN; the others compute alike into a private
    folder (holding a copy of RUN for --resume) with their output silenced."""
    import contextlib
    import io
    import shutil
    import tempfile
    from pathlib import Path

    import torch

    from hybridpk.errors import HybridPKError
    from hybridpk.residual.distributed import init_from_environment

    if args.hybrid != "vae":
        raise HybridPKError("--distributed trains the hybrid's networks data-parallel: add --hybrid vae (a population "
                            "fit alone runs in one process)")
    shard, args.device = init_from_environment(args.device)
    try:
        if shard.main:
            torch.distributed.barrier()           # the other processes have copied RUN for --resume
            return _run(args)
        private = Path(tempfile.mkdtemp(prefix=f"hybridpk-rank{shard.rank}-"))
        try:
            run_dir = private / "run"
            if args.resume and Path(args.out).is_dir():
                shutil.copytree(args.out, run_dir)
            torch.distributed.barrier()
            args.out, args.quiet, args.report = str(run_dir), True, False
            with contextlib.redirect_stdout(io.StringIO()):
                _run(args)
            return 0
        finally:
            shutil.rmtree(private, ignore_errors=True)
    finally:
        torch.distributed.destroy_process_group()


def _run(args) -> int:
    import shutil
    from pathlib import Path

    from hybridpk.errors import Interrupted

    pm, ds = _model_and_data(args)
    if args.hybrid == "vae":   # before the population fit, not after it
        from hybridpk.residual.hybrid import require_hybrid_support

        require_hybrid_support(pm, ds)
    out = Path(args.out)
    ck = out / "checkpoint"
    if not args.resume and ck.exists():
        shutil.rmtree(ck)
    done = "no finished stage is saved yet"
    try:
        result, resumed = _population_stage(args, pm, ds, out, ck)
        record_run_data(out, str(args.source), ds)
        if args.hybrid == "vae":
            done = f"the population fit is saved in {out}"
        hybrid = _hybrid_stage(args, pm, ds, result, ck) if args.hybrid == "vae" else None
        if hybrid is not None:
            hybrid.save(out)
            no_correction = hybrid.vae.form_name == "none"      # nobody needs the complex model: nothing to learn
            classifier = None if args.no_classifier or no_correction else _classifier_stage(hybrid, out, args.seed)
    except KeyboardInterrupt as exc:
        raise Interrupted(f"{exc or 'interrupted'}; {done}; repeat the command with --resume to continue") from None
    if ck.exists():
        shutil.rmtree(ck)
    if resumed:
        print(f"resumed: the population fit saved in {out} was kept")
    print(report(result, ds))
    if hybrid is not None:
        h = hybrid.summary()
        if h["form"] == "none":
            print("hybrid: no correction predicted the held-out patients' levels better than the ODE model alone "
                  "(selection below), so the run's hybrid is the ODE model (form none, no correction)")
        else:
            print(f"hybrid (ODE + VAE, {h['form']} form, latent dimension {h['latent_dim']}): -2LL of the data "
                  f"{h['nll_ode_total']:.1f} (ODE only) -> {h['nll_hybrid_total']:.1f} (hybrid); RMSE at the "
                  f"observations {h['rmse_ode']:.4g} -> {h['rmse_hybrid']:.4g}")
        for line in _candidate_lines(hybrid.candidates):
            print(line)
        if h.get("omega"):
            o = h["omega"]
            print("OMEGA and SIGMA of the hybrid (iterative two-stage, with the correction; ODE-only fit in "
                  "brackets): " + ", ".join(f"{name} {o['hybrid'][i][i]:.4g} ({o['population'][i][i]:.4g})"
                                            for i, name in enumerate(o["etas"]))
                  + "".join(f", {k} SD {v:.4g} ({o['sigma_population'][k]:.4g})"
                            for k, v in o["sigma_hybrid"].items()))
        r = h["refinement"]
        if r["kept_encoder_estimate"] or r["optimizer_failure"]:
            print(f"note: {r['kept_encoder_estimate']} of {r['patients']} patients kept the encoder's estimate of z "
                  "(the per-patient MAP refinement did not improve it" + (f"; its optimiser failed: "
                  f"{r['optimizer_failure']}" if r["optimizer_failure"] else "") + ")")
    if hybrid is not None and classifier is not None:
        r = classifier.report
        auroc = f"cross-validated AUROC {r['auroc']:.3f}" if r.get("auroc") is not None else r.get("note", "")
        print(f"latent classifier: {int(classifier.table.COMPLEX_EVIDENCE.sum())} of {len(classifier.table)} patients "
              f"need the complex model by their own data (COMPLEXITY > {classifier.threshold:.3g}); {auroc}; "
              "P_COMPLEX and COMPLEX in individual.csv ('hybridpk classify RUN' for the report)")
    if args.report:
        from hybridpk.report import write_report

        print(f"report: {write_report(out, ds, out / 'report', seed=args.seed)}")
    final = sorted(p.name for p in out.glob("*_final.mod"))
    print(f"wrote {out / 'summary.json'}, individual.csv, predictions.csv, model.json"
          + "".join(f", {name}" for name in final) + (", vae.pt, vae.json" if hybrid is not None else ""))
    return 0


def _classifier_stage(hybrid, out, seed: int):
    """The run's latent classifier (hybridpk.classify), trained and saved with it."""
    from hybridpk.classify import save_classifier, train_classifier

    rc = train_classifier(hybrid, seed=seed)
    save_classifier(out, rc)
    return rc


def _candidate_lines(cands) -> list[str]:
    """The form / latent-dimension selection as a few lines: each candidate's score (predictive -2LL per held-out
    observation, or held-out -ELBO per patient)."""
    if not cands:
        return []
    screened = any(c.screen_score is not None for c in cands)
    n_screen = max(c.screen_epochs for c in cands)
    what = ("predictive -2LL per held-out observation (each held-out patient's levels predicted from its other "
            "levels)" if cands[0].criterion == "predictive" else "held-out -ELBO per patient")
    head = (f"selection by {what} (lower is better; after {n_screen} screening epochs"
            if screened else f"selection by {what} (lower is better")
    lines = [head + "):"]
    for c in cands:
        score = c.screen_score if screened else c.score
        # the screening's winner continued: its final score (what the ODE model's, form none, is compared with)
        end = f", {c.score:.4f} after {c.epochs} epochs" if screened and c.score is not None and c.epochs else ""
        name = "none (ODE)" if c.form == "none" else c.form
        lines.append(f"  {name:<12} K={c.latent_dim}  {score:10.4f}{end}  ({c.seconds:.0f} s)"
                     + ("  <- chosen" if c.chosen else ""))
    return lines


#: options of 'fit' that do not change the population fit (a resumed run may keep its saved population fit)
_NOT_POPULATION = ("hybrid", "hybrid_form", "screen_epochs", "latent_dim", "epochs", "training", "device", "quiet",
                   "distributed", "resume", "out", "debug", "handler", "command", "version")


def _stage_key(args, ds) -> str:
    """SHA-256 of what the population fit computes from: its options, the data and, for a control stream,
    the file's text."""
    import hashlib
    import json
    from pathlib import Path

    opts = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_POPULATION}
    h = hashlib.sha256(json.dumps(opts, default=str).encode() + ds.fingerprint().encode())
    src = Path(str(args.source))
    if src.suffix.lower() in (".mod", ".ctl") and src.is_file():
        h.update(src.read_bytes())
    return h.hexdigest()


def _population_stage(args, pm, ds, out, ck):
    """(the FOCE-I fit, whether it was resumed from RUN): with --resume, the population fit RUN already holds
    when it was made by the same options and data; else the fit (checkpointed in RUN/checkpoint/foce.json),
    written to RUN as soon as it is finished."""
    import warnings

    from hybridpk.io import atomic_write_text
    from hybridpk.population import FittedPopulation, fit_population

    key = _stage_key(args, ds)
    stamp = ck / "population.done"
    if args.resume and stamp.is_file() and stamp.read_text().strip() == key:
        return FittedPopulation.load(out), True
    with warnings.catch_warnings():  # convergence problems are reported below and in summary.json
        warnings.simplefilter("ignore")
        result = fit_population(pm, ds, seed=args.seed, maxiter=args.maxiter, progress=not args.quiet,
                                estimation=args.method, evaluate=True if args.evaluate else None,
                                covariance="none" if args.no_covariance else args.covariance, pooled_start=args.pooled,
                                checkpoint=ck / "foce.json", device=args.device)
    result.save(out)
    if pm.recipe.get("kind") == "nonmem":     # the final estimates, to take back to NONMEM
        from pathlib import Path

        from hybridpk.population.nonmem import write_control_stream

        write_control_stream(result, out / f"{Path(str(args.source)).stem}_final.mod")
    atomic_write_text(stamp, key)
    return result, False


def _hybrid_stage(args, pm, ds, result, ck):
    """The VAE trained on the population fit (checkpoints in RUN/checkpoint/)."""
    from hybridpk.residual import TrainConfig, fit_hybrid

    k = args.latent_dim if args.latent_dim == "auto" else int(args.latent_dim)
    print("training the VAE ...")
    return fit_hybrid(pm, ds, latent_dim=k, seed=args.seed, progress=not args.quiet, population=result,
                      config=TrainConfig(epochs=args.epochs, device=args.device, joint=args.training == "joint",
                                         form=args.hybrid_form, screen_epochs=args.screen_epochs,
                                         distributed=getattr(args, "distributed", False)),
                      checkpoint_dir=ck)


def _model_and_data(args):
    """The PopulationModel and Dataset the command describes (a control stream, or data and options)."""
    from hybridpk.errors import HybridPKError
    from hybridpk.population import build_model

    src = str(args.source)
    if src.lower().endswith((".mod", ".ctl")):
        from hybridpk.population.nonmem import read_control_stream

        pm, ds = read_control_stream(src)
        asked = pm.recipe.get("estimation", "FOCE-I")
        if args.method and args.method != asked:
            raise HybridPKError(f"--method {args.method}: {src} asks for {asked} in its $ESTIMATION; hybridpk "
                                "does what the control stream says: change $ESTIMATION, or drop --method")
        args.pooled = False
    else:
        if not args.model:
            raise HybridPKError("--model is required with a dataset (or give a NONMEM control stream .mod)")
        from hybridpk.data.dataset import read_nonmem

        ds = read_nonmem(resolve_data_path(src))
        spec = _published_spec(args)
        if spec is not None:
            ds.require_units(spec.units, spec.name)    # its estimates are on its units' scale
            args.pooled = False
            return spec.starting_model(), ds
        init = {}
        for item in (args.init or "").split(","):
            if item.strip():
                k, _, v = item.partition("=")
                try:
                    init[k.strip().upper()] = float(v)
                except ValueError:
                    raise HybridPKError(f"--init: expected P=VALUE, got {item!r}") from None
        iiv = [s.strip().upper() for s in args.iiv.split(",") if s.strip()] if args.iiv else None
        if args.ltbs:
            from hybridpk.population import ErrorModel

            error = ErrorModel("additive", add=0.3, ltbs=True)
        else:
            error = args.error or "combined"
        if args.omega_block == "all":
            block = True
        elif args.omega_block:
            block = [[p.strip() for p in g.split(",") if p.strip()] for g in args.omega_block.split(";") if g.strip()]
        else:
            block = False
        iov = [s.strip().upper() for s in args.iov.split(",") if s.strip()] if args.iov else None
        if args.occasion != "OCC" and not iov:
            raise HybridPKError(f"--occasion {args.occasion} names the occasion column of --iov; give --iov P,P too")
        pm = build_model(args.model, iiv=iiv, covariates=args.covariate, error=error, initial=init, data=ds,
                         omega_block=block, time_varying=args.time_varying, iov=iov, occasion=args.occasion)
        args.pooled = not init
    return pm, ds


def _published_spec(args):
    """The published model --model names (a spec name or .toml file), or None for a structural model. Its IIV,
    covariate effects, error model and estimates are the spec's: options that would change them are refused."""
    from pathlib import Path

    from hybridpk.errors import HybridPKError
    from hybridpk.population import load_model, model_specs

    name = str(args.model)
    if not (name in model_specs() or (name.endswith(".toml") and Path(name).is_file())):
        return None
    given = [flag for flag, value in (("--iiv", args.iiv), ("--covariate", args.covariate), ("--error", args.error),
                                      ("--ltbs", args.ltbs), ("--init", args.init),
                                      ("--omega-block", args.omega_block), ("--iov", args.iov)) if value]
    spec = load_model(name)
    if given:
        raise HybridPKError(f"--model {name} is a published model: its IIV, covariates, residual error and initial "
                            f"estimates are the spec's, so {', '.join(given)} cannot change them; drop "
                            f"{'it' if len(given) == 1 else 'them'}, or build your own model on its structure "
                            f"(--model {spec.model.structural.name} with your options)")
    return spec


def _etabar(bar) -> str:
    """", ETABAR -0.012 (P 0.49)" as NONMEM's .lst gives it (nothing for a run saved without it)."""
    if not bar or bar["p"] is None:
        return ""
    p = "P < 0.001" if bar["p"] < 1e-3 else f"P {bar['p']:.3f}"
    return f", ETABAR {bar['etabar']:.3g} ({p})"


def report(result, ds) -> str:
    """The estimates as printed after a fit: OFV and convergence, THETA with RSE, OMEGA with CV and
    shrinkage, SIGMA on its stated scale, warnings."""
    e = result.estimation
    if e.evaluation_only:
        lines = [f"{e.method} evaluation (MAXEVAL=0: nothing estimated) of {ds.n_subjects} subjects, "
                 f"{ds.n_observations} observations: OFV {e.ofv:.4f} at the initial estimates ({e.seconds:.1f} s)"]
    else:
        lines = [f"{e.method} fit of {ds.n_subjects} subjects, {ds.n_observations} observations: OFV {e.ofv:.4f} "
                 f"({'converged' if e.converged else 'NOT converged'}, {e.iterations} iterations, {e.seconds:.1f} s)"]
    labels = {"sandwich": "the sandwich R^-1 S R^-1 (NONMEM's default)", "R": "2 R^-1 (MATRIX=R)",
              "S": "4 S^-1 (MATRIX=S)"}
    if e.covariance in labels:
        lines.append(f"  standard errors (RSE) from {labels[e.covariance]}; CWRES as NONMEM's FOCE-I $TABLE "
                     "(see summary.json 'methods')")
    if ds.time_note:
        lines.append(f"  {ds.time_note} (RUN/data.json holds each subject's first date and time)")
    if ds.dv_log:
        lines.append("  DV: the control stream fits LOG(F) to DV in log units; its DV were read as EXP(DV), and the "
                     "tables give DV, PRED and IPRED as concentrations (IWRES and CWRES on the log scale)")
    if ds.commented_lines:
        lines.append(f"  {len(ds.commented_lines)} records marked C in the comment column C left out (NM-TRAN's "
                     "IGNORE=C; `hybridpk check` lists their lines)")
    for t in result.theta:
        rse = f"{t.rse:.1f}%" if t.rse is not None else "-"
        lines.append(f"  {t.shown:<12} {t.value:12.5g}   RSE {rse}")
    for o in result.omega:
        shr = e.shrinkage["eta"].get(o.eta, float("nan"))
        cv = f"{o.cv_percent:.1f}%" if o.cv_percent is not None else "not finite"
        lines.append(f"  {o.label:<12} {o.variance:12.5g}   (CV {cv}, shrinkage "
                     + (f"{shr:.1f}%" if shr == shr else "undefined") + _etabar(e.etabar.get(o.eta)) + ")")
    etas = result.omega.etas
    held = {f"{etas[c]},{etas[r]}" for r, c in result.model.omega_zeros}
    for pair, c in result.omega.covariances_to_dict().items():      # a block's covariances, as NONMEM prints them
        if pair in held:
            lines.append(f"  {'COV(' + pair + ')':<12} {0:12.5g}   (held at 0: a banded block, as NONMEM holds a 0 "
                         "given in $OMEGA BLOCK)")
            continue
        rse = f", RSE {100 * c['se'] / abs(c['covariance']):.1f}%" if c["se"] is not None and c["covariance"] else ""
        lines.append(f"  {'COV(' + pair + ')':<12} {c['covariance']:12.5g}   (correlation {c['correlation']:.2f}{rse})")
    for s in result.sigma:
        lines.append(f"  {s.label:<12} {s.value:12.5g}   ({'SD' if s.scale == 'sd' else 'variance'})")
    lines += [f"warning: {w}" for w in e.warnings]
    return "\n".join(lines)
