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


#: the file of a run folder where 'hybridpk fit' records the dataset it read (report, vpc, covariates and compare
#: read it again when --data is not given)
RUN_DATA = "data.json"

#: the help of --data on the commands that take a run's own dataset by default
RUN_DATA_HELP = ("the dataset the run was fitted to: a NONMEM-style file, a bundled dataset name, or a control stream "
                 "(.mod: its $DATA, read as the control stream reads it); default: the one 'hybridpk fit' read, "
                 "recorded in RUN/data.json, refused if it has changed since")


def read_dataset_arg(arg: str):
    """The Dataset a DATA argument names: a NONMEM control stream (.mod/.ctl: its $DATA, read as the stream
    reads it: IGNORE, DROP, its column names), a file, or a bundled dataset's name."""
    if str(arg).lower().endswith((".mod", ".ctl")):
        from hybridpk.population.nonmem import read_control_stream

        return read_control_stream(arg)[1]
    from hybridpk.data.dataset import read_nonmem

    return read_nonmem(resolve_data_path(arg))


#: the help of --dv on the commands that read a patient's or new patients' levels
DV_HELP = ("the scale of the data file's DV, asked for by a model whose control stream fits LOG(F) to log DV "
           "(log-transform-both-sides with DV in log units): 'log' (the stream's own scale: read as EXP(DV)) or "
           "'conc' (concentrations, as measured); a control stream given as the data reads its own $DATA and needs "
           "neither")


def dv_scale_arg(ds, scale: str | None):
    """``ds`` with its DV scale as --dv states it (None: as read)."""
    if scale == "log":
        return ds.dv_from_log()
    if scale == "conc":
        return ds.dv_stated_concentrations()
    return ds


def model_dataset(arg: str, scale: str | None, model):
    """A patient's or new patients' records for ``model`` (a fitted population, a hybrid or a dosing model): DATA
    read (:func:`read_dataset_arg`), on the DV scale --dv states, and, when the model's control stream censors levels
    (Beal's M3 written with F_FLAG), with the levels the stream would censor censored; levels the file marks
    censored that the stream would fit as measured are refused by row (:meth:`PopulationModel.read_levels`)."""
    ds = dv_scale_arg(read_dataset_arg(arg), scale)
    if str(arg).lower().endswith((".mod", ".ctl")):
        return ds       # read by its own stream
    return getattr(model, "population", model).model.read_levels(ds, strict=True)


def record_run_data(run_dir, source: str, ds) -> None:
    """Write RUN/data.json: the dataset's source as 'hybridpk fit' was given it (an absolute path, or a bundled
    dataset's name), its fingerprint (SHA-256 of the records, :meth:`Dataset.fingerprint`) and, when its dates and
    clock times were translated to hours, what was done and each subject's TIME 0 as a date and time."""
    import json
    from pathlib import Path

    from hybridpk.io import atomic_write_text

    path = Path(source)
    entry = str(path.resolve()) if path.exists() else str(source)
    record = {"source": entry, "data_sha256": ds.fingerprint()}
    if ds.time_note:
        record.update(time_translation=ds.time_note, time_origin={str(k): v for k, v in ds.time_origin.items()})
    atomic_write_text(Path(run_dir) / RUN_DATA, json.dumps(record, indent=2))


def run_dataset(run_dir, data_arg: str | None, model=None):
    """The dataset a command on a run reads: ``data_arg`` (--data) when given, else the one RUN/data.json
    records, read again from its source and refused by name if it is gone or has changed since the fit. A --data
    file is read for ``model`` (the run, loaded by the command) as :func:`model_dataset` reads it: levels its
    control stream's M3 censors, censored."""
    import json
    from pathlib import Path

    from hybridpk.errors import HybridPKError

    if data_arg:
        return read_dataset_arg(data_arg) if model is None else model_dataset(data_arg, None, model)
    path = Path(run_dir) / RUN_DATA
    if not path.is_file():
        raise HybridPKError(f"{run_dir} does not record the dataset it was fitted to (no {RUN_DATA}: a run written by "
                            "the library or an earlier version of hybridpk); give --data")
    try:
        entry = json.loads(path.read_text())
        source, digest = str(entry["source"]), str(entry["data_sha256"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise HybridPKError(f"{path} is damaged; give --data") from None
    if not Path(source).exists() and resolve_data_path(source) == Path(source):
        raise HybridPKError(f"{run_dir} was fitted to {source}, which is no longer there; give --data")
    ds = read_dataset_arg(source)
    if ds.fingerprint() != digest:
        raise HybridPKError(f"{source} has changed since {run_dir} was fitted to it (its records' SHA-256 differs); "
                            "give --data with the dataset the run was fitted to")
    print(f"data: {source} (the dataset {run_dir} was fitted to)")
    return ds


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
