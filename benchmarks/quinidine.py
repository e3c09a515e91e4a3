"""Real clinical data we did not make: nlme's Quinidine (Verme et al., Ther Drug Monit 1992; 136 hospitalised
patients, 361 levels, oral doses with steady-state records, covariates that change within a patient), shaped as
a NONMEM user shapes it, fitted by hybridpk and by R nlme side by side.

Data: R's ``nlme::Quinidine`` (exported by Rscript at run time; Debian: r-base-core r-cran-nlme), converted as a
user would: ID = Subject, TIME = time (h), DV = conc (mg/L), AMT = dose (mg), a dose record with ``interval``
is at steady state (SS=1, II = interval), EVID/MDV from which of dose and conc the record holds (records with
neither: EVID=0, MDV=1, covariate updates); covariates WT (Weight, kg), GLYCO (alpha-1-acid glycoprotein,
mg/dL; changes within 89 patients) and CRCL50 (creatinine clearance < 50 mL/min; changes within 12).

1. The base model of Pinheiro & Bates (2000, section 8.2): 1-cmt oral, IIV on CL and V, additive error, by
   hybridpk (``hybridpk fit quin.csv --model 1cmt_oral --iiv CL,V --error additive``, FOCE-I) and by nlme
   (``quinModel``, method ML, pdDiag(lV + lCl)). nlme's -2 log-likelihood is printed without the constant
   N log(2 pi), as NONMEM's OFV is (nlme's method, Lindstrom-Bates, is close to FOCE but not the same).
2. The same with the time-varying covariates on CL (GLYCO and WT power, CRCL50 categorical), by hybridpk only
   (nlme's fit of this model stops without converging from Pinheiro & Bates' start); each record's covariates
   hold over the interval it ends, as NONMEM's $PK, so the exact matrix-exponential path is taken.

Run:  python benchmarks/quinidine.py
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

R_EXPORT = ('suppressPackageStartupMessages(library(nlme)); '
            'write.csv(as.data.frame(Quinidine), "{out}", row.names=FALSE)')

R_FIT = r"""
suppressPackageStartupMessages(library(nlme))
tm <- system.time(fm <- nlme(conc ~ quinModel(Subject, time, conc, dose, interval, lV, lKa, lCl), data = Quinidine,
           fixed = lV + lKa + lCl ~ 1, random = pdDiag(lV + lCl ~ 1), groups = ~ Subject,
           start = list(fixed = c(5, -0.3, 2)), na.action = na.pass, naPattern = ~ !is.na(conc), method = "ML"))
fe <- exp(fixef(fm)); vc <- as.numeric(VarCorr(fm)[, "Variance"])
cat(sprintf("RESULT %.3f %.5f %.5f %.5f %.6f %.6f %.5f %.4f\n", tm[["elapsed"]], fe[["lCl"]], fe[["lV"]], fe[["lKa"]],
            vc[2], vc[1], sqrt(vc[3]), -2 * as.numeric(logLik(fm))))
"""


def nonmem_csv(raw: pd.DataFrame) -> pd.DataFrame:
    """nlme's Quinidine as a NONMEM dataset (see the module docstring)."""
    dose = raw["dose"].notna()
    return pd.DataFrame({
        "ID": raw["Subject"], "TIME": raw["time"], "AMT": raw["dose"].fillna(0.0), "DV": raw["conc"],
        "EVID": np.where(dose, 1, 0), "MDV": np.where(raw["conc"].notna(), 0, 1),
        "II": raw["interval"].fillna(0.0), "SS": np.where(raw["interval"].notna(), 1, 0),
        "WT": raw["Weight"], "GLYCO": raw["glyco"], "CRCL50": (raw["Creatinine"] == "< 50").astype(int)})


def hybridpk_fit(data: Path, out: Path, *options: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hybridpk", "fit", str(data), "--model", "1cmt_oral", "--out", str(out),
                    "--quiet", *options], check=True)
    return json.loads((out / "summary.json").read_text()), time.perf_counter() - t0


def values(summary: dict) -> dict:
    """{THETA name: estimate, OMEGA label: variance, SIGMA label: SD} of a summary.json."""
    out = {name: t["estimate"] for name, t in summary["parameters"].items()}
    out.update({name: o["variance"] for name, o in summary["omega"].items()})
    out.update({name: s["sd"] for name, s in summary["sigma"].items()})
    return out


def main() -> int:
    import torch

    import hybridpk

    if shutil.which("Rscript") is None:
        print("Rscript with nlme is needed for nlme's Quinidine data (Debian: r-base-core r-cran-nlme)")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["Rscript", "-e", R_EXPORT.format(out=tmp / "raw.csv")], check=True)
        raw = pd.read_csv(tmp / "raw.csv")
        data = tmp / "quin.csv"
        nonmem_csv(raw).to_csv(data, index=False)
        n_obs = int(raw["conc"].notna().sum())
        print(f"hybridpk {hybridpk.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"nlme's Quinidine: {raw['Subject'].nunique()} patients, {n_obs} levels, {len(raw)} records")

        base, t_base = hybridpk_fit(data, tmp / "base", "--iiv", "CL,V", "--error", "additive")
        v = values(base)
        print(f"base model, hybridpk FOCE-I: OFV {base['ofv']:.3f}, CL {v['CL']:.4g} V {v['V']:.4g} KA {v['KA']:.4g}, "
              f"OMEGA CL {v['ETA_CL']:.4g} V {v['ETA_V']:.4g}, ADD {v['ADD']:.4g}; "
              f"{base['fit_seconds']:.1f} s estimation, {t_base:.1f} s whole process")
        r = subprocess.run(["Rscript", "-e", R_FIT], capture_output=True, text=True)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
        if line is None:
            print(f"nlme failed: {r.stderr.strip()[-300:]}")
        else:
            t, cl, vv, ka, om_cl, om_v, add, m2ll = map(float, line.split()[1:])
            ofv = m2ll - n_obs * math.log(2 * math.pi)
            print(f"base model, nlme ML:         OFV {ofv:.3f}, CL {cl:.4g} V {vv:.4g} KA {ka:.4g}, "
                  f"OMEGA CL {om_cl:.4g} V {om_v:.4g}, ADD {add:.4g}; {t:.1f} s estimation")

        cov, t_cov = hybridpk_fit(data, tmp / "cov", "--iiv", "CL,V", "--error", "additive",
                                  "--covariate", "CL~GLYCO", "--covariate", "CL~CRCL50:categorical",
                                  "--covariate", "CL~WT")
        v = values(cov)
        effects = ", ".join(f"{k} {v[k]:.4g}" for k in v if k.startswith("CL_"))
        print(f"time-varying covariates on CL, hybridpk FOCE-I: OFV {cov['ofv']:.3f} "
              f"({'converged' if cov['converged'] else 'not converged'}), CL {v['CL']:.4g} V {v['V']:.4g} "
              f"KA {v['KA']:.4g}, {effects}; {cov['fit_seconds']:.1f} s estimation, {t_cov:.1f} s whole process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
