"""hybridpk dose / hybridpk map: precision dosing for one patient."""

from __future__ import annotations

from ._common import (DEVICE_HELP, DV_HELP, ManualFormatter, device_arg, figure_arg, finite_float, model_dataset,
                      out_file_arg, positive_float, positive_int)

#: the target a dose recommendation takes when neither the command nor the model states one
DEFAULT_TARGET = "auc24=400:600"

DOSE_HELP = """\
Recommend a dose (and interval) for a patient, or for each patient of a list, from a population model and a
few drug levels.

MODEL_OR_RUN is a published model spec shipped with hybridpk (e.g. vancomycin_goti2018; list them with
'hybridpk dose --list'), a spec file (.toml), a NONMEM control stream (.mod/.ctl: its $THETA/$OMEGA/$SIGMA,
so put a run's final estimates there; its $DATA file must be present, and its covariate ranges become the
population patients are checked against; a stream that censors levels with F_FLAG, Beal's M3, censors the
patient's levels by the same rule), or a run folder written by 'hybridpk fit', a hybrid one
included (--hybrid vae: the patient's posterior is then over the ETAs and the latent z jointly, and
exposures come from the hybrid prediction, simulated dose by dose). PATIENT.csv is a
NONMEM-style file for one patient, or for a day's list of patients (one answer per ID, a summary table;
a patient whose data are refused is listed with the reason and the others are answered): the doses given
so far, the TDM levels (EVID 0) and the covariates the
model needs (e.g. CRCL, WT). A spec may declare defaults for optional covariates (vancomycin_goti2018:
DIAL = 0, not on dialysis); the answer then says which value it took. A spec may also state its drug's
regimen ([dosing]: target, interval, infusion duration, dose step; busulfan_longboyle2015: Css 600-900
ng/mL, i.e. auc24=14.4:21.6, 2-h infusions every 6 h, steps of 0.1 mg), taken for the flags not given and
printed; a model that states no target gets auc24=400:600 (a vancomycin window), with a note saying so, and
one that states no dose step takes it from the patient's record (the largest of 1, 2, 2.5 or 5 x 10^k mg
that is at most a quarter of the median dose given: 1000 mg gives 250, 3.5 mg gives 0.5; 250 for a record
without a dose), also with a note.

The patient's parameters are estimated by MAP (Bayesian, with the model as prior); 1000 posterior draws
(250 for a hybrid; --draws N) give the uncertainty: adaptive importance sampling from the Laplace
approximation with the prior as a defensive component (a second mode is not missed), Pareto-smoothed; a
warning says when the sampling is poorly resolved (effective sample size < 100 or Pareto k > 0.7). The
regimen is chosen on the MAP prediction, so the sampling seed does not change it: among whole multiples of
--dose-step up to --max-dose, the one whose MAP exposure lies in the target window closest to its middle,
among those needing at most twice the smallest daily dose that reaches the window (so that a trough target is
not met by a huge dose at a long interval); ties: the smaller daily dose. If no allowed regimen reaches the
window, the command says so and names the nearest one; it never recommends 0 mg, more than --max-dose or
infusions longer than the interval; a dose more than 5 times the largest in the patient's record is named.
Targets: auc24=LOW:HIGH (mg*h/L over 24 h at steady state), auc24@D=LOW:HIGH (over day D of the new
regimen, history included), trough=LOW:HIGH and
peak=LOW:HIGH (mg/L, steady state), conc@T=LOW:HIGH (mg/L, T h after the first new dose).

Two other questions: --dose MG fixes the dose and solves for the dosing interval (h) that puts the MAP
steady-state target (auc24, trough or peak) at the middle of its window, exactly (a root, not a pick from
a list; --interval-step rounds it, e.g. to 0.5 or 6 h). --time-below C answers when the concentration
falls to C mg/L after the last dose if nothing more is given (MAP time and 90% interval; exact root after
the peak, or --posologyr-grid for posologyr's poso_time_cmin: the first 0.1-h grid point from the last
dose + 0.2 h that is below C). --loading adds a loading dose at the start that puts the target of the
first interval (trough before the first maintenance dose, peak, or the AUC of the first 24 h) at the middle
of the window; the maintenance regimen follows one interval later. --cmt N sends the new doses into
compartment N (e.g. IV into the central compartment of an oral model; F then does not apply).

REC.json holds: the dose and interval, the regimen as NONMEM dose records, the predicted exposure (MAP,
median and 90% interval), the probability of target attainment, the MAP individual parameters with
their 90% credible intervals, and warnings (covariates outside the model's population, few or
implausible levels, poorly informed parameters, capped doses; for a hybrid, a latent z or a regimen (dose,
interval, time span, number of doses) outside what its training data covered), and the patient's whole
estimate as 'hybridpk map --out EST.json' writes it (patient_estimate). --plot draws the forecast under the
recommended regimen (MAP prediction and 90% prediction interval over the posterior draws, the levels, the
doses given and the new ones) with the target window.
"""

MAP_HELP = """\
Estimate one patient's parameters (MAP with the model as prior) and forecast the concentrations.
MODEL_OR_RUN as for 'hybridpk dose' (a spec, a .toml, a NONMEM control stream or a run folder). A file
with several patients gets one line per ID (MAP parameters, OFV; refused patients with the reason), and
--out holds every patient (an ID column in the CSV).

Prints the MAP individual parameters with 90% credible intervals, the OFV and warnings; --out writes a CSV
of the forecast (MAP prediction, median, 90% prediction interval) on a time grid, or, named .json, the
whole estimate (full-precision MAP, OFV with each level's contribution, shrinkage, the Laplace covariance
from the observed and from the expected information, the latter as NONMEM's ETC, and the forecast), and
--plot a figure of the forecast with the TDM levels. --samples writes the posterior draws as an ArviZ
NetCDF file. --auc adds the AUC of the doses already given over a window (Gauss-Legendre quadrature split at
each dose; no further dose assumed).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("dose", help="recommend a dose for a patient (MIPD)", description=DOSE_HELP,
                       epilog="examples:\n  hybridpk dose vancomycin_goti2018 patient.csv --target auc24=400:600 "
                              "--interval 12 --duration 1 --dose-step 250 --max-dose 4000 --out rec.json\n"
                              "  hybridpk dose runs/mydrug patient.csv --target trough=10:15 --out rec.json\n"
                              "  hybridpk dose vancomycin_goti2018 patient.csv --dose 1000 --target trough=10:15 "
                              "--interval-step 0.5\n"
                              "  hybridpk dose vancomycin_goti2018 patient.csv --time-below 10\n",
                       formatter_class=ManualFormatter)
    p.add_argument("model", metavar="MODEL_OR_RUN", nargs="?",
                   help="model spec name/file, NONMEM control stream or fit run folder")
    p.add_argument("patient", metavar="PATIENT.csv", nargs="?", help="one patient's doses, levels, covariates")
    p.add_argument("--list", action="store_true", help="list the shipped model specs and exit")
    p.add_argument("--target", help="target window, e.g. auc24=400:600 (default: the model's stated target, e.g. a "
                   f"published spec's [dosing]; else {DEFAULT_TARGET})")
    p.add_argument("--interval", type=float, help="dosing interval (h); default: the model's stated interval, else "
                   "the best of 8, 12, 24")
    p.add_argument("--duration", type=float, help="infusion duration (h); 0 for bolus/oral (default: the model's "
                   "own duration for a model whose doses take one, a control stream's D1 with RATE = -2; 0 for a "
                   "model whose route is oral or bolus: a fit of an oral model, or of an IV model to data dosed by "
                   "bolus only; else 1)")
    p.add_argument("--cmt", type=int, default=0, metavar="N", help="compartment of the new doses (NONMEM numbering; "
                   "default 0: the model's dose compartment), e.g. the central compartment for IV doses with a "
                   "model fitted on oral data (F then does not apply)")
    p.add_argument("--dose-step", type=float, help="dose rounding step (mg; default: the model's stated step, else a "
                   "round quarter of the median dose in the patient's record or less, e.g. 250 for 1000-mg doses)")
    p.add_argument("--max-dose", type=float, help="maximum single dose (mg)")
    p.add_argument("--start", metavar="H|DATE TIME", help="time of the first new dose: hours on the record's TIME "
                   "scale, or a date and time ('2026-12-09 08:00') when the record has dates and clock times "
                   "(default: the last dose plus its interval)")
    p.add_argument("--dose", type=positive_float, metavar="MG", help="fix the dose (mg) and solve for the interval "
                   "that puts the steady-state target (auc24, trough, peak) at the middle of its window")
    p.add_argument("--interval-step", type=positive_float, metavar="H", help="with --dose: round the interval to a "
                   "whole multiple of H hours (default: the exact root)")
    p.add_argument("--loading", action="store_true", help="also a loading dose, given at the start, that puts the "
                   "target of the first interval at the middle of its window; the maintenance follows one interval "
                   "later")
    p.add_argument("--time-below", type=positive_float, metavar="C", help="instead of a dose: when the "
                   "concentration falls to C mg/L after the last dose, if nothing more is given")
    p.add_argument("--posologyr-grid", action="store_true", help="with --time-below: posologyr's grid semantics "
                   "(first 0.1-h point from last dose + 0.2 h below C) instead of the exact root after the peak")
    p.add_argument("--draws", type=positive_int, metavar="N", help="posterior draws (default 1000; 250 for a hybrid); "
                   "the probability of target attainment reports its Monte-Carlo error")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior sampling")
    p.add_argument("--dv", choices=["log", "conc"], help=DV_HELP)
    p.add_argument("--device", default="cpu", type=device_arg, help=DEVICE_HELP)
    p.add_argument("--out", metavar="REC.json", type=out_file_arg, help="write the recommendation here")
    p.add_argument("--plot", metavar="FIG.png", type=figure_arg, help="figure of the forecast under the recommended "
                   "regimen: MAP prediction, 90%% prediction interval, the levels, the doses and the target window")
    p.set_defaults(handler=run_dose)

    q = sub.add_parser("map", help="MAP estimate and forecast for a patient", description=MAP_HELP,
                       epilog="example:\n  hybridpk map vancomycin_goti2018 patient.csv --plot forecast.png\n",
                       formatter_class=ManualFormatter)
    q.add_argument("model", metavar="MODEL_OR_RUN")
    q.add_argument("patient", metavar="PATIENT.csv")
    q.add_argument("--until", type=finite_float, help="forecast until this time (h; default last record + 24)")
    q.add_argument("--out", metavar="FORECAST.csv|EST.json", type=out_file_arg, help="forecast table (.csv), or "
                   "(.json) the whole estimate: MAP at full precision, OFV and each level's contribution, shrinkage, "
                   "the covariance (observed and expected information, NONMEM's ETC), the forecast")
    q.add_argument("--plot", metavar="FIG.png", type=figure_arg, help="forecast figure with the TDM levels")
    q.add_argument("--samples", metavar="POSTERIOR.nc", help="posterior draws (ArviZ NetCDF)")
    q.add_argument("--auc", nargs="?", const="", metavar="FROM:TO", type=auc_window_arg,
                   help="also the AUC (mg*h/L) of the doses given, over FROM-TO h (default: first dose to last "
                   "record; either end may be left out, e.g. 24: or :48), MAP and 90%% interval")
    q.add_argument("--above", type=positive_float, metavar="C", help="also the hours the concentration spends above C "
                   "mg/L (e.g. an MIC: fT>MIC) over the --auc window (default: first dose to last record)")
    q.add_argument("--draws", type=positive_int, metavar="N", help="posterior draws (default 1000; 250 for a hybrid)")
    q.add_argument("--seed", type=int, default=0, help="seed of the posterior sampling")
    q.add_argument("--dv", choices=["log", "conc"], help=DV_HELP)
    q.add_argument("--device", default="cpu", type=device_arg, help=DEVICE_HELP)
    q.set_defaults(handler=run_map)


def auc_window_arg(text: str):
    """'FROM:TO' (h), either part may be empty; '' (the flag alone): the whole history."""
    import argparse
    import math

    if text == "":
        return (None, None)
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        ends = tuple(None if p.strip() == "" else float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give the window as FROM:TO in hours, e.g. 0:24 or 24:")
    if any(e is not None and not math.isfinite(e) for e in ends) or (None not in ends and ends[0] >= ends[1]):
        raise argparse.ArgumentTypeError(f"{text!r}: give finite times with FROM < TO")
    return ends


def _load(args):
    from hybridpk.dosing import dosing_model

    model = dosing_model(args.model, device=args.device)
    ds = model_dataset(args.patient, args.dv, model)
    if hasattr(args, "start"):
        args.start = _start_hours(args.start, ds)
    return model, ds


def _start_hours(start, ds):
    """--start as hours on the record's TIME scale: a number as given; a date and time ("2026-12-09 08:00",
    ISO 8601) as the hours since the patient's first record, which the record's own dates and clock times
    place (hybridpk.data._clock); with several patients, a {ID: hours} for each. None stays None."""
    import datetime as dt
    import math

    from hybridpk.errors import HybridPKError

    if start is None or isinstance(start, (int, float)):
        return start
    try:
        hours = float(start)
    except ValueError:
        pass
    else:
        if not math.isfinite(hours):
            raise HybridPKError(f"--start {start}: give a finite time (h) or a date and time")
        return hours
    try:
        when = dt.datetime.fromisoformat(start.strip())
    except ValueError:
        raise HybridPKError(f"--start {start!r}: give hours (e.g. 120) or a date and time (e.g. '2026-12-09 08:00')"
                            ) from None
    if when.tzinfo is not None:
        raise HybridPKError(f"--start {start!r}: give the date and time without a time zone, as the record's own "
                            "dates and clock times are written")
    hours = {pid: ds.hours_at(pid, when) for pid in ds.ids}
    missing = [pid for pid, h in hours.items() if h is None]
    if missing:
        raise HybridPKError(f"--start {start!r} is a date and time, but the record of patient "
                            f"{', '.join(map(str, missing[:5]))} has no calendar dates to place it (its TIME is "
                            "hours); give --start in hours on that scale")
    return hours[ds.ids[0]] if len(hours) == 1 else hours


def run_dose(args) -> int:
    import json

    from hybridpk.dosing import interval_for_dose, recommend_dose
    from hybridpk.errors import HybridPKError
    from hybridpk.io import atomic_write_text, run_metadata
    from hybridpk.population import model_specs

    if args.list:
        print("\n".join(model_specs()))
        return 0
    if not args.model or not args.patient:
        raise HybridPKError("give MODEL_OR_RUN and PATIENT.csv (or --list)")
    _check_question(args)
    model, ds = _load(args)
    _conventions(args, model, ds)
    if ds.n_subjects > 1:
        if args.plot:
            raise HybridPKError(f"--plot is for one patient; the file has {ds.n_subjects} (IDs "
                                f"{', '.join(map(str, ds.ids[:5]))}{', ...' if ds.n_subjects > 5 else ''})")
        from .daylist import run_many

        return run_many(args, model, ds, *_question(args))
    if args.plot and (args.time_below is not None or args.loading):
        raise HybridPKError(f"--plot draws a recommended regimen; drop it with "
                            f"{'--time-below' if args.time_below is not None else '--loading'}")
    if args.time_below is not None:
        return _time_below(args, model, ds)
    if args.loading:
        return _loading(args, model, ds)
    post = None
    if args.plot:       # one posterior for the recommendation and its figure
        from hybridpk.dosing import estimate_patient

        post = estimate_patient(model, ds, n_samples=args.draws, seed=args.seed)
    if args.dose is not None:
        rec = interval_for_dose(model, ds, args.dose, args.target, duration=args.duration,
                                interval_step=args.interval_step, start=args.start, seed=args.seed, cmt=args.cmt,
                                n_samples=args.draws, posterior=post)
    else:
        rec = recommend_dose(model, ds, args.target, interval=args.interval, duration=args.duration,
                             dose_step=args.dose_step, max_dose=args.max_dose, start=args.start, seed=args.seed,
                             cmt=args.cmt, n_samples=args.draws, posterior=post)
    out = {**rec.to_dict(), **_clock(ds, start_clock=rec.start), **run_metadata(seed=args.seed)}
    text = json.dumps(out, indent=2, default=float)
    if args.out:
        atomic_write_text(args.out, text)
    metric, exp = next(iter(rec.exposure.items()))
    print(f"{model.name}: {rec.dose:g} mg every {rec.interval:.4g} h"
          + rec.regimen.how
          + (f" into compartment {rec.regimen.cmt}" if rec.regimen.cmt else "") + f", from {_at(ds, rec.start)}")
    se = f" (Monte-Carlo SE {rec.pta_mc_se:.1%})" if rec.pta_mc_se is not None else ""
    print(f"  predicted {metric}: MAP {exp['map']:.1f}; posterior median {exp['median']:.1f}, 90% interval "
          f"{exp['p05']:.1f}-{exp['p95']:.1f}; target {exp['target'][0]:g}-{exp['target'][1]:g}")
    print(f"  probability of target attainment {rec.pta:.0%}{se} over the posterior draws")
    for w in rec.warnings:
        print(f"warning: {w}")
    if args.out:
        print(f"wrote {args.out}")
    if args.plot:
        _plot_recommendation(args, model, ds, rec, post, metric, exp)
    return 0


def _at(ds, hours: float) -> str:
    """'t = 120.5 h', with the date and time when the patient's record had them ('t = 120.5 h, 2026-12-09
    08:00')."""
    when = ds.clock_time(ds.ids[0], hours)
    return f"t = {hours:g} h" + (f", {when}" if when else "")


def _clock(ds, **hours) -> dict:
    """{name: "YYYY-MM-DD hh:mm"} of the times given (h), for REC.json, when the patient's record had calendar
    dates (hybridpk.data._clock); empty otherwise."""
    out = {name: ds.clock_time(ds.ids[0], h) for name, h in hours.items() if h is not None}
    return {name: when for name, when in out.items() if when is not None}


def _plot_recommendation(args, model, ds, rec, post, metric: str, exp: dict) -> None:
    """The forecast under the recommended regimen (three intervals, at least 48 h) with the target window."""
    import numpy as np

    from hybridpk.dosing import forecast, plot_forecast

    until = rec.start + max(48.0, 3 * rec.interval)
    fc = forecast(post.estimate, post.draws, np.linspace(0.0, until, 481), regimen=rec.regimen, seed=args.seed)
    note = (f"{metric}: MAP {exp['map']:.4g}, 90% interval {exp['p05']:.4g}-{exp['p95']:.4g}; "
            f"P(target) {rec.pta:.0%}")
    plot_forecast(fc, post.estimate, args.plot, title=f"{model.name}, patient {ds.ids[0]}: {rec.dose:g} mg every "
                  f"{rec.interval:.4g} h", target=rec.target, regimen=rec.regimen, note=note)
    print(f"wrote {args.plot}")


def _conventions(args, model, ds) -> None:
    """Fill the flags not given from the regimen conventions the model states (a published spec's [dosing]:
    target, interval, infusion duration, dose step, maximum dose), then from hybridpk's defaults, and say
    which were taken: a vancomycin AUC window is never applied to another drug without a word."""
    from hybridpk.dosing.targets import parse_target
    from hybridpk.errors import HybridPKError

    if args.time_below is not None:
        return
    stated = dict(getattr(model.population, "dosing", None) or {})
    keys = ("target", "duration") + (() if args.dose is not None else ("interval", "dose_step", "max_dose"))
    taken = [key for key in keys if getattr(args, key) is None and key in stated]
    if "target" in taken:
        try:
            parse_target(stated["target"])
        except HybridPKError as exc:
            raise HybridPKError(f"{model.name}: the target its [dosing] states is not usable ({exc}); give --target")
    for key in taken:
        setattr(args, key, stated[key])
    if taken:
        print(f"{model.name} states its regimen: " + ", ".join(f"{k.replace('_', ' ')} {stated[k]:g}"
                                                              if k != "target" else f"target {stated[k]}"
                                                              for k in taken) + " (the flags override)")
    if args.target is None:
        if model.concentration_scale:
            raise HybridPKError(f"{model.name} predicts levels in other units than amount/L "
                                f"({model.concentration_scale}), and hybridpk's "
                                f"default target {DEFAULT_TARGET} is in mg*h/L: give --target in the units of its "
                                "levels")
        args.target = DEFAULT_TARGET
        print(f"note: target {DEFAULT_TARGET} is hybridpk's default (a vancomycin AUC24 window, mg*h/L); "
              f"{model.name} states none, so give --target for another drug")
    if args.dose_step is None and args.dose is None:
        print(f"note: {model.name} states no dose step, so " + _record_step_note(ds) + "; give --dose-step to choose")


def _record_step_note(ds) -> str:
    """How the dose step is taken from the patient's record (or each patient's, for a day's list)."""
    from hybridpk.dosing.constraints import FALLBACK_DOSE_STEP, median_record_dose, record_dose_step

    df = ds.to_dataframe()
    if ds.n_subjects > 1:
        return ("each patient's dose step is a round quarter of the median dose in the patient's record, or less "
                f"({FALLBACK_DOSE_STEP:g} mg for a record without a dose)")
    step = record_dose_step(df)
    if step is None:
        return f"the dose step is {FALLBACK_DOSE_STEP:g} mg (the patient's record has no dose to take it from)"
    return (f"the dose step is {step:g} mg (doses are multiples of it), taken from the patient's record: a round "
            f"quarter of the median dose {median_record_dose(df):g} mg, or less")


def _question(args):
    """(the library function, its arguments) that answer the command's question."""
    from hybridpk.dosing import interval_for_dose, loading_dose, recommend_dose, time_to_concentration

    if args.time_below is not None:
        return time_to_concentration, {"concentration": args.time_below,
                                       "method": "grid" if args.posologyr_grid else "root"}
    common = {"target": args.target, "duration": args.duration, "start": args.start, "cmt": args.cmt}
    if args.loading:
        question, arguments = loading_dose, {**common, "interval": args.interval, "dose_step": args.dose_step,
                                             "max_dose": args.max_dose}
    elif args.dose is not None:
        question, arguments = interval_for_dose, {**common, "dose": args.dose, "interval_step": args.interval_step}
    else:
        question, arguments = recommend_dose, {**common, "interval": args.interval, "dose_step": args.dose_step,
                                               "max_dose": args.max_dose}
    if isinstance(args.start, dict):     # a date and time: each patient's own hours (_start_hours)
        starts, ask = args.start, question

        def question(model, patient, **kw):
            return ask(model, patient, **{**kw, "start": starts[patient.ids[0]]})
    return question, arguments


def _check_question(args) -> None:
    """One question per call: a dose (default), the interval for --dose, or --time-below; refuse flags that
    belong to another question."""
    from hybridpk.errors import HybridPKError

    given = {flag for flag, value in (("--interval", args.interval), ("--max-dose", args.max_dose),
                                      ("--interval-step", args.interval_step), ("--dose", args.dose),
                                      ("--posologyr-grid", args.posologyr_grid or None)) if value is not None}
    if args.dose_step is not None:
        given.add("--dose-step")
    if args.cmt != 0:
        given.add("--cmt")
    if args.loading:
        if args.time_below is not None or args.dose is not None:
            raise HybridPKError("--loading goes with a dose recommendation; drop "
                                + ("--time-below" if args.time_below is not None else "--dose"))
    if args.time_below is not None:
        clash = given - {"--posologyr-grid"}
        if clash:
            raise HybridPKError("--time-below asks when the level falls, with no new dose; drop "
                                + ", ".join(sorted(clash)))
        return
    if "--posologyr-grid" in given:
        raise HybridPKError("--posologyr-grid goes with --time-below C")
    if args.dose is not None:
        clash = given & {"--interval", "--max-dose", "--dose-step"}
        if clash:
            raise HybridPKError(f"--dose fixes the dose and solves for the interval; drop {', '.join(sorted(clash))}")
    elif args.interval_step is not None:
        raise HybridPKError("--interval-step goes with --dose MG (the interval for a fixed dose)")


def _loading(args, model, ds) -> int:
    import json

    from hybridpk.dosing import loading_dose
    from hybridpk.io import atomic_write_text, run_metadata

    out = loading_dose(model, ds, args.target, interval=args.interval, duration=args.duration, cmt=args.cmt,
                       dose_step=args.dose_step, max_dose=args.max_dose, start=args.start, seed=args.seed,
                       n_samples=args.draws)
    m = out.maintenance
    how = m.regimen.how
    if out.dose_mg is None:
        print(f"{model.name}: no loading dose; maintenance {m.dose:g} mg every {m.interval:g} h{how}, from "
              f"{_at(ds, m.start + m.interval)}")
    else:
        print(f"{model.name}: loading dose {out.dose_mg:g} mg at {_at(ds, m.start)}, then {m.dose:g} mg every "
              f"{m.interval:g} h{how} from {_at(ds, m.start + m.interval)}")
    label, e = next(iter(out.exposure.items()))
    print(f"  {label}: MAP {e['map']:.1f}; posterior median {e['median']:.1f}, 90% interval {e['p05']:.1f}-"
          f"{e['p95']:.1f}; target {e['target'][0]:g}-{e['target'][1]:g}; probability in the window "
          f"{out.pta:.0%}")
    metric, exp = next(iter(m.exposure.items()))
    print(f"  {metric} at steady state: MAP {exp['map']:.1f}; posterior median {exp['median']:.1f}, 90% interval "
          f"{exp['p05']:.1f}-{exp['p95']:.1f}")
    for w in out.warnings:
        print(f"warning: {w}")
    if args.out:
        clock = _clock(ds, loading_clock=m.start if out.dose_mg is not None else None,
                       maintenance_clock=m.start + m.interval)
        atomic_write_text(args.out, json.dumps({**out.to_dict(), **clock, **run_metadata(seed=args.seed)},
                                               indent=2, default=float))
        print(f"wrote {args.out}")
    return 0


def _time_below(args, model, ds) -> int:
    import json

    from hybridpk.dosing import time_to_concentration
    from hybridpk.io import atomic_write_text, run_metadata

    out = time_to_concentration(model, ds, args.time_below, method="grid" if args.posologyr_grid else "root",
                                seed=args.seed, n_samples=args.draws)
    if out["map_time_h"] is None:
        print(f"{model.name}: the MAP concentration does not fall to {args.time_below:g} mg/L within 168 h of the "
              f"last dose ({out['last_dose_h']:g} h)")
    else:
        p05 = "-" if out["p05_h"] is None else f"{out['p05_h']:.2f}"
        p95 = "beyond 168 h" if out["p95_h"] is None else f"{out['p95_h']:.2f}"
        when = ds.clock_time(ds.ids[0], out["map_time_h"])
        print(f"{model.name}: the concentration falls to {args.time_below:g} mg/L at t = {out['map_time_h']:.2f} h "
              + (f"({when}; " if when else "(") + f"MAP; {out['map_time_after_last_dose_h']:.2f} h after the last "
              f"dose at {out['last_dose_h']:g} h), 90% interval {p05} to {p95} h")
        out = {**out, **_clock(ds, map_time_clock=out["map_time_h"])}
    for w in out["warnings"]:
        print(f"warning: {w}")
    if args.out:
        atomic_write_text(args.out, json.dumps({**out, **run_metadata(seed=args.seed)}, indent=2, default=float))
        print(f"wrote {args.out}")
    return 0


def run_map(args) -> int:
    import numpy as np

    from hybridpk.dosing import estimate_patient, forecast, plot_forecast
    from hybridpk.dosing.summary import patient_summary
    from hybridpk.io import atomic_write_text

    model, ds = _load(args)
    if ds.n_subjects > 1:
        from .daylist import run_many_map

        return run_many_map(args, model, ds)
    post = estimate_patient(model, ds, n_samples=args.draws, seed=args.seed)
    censored = f", {ds.n_censored_observations} censored" if ds.n_censored_observations else ""
    print(f"{model.name}: MAP estimates ({int(post.estimate.n_levels[0])} level(s){censored}; 90% credible "
          "intervals)")
    for name, v in post.parameters().items():
        print(f"  {name:<6} {v['map']:10.4g}   ({v['p05']:.4g}-{v['p95']:.4g})")
    n_eta = post.model.n_eta
    for j, name in enumerate(post.model.point_names[n_eta:], start=n_eta):   # a hybrid's latent z
        d = post.draws[:, j].cpu().numpy()
        print(f"  {name:<6} {float(post.estimate.eta[0, j]):10.4g}   ({np.quantile(d, 0.05):.4g}-"
              f"{np.quantile(d, 0.95):.4g})  latent")
    if args.above is not None:
        from hybridpk.dosing import time_above

        window = args.auc if args.auc is not None else (None, None)
        ta = time_above(model, ds, args.above, *window, posterior=post)
        print(f"  above {args.above:g} mg/L from {ta['start_h']:g} to {ta['end_h']:g} h: MAP {ta['map_hours']:.2f} h "
              f"({ta['map_fraction']:.0%}); posterior median {ta['median_hours']:.2f} h, 90% interval "
              f"{ta['p05_hours']:.2f}-{ta['p95_hours']:.2f} h")
    summary = patient_summary(post)
    print(f"  OFV {summary['ofv']:.4f} (-2 log posterior at the MAP; each level's share in --out EST.json)")
    for w in post.warnings:
        print(f"warning: {w}")
    if args.auc is not None:
        from hybridpk.dosing import auc

        a = auc(model, ds, *args.auc, posterior=post)
        unit = "mg*h/L" if not model.concentration_scale else f"h x the levels' units ({model.concentration_scale})"
        print(f"  AUC {a['start_h']:g}-{a['end_h']:g} h of the doses given: MAP {a['map']:.4g} {unit}; posterior "
              f"median {a['median']:.4g}, 90% interval {a['p05']:.4g}-{a['p95']:.4g}")
    df = ds.to_dataframe()
    until = args.until or float(df.TIME.max()) + 24.0
    fc = forecast(post.estimate, post.draws, np.linspace(0.0, until, 241), seed=args.seed)
    for w in fc.warnings:
        print(f"warning: {w}")
    if args.out and args.out.lower().endswith(".json"):
        import json

        from hybridpk.io import run_metadata

        out = {**summary, "forecast": fc.table.to_dict(orient="list"),
               "warnings": list(post.warnings) + list(fc.warnings), **run_metadata(seed=args.seed)}
        if args.auc is not None:
            out["auc"] = a
        atomic_write_text(args.out, json.dumps(out, indent=2, default=float))
        print(f"wrote {args.out}")
    elif args.out:
        atomic_write_text(args.out, fc.table.to_csv(index=False))
        print(f"wrote {args.out}")
    if args.plot:
        plot_forecast(fc, post.estimate, args.plot, title=f"{model.name}, patient {ds.ids[0]}")
        print(f"wrote {args.plot}")
    if args.samples:
        post.to_inference_data().to_netcdf(args.samples)
        print(f"wrote {args.samples}")
    return 0
