"""Published population models as declarative specs (models/*.toml): loaded into a FittedPopulation, and a
fit written out as one.

A spec names its ``structure`` (a library model), ``[typical]`` values, ``[iiv]`` variances of log-normal ETAs,
optionally ``[iiv_covariance]`` (``"CL,V" = 0.03``: an OMEGA block over the parameters it connects), an
``[error]`` (additive, proportional, combined: Var = add^2 + (prop IPRED)^2, or combined1: SD = add + prop
IPRED, as Monolix and posologyr define them), ``[[covariate]]`` effects, ``[defaults]`` for optional
covariates, ``[population]`` covariate ranges, ``time_varying`` ("nonmem" or "locf": how a covariate that
changes within a patient's records acts), and ``[parameters]``: structural parameters computed from others
(``CL = "K * V"``: a micro-constant parameterisation in which K and V have typical values, IIV and covariate
effects, and ETA_V acts on both CL and V; arithmetic and exp/log/sqrt, parsed without executing code, see
:func:`hybridpk.population.build_model`). ``[iov]`` gives variances of inter-occasion variability
(``CL = 0.02``): the column ``occasion`` (default "OCC"; 1 when a patient file lacks it) numbers a patient's
occasions 1, 2, ..., each with its own ETA, up to ``occasions`` (default 8); in dosing, the regimen ahead is a
new occasion, whose IOV is unknown (0 at the MAP, drawn from its variance in intervals).

A ``[[covariate]]`` may clamp its covariate with ``lower`` / ``upper`` (NONMEM's MAX/MIN), two clamped linear
effects making a hockey-stick (:class:`hybridpk.population.CovariateEffect`). ``[dosing]`` states the
regimen conventions of the publication (``target``, ``interval`` h, ``duration`` h, ``dose_step`` and
``max_dose`` mg), which ``hybridpk dose`` takes when its flags are not given."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import HybridPKError, ModelError
from .fitted import FittedPopulation, route_of
from .spec import CovariateEffect, ErrorModel, build_model

__all__ = ["load_model", "model_specs", "write_spec"]

#: occasions of a spec with [iov] that does not say how many
DEFAULT_OCCASIONS = 8


def _models_dir() -> Path:
    here = Path(__file__).resolve()
    installed = here.parents[1] / "_models"
    return installed if installed.is_dir() else here.parents[3] / "models"


def model_specs() -> list[str]:
    """Names of the published model specs shipped in ``models/``."""
    d = _models_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def load_model(source) -> FittedPopulation:
    """A published model: a spec name shipped with hybridpk (e.g. 'vancomycin_goti2018', see
    :func:`model_specs`), a spec file (.toml), or a NONMEM control stream (.mod/.ctl) whose initial estimates
    are a run's final ones (:func:`from_control_stream`). A FittedPopulation is returned unchanged."""
    if isinstance(source, FittedPopulation):
        return source
    path = Path(source)
    if path.suffix == ".toml" and path.is_file():
        return _from_toml(path)
    if path.suffix.lower() in (".mod", ".ctl") and path.is_file():
        return from_control_stream(path)
    candidate = _models_dir() / f"{path.stem}.toml"
    if path.suffix in ("", ".toml") and candidate.is_file():
        return _from_toml(candidate)
    raise HybridPKError(f"{source}: not a model spec name or spec file; shipped specs: {', '.join(model_specs())}")


def _from_toml(path: Path) -> FittedPopulation:
    import tomllib

    try:
        spec = tomllib.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HybridPKError(f"cannot read model spec {path}: {exc}") from None
    try:
        structure = spec["structure"]
        typical = {k.upper(): float(v) for k, v in spec["typical"].items()}
        iiv = {k.upper(): float(v) for k, v in spec.get("iiv", {}).items()}
        iov = {k.upper(): float(v) for k, v in spec.get("iov", {}).items()}
        occasion = str(spec.get("occasion", "OCC"))
        occasions = int(spec.get("occasions", DEFAULT_OCCASIONS)) if iov else None
        covariances = _covariances(path, spec.get("iiv_covariance", {}), iiv)
        time_varying = str(spec.get("time_varying", "nonmem"))
        err = spec.get("error", {})
        effects, coef = [], {}
        for c in spec.get("covariate", []):
            bounds = {b: float(c[b]) for b in ("lower", "upper") if c.get(b) is not None}
            e = CovariateEffect(c["parameter"].upper(), c["covariate"], c.get("kind", "power"), c.get("reference"),
                                c.get("exponent"), float(c.get("level", 1.0)), **bounds)
            effects.append(e)
            if e.kind == "maturation":   # TM50 (covariate units) and the Hill coefficient
                coef.update({e.theta_names[0]: float(c["tm50"]), e.theta_names[1]: float(c["hill"])})
            elif "coefficient" in c:
                coef[e.theta_name] = float(c["coefficient"])
            elif e.kind != "power" or e.exponent is None:
                raise ModelError(f"model spec {path.name}: covariate effect {e.parameter}~{e.covariate} needs "
                                 "'exponent' (power) or 'coefficient'")
    except KeyError as exc:
        raise ModelError(f"model spec {path.name} lacks {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"model spec {path.name}: a value is not of the expected kind ({exc})") from None
    # effects of the same covariate on one parameter with distinct coefficients need distinct theta names
    names = [e.theta_name for e in effects]
    if len(set(names)) != len(names):
        raise ModelError(f"model spec {path.name}: two effects of one covariate on one parameter")
    blocks = _blocks(covariances)
    try:
        pm = build_model(structure, iiv=list(iiv), covariates=effects,
                         error=ErrorModel(err.get("kind", "proportional"), add=float(err.get("add", 0.0)),
                                          prop=float(err.get("prop", 0.0))), initial=typical,
                         omega_block=blocks or False, time_varying=time_varying,
                         derived={str(k): str(v) for k, v in spec.get("parameters", {}).items()},
                         iov=list(iov), occasion=occasion, occasions=occasions)
    except (ModelError, ValueError) as exc:
        raise ModelError(f"model spec {path.name}: {exc}") from None
    missing = [t.name for t in pm.thetas if t.name not in typical and t.name not in coef]
    if missing:   # never the library's starting value in place of a published one
        raise ModelError(f"model spec {path.name}: [typical] has no value for {', '.join(missing)} (the "
                         f"{structure} model needs {', '.join(t.name for t in pm.thetas if t.name not in coef)})")
    theta = {t.name: typical.get(t.name, coef.get(t.name)) for t in pm.thetas}
    omega = {e: iiv[e.removeprefix("ETA_")] for e in pm.etas[:len(iiv)]}
    omega.update({f"ETA_IOV_{p}_{k}": v for p, v in iov.items() for k in range(1, (occasions or 0) + 1)})
    sd = {k: float(err.get(k.lower(), 0.0)) for k in pm.error.names}
    _check_values(path, pm, theta, omega, sd)
    if covariances:
        names = [e.removeprefix("ETA_") for e in pm.etas]
        omega = [[omega[f"ETA_{a}"] if a == b else covariances.get(frozenset((a, b)), 0.0) for b in names]
                 for a in names]      # IOV names (IOV_CL_1) never pair with an IIV parameter's name
        if float(torch.linalg.eigvalsh(torch.tensor(omega, dtype=torch.float64)).min()) <= 0:
            raise ModelError(f"model spec {path.name}: [iiv] with [iiv_covariance] is not positive definite (a "
                             "correlation of 1 or more)")
    ranges = {k: (float(v[0]), float(v[1])) for k, v in spec.get("population", {}).items()}
    defaults = {k: float(v) for k, v in spec.get("defaults", {}).items()}
    if iov:
        defaults.setdefault(occasion, 1.0)    # a patient file without occasions: one occasion
    unknown = sorted(set(defaults) - set(pm.covariates))
    if unknown:
        raise ModelError(f"model spec {path.name}: [defaults] names {', '.join(unknown)}, which the model does not use")
    return FittedPopulation.from_values(pm, theta, omega, sd, name=spec.get("name", path.stem),
                                        citation=spec.get("citation", ""), ranges=ranges,
                                        route=spec.get("route", "infusion"), units=dict(spec.get("units", {})),
                                        covariate_defaults=defaults, dosing=_dosing(path, spec.get("dosing", {})))


#: [dosing] keys and whether each is a number (the target is text, read by hybridpk.dosing.parse_target)
_DOSING_KEYS = {"target": False, "interval": True, "duration": True, "dose_step": True, "max_dose": True}


def _dosing(path: Path, table: dict) -> dict:
    """A spec's [dosing] conventions, checked: known keys, positive numbers (an infusion duration may be 0)."""
    unknown = sorted(set(table) - set(_DOSING_KEYS))
    if unknown:
        raise ModelError(f"model spec {path.name}: [dosing] has {', '.join(unknown)}; it takes "
                         f"{', '.join(_DOSING_KEYS)}")
    out = {}
    for key, value in table.items():
        if not _DOSING_KEYS[key]:
            if not isinstance(value, str):
                raise ModelError(f"model spec {path.name}: [dosing] {key} must be text, e.g. \"auc24=400:600\"")
            out[key] = value
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ModelError(f"model spec {path.name}: [dosing] {key} = {value!r} is not a number") from None
        if not (math.isfinite(v) and (v >= 0 if key == "duration" else v > 0)):
            raise ModelError(f"model spec {path.name}: [dosing] {key} = {value!r} must be "
                             f"{'0 or more' if key == 'duration' else 'positive'}")
        out[key] = v
    return out


def from_control_stream(path) -> FittedPopulation:
    """A NONMEM control stream as a fitted model, at the values its $THETA/$OMEGA/$SIGMA give: as a dosing
    prior, write the run's final estimates there (as PsN's ``update_inits`` does, or
    :func:`write_control_stream` after a hybridpk fit). The model is read as ``hybridpk fit`` reads it
    (:func:`hybridpk.population.nonmem.read_control_stream`, its $DATA file included); the range of each
    covariate in that dataset becomes the population the dosing checks patients against."""
    from .nonmem import read_control_stream

    path = Path(path)
    pm, ds = read_control_stream(path)
    theta = {t.name: t.init for t in pm.thetas}
    init = pm.omega_init
    omega = (dict(zip(pm.etas, init)) if init and not isinstance(init[0], (tuple, list))
             else [list(row) for row in init])
    df = ds.to_dataframe()
    ranges = {c: (float(df[c].min()), float(df[c].max())) for c in pm.covariates}
    route = route_of(pm.structural, ds)
    return FittedPopulation.from_values(pm, theta, omega if pm.n_eta else {}, pm.error.init_values(),
                                        name=path.stem, route=route, ranges=ranges,
                                        citation=f"NONMEM control stream {path.name} at its initial estimates")


def _covariances(path: Path, table: dict, iiv: dict) -> dict:
    """[iiv_covariance] "CL,V" = 0.03: {frozenset of two parameters with IIV: covariance}."""
    out = {}
    for key, value in table.items():
        pair = [p.strip().upper() for p in str(key).split(",")]
        if len(pair) != 2 or pair[0] == pair[1] or any(p not in iiv for p in pair):
            raise ModelError(f"model spec {path.name}: [iiv_covariance] {key!r}: name two different parameters with "
                             f"IIV ({', '.join(iiv) or 'none'}), e.g. \"CL,V\" = 0.03")
        out[frozenset(pair)] = float(value)
    return out


def _blocks(covariances: dict) -> list:
    """The OMEGA blocks the covariances connect: groups of parameters, each a connected component."""
    groups = []
    for pair in covariances:
        joined = [g for g in groups if g & pair]
        merged = set(pair).union(*joined) if joined else set(pair)
        groups = [g for g in groups if not g & pair] + [merged]
    return [sorted(g) for g in groups]


def _check_values(path: Path, pm, theta: dict, omega: dict, sd: dict) -> None:
    """A spec's numbers must be usable: finite typical values (their ranges are build_model's check), positive
    finite IIV variances, residual SDs >= 0 and not all 0."""
    bad = [f"[typical] {k} = {v} (a finite number)" for k, v in theta.items() if not math.isfinite(v)]
    bad += [f"[iov] {e.removeprefix('ETA_IOV_').rsplit('_', 1)[0]} = {v} (a variance: > 0)"
            if e.startswith("ETA_IOV_") else f"[iiv] {e.removeprefix('ETA_')} = {v} (a variance: > 0)"
            for e, v in omega.items() if not (math.isfinite(v) and v > 0)]
    bad = list(dict.fromkeys(bad))      # one line per IOV parameter, not per occasion
    bad += [f"[error] {k.lower()} = {v} (an SD: >= 0)" for k, v in sd.items() if not (math.isfinite(v) and v >= 0)]
    if sd and all(v == 0 for v in sd.values()):
        bad.append("[error]: every residual SD is 0 (give add and/or prop)")
    if bad:
        raise ModelError(f"model spec {path.name}: " + "; ".join(bad))


def write_spec(fitted: FittedPopulation, path, *, name: str, drug: str = "", citation: str = "",
               ranges: dict | None = None, route: str = "infusion") -> Path:
    """Write a fitted model (a fit of a library model with a diagonal OMEGA) as a models/*.toml spec, so it
    can serve as a dosing prior like the published ones."""
    from ..io import atomic_write_text

    recipe = fitted.model.recipe
    if recipe.get("kind") != "build" or fitted.omega.block:
        raise HybridPKError("only fits of library models with a diagonal OMEGA can be written as a spec")
    effects = [CovariateEffect(**c) for c in recipe.get("covariates", [])]
    eff_names = {n for e in effects for n in e.theta_names}
    lines = [f'name = "{name}"', f'drug = "{drug}"', f'structure = "{recipe["model"]}"',
             f'citation = "{citation or "hybridpk fit"}"', f'route = "{route}"', "", "[typical]"]
    lines += [f"{t.name} = {t.value!r}" for t in fitted.theta if t.name not in eff_names]
    lines += ["", "[iiv]"] + [f"{e.eta.removeprefix('ETA_')} = {e.variance!r}" for e in fitted.omega]
    lines += ["", "[error]", f'kind = "{recipe["error"]}"'] + [f"{s.kind.lower()} = {s.sd!r}" for s in fitted.sigma]
    if recipe.get("derived"):
        lines += ["", "[parameters]"] + [f"{k} = {v!r}" for k, v in recipe["derived"].items()]
    for e in effects:
        lines += ["", "[[covariate]]", f'parameter = "{e.parameter}"', f'covariate = "{e.covariate}"',
                  f'kind = "{e.kind}"']
        if e.reference is not None:
            lines.append(f"reference = {float(e.reference)!r}")
        if e.kind == "categorical":
            lines.append(f"level = {float(e.level)!r}")
        lines += [f"{b} = {float(getattr(e, b))!r}" for b in ("lower", "upper") if getattr(e, b) is not None]
        if e.exponent is not None:
            lines.append(f"exponent = {float(e.exponent)!r}")
        elif e.kind == "power":
            lines.append(f"exponent = {fitted.theta[e.theta_name].value!r}")
        elif e.kind == "maturation":
            lines += [f"{key} = {fitted.theta[n].value!r}" for key, n in zip(("tm50", "hill"), e.theta_names)]
        else:
            lines.append(f"coefficient = {fitted.theta[e.theta_name].value!r}")
    if ranges:
        lines += ["", "[population]"] + [f"{k} = [{float(lo)!r}, {float(hi)!r}]" for k, (lo, hi) in ranges.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)
