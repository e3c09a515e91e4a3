"""FOCE-I at scale, side by side with R nlme on the same data in the same run.

Data: N simulated subjects, 1-cmt oral (KA 1.5 1/h, CL 3 L/h, V 30 L), 100 mg at time 0, 8 samples in 0.25-12 h,
log-normal IIV of 30% on KA, CL and V (OMEGA 0.09 each), additive error SD 0.1 mg/L.

hybridpk: the command a user runs, ``hybridpk fit DATA --model 1cmt_oral --iiv KA,CL,V --error additive --quiet``
(FOCE-I with the sandwich standard errors, CWRES and the output tables), timed whole-process from the shell;
"estimation" is the fit as summary.json's fit_seconds reports it (the FOCE-I search, standard errors, EBEs and
diagnostics; not the import of Python packages nor reading and writing files).
This model and data take the analytic path of FOCE-I (hybridpk.population.analytic_focei: the closed form's own
derivatives in numpy; summary.json's "derivatives" says so). Two in-process runs of the same fit report what
the time goes to, with the analytic path and with it turned off (the general path: automatic differentiation,
as every model it does not cover is fitted): the outer (BFGS) search, the covariance step, the reported EBEs and
tables, OFV evaluations, EBE Newton steps, and the general path's time in the structural model's predictions.

R nlme (when ``Rscript`` with nlme is installed; Debian: r-base-core r-cran-nlme): the same model as a
closed-form nonlinear mixed-effects model (log-parameters, pdDiag random effects, method ML: Lindstrom-Bates,
a first-order conditional method close to FOCE), started from the same typical values as hybridpk's default
(hybridpk's starting values also pass through a naive-pooled fit). "estimation" is the ``nlme()`` call's
elapsed time (system.time), "whole" the Rscript process from the shell (R startup, loading nlme, reading the
CSV, fitting, printing).

Ratios printed: hybridpk / nlme for estimation and whole-process; the growth exponent of hybridpk's estimation
time between the two largest sizes (log t2/t1 over log N2/N1).

Run:  python benchmarks/fit_scale.py [--sizes 100 1000 10000] [--seed 1] [--no-profile]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

TRUE = dict(KA=1.5, CL=3.0, V=30.0)
OMEGA, ADD, DOSE = 0.09, 0.1, 100.0
TIMES = np.array([0.25, 0.5, 1, 2, 4, 6, 8, 12], dtype=float)

R_SCRIPT = r"""
suppressPackageStartupMessages(library(nlme))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
d <- d[d$EVID == 0, ]
d <- groupedData(DV ~ TIME | ID, data = d)
model <- function(lKA, lCL, lV, t) {
  ka <- exp(lKA); k <- exp(lCL - lV); v <- exp(lV)
  100 * ka / (v * (ka - k)) * (exp(-k * t) - exp(-ka * t))
}
st <- c(lKA = log(as.numeric(args[2])), lCL = log(as.numeric(args[3])), lV = log(as.numeric(args[4])))
tm <- system.time(fit <- nlme(DV ~ model(lKA, lCL, lV, TIME), data = d, fixed = lKA + lCL + lV ~ 1,
                              random = pdDiag(lKA + lCL + lV ~ 1), start = st, method = "ML"))
fe <- fixef(fit)
vc <- as.numeric(VarCorr(fit)[, "Variance"])
cat(sprintf("RESULT %.4f %.6f %.6f %.6f %.6f %.6f %.6f %.6f %.4f\n", tm[["elapsed"]], exp(fe[["lKA"]]),
            exp(fe[["lCL"]]), exp(fe[["lV"]]), vc[1], vc[2], vc[3], sqrt(vc[4]), -2 * as.numeric(logLik(fit))))
"""


def simulate(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng([seed, n])
    rows = []
    for i in range(1, n + 1):
        ka, cl, v = (TRUE[k] * math.exp(rng.normal(0.0, math.sqrt(OMEGA))) for k in ("KA", "CL", "V"))
        k = cl / v
        rows.append(dict(ID=i, TIME=0.0, AMT=DOSE, DV=0.0, EVID=1, MDV=1))
        conc = DOSE * ka / (v * (ka - k)) * (np.exp(-k * TIMES) - np.exp(-ka * TIMES))
        for t, c in zip(TIMES, conc + rng.normal(0.0, ADD, TIMES.size)):
            rows.append(dict(ID=i, TIME=float(t), AMT=0.0, DV=round(float(c), 6), EVID=0, MDV=0))
    return pd.DataFrame(rows)


def run_hybridpk(csv: str, out: str) -> dict:
    cmd = [sys.executable, "-m", "hybridpk", "fit", csv, "--model", "1cmt_oral", "--iiv", "KA,CL,V", "--error",
           "additive", "--out", out, "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    whole = time.perf_counter() - t0
    s = json.load(open(os.path.join(out, "summary.json")))
    par = {name: p["estimate"] for name, p in s["parameters"].items()}
    return dict(whole=whole, estimation=s["fit_seconds"], iterations=s["iterations"],
                evaluations=s["function_evaluations"], ofv=s["ofv"], **par)


def profile_in_process(csv: str, general: bool = False) -> dict:
    """The same fit in this process, timed by phase: the outer (BFGS) search with the naive-pooled start, the
    covariance step, and the rest (the reported EBEs, tables, diagnostics); with the EBE Newton steps and the
    time in the structural model's predictions (``solve.simulate``: the general path's). ``general``: with
    the analytic path (hybridpk.population.analytic_focei) turned off, as fits of models it does not cover run."""
    import hybridpk as hp
    from hybridpk.population import analytic_focei, build_model, fit_population, focei
    from hybridpk.population import fit as fit_module

    spent = {"solve": 0.0, "calls": 0, "newton": 0}
    phases = {"search": 0.0, "covariance": 0.0}
    patched = []

    def patch(module, name, wrapper):
        original = getattr(module, name)
        patched.append((module, name, original))
        setattr(module, name, wrapper(original))

    def timing(key, count=None):
        def wrapper(original):
            def timed(*a, **k):
                t = time.perf_counter()
                try:
                    return original(*a, **k)
                finally:
                    (phases if key in phases else spent)[key] += time.perf_counter() - t
                    if count:
                        spent[count] += 1
            return timed
        return wrapper

    def counting(original):
        def counted(*a, **k):
            spent["newton"] += 1
            return original(*a, **k)
        return counted

    patch(focei, "simulate", timing("solve", "calls"))
    patch(focei.Problem, "_backtrack", counting)
    patch(analytic_focei.AnalyticFOCEI, "_backtrack", counting)
    patch(fit_module, "minimize", timing("search"))
    patch(fit_module, "_covariance", timing("covariance"))
    if general:
        patch(analytic_focei, "analytic_problem", lambda original: lambda *a: (None, "turned off"))
    try:
        ds = hp.read_nonmem(csv)
        pm = build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="additive")
        t = time.perf_counter()
        f = fit_population(pm, ds, progress=False)
        total = time.perf_counter() - t
    finally:
        for module, name, original in reversed(patched):
            setattr(module, name, original)
    it = f.estimation.iterations
    return dict(total=total, per_iteration=total / max(it, 1), iterations=it, evaluations=f.estimation.evaluations,
                newton_steps=spent["newton"], solve=spent["solve"], solve_calls=spent["calls"],
                search=phases["search"], covariance=phases["covariance"],
                derivatives=f.estimation.derivatives.split(":")[0], ofv=f.estimation.ofv)


def run_nlme(csv: str, start: dict) -> dict | None:
    if shutil.which("Rscript") is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as fh:
        fh.write(R_SCRIPT)
    t0 = time.perf_counter()
    p = subprocess.run(["Rscript", fh.name, csv, str(start["KA"]), str(start["CL"]), str(start["V"])],
                       capture_output=True, text=True)
    whole = time.perf_counter() - t0
    os.unlink(fh.name)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
    if p.returncode != 0 or not line:
        msg = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": msg}
    v = [float(x) for x in line[0].split()[1:]]
    return dict(whole=whole, estimation=v[0], KA=v[1], CL=v[2], V=v[3], omega=v[4:7], add=v[7], m2ll=v[8])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-profile", action="store_true", help="skip the in-process breakdown")
    a = ap.parse_args()
    import torch

    import hybridpk

    print(f"hybridpk {hybridpk.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}; seed {a.seed}")
    from hybridpk.models import get_model

    start = {p.name: p.typical for p in get_model("1cmt_oral").parameters if p.name in TRUE}
    est_times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.sizes:
            csv = os.path.join(tmp, f"d{n}.csv")
            simulate(n, a.seed).to_csv(csv, index=False)
            h = run_hybridpk(csv, os.path.join(tmp, f"run{n}"))
            est_times[n] = h["estimation"]
            err = max(abs(h[k] / TRUE[k] - 1) for k in TRUE)
            print(f"N={n:6d} hybridpk: whole {h['whole']:7.2f} s, estimation {h['estimation']:7.2f} s, "
                  f"{h['iterations']} iterations, {h['evaluations']} OFV evaluations; KA {h['KA']:.4f} CL "
                  f"{h['CL']:.4f} V {h['V']:.3f} (max error {100 * err:.2f}%)")
            if not a.no_profile and n <= 10000:
                for general in (False, True):
                    p = profile_in_process(csv, general)
                    print(f"         in-process, {p['derivatives']} derivatives: {p['total']:.2f} s (search "
                          f"{p['search']:.2f}, covariance {p['covariance']:.2f}, EBEs and tables "
                          f"{p['total'] - p['search'] - p['covariance']:.2f}), {p['per_iteration']:.3f} s per outer "
                          f"iteration, {p['evaluations']} OFV evaluations, {p['newton_steps']} EBE Newton steps, "
                          f"OFV {p['ofv']:.4f}; general-path predictions {p['solve']:.2f} s in {p['solve_calls']} "
                          "calls")
            r = run_nlme(csv, start)
            if r is None:
                print("         R nlme: Rscript not found (Debian: apt install r-base-core r-cran-nlme); skipped")
            elif "error" in r:
                print(f"         R nlme: failed ({r['error']})")
            else:
                err_r = max(abs(r[k] / TRUE[k] - 1) for k in TRUE)
                print(f"         R nlme:   whole {r['whole']:7.2f} s, estimation {r['estimation']:7.2f} s; KA "
                      f"{r['KA']:.4f} CL {r['CL']:.4f} V {r['V']:.3f} (max error {100 * err_r:.2f}%)")
                print(f"         ratio hybridpk / nlme: estimation {h['estimation'] / r['estimation']:.2f}x, "
                      f"whole-process {h['whole'] / r['whole']:.2f}x")
    sizes = sorted(est_times)
    if len(sizes) >= 2:
        n1, n2 = sizes[-2], sizes[-1]
        expo = math.log(est_times[n2] / est_times[n1]) / math.log(n2 / n1)
        print(f"growth of the estimation time from N={n1} to N={n2}: exponent {expo:.2f}")


if __name__ == "__main__":
    main()
