"""Throughput of the solver paths against a plain scipy solve_ivp (LSODA) loop over subjects.

Problems (float64, every subject with its own random sampling times):
  linear  : 2cmt_iv, 1-h infusions q12h x 6 (ADDL=5), 8-12 samples in 0-72 h
  nonlinear: 1cmt_oral_mm, oral doses q12h x 6, 8-12 samples in 0-72 h
Paths: closed form (linear only); batched ODE with hybridpk's per-subject Dormand-Prince ("ode/dp5", the
default ODE path); batched torchdiffeq dopri5 in local time between events ("ode/dopri5"); and a plain
solve_ivp LSODA loop over subjects (numpy right-hand side).
All use rtol 1e-6 / atol 1e-9 (the ODE paths); the closed form is exact. The LSODA loop at N=10000 is
estimated from its time on 500 subjects (marked 'est.').

Run:  OMP_WAIT_POLICY=PASSIVE python benchmarks/ode_throughput.py [--sizes 100 1000 10000] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

import hybridpk as hp  # noqa: E402
from hybridpk.solve import simulate  # noqa: E402

RTOL, ATOL = 1e-6, 1e-9
LIN = dict(CL=5.0, V=20.0, Q=8.0, V2=60.0)
MM = dict(V=40.0, VMAX=40.0, KM=2.0, KA=1.1)


def design(n, infusion, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append(dict(ID=i + 1, TIME=0.0, DV=0.0, AMT=500.0 if infusion else 200.0, EVID=1, MDV=1, CMT=1,
                         RATE=500.0 if infusion else 0.0, ADDL=5, II=12.0))
        k = rng.integers(8, 13)
        for t in np.sort(rng.choice(np.arange(1, 720) / 10.0, size=k, replace=False)):
            rows.append(dict(ID=i + 1, TIME=float(t), DV=1.0, AMT=0.0, EVID=0, MDV=0, CMT=0, RATE=0.0, ADDL=0,
                             II=0.0))
    return hp.read_nonmem(pd.DataFrame(rows))


def params(base, n, seed=1):
    rng = np.random.default_rng(seed)
    return {k: torch.tensor(v * np.exp(rng.normal(0, 0.3, n)), dtype=torch.float64) for k, v in base.items()}


def scipy_loop(ds, p, model):
    """Plain loop: each subject integrated by solve_ivp (LSODA) between dose events (numpy right-hand side)."""
    f = ds.to_dataframe()
    pn = {k: v.numpy() for k, v in p.items()}
    doses = ds.doses()
    for i, sid in enumerate(ds.ids):
        d = doses[doses.ID == sid]
        obs = f[(f.ID == sid) & (f.EVID == 0)].TIME.to_numpy()
        q = {k: v[i] for k, v in pn.items()}
        if model == "2cmt_iv":
            k10, k12, k21 = q["CL"] / q["V"], q["Q"] / q["V"], q["Q"] / q["V2"]

            def rhs(t, a, r):
                return [r - (k10 + k12) * a[0] + k21 * a[1], k12 * a[0] - k21 * a[1]]
            events = sorted(set(d.TIME) | set(d.TIME + d.AMT / d.RATE))
            a = np.zeros(2)
        else:
            def rhs(t, a, r):
                c = a[1] / q["V"]
                return [-q["KA"] * a[0], q["KA"] * a[0] - q["VMAX"] * c / (q["KM"] + c)]
            events = sorted(set(d.TIME))
            a = np.zeros(2)
        bounds = events + [max(obs.max(), events[-1]) + 1e-9]
        for j in range(len(bounds) - 1):
            t0, t1 = bounds[j], bounds[j + 1]
            if model == "2cmt_iv":
                r = sum(row.RATE for row in d.itertuples() if row.TIME <= t0 < row.TIME + row.AMT / row.RATE)
            else:
                r = 0.0
                a[0] += d.AMT[d.TIME == t0].sum()
            te = obs[(obs >= t0) & (obs < t1)]
            sol = solve_ivp(rhs, (t0, t1), a, method="LSODA", rtol=RTOL, atol=ATOL, args=(r,),
                            t_eval=np.r_[te, t1] if len(te) else [t1])
            a = sol.y[:, -1].copy()


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_case(model, base, infusion, n, device, scipy_cap=500):
    ds = design(n, infusion)
    b = ds.to_batch().to(device)
    p = {k: v.to(device) for k, v in params(base, n).items()}
    res = {}

    def fwd(path):
        method, _, solver = path.partition("/")
        simulate(model, p, b, method=method, solver=solver or "dp5", rtol=RTOL, atol=ATOL)

    def fwd_bwd(path):
        method, _, solver = path.partition("/")
        q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
        simulate(model, q, b, method=method, solver=solver or "dp5", rtol=RTOL, atol=ATOL).ipred.sum().backward()

    paths = (["closed_form"] if model == "2cmt_iv" else []) + ["ode/dp5", "ode/dopri5"]
    for m in paths:
        reps = 5 if m == "closed_form" else 1
        if m == "closed_form":
            fwd(m)  # warm-up
        res[m] = (timed(lambda: fwd(m), reps), timed(lambda: fwd_bwd(m), reps))
    m_sc = min(n, scipy_cap)
    sub = ds.subset(ds.ids[:m_sc])
    t_sc = timed(lambda: scipy_loop(sub, {k: v[:m_sc].cpu() for k, v in p.items()}, model))
    res["scipy"] = (t_sc * n / m_sc, None, m_sc < n)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, rtol {RTOL}, "
          f"atol {ATOL}")
    print(f"{'problem':<10} {'N':>6} {'path':<12} {'fwd s':>9} {'fwd+bwd s':>10} {'profiles/s':>11} "
          f"{'x scipy loop':>13}")
    for model, base, inf in (("2cmt_iv", LIN, True), ("1cmt_oral_mm", MM, False)):
        for n in args.sizes:
            res = run_case(model, base, inf, n, args.device)
            t_sc, _, est = res["scipy"]
            for m in [k for k in res if k != "scipy"]:
                f, fb = res[m]
                print(f"{model:<10} {n:>6} {m:<12} {f:>9.4f} {fb:>10.4f} {n / f:>11.0f} {t_sc / f:>13.1f}")
            print(f"{model:<10} {n:>6} {'scipy LSODA':<12} {t_sc:>9.3f} {'-':>10} {n / t_sc:>11.0f} {1.0:>13.1f}"
                  + ("  (est. from 500)" if est else ""))


if __name__ == "__main__":
    main()
