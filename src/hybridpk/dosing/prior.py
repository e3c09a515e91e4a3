"""The prior of a precision-dosing problem: a published model spec (models/*.toml) or a fitted run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import HybridPKError, ModelError
from ..population.spec import CovariateEffect, ErrorModel, PopulationModel, build_model

__all__ = ["Prior", "load_prior", "model_specs", "prior_from_fit", "prior_from_values"]


def _models_dir() -> Path:
    here = Path(__file__).resolve()
    installed = here.parents[1] / "_models"
    return installed if installed.is_dir() else here.parents[3] / "models"


def model_specs() -> list[str]:
    """Names of the published model specs shipped in ``models/``."""
    d = _models_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


@dataclass(frozen=True)
class Prior:
    """A population model with fixed population values: what MAP estimation and dosing start from.

    ``theta`` {name: value} natural scale, ``omega`` (K, K) ETA variances, ``sd`` residual SDs
    {"ADD", "PROP"}, ``ranges`` {covariate: (low, high)} of the model's population, ``route`` of dosing.
    """

    name: str
    pm: PopulationModel = field(repr=False)
    theta: dict = field(repr=False)
    omega: torch.Tensor = field(repr=False)
    sd: dict = field(repr=False)
    citation: str = ""
    ranges: dict = field(default_factory=dict)
    route: str = "infusion"
    units: dict = field(default_factory=dict)
    notes: tuple = ()           # caveats every estimate and recommendation from this prior repeats


def _from_toml(path: Path) -> Prior:
    import tomllib

    try:
        spec = tomllib.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HybridPKError(f"cannot read model spec {path}: {exc}") from None
    try:
        structure = spec["structure"]
        typical = {k.upper(): float(v) for k, v in spec["typical"].items()}
        iiv = {k.upper(): float(v) for k, v in spec.get("iiv", {}).items()}
        err = spec.get("error", {})
    except KeyError as exc:
        raise ModelError(f"model spec {path.name} lacks {exc}") from None
    effects, coef = [], {}
    for c in spec.get("covariate", []):
        e = CovariateEffect(c["parameter"].upper(), c["covariate"], c.get("kind", "power"), c.get("reference"),
                            c.get("exponent"), float(c.get("level", 1.0)))
        effects.append(e)
        if "coefficient" in c:
            coef[e.theta_name] = float(c["coefficient"])
        elif e.kind != "power" or e.exponent is None:
            raise ModelError(f"model spec {path.name}: covariate effect {e.parameter}~{e.covariate} needs "
                             "'exponent' (power) or 'coefficient'")
    # effects of the same covariate on one parameter with distinct coefficients need distinct theta names
    names = [e.theta_name for e in effects]
    if len(set(names)) != len(names):
        raise ModelError(f"model spec {path.name}: two effects of one covariate on one parameter")
    pm = build_model(structure, iiv=list(iiv), covariates=effects, error=ErrorModel(err.get("kind", "proportional"),
                     add=float(err.get("add", 0.0)), prop=float(err.get("prop", 0.0))),
                     initial=typical)
    theta = {t.name: torch.tensor(typical.get(t.name, coef.get(t.name, t.init)), dtype=torch.float64)
             for t in pm.thetas}
    omega = torch.diag(torch.tensor([iiv[e.removeprefix("ETA_")] for e in pm.etas], dtype=torch.float64))
    sd = {k: torch.tensor(float(err.get(k.lower(), 0.0)), dtype=torch.float64) for k in pm.error.names}
    ranges = {k: (float(v[0]), float(v[1])) for k, v in spec.get("population", {}).items()}
    return Prior(name=spec.get("name", path.stem), pm=pm, theta=theta, omega=omega, sd=sd,
                 citation=spec.get("citation", ""), ranges=ranges, route=spec.get("route", "infusion"),
                 units=dict(spec.get("units", {})))


def _from_run(run: Path) -> Prior:
    from ..population.predict import load_fit

    pm, theta, omega, sd = load_fit(run)
    notes = ()
    if (run / "vae.pt").is_file():
        notes = (f"{run} is a hybrid run (ODE + VAE residual); estimates, forecasts and doses here use its "
                 "population ODE model only (the VAE residual is not used by the dosing functions yet)",)
    return Prior(name=run.name, pm=pm, theta=theta, omega=omega, sd=sd, citation=f"hybridpk fit {run}",
                 route="infusion", notes=notes)


def load_prior(source) -> Prior:
    """A Prior from a spec file (``models/NAME.toml``), a spec name (e.g. 'vancomycin_goti2018') or a run
    folder written by ``hybridpk fit``."""
    if isinstance(source, Prior):
        return source
    path = Path(source)
    if path.is_dir():
        return _from_run(path)
    if path.suffix == ".toml" and path.is_file():
        return _from_toml(path)
    candidate = _models_dir() / f"{path.stem}.toml"
    if candidate.is_file():
        return _from_toml(candidate)
    raise HybridPKError(f"{source}: not a model spec, a spec name or a run folder; shipped specs: "
                        f"{', '.join(model_specs())}")



def prior_from_fit(result, pm, ranges: dict | None = None, name: str = "fit") -> Prior:
    """A Prior from a FitResult (and its PopulationModel): population estimates become the prior."""
    theta = {k: torch.tensor(v["estimate"], dtype=torch.float64) for k, v in result.parameters.items()}
    omega = torch.tensor(result.omega_matrix, dtype=torch.float64) if result.omega_matrix else \
        torch.diag(torch.tensor([v["variance"] for v in result.omega.values()], dtype=torch.float64))
    sd = {v.get("type", k): torch.tensor(v.get("sd", v["estimate"]), dtype=torch.float64)
          for k, v in result.sigma.items()}
    return Prior(name=name, pm=pm, theta=theta, omega=omega, sd=sd, citation="hybridpk fit",
                 ranges=dict(ranges or {}), route="infusion")


def prior_from_values(pm, theta: dict, omega: dict, sd: dict, name: str = "model", ranges=None) -> Prior:
    """A Prior from explicit population values (e.g. the true model of a simulation)."""
    th = {t.name: torch.tensor(float(theta[t.name]), dtype=torch.float64) for t in pm.thetas}
    om = torch.diag(torch.tensor([float(omega[e.removeprefix("ETA_")]) for e in pm.etas], dtype=torch.float64))
    s = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in sd.items()}
    return Prior(name=name, pm=pm, theta=th, omega=om, sd=s, ranges=dict(ranges or {}))


def write_spec(result, path, *, name: str, drug: str = "", citation: str = "", ranges: dict | None = None,
               route: str = "infusion"):
    """Write a fitted model (``hybridpk fit`` of a library model, diagonal OMEGA) as a models/*.toml spec, so it
    can serve as a dosing prior like the published ones."""
    from ..io import atomic_write_text

    spec = result.spec
    if spec.get("kind") != "build" or spec.get("omega_block"):
        raise HybridPKError("only fits of library models with a diagonal OMEGA can be written as a spec")
    eff_names = {f"{c['parameter']}_{c['covariate']}" for c in spec.get("covariates", [])}
    lines = [f'name = "{name}"', f'drug = "{drug}"', f'structure = "{spec["model"]}"',
             f'citation = "{citation or "hybridpk fit"}"', f'route = "{route}"', "", "[typical]"]
    lines += [f"{k} = {v['estimate']!r}" for k, v in result.parameters.items() if k not in eff_names]
    lines += ["", "[iiv]"] + [f"{k.removeprefix('ETA_')} = {v['variance']!r}" for k, v in result.omega.items()]
    err = {v.get("type", k): v.get("sd", v["estimate"]) for k, v in result.sigma.items()}
    lines += ["", "[error]", f'kind = "{spec["error"]}"'] + [f"{k.lower()} = {v!r}" for k, v in err.items()]
    for c in spec.get("covariates", []):
        lines += ["", "[[covariate]]", f'parameter = "{c["parameter"]}"', f'covariate = "{c["covariate"]}"',
                  f'kind = "{c["kind"]}"']
        if c.get("reference") is not None:
            lines.append(f"reference = {float(c['reference'])!r}")
        if c["kind"] == "categorical":
            lines.append(f"level = {float(c['level'])!r}")
        theta = f"{c['parameter']}_{c['covariate']}"
        if c.get("exponent") is not None:
            lines.append(f"exponent = {float(c['exponent'])!r}")
        elif c["kind"] == "power":
            lines.append(f"exponent = {result.parameters[theta]['estimate']!r}")
        else:
            lines.append(f"coefficient = {result.parameters[theta]['estimate']!r}")
    if ranges:
        lines += ["", "[population]"] + [f"{k} = [{float(lo)!r}, {float(hi)!r}]" for k, (lo, hi) in ranges.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)
