"""hybridpk demo: the main demonstration on bundled data."""

from __future__ import annotations

from ._common import ManualFormatter

HELP = """\
Run the main demonstration on the datasets bundled with hybridpk.

For now this validates and summarises every bundled dataset (the same as 'hybridpk check NAME' for
each); later releases extend it to the full fit of the hybrid model.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the demonstration on bundled data", description=HELP,
                       epilog="example:\n  hybridpk demo\n", formatter_class=ManualFormatter)
    p.set_defaults(handler=run)


def run(args) -> int:
    from types import SimpleNamespace

    from hybridpk.data.bundled import bundled_datasets

    from . import check

    names = bundled_datasets()
    print(f"hybridpk demo: checking {len(names)} bundled dataset(s): {', '.join(names)}\n")
    return check.run(SimpleNamespace(data=names, columns=None, covariates=None, json=False))
