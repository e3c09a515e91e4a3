"""Data flows one way: no module of hybridpk imports from a higher layer (including imports inside functions
and literal ``importlib.import_module`` names).

errors/io/progress < data, models < solve < population < residual < classify < dosing < diagnostics, report
< cli. Packages of one layer (data and models; diagnostics and report) are independent of each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hybridpk"

LAYERS = (("errors", "io", "progress"), ("data", "models"), ("solve",), ("population",), ("residual",),
          ("classify",), ("dosing",), ("diagnostics",), ("report",), ("cli",))
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
#: the package's front doors, above every layer: the lazy public API and ``python -m hybridpk``
TOP = {"__init__", "__main__"}


def _component(module: str) -> str | None:
    """The top-level component of a dotted hybridpk module name ('hybridpk.population.fit' -> 'population')."""
    parts = module.split(".")
    if parts[0] != "hybridpk":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``source`` (the text of ``module``), anywhere in the file."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module:
                out.append((node.lineno, target))
            else:   # 'from .. import x': x is a module (or a name of that package's __init__)
                out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            out.append((node.lineno, str(node.args[0].value)))
    return out


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """Violations of the layering in one module, as 'module:line imports target (layer a -> layer b)'."""
    here = _component(module)
    if here in TOP or here is None:
        return []
    if here not in RANK:
        return [f"{module}: package {here!r} is in no layer; add it to LAYERS in this test"]
    bad = []
    for line, target in imported_modules(source, module, is_package):
        other = _component(target)
        if other is None or other == here:
            continue
        if other == "__init__":
            bad.append(f"{module}:{line} imports the top-level package hybridpk (import the module itself)")
        elif other not in RANK:
            continue   # 'from .. import name': a name defined in hybridpk/__init__, not a module
        elif RANK[other] >= RANK[here]:
            bad.append(f"{module}:{line} imports {target} ({here} -> {other}, layer {RANK[here]} -> {RANK[other]})")
    return bad


def test_no_module_imports_from_a_higher_layer():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        bad += upward_imports(path.read_text(), _module_name(path), path.name == "__init__.py")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_every_package_is_in_a_layer():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in SRC.glob("*.py")} - TOP
    assert packages | modules <= set(RANK), (packages | modules) - set(RANK)


@pytest.mark.parametrize("source, module, ok", [
    ("from ..dosing import recommend_dose", "hybridpk.residual.hybrid", False),
    ("def f():\n    from hybridpk.dosing.model import dosing_model\n", "hybridpk.residual.hybrid", False),
    ("import hybridpk.cli", "hybridpk.population.fit", False),
    ("from ... import dosing", "hybridpk.residual.forms.base", False),
    ("import importlib\nimportlib.import_module('hybridpk.residual')", "hybridpk.population.fit", False),
    ("from ..models import get_model", "hybridpk.data.batch", False),          # siblings are independent
    ("from ..population import fit_population", "hybridpk.residual.hybrid", True),
    ("from .forms import get_form", "hybridpk.residual.vae", True),
    ("from ...solve.closed_form import concentration", "hybridpk.residual.forms.reservoir", True),
    ("import torch\nfrom ..errors import ModelError", "hybridpk.solve.ode", True),
])
def test_the_checker_finds_upward_imports(source, module, ok):
    """The check itself can fail: it flags upward imports, also inside functions and via import_module."""
    assert (upward_imports(source, module) == []) == ok
