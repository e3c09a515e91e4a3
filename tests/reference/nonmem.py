"""Reference values from a real NONMEM run: pharmpy-core's bundled pheno example (pheno.mod, FOCE-I).

pheno.ext holds NONMEM's final estimates (row ITERATION -1000000000) and standard errors (-1000000001);
pheno.phi holds the EBEs (ETA) and each subject's OBJ contribution. Parsed here, not copied.
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
