"""Helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


class ManualFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-written layout of descriptions and examples, and shows defaults."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" not in text and action.default not in (None, False, argparse.SUPPRESS) \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def resolve_data_path(arg: str):
    """A file path, or the name of a bundled dataset (e.g. 'theoph')."""
    from pathlib import Path

    path = Path(arg)
    if path.exists():
        return path
    from hybridpk.data.bundled import bundled_dataset, bundled_datasets

    if arg.removesuffix(".csv") in bundled_datasets():
        return bundled_dataset(arg)
    return path  # read_nonmem reports the missing file clearly


def latent_dim_arg(text: str):
    """--latent-dim: "auto" or a whole number >= 1."""
    if text == "auto":
        return text
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1 (the latent dimension) or 'auto'")
    return str(k)


#: the help of --device on the commands that estimate patients (predict, map, dose)
DEVICE_HELP = ("where the patients' estimates, posterior draws and predictions are computed: cpu, cuda, cuda:N, "
               "or auto (a CUDA GPU when there is one, else the CPU). float64 on every device; the random draws are "
               "made on the CPU, so the same seed gives the same answer anywhere. On a GPU the estimates take the "
               "general (automatic-differentiation) path: the analytic FOCE-I derivatives of 1- and 2-compartment "
               "models are numpy code, on the CPU. Default: %(default)s")


def device_arg(text: str) -> str:
    """--device: a torch device that exists on this machine, or "auto" (a CUDA GPU when there is one, else the
    CPU), checked before any work starts; returns the device's name ("auto" resolved)."""
    from hybridpk.errors import HybridPKError
    from hybridpk.solve.device import resolve_device

    try:
        return str(resolve_device(text))
    except HybridPKError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def figure_arg(text: str) -> str:
    """A figure path whose suffix matplotlib can write (checked before any work starts)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(text).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise argparse.ArgumentTypeError(f"{text!r}: the figure format is given by the suffix, one of "
                                         f"{', '.join(sorted(formats))}")
    return text


def _writable_base(path, text: str, what: str):
    """The nearest existing folder above ``path`` (where the output will be created), checked to be a folder
    this process can write in."""
    import os
    from pathlib import Path

    base = Path(path).absolute()
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {base} is a file, so the {what} cannot be created below it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write in {base} (permission denied); give a {what} "
                                         "you can write to")
    return base


def out_file_arg(text: str) -> str:
    """--out for a file: not a folder, below a folder that can be written (checked before any work starts)."""
    from pathlib import Path

    p = Path(text)
    if not text or p.is_dir() or text.endswith(("/", "\\")):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name, e.g. "
                                         f"{str(Path(text or '.') / 'out.csv')}")
    _writable_base(p.parent, text, "file")
    return text


def out_folder_arg(text: str) -> str:
    """--out for a run folder: a folder (or a path where one can be created) that can be written (checked
    before any work starts; nothing is created until there is something to write)."""
    from pathlib import Path

    p = Path(text)
    if not text:
        raise argparse.ArgumentTypeError("'': give a folder for the run, e.g. runs/mydrug")
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; give a folder for the run")
    _writable_base(p, text, "folder")
    return text


def positive_int(text: str) -> int:
    """A whole number >= 1 (iterations, epochs)."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return v


def finite_float(text: str) -> float:
    """A finite number (times in h)."""
    import math

    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (a dose in mg, a concentration in mg/L, an interval step in h)."""
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number > 0")
    return v


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (a residual SD)."""
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number >= 0")
    return v
