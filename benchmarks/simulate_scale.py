"""A virtual population of 10^6 patients (1-cmt oral, 10 samples each) simulated by the CLI in chunks:
wall time and peak memory of the whole process (issue 19, point 4: peak memory under 2 GB).

The command is the one a user runs (`hybridpk simulate ONE.csv --model 1cmt_oral ... --n N --out F`); the
peak resident memory is the child process's (getrusage RUSAGE_CHILDREN). Also checks the written files: the
number of rows and IDs, and the log-normal parameters' sample variance against OMEGA.

Run:  python benchmarks/simulate_scale.py [--n 1000000] [--chunk 10000] [--format parquet|csv]
      [--device cpu|cuda|auto]
(--device is passed to the command: where each chunk is solved)
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=10_000)
    ap.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        design = Path(tmp) / "one.csv"
        rows = [dict(ID=1, TIME=0.0, AMT=100.0, EVID=1, MDV=1, DV=0.0, WT=70.0)]
        rows += [dict(ID=1, TIME=t, AMT=0.0, EVID=0, MDV=0, DV=0.0, WT=70.0)
                 for t in (0.5, 1, 2, 3, 4, 6, 8, 12, 16, 24)]
        pd.DataFrame(rows).to_csv(design, index=False)
        out = Path(tmp) / f"sim.{args.format}"
        cmd = [sys.executable, "-m", "hybridpk", "simulate", str(design), "--model", "1cmt_oral",
               "--typical", "CL=5,V=50,KA=1.2", "--omega", "CL=0.09,V=0.04,KA=0.09", "--proportional", "0.1",
               "--additive", "0.05", "--n", str(args.n), "--chunk", str(args.chunk), "--seed", "1",
               "--device", args.device, "--out", str(out)]
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True).returncode
        wall = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        size_mb = out.stat().st_size / 2 ** 20 if out.exists() else float("nan")
        side = out.with_name(f"sim.params.{args.format}")
        read = pd.read_parquet if args.format == "parquet" else pd.read_csv
        params = read(side)
        n_rows = len(read(out, columns=["ID"])) if args.format == "parquet" else sum(1 for _ in open(out)) - 1
    print(f"{args.n} virtual patients x 10 samples, chunks of {args.chunk}, {args.format}, "
          f"device {args.device}: rc={rc}")
    print(f"  wall time {wall:.1f} s ({args.n / wall:,.0f} patients/s), peak memory {peak_mb:.0f} MB "
          f"({peak_mb / 2048:.2f}x the 2 GB budget), file {size_mb:.0f} MB")
    print(f"  rows {n_rows} (expected {11 * args.n}), IDs {params.ID.nunique()}; var(log CL/5) "
          f"{np.log(params.CL / 5).var():.4f} (OMEGA 0.09), var(log V/50) {np.log(params.V / 50).var():.4f} (0.04)")


if __name__ == "__main__":
    main()
