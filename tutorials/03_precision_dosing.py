# %% [markdown]
# # Tutorial 3: model-informed precision dosing of vancomycin
#
# A published model (Goti et al. 2018, shipped as `models/vancomycin_goti2018.toml`) is the prior. One
# patient's dosing history and two TDM levels give the individual posterior (MAP + Laplace + importance
# resampling); the forecast shows the uncertainty; the recommendation targets AUC24 400-600 mg*h/L with
# doses in 250 mg steps and reports the probability of target attainment.
#
#     python tutorials/03_precision_dosing.py        (HYBRIDPK_SMOKE=1 for a quick run)

# %%
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

import hybridpk as hp
from hybridpk.dosing import forecast, plot_forecast

OUT = Path(os.environ.get("HYBRIDPK_TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(parents=True, exist_ok=True)
SMOKE = os.environ.get("HYBRIDPK_SMOKE") == "1"

# %% [markdown]
# ## 1. The prior and the patient
# 1000 mg over 1 h every 12 h; levels 1.5 h after the end of the 4th infusion and just before the 5th.

# %%
model = hp.load_model("vancomycin_goti2018")
print(model.citation)
rows = [dict(ID=1, TIME=0.0, DV=0.0, AMT=1000.0, RATE=1000.0, ADDL=3, II=12.0, EVID=1, MDV=1),
        dict(ID=1, TIME=38.5, DV=24.0, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0),
        dict(ID=1, TIME=47.5, DV=9.5, AMT=0.0, RATE=0.0, ADDL=0, II=0.0, EVID=0, MDV=0)]
patient = hp.read_nonmem(pd.DataFrame(rows).assign(CRCL=75.0, WT=82.0, DIAL=0))

# %% [markdown]
# ## 2. Individual posterior and forecast

# %%
post = hp.estimate_patient(model, patient, n_samples=300 if SMOKE else 1000)
print(post.estimate.parameters)
print("effective sample size of the importance resampling:", round(post.ess))
fc = forecast(post.estimate, post.draws, np.linspace(0, 72, 145))
plot_forecast(fc, post.estimate, OUT / "vancomycin_forecast.png", title="vancomycin, patient 1")

# %% [markdown]
# ## 3. The dose for AUC24 400-600 mg*h/L
# The recommendation is a NONMEM dose record: append it to the patient's data to simulate it.

# %%
rec = hp.recommend_dose(model, patient, "auc24=400:600", interval=12, duration=1, dose_step=250, max_dose=4000,
                        posterior=post)
print(f"{rec.dose:g} mg every {rec.interval:g} h; probability of target attainment {rec.pta:.0%}")
print(rec.records)
(OUT / "recommendation.json").write_text(json.dumps(rec.to_dict(), indent=2, default=float))
