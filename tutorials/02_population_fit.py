# %% [markdown]
# # Tutorial 2: population fits that match NONMEM and nlmixr2
#
# FOCE with interaction on two classic datasets: theophylline (1-compartment oral, IIV on KA, CL, V,
# additive error; compare with nlmixr2's published fit) and phenobarbital in neonates (pharmpy's bundled
# NONMEM run `pheno`, imported from its control stream). Then parameter recovery on a simulated
# population with a weight effect on clearance.
#
#     python tutorials/02_population_fit.py        (HYBRIDPK_SMOKE=1 for a quick run)

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import hybridpk as hp  # noqa: E402

OUT = Path(os.environ.get("HYBRIDPK_TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(parents=True, exist_ok=True)
SMOKE = os.environ.get("HYBRIDPK_SMOKE") == "1"

# %% [markdown]
# ## 1. Theophylline
# `build_model` names the structural model, which parameters get IIV and the error model. The result is
# the fitted model (frozen): typed THETA / OMEGA / SIGMA tables and the estimation record; `save` writes
# summary.json, individual.csv, predictions.csv and model.json, and `hp.load_run` reads them back.

# %%
ds = hp.read_nonmem(hp.bundled_dataset("theoph"))
pm = hp.build_model("1cmt_oral", iiv=["KA", "CL", "V"], error="additive", data=ds)
fit = hp.fit_population(pm, ds, progress=False, covariance=not SMOKE)
e = fit.estimation
print(f"OFV {e.ofv:.3f}  converged={e.converged}  ({e.seconds:.1f} s)")
nlmixr2 = {"KA": 1.57, "CL": 2.76, "V": 31.5}
for k, v in nlmixr2.items():
    print(f"  {k:<3} hybridpk {fit.theta[k].value:7.3f}   nlmixr2 {v}")
for o in fit.omega:
    print(f"  {o.label:<7} CV {o.cv_percent:5.1f}%")
print(f"  {fit.sigma['ADD'].label:<7} {fit.sigma['ADD'].value:.3f} mg/L ({fit.sigma['ADD'].scale})")
fit.save(OUT / "theoph_run")

p = e.predictions[e.predictions.MDV == 0]
fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
axes[0].plot(p.PRED, p.DV, ".")
axes[0].set(xlabel="PRED (mg/L)", ylabel="DV (mg/L)")
axes[1].plot(p.IPRED, p.DV, ".")
axes[1].set(xlabel="IPRED (mg/L)", ylabel="DV (mg/L)")
axes[2].plot(p.TIME, p.CWRES, ".")
axes[2].axhline(0, color="grey")
axes[2].set(xlabel="time (h)", ylabel="CWRES")
for ax in axes[:2]:
    lim = max(p.DV.max(), p.IPRED.max())
    ax.plot([0, lim], [0, lim], color="grey", lw=0.8)
fig.tight_layout()
fig.savefig(OUT / "theoph_gof.png", dpi=100)

# %% [markdown]
# ## 2. pheno, from its NONMEM control stream
# `read_control_stream` evaluates the $PK as written (THETA, ETA, WGT, the APGR IF block) and reads the
# dataset named in $DATA. NONMEM's final OFV for this run is 586.276.

# %%
try:
    import pharmpy  # noqa: F401

    mod = Path(pharmpy.__file__).parent / "internals" / "example_models" / "pheno.mod"
    pm, data = hp.read_control_stream(mod)
    res = hp.fit_population(pm, data, progress=False, pooled_start=False, covariance=not SMOKE)
    print(f"pheno OFV {res.estimation.ofv:.3f} (NONMEM 586.276)")
    for t in res.theta:
        print(f"  {t.name:<8} {t.value:.5g}")
    print(f"  SIGMA    {res.sigma['SIGMA'].value:.5g} (a {res.sigma['SIGMA'].scale}, as NONMEM's $SIGMA)")
except ImportError:
    print("pharmpy-core is not installed: pip install 'hybridpk[nonmem]' to import NONMEM models")

# %% [markdown]
# ## 3. Recovering known truth
# Simulate 2-compartment infusions with weight on clearance, fit, compare.

# %%
n = 40 if SMOKE else 100
design = hp.make_design(n, [dict(TIME=0, AMT=1000, CMT=1, RATE=1000, ADDL=3, II=12)],
                        [0.5, 1, 2, 4, 8, 11.5, 36.5, 37.5, 40, 44, 47.9],
                        covariates={"WT": lambda rng, k: rng.normal(75, 15, k).clip(40, 140)}, jitter=0.25, seed=1)
truth = dict(CL=4.5, V=20.0, Q=6.0, V2=50.0)
sim = hp.simulate_population("2cmt_iv", design, truth, {"CL": 0.09, "V": 0.04}, proportional=0.1,
                             covariates={"CL": ("WT", 70.0, 0.75)}, seed=1)
pm = hp.build_model("2cmt_iv", iiv=["CL", "V"], covariates=["CL~WT:power:70"], data=sim.dataset)
rec = hp.fit_population(pm, sim.dataset, progress=False, covariance=False)
for k, v in truth.items():
    print(f"  {k:<3} true {v:6.2f}  estimated {rec.theta[k].value:6.2f}")
print(f"  CL~WT exponent: true 0.75, estimated {rec.theta['CL_WT'].value:.2f}")
