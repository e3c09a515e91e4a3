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
