"""'hybridpk dose' and 'hybridpk map' on a file with several patients: one answer per ID, a summary table."""

from __future__ import annotations


def run_many(args, model, ds, question, arguments: dict) -> int:
    """Answer ``question`` for every patient of ``ds`` (:func:`hybridpk.dosing.for_each_patient`), print one
    line per patient and write every answer to --out (JSON). A refused patient is listed with the reason; the
    others are answered."""
    import json

    import pandas as pd

    from hybridpk.dosing import for_each_patient
    from hybridpk.io import atomic_write_text, run_metadata

    print(f"{model.name}: {ds.n_subjects} patients")
    answers = for_each_patient(question, model, ds, seed=args.seed, n_samples=args.draws, **arguments)
    table = pd.DataFrame([{"ID": a.id, **(_row(a.result) if a.ok else {"answer": f"refused: {_one_line(a.error)}"})}
                          for a in answers])
    if "warnings" in table:
        table["warnings"] = _counts(table["warnings"])
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200,
                           "display.max_colwidth", 90):
        print(table.to_string(index=False, na_rep=""))
    refused = sum(not a.ok for a in answers)
    if refused:
        rest = "the others are answered" if refused < len(answers) else "none is answered"
        print(f"{refused} of {len(answers)} patients refused (the reason is in the table); {rest}")
    if args.out:
        patients = [{"ID": a.id, **(_as_dict(a.result) if a.ok else {"error": a.error})} for a in answers]
        text = json.dumps({"patients": patients, "summary": table.to_dict(orient="records"),
                           **run_metadata(seed=args.seed)}, indent=2, default=_plain)
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    return 0


def _counts(column):
    """Whole numbers printed as such, blank for a refused patient."""
    return column.map(lambda v: "" if v != v or v is None else int(v))


def _plain(x):
    """JSON for numpy scalars and other numbers."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def _as_dict(result) -> dict:
    return result.to_dict() if hasattr(result, "to_dict") else dict(result)


def _row(result) -> dict:
    """One summary line of an answer: what it is, its MAP value, 90% interval, probability of target
    attainment, number of warnings."""
    from hybridpk.dosing import LoadingDose, Recommendation

    if isinstance(result, Recommendation):
        (metric, e), = result.exposure.items()
        how = f" ({result.duration:g}-h infusion)" if result.duration > 0 else (
            " (the model's duration D)" if result.regimen.model_duration else "")
        return {"answer": f"{result.dose:g} mg every {result.interval:.4g} h{how}", "metric": metric,
                "MAP": round(e["map"], 4), "p05": round(e["p05"], 4), "p95": round(e["p95"], 4),
                "PTA": round(result.pta, 3), "warnings": len(result.warnings)}
    if isinstance(result, LoadingDose):
        (metric, e), = result.exposure.items()
        m = result.maintenance
        load = "no loading dose" if result.dose_mg is None else f"load {result.dose_mg:g} mg"
        return {"answer": f"{load}, then {m.dose:g} mg every {m.interval:.4g} h", "metric": metric,
                "MAP": round(e["map"], 4), "p05": round(e["p05"], 4), "p95": round(e["p95"], 4),
                "PTA": round(result.pta, 3), "warnings": len(result.warnings)}
    if "map_time_h" in result:       # time to a concentration
        t = result["map_time_h"]
        return {"answer": "not within 168 h" if t is None else f"falls to {result['concentration']:g} at {t:.2f} h",
                "metric": "time (h)", "MAP": t, "p05": result["p05_h"], "p95": result["p95_h"],
                "warnings": len(result["warnings"])}
    raise TypeError(type(result).__name__)


def run_many_map(args, model, ds) -> int:
    """'hybridpk map' for every patient: MAP parameters and OFV per ID (and the AUC with --auc); --out
    EST.json the estimates in full, FORECAST.csv the forecasts with an ID column."""
    import json

    import numpy as np
    import pandas as pd

    from hybridpk.dosing import auc, estimate_patients, forecast
    from hybridpk.dosing.summary import patient_summary
    from hybridpk.errors import HybridPKError
    from hybridpk.io import atomic_write_text, run_metadata

    if args.plot or args.samples:
        raise HybridPKError(f"{'--plot' if args.plot else '--samples'} is for one patient; the file has "
                            f"{ds.n_subjects} (IDs {', '.join(str(i) for i in ds.ids[:5])}...): give one patient's "
                            "records")
    print(f"{model.name}: {ds.n_subjects} patients, MAP estimates")
    rows, full, tables = [], [], []
    for pid, post in estimate_patients(model, ds, n_samples=args.draws, seed=args.seed).items():
        if isinstance(post, HybridPKError):
            rows.append({"ID": pid, "error": _one_line(str(post))})
            full.append({"ID": pid, "error": str(post)})
            continue
        one = ds.subset([pid])
        summary = patient_summary(post)
        row = {"ID": pid, **{k: round(v["map"], 6) for k, v in summary["parameters"].items()},
               "OFV": round(summary["ofv"], 4), "levels": int(post.estimate.n_levels[0]),
               "warnings": len(post.warnings)}
        entry = {"ID": pid, **summary, "warnings": list(post.warnings)}
        if args.auc is not None:
            try:
                a = auc(model, one, *args.auc, posterior=post)
                row["AUC"] = round(a["map"], 4)
                entry["auc"] = a
            except HybridPKError as e:
                row["AUC"], entry["auc"] = None, {"error": str(e)}
        if args.out:    # the forecasts only where they are written
            until = args.until or float(one.to_dataframe().TIME.max()) + 24.0
            fc = forecast(post.estimate, post.draws, np.linspace(0.0, until, 241), seed=args.seed)
            entry["forecast"] = fc.table.to_dict(orient="list")
            tables.append(fc.table.assign(ID=pid)[["ID", *fc.table.columns]])
        rows.append(row)
        full.append(entry)
    table = pd.DataFrame(rows)
    for c in ("levels", "warnings"):
        if c in table:
            table[c] = _counts(table[c])
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200,
                           "display.max_colwidth", 90):
        print(table.to_string(index=False, na_rep=""))
    refused = sum("error" in r for r in rows)
    if refused:
        print(f"{refused} of {len(rows)} patients refused (the reason is in the table); the others are estimated")
    if args.out and args.out.lower().endswith(".json"):
        atomic_write_text(args.out, json.dumps({"patients": full, **run_metadata(seed=args.seed)}, indent=2,
                                               default=_plain))
        print(f"wrote {args.out}")
    elif args.out:
        atomic_write_text(args.out, pd.concat(tables, ignore_index=True).to_csv(index=False) if tables else "")
        print(f"wrote {args.out}")
    return 0


def _one_line(message: str) -> str:
    """A refusal's message on one line of the table (a dataset error lists its problems on lines of their own,
    which the table printed as '\\n'); --out keeps it as it is."""
    return " ".join(message.split())
