"""hybridpk models: list the model library with parameters and units."""

from __future__ import annotations

from ._common import ManualFormatter

HELP = """\
List the compartment models of the library, with their compartments (NONMEM CMT numbers), which
compartment receives doses (CMT 0 in the data means that one) and which is observed, whether the
exact closed-form solution is used, and each parameter with its unit, meaning, typical value and bounds.

Units assume doses in mg and time in h (concentrations in mg/L). F and ALAG act on doses into the
default dose compartment (NONMEM's F1/ALAG1) and default to 1 and 0.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the models and their parameters", description=HELP,
                       epilog="examples:\n  hybridpk models\n  hybridpk models 2cmt_iv\n  hybridpk models --json\n",
                       formatter_class=ManualFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help="only these models")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run)


def run(args) -> int:
    import json
    import textwrap

    from hybridpk.models import MODELS, get_model

    from hybridpk.population import load_model, model_specs

    specs = [n for n in args.names if n in model_specs()] if args.names else model_specs()
    names = [n for n in args.names if n not in specs]
    models = [get_model(n) for n in names] if args.names else list(MODELS.values())
    published = [load_model(n) for n in specs]
    if args.json:
        out = {m.name: {"description": m.description, "compartments": list(m.compartments),
                        "dose_cmt": m.dose_cmt, "obs_cmt": m.obs_cmt, "closed_form": m.linear,
                        "parameters": {p.name: {"unit": p.unit, "description": p.description,
                                                "typical": p.typical, "lower": p.lower,
                                                "upper": p.upper} for p in m.parameters}}
               for m in models}
        out.update({f.name: {"published": True, "structure": f.model.structural.name, "citation": f.citation,
                             "covariates": list(f.covariates), "error": f.model.error.kind,
                             "dosing": dict(f.dosing)} for f in published})
        print(json.dumps(out, indent=2))
    else:
        blocks = [m.describe() for m in models]
        if published:
            blocks.append("published models (--model NAME):\n" + "\n".join(
                f"  {f.name}: {f.model.structural.name}, covariates {', '.join(f.covariates) or 'none'}, "
                f"{f.model.error.kind} error{_regimen(f.dosing)}\n    {textwrap.shorten(f.citation, 116)}"
                for f in published))
        print("\n\n".join(blocks))
    return 0


def _regimen(dosing: dict) -> str:
    """The regimen conventions a published model states (its spec's [dosing]), as 'hybridpk dose' takes them."""
    parts = [f"target {dosing['target']}"] if "target" in dosing else []
    parts += [f"{label} {dosing[key]:g}{unit}" for key, label, unit in (
        ("interval", "every", " h"), ("duration", "infusions of", " h"), ("dose_step", "steps of", " mg"),
        ("max_dose", "at most", " mg")) if key in dosing]
    return f"; dose: {', '.join(parts)}" if parts else ""
