"""A day's list in one call: 'hybridpk dose' for 100 vancomycin patients, whole process, against the
same patients one call each (the baseline, measured on the first 5 patients in this run and scaled to 100).

Target (issue: precision dosing for a day's list): under 15 s on 2 cores for 100 patients in one call.
The patients: 1000 mg q12h as 1-h infusions, a trough (11.5 h) and a peak (13.5 h) after the 2nd dose, CRCL
40-120 mL/min and WT 50-100 kg drawn from the seed; patient 7 has a negative level and must be refused
without stopping the others.

Run:  python benchmarks/dose_daylist.py [--patients 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def day_list(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        crcl, wt = rng.uniform(40, 120), rng.uniform(50, 100)
        for t, amt, dv, evid in ((0.0, 1000.0, 0.0, 1), (11.5, 0.0, rng.uniform(5, 20), 0),
                                 (12.0, 1000.0, 0.0, 1), (13.5, 0.0, rng.uniform(20, 40), 0)):
            rows.append(dict(ID=i, TIME=t, AMT=amt, RATE=amt, DV=dv, EVID=evid, MDV=int(evid == 1), CRCL=crcl,
                             WT=wt))
    df = pd.DataFrame(rows)
    df.loc[(df.ID == 7) & (df.EVID == 0), "DV"] = -1.0
    return df


def timed(args: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "hybridpk", *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"hybridpk {' '.join(args)} failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    return time.perf_counter() - t, run.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        df = day_list(a.patients, a.seed)
        df.to_csv(d / "day.csv", index=False)
        singles = []
        for pid in range(1, 6):
            df[df.ID == pid].to_csv(d / f"p{pid}.csv", index=False)
            singles.append(timed(["dose", "vancomycin_goti2018", str(d / f"p{pid}.csv")])[0])
        whole, printed = timed(["dose", "vancomycin_goti2018", str(d / "day.csv"), "--out", str(d / "r.json")])
        out = json.loads((d / "r.json").read_text())
    per_call = float(np.median(singles))
    refused = [p["ID"] for p in out["patients"] if "error" in p]
    print(f"hybridpk dose, {a.patients} patients in one call: {whole:.1f} s whole process "
          f"(target < 15 s on 2 cores); {len(out['patients']) - len(refused)} answered, refused: {refused}")
    print(f"one patient per call: {per_call:.2f} s (median of 5) -> {a.patients} calls ~ "
          f"{per_call * a.patients:.0f} s; ratio {per_call * a.patients / whole:.1f}x")
    print(f"versions: {out['versions']}; seed {a.seed}")


if __name__ == "__main__":
    main()
