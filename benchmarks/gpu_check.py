"""GPU check: the solver paths, predictions, doses and VAE training run unchanged with --device cuda, agree
with the CPU.

Run (on a machine with a GPU):  PYTHONPATH=src python benchmarks/gpu_check.py
(or bash benchmarks/gpu_run.sh OUTDIR: this check, then the README hybrid fit with --device cuda and a predict;
last results in benchmarks/RESULTS-gpu_check.txt)
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

import hybridpk as hp
from hybridpk.population import build_model, fit_population
from hybridpk.residual import ODEBaseline, TrainConfig, train_vae
from hybridpk.solve import virtual_design
from hybridpk.solve.examples import simulate_ehc_population


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main():
    warnings.simplefilter("ignore")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, device {dev}" + (f" ({torch.cuda.get_device_name(0)})" if dev == "cuda" else ""))
    # solver paths on N = 10000 profiles
    n = 10000
    design = hp.make_design(n, [dict(TIME=0, AMT=500, CMT=1, ADDL=5, II=12)], [0.5, 1, 2, 4, 8, 11.9, 30, 60, 71],
                            jitter=0.3, seed=1)
    b = design.to_batch()
    rng = np.random.default_rng(0)
    for model, base in (("1cmt_oral", dict(CL=3.0, V=30.0, KA=1.2)), ("1cmt_oral_mm", dict(V=40.0, VMAX=40.0, KM=2.0,
                                                                                          KA=1.1))):
        p = {k: torch.tensor(v * np.exp(rng.normal(0, 0.3, n))) for k, v in base.items()}
        cpu, t_cpu = timed(lambda: hp.simulate(model, p, b, rtol=1e-8, atol=1e-10).ipred)
        bg = b.to(dev)
        pg = {k: v.to(dev) for k, v in p.items()}
        hp.simulate(model, pg, bg, rtol=1e-8, atol=1e-10)
        gpu, t_gpu = timed(lambda: hp.simulate(model, pg, bg, rtol=1e-8, atol=1e-10).ipred)
        m = cpu.abs() > 1e-6 * cpu.abs().max()
        rel = ((gpu.cpu() - cpu).abs() / cpu.abs())[m].max()
        print(f"{model:<14} N={n}: cpu {t_cpu:.3f} s, {dev} {t_gpu:.3f} s, max relative difference {rel:.2e}")
    # a virtual population (simulate --device): the same draws, solved on each device
    one = hp.make_design(1, [dict(TIME=0, AMT=500, CMT=1, ADDL=5, II=12)], [0.5, 1, 2, 4, 8, 11.9, 30, 60, 71, 72])
    typical, omega = dict(CL=3.0, V=30.0, KA=1.2), dict(CL=0.09, V=0.04, KA=0.09)
    design = virtual_design(one, 0, 100_000)
    sims = {}
    for device in ("cpu", dev):
        sims[device], t = timed(lambda: hp.simulate_population("1cmt_oral", design, typical, omega, proportional=0.1,
                                                               seed=3, device=device))
        print(f"simulate_population 100000 patients on {device}: {t:.2f} s")
    a, g = sims["cpu"].ipred.IPRED.to_numpy(), sims[dev].ipred.IPRED.to_numpy()
    print(f"simulate_population cpu against {dev}: max relative IPRED difference "
          f"{np.max(np.abs(g - a) / np.maximum(np.abs(a), 1e-12)):.2e}, same ETAs "
          f"{sims['cpu'].etas.equals(sims[dev].etas)}")
    # VAE training on the EHC example
    ds, _ = simulate_ehc_population(200, seed=1)
    pm = build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined")
    fit = fit_population(pm, ds, progress=False, covariance=False)
    fits_agree(pm, ds, dev)
    predictions_and_doses_agree(fit, ds, dev)
    est = fit.estimation.estimates
    batch = est.problem.batch
    ipred = fit.concentrations(batch, est.eta)
    for mode in ("staged", "joint"):
        joint = mode != "staged"
        for device in ("cpu", dev):
            cfg = TrainConfig(epochs=300, min_epochs=300, seed=1, progress=False, device=device, joint=joint)
            (model, hist), t = timed(lambda: train_vae(batch, ipred, pm.error, fit.sigma.sd_tensors(), cfg,
                                                       baseline=ODEBaseline(fit) if joint else None,
                                                       eta0=est.eta if joint else None))
            print(f"VAE ({mode}) 300 epochs on {device}: {t:.1f} s; final train -ELBO "
                  f"{hist[-1][1]:.4f}, val {hist[-1][2]:.4f}")


def fits_agree(pm, ds, dev):
    """fit_population on ``dev`` (the automatic-differentiation path) against the CPU's: the analytic path (the
    default there) and the same automatic-differentiation path."""
    from unittest import mock

    runs = {}
    (runs["cpu, analytic"], t) = timed(lambda: fit_population(pm, ds, progress=False))
    print(f"FOCE-I fit of {ds.n_subjects} patients on cpu (analytic derivatives): {t:.2f} s")
    with mock.patch("hybridpk.population.analytic_focei.analytic_problem", lambda *a: (None, "off")):
        (runs["cpu, automatic"], t) = timed(lambda: fit_population(pm, ds, progress=False))
    print(f"FOCE-I fit on cpu (automatic differentiation): {t:.2f} s")
    (runs[dev], t) = timed(lambda: fit_population(pm, ds, progress=False, device=dev))
    print(f"FOCE-I fit on {dev} ({runs[dev].estimation.derivatives[:9]}): {t:.2f} s")
    for name, r in runs.items():
        th = ", ".join(f"{row.name} {row.value:.6g}" for row in r.theta.rows)
        print(f"  {name}: OFV {r.estimation.ofv:.6f}, {th}")


def predictions_and_doses_agree(fit, ds, dev):
    """predict / map / dose on ``dev`` against the CPU (model.to(dev), dosing_model(..., device=dev)): the
    general FOCE-I path on the GPU, the analytic one on the CPU; the same draws (made on the CPU)."""
    import pandas as pd

    from hybridpk.dosing import dosing_model, estimate_patient, recommend_dose

    (a, t_cpu), (g, t_dev) = (timed(lambda m=m: m.predict(ds).table) for m in (fit, fit.to(dev)))
    rel = np.max(np.abs(g.IPRED - a.IPRED) / np.maximum(np.abs(a.IPRED), 1e-12))
    eta = max(float(np.max(np.abs(g[c] - a[c]))) for c in fit.model.etas)
    print(f"predict ({ds.n_subjects} patients) cpu {t_cpu:.2f} s, {dev} {t_dev:.2f} s: max relative IPRED difference "
          f"{rel:.2e}, max ETA difference {eta:.2e}")
    rows = [dict(ID=7, TIME=0.0, DV=0.0, AMT=1000.0, RATE=1000.0, ADDL=3, II=12.0, EVID=1, MDV=1)]
    rows += [dict(ID=7, TIME=t, DV=v, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0)
             for t, v in ((37.5, 28.0), (47.5, 11.0))]
    patient = hp.read_nonmem(pd.DataFrame(rows).assign(CRCL=80.0, WT=80.0, DIAL=0))
    answers = {}
    for device in ("cpu", dev):
        model = dosing_model("vancomycin_goti2018", device=device)
        (rec, t) = timed(lambda: recommend_dose(model, patient, "auc24=400:600", seed=1))
        post = estimate_patient(model, patient, seed=1)
        answers[device] = (rec.dose, rec.interval, rec.exposure, post.parameters())
        print(f"dose vancomycin_goti2018 on {device}: {rec.dose:g} mg every {rec.interval:g} h, "
              f"{next(iter(rec.exposure.values()))}, {t:.2f} s")
    print(f"dose cpu against {dev}: same regimen {answers['cpu'][:2] == answers[dev][:2]}")


if __name__ == "__main__":
    main()
