# %% [markdown]
# # Tutorial 5: who needs the complex model, which model the data support, which covariates matter
#
# The decision layer on top of a hybrid fit:
# 1. a classifier on the latent space flags the patients who need more than the ODE (here: those who
#    recirculate), checked against the truth on patients it never saw;
# 2. candidate models fitted to the same data are ranked by cross-validation over patients;
# 3. covariates are screened against the ETAs and confirmed by stepwise covariate modelling.
#
#     python tutorials/05_classify_select_discover.py        (HYBRIDPK_SMOKE=1 for a quick run)

# %%
import os
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

import hybridpk as hp
from hybridpk.classify import (classify_patients, compare_runs, patient_covariates, screen_covariates,
                               stepwise_covariates, train_classifier)
from hybridpk.residual import TrainConfig
from hybridpk.solve.examples import simulate_ehc_population

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

OUT = Path(os.environ.get("HYBRIDPK_TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(parents=True, exist_ok=True)
SMOKE = os.environ.get("HYBRIDPK_SMOKE") == "1"
warnings.simplefilter("ignore")

# %% [markdown]
# ## 1. The hybrid and its latent classifier
# Every other simulated patient recirculates. The hybrid learns the correction; each training patient is then
# labelled by its own evidence (the hybrid explains its levels better than the ODE by more than the
# chi-square(K) 95% quantile: a likelihood-ratio test per patient), and a calibrated logistic regression on
# the latent mean and SD gives P_COMPLEX. The true flag is never used in training.

# %%
train, train_truth = simulate_ehc_population(60 if SMOKE else 200, seed=1)
pm = hp.build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined")
fit = hp.fit_population(pm, train, progress=False, covariance=False)
config = TrainConfig(epochs=60 if SMOKE else 1500, warmup_epochs=10 if SMOKE else 100,
                     min_epochs=60 if SMOKE else 1000, form="reservoir", progress=False)
hybrid = hp.fit_hybrid(pm, train, population=fit, config=config, seed=1, progress=False)
rc = train_classifier(hybrid, seed=1)
print(f"labelled COMPLEX by their own data: {rc.table.COMPLEX_EVIDENCE.sum()} of {len(rc.table)}; "
      f"cross-validated AUROC for those labels {rc.report.get('auroc')}")

new, new_truth = simulate_ehc_population(40 if SMOKE else 100, seed=1001)
flags = classify_patients(hybrid, rc, new).merge(new_truth[["ID", "RECIRC"]], on="ID")
auroc = roc_auc_score(flags.RECIRC, flags.P_COMPLEX)
print(f"new patients: AUROC of P_COMPLEX for the true recirculation flag {auroc:.3f}; "
      f"{((flags.P_COMPLEX > 0.25) & (flags.P_COMPLEX < 0.75)).mean():.0%} uncertain (0.25-0.75)")

fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
fpr, tpr, _ = roc_curve(flags.RECIRC, flags.P_COMPLEX)
a.plot(fpr, tpr, "b-", label=f"AUROC {auroc:.2f}")
a.plot([0, 1], [0, 1], "k:", lw=0.8)
a.set_xlabel("false positive rate")
a.set_ylabel("true positive rate")
a.set_title("new patients: ROC for the true flag")
a.legend()
oof = np.asarray(rc.report.get("out_of_fold") or rc.table.P_COMPLEX)
observed, predicted = calibration_curve(rc.table.LABEL, oof, n_bins=5, strategy="quantile")
b.plot(predicted, observed, "o-", label="out of fold")
b.plot([0, 1], [0, 1], "k:", lw=0.8)
b.set_xlabel("predicted P_COMPLEX")
b.set_ylabel("observed rate (evidence labels)")
b.set_title("calibration (training patients)")
b.legend()
fig.tight_layout()
fig.savefig(OUT / "05_classifier.png", dpi=100)

# %% [markdown]
# ## 2. Which model do the data support?
# The 1-compartment ODE, a 2-compartment ODE and the hybrid, all fitted to the same patients, are refitted
# without each fold of patients, and each held-out patient's levels are predicted half from the other half.
# AIC and BIC are given for the ODE models; the hybrid's likelihood is conditional on z, so it is compared by
# cross-validation only.

# %%
fit2 = hp.fit_population(hp.build_model("2cmt_oral", iiv=["CL", "V", "KA"], error="combined"), train,
                         progress=False, covariance=False)
comparison = compare_runs({"1-cmt": fit, "2-cmt": fit2, "1-cmt + VAE": hybrid}, train, folds=2 if SMOKE else 5,
                          seed=1, progress=None)
print(comparison.table.round(4).to_string(index=False))
print("recommended:", comparison.reason)
comparison.table.to_csv(OUT / "05_compare.csv", index=False)

# %% [markdown]
# ## 3. Covariates: screen, then stepwise covariate modelling
# A population with CL depending on CRCL and V on WT, and two decoys (AGE, and HT which correlates with WT).

# %%
rng = np.random.default_rng(5)
n = 60 if SMOKE else 120
wt = rng.normal(72, 14, n).clip(40, 130)
covs = {"WT": wt, "CRCL": rng.normal(85, 25, n).clip(20, 160), "AGE": rng.uniform(20, 85, n),
        "HT": 170 + 0.45 * (wt - 72) + rng.normal(0, 7, n)}
design = hp.make_design(n, [dict(TIME=0, AMT=500)], [0.5, 2, 6, 12, 24], jitter=0.1, seed=5,
                        covariates={k: (lambda r, m, v=v: v[:m]) for k, v in covs.items()})
sim = hp.simulate_population("1cmt_iv", design, dict(CL=3.0, V=30.0), dict(CL=0.09, V=0.06),
                             covariates={"CL": ("CRCL", 80.0, 0.75), "V": ("WT", 70.0, 1.0)},
                             proportional=0.1, additive=0.05, seed=5)
base = hp.fit_population(hp.build_model("1cmt_iv", iiv=["CL", "V"], error="combined"), sim.dataset,
                         progress=False, covariance=False)
screen = screen_covariates(base.estimation.individual, patient_covariates(sim.dataset),
                           permutations=100 if SMOKE else 1000, seed=5)
print(screen.round(4).to_string(index=False))
names = ["WT", "CRCL", "AGE"] if SMOKE else ["WT", "CRCL", "AGE", "HT"]
search = stepwise_covariates(base, sim.dataset, [(p, c) for p in ("CL", "V") for c in names])
print(search.steps.round(3).to_string(index=False))
print("selected:", ", ".join(search.selected))
search.steps.to_csv(OUT / "05_scm_steps.csv", index=False)
pd.DataFrame({"relation": search.selected}).to_csv(OUT / "05_selected.csv", index=False)
