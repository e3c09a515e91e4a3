"""Reference values from a real NONMEM run: pharmpy-core's bundled pheno example (pheno.mod, FOCE-I).

pheno.ext holds NONMEM's final estimates (row ITERATION -1000000000) and standard errors (-1000000001);
pheno.phi holds the EBEs (ETA) and each subject's OBJ contribution; pheno.lst the printed rows (ETABAR, SE, N,
P VAL., ETASHRINKSD(%), ...). Parsed here, not copied.
"""

from __future__ import annotations

import pandas as pd


def read_ext(path):
    """{'final': Series, 'se': Series} from a NONMEM .ext file (first table)."""
    lines = path.read_text().splitlines()
    header = lines[1].split()
    rows = [ln.split() for ln in lines[2:] if ln.strip() and not ln.startswith("TABLE")]
    df = pd.DataFrame([[float(x) for x in r] for r in rows], columns=header).set_index("ITERATION")
    return {"final": df.loc[-1000000000], "se": df.loc[-1000000001]}


def read_phi(path):
    lines = path.read_text().splitlines()
    header = lines[1].split()
    rows = [ln.split() for ln in lines[2:] if ln.strip()]
    return pd.DataFrame([[float(x) for x in r] for r in rows], columns=header)


def read_lst_row(lst: str, label: str) -> list[float]:
    """The numbers of the row of a NONMEM .lst's text ``lst`` that starts with ``label`` (e.g. "ETABAR:",
    "ETASHRINKSD(%)")."""
    line = next(ln for ln in lst.splitlines() if ln.strip().startswith(label))
    return [float(v) for v in line.split()[len(label.split()):]]
