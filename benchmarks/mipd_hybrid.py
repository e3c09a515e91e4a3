"""Precision dosing with the hybrid: an enterohepatic-recirculation drug dosed repeatedly, AUC24 target.

Truth: 1cmt_oral_ehc (CL 4 L/h, V 40 L, KA 1.2/h; half the patients recirculate, KGB > 0, the gallbladder
empties at meals 4 h and 10 h after each 12-hourly dose), IIV 30% CL, 20% V, 30% KA, 30% KGB, 10%
proportional + 0.05 mg/L additive error (as hybridpk.solve.examples.simulate_ehc_population).

Training data (--train patients): oral doses every 12 h for 72 h, one dose level per patient drawn from
50-250 mg, 8-12 samples each in 0-84 h. Three models are fitted or given:
- ODE-only: 1cmt_oral, IIV on CL, V, KA, combined error, FOCE-I on the training data;
- hybrid: the same plus the VAE correction (hybridpk.fit_hybrid, --form; default: reservoir, the README's
  choice for recirculation), trained on the same data;
- oracle: the true structure (1cmt_oral_ehc) at the true population values (KGB variance 1, as the
  ceiling of benchmarks/vae_ehc.py).

Held-out patients (--test, every other one recirculating): 100 mg every 12 h from 0 h, three TDM levels
in 0-24 h. Each model recommends the dose from 24 h (every 12 h, oral, 10-mg steps) for an AUC24 of
40-60 mg*h/L (the typical patient at 100 mg every 12 h: 50). Each regimen is
then simulated with the patient's true parameters (AUC24 = 2 x AUC over the 10th new dosing interval,
the definition the recommendations use), and the benchmark reports the fraction whose true AUC24 lands in
the window (by recirculating or not, with binomial SEs), the recommended dose over the ideal one (the dose that
gives the patient's true AUC24 = 50: its bias and spread), the 90% prediction-interval coverage of the next
level (one sample at a random time in 24-36 h, the patient's regimen continued with 100 mg at 24 h), and
the time of one recommendation (estimate + dose search) per model.

Measured now (seed 1, idle, benchmarks/RESULTS-mipd_hybrid.txt): the grid forms' interval divides the 12-h
dosing interval, the networks hold the time since the first dose at the training span beyond it, the reservoir's
fill is averaged over each interval (mass conserved at steady state) and the ITS moves the typical values to the
training patients' mean ETA: recirculating patients in the window ODE-only 36%, hybrid 48%, oracle 56% (SE about
7 points; issue 14 asks >= ODE-only + 10 and within 5 of the oracle: the second still fails); the others 80 / 78 /
62%; recommended / ideal dose, recirculating, 1.254 / 1.138 / 1.056; 90% PI coverage 93 / 94 / 83%; one hybrid
recommendation median 0.61 s, at most 0.77 s. Seed 1 was the hybrid's best: with the same code, seeds 2 and 3
give recirculating patients in the window ODE-only 50 / 34%, hybrid 42 / 32%, oracle 62 / 62% (recommended /
ideal dose 1.253 / 1.283, 1.241 / 1.214, 1.034 / 1.010). Over three seeds the hybrid doses recirculating patients
no better than the ODE (41 against 40% in the window, the oracle 60%): its MAP CL for them stays 14-24% high.
One hybrid recommendation: median 0.89-0.91 s, at most 2.45 s (seeds 2, 3); rerun idle after this stop's changes
(stop 36): median 0.69 / 0.65 s, at most 1.04 / 1.06 s, recirculating patients in the window 46 / 28% (the hybrid,
trained from an ODE fit that changed below its printed digits, ended at other epochs).

Where the bias comes from (stop 36, seed 1, benchmarks/RESULTS-mipd_hybrid.txt): the hybrid finds a recirculating
patient's uptake (k_in / KGB 1.02) and k10, but V, and CL with it, 14% too large. At the true parameters its curve
lies 16% above the truth over 0-24 h: the learnt release schedule leaks drug back between meals (e.g. 96% of the
reservoir released in the first 1.7 h after the first dose, where training cannot see it, 43% in the cell before
the 10-h meal), and the MAP absorbs the extra drug with V. A grid aligned with the meals, no correction penalty,
or a release schedule without the time since the first dose did not remove it on two seeds.
Later experiments (seed 1, RESULTS): a release made of learnt pulses in the time since the last dose finds the
meals (4.1, 10.3-10.6 h) and, delivered as a short burst inside its cell, lets the curve follow the truth (0-24 h
within 10% at the true parameters), but the bias stays until training uses the true residual error instead of the
ODE-only fit's (PROP 0.24 against 0.10): then recirculating patients in the window 52% (ODE-only 36, oracle 56),
the MAP CL of recirculating patients 1.18x the truth and 1.05x with the uptake known. Not in the code yet: the
residual error must be learnt in training, the burst made cheaper (training took 611 s), and the z prior fixed.

Is the oracle's bound within reach from three levels? benchmarks/mipd_bayes_oracle.py (stop 56) doses the same
patients with the true structure and the true mixture prior (half the patients without recirculation): the three
levels tell recirculating patients from the others almost always, and its recirculating patients land in the window
as often as the oracle's (seeds 1-3: 60 / 60 / 66% against 56 / 62 / 62%). The hybrid's gap is not the sparse data:
with a Gaussian-mixture prior of z it tells the groups apart better (the others' uptake 0.22 -> 0.06 of k10) but its
recirculating patients do not gain, and with their group known and its typical values set to the truth its MAP CL
is still 1.10x the truth (50% in the window): what is left is the reservoir structure's fit to early levels and its
OMEGA and SIGMA (benchmarks/RESULTS-mipd_hybrid.txt, 2026-12-07).

Earlier measurements and the diagnosis that led to these changes follow.

Measured with the hybrid's own OMEGA and SIGMA (iterative two-stage step after training; seed 1, same design,
benchmarks/RESULTS-mipd_hybrid.txt): recirculating patients in the window ODE-only 36%, hybrid 42%, oracle 56%
(SE about 7 points); the others 80 / 78 / 62%; 90% PI coverage of the next level 93 / 94 / 83%; one hybrid
recommendation median 0.57 s. So the hybrid's own residual error fixed the intervals and gained 8 points, but
not the 10 points over ODE-only nor the 5 from the oracle that issue 14 asks. What is left is a bias: recommended
over ideal dose for recirculating patients, geometric mean x/ SD: ODE-only 1.254 x/ 1.300, hybrid 1.164 x/ 1.257,
oracle 1.056 x/ 1.235 (the others 1.011, 0.992, 0.869): the hybrid overdoses recirculating patients by 16% with
the oracle's spread.

Where that bias comes from (seed 1, the 50 recirculating held-out patients, 2026-12-05; throw-away scripts,
numbers in benchmarks/RESULTS-mipd_hybrid.txt): the patient's MAP CL over the true one (geometric mean) is,
with the three levels, hybrid 1.170, ODE-only 1.272, oracle 1.047; with twelve levels in 0-24 h 1.129, 1.429 and
1.009. So it is the hybrid's model, not the sparse data. Measured levers, each alone (three levels): the hybrid's
typical values are 10% above the truth (CL 4.39, V 43.5, KA 1.35 against 4.0, 40, 1.2): set to the truth, CL
1.106 (twelve levels 1.097); re-centred on the training patients' mean ETA (a THETA step for the ITS), 1.141;
the reservoir's uptake untied from the patient's k10 (k_in = exp(a(z) - 3) / t_scale, retrained), 1.153; the
training patients' aggregate posterior as a mixture prior of z in place of its moment-matched Gaussian, 1.160.
Started from the true parameters, every patient's MAP returns to the same point (no local optimum).
Found on the way, a defect of the grid forms: the steady-state AUC24 the hybrid predicts depends on how many
doses are simulated. AUC24 x CL / daily dose of one patient's MAP after 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 30, 40
doses: 0.89, 0.92, 0.95, 0.95, 1.00, 1.22, 1.07, 1.01, 1.04, 1.00, 0.93, 1.05: the 1.745-h grid drifts in phase
against the 12-h dosing, and the release rate, taken at each interval's midpoint, hits or misses the meal peaks.
Prototyped, not kept: the rate integrated over each interval at 8 points: within 3% from 8 doses, the fit 2.6x
slower (272 against 106 s); a grid width that divides the training's dosing interval (12/7 h): periodic from 8
doses at the same cost, but then the steady state shows the midpoint fill of the reservoir creating 4-6% of the
dose (AUC24 x CL / daily dose 1.04-1.06), which an exact integral of the central amount over each interval would
remove. With the 8-point integration 44% of the recirculating patients land in the window (42% as committed): the
CL bias above is the gap.

Measured before that step (seed 1, 200 training / 100 held-out patients, reservoir form, 2 cores): true AUC24
in the window, recirculating patients: ODE-only 36%, hybrid 34%, oracle 56% (SE about 7 points each); the
others 80 / 78 / 62%. 90% PI coverage of the next level: ODE-only 93%, hybrid 97%, oracle 81%. One hybrid recommendation
(estimate + dose search, 250 draws): median 0.85 s, at most 1.23 s. So the hybrid does not yet dose the
recirculating patients better, for two measured reasons: the steady-state AUC24 of a mass-conserving
recirculation is F dose / CL whatever the curve's shape, so only the patient's CL matters, which three
early levels inform no better through the hybrid than through the ODE; and the hybrid inherits the ODE
fit's SIGMA, which carries its structural misfit (ADD 0.11 mg/L, PROP 0.24 against the true 0.05 and
0.10), so its intervals are too wide. (An earlier draft that took the steady-state metric after two to
three new doses with the history included scored 52%: a bias of that metric, not a better estimate.)
With --form auto (the input form, the current default) the hybrid is far worse: 16% / 14% in the window
(ODE-only 36% / 80%), PI coverage 99%: its learnt input does not conserve mass, so over a new regimen the
correction adds or removes drug; dosing with a non-reservoir hybrid now warns so.

Run:  python benchmarks/mipd_hybrid.py [--train 200] [--test 100] [--seed 1] [--form reservoir]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

# OpenMP threads as the CLI runs them (OMP_WAIT_POLICY unset: spin, then sleep). PASSIVE, which the test
# suite sets for its parallel workers, doubles the cost of a training epoch on 2 cores (0.11 against 0.05 s).
OMP_POLICY = os.environ.get("OMP_WAIT_POLICY", "unset")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import hybridpk as hp  # noqa: E402
from hybridpk.data import Regimen  # noqa: E402
from hybridpk.dosing import estimate_patient, forecast, recommend_dose  # noqa: E402
from hybridpk.errors import HybridPKError  # noqa: E402
from hybridpk.population import FittedPopulation, build_model, fit_population  # noqa: E402
from hybridpk.residual import TrainConfig, fit_hybrid  # noqa: E402
from hybridpk.solve.examples import EHC_TYPICAL as EHC  # noqa: E402
from hybridpk.solve.population_sim import observe  # noqa: E402

WINDOW = (40.0, 60.0)
TAU = 12.0
N_NEW = 10


def individuals(n: int, rng):
    """True parameters of ``n`` patients (every other one recirculating)."""
    rows = []
    for i in range(n):
        p = dict(EHC)
        p["CL"] *= float(np.exp(rng.normal(0, 0.3)))
        p["V"] *= float(np.exp(rng.normal(0, 0.2)))
        p["KA"] *= float(np.exp(rng.normal(0, 0.3)))
        p["KGB"] = p["KGB"] * float(np.exp(rng.normal(0, 0.3))) if i % 2 == 0 else 0.0
        rows.append(dict(ID=i + 1, RECIRC=int(i % 2 == 0), **p))
    return pd.DataFrame(rows)


def simulate(truth, rng, doses, n_doses: int, times_of):
    """Oral doses every 12 h (``doses`` mg per patient, ``n_doses`` of them from 0 h) and samples at
    ``times_of(rng)`` (h); DV with the residual error."""
    rows = []
    for (_, p), amt in zip(truth.iterrows(), doses):
        rows.append(dict(ID=p.ID, TIME=0.0, DV=0.0, AMT=float(amt), ADDL=n_doses - 1, II=TAU, EVID=1, MDV=1, CMT=1))
        rows += [dict(ID=p.ID, TIME=float(t), DV=0.0, AMT=0.0, ADDL=0, II=0.0, EVID=0, MDV=0, CMT=2)
                 for t in times_of(rng)]
    design = hp.read_nonmem(pd.DataFrame(rows))
    ds, _ = observe("1cmt_oral_ehc", design, {k: truth[k].to_numpy() for k in EHC}, rng, proportional=0.10,
                    additive=0.05, decimals=5)
    return ds


def true_auc24(p, dose: float) -> float:
    """True AUC24 of the patient ``p`` (a truth row) after its history (100 mg at 0 and 12 h) and N_NEW doses
    of ``dose`` every 12 h from 24 h: 2 x the AUC over the last interval."""
    end = 24.0 + N_NEW * TAU
    grid = np.linspace(end - TAU, end, 481)
    rows = [dict(ID=1, TIME=0.0, DV=0.0, AMT=100.0, ADDL=1, II=TAU, EVID=1, MDV=1, CMT=1),
            dict(ID=1, TIME=24.0, DV=0.0, AMT=float(dose), ADDL=N_NEW - 1, II=TAU, EVID=1, MDV=1, CMT=1)]
    rows += [dict(ID=1, TIME=float(t), DV=0.0, AMT=0.0, ADDL=0, II=0.0, EVID=2, MDV=1, CMT=2) for t in grid]
    b = hp.read_nonmem(pd.DataFrame(rows)).to_batch()
    c = hp.simulate("1cmt_oral_ehc", {k: torch.tensor([float(p[k])]) for k in EHC}, b).ipred[0, -len(grid):]
    return float(torch.trapezoid(c, torch.as_tensor(grid))) * 24.0 / TAU


def benchmark_data(seed: int, n_train: int = 200, n_test: int = 100):
    """(training truth, training Dataset, held-out truth, held-out Dataset) of the benchmark with ``seed``: the
    training patients' doses and samples over 84 h, the held-out patients' 100 mg every 12 h and three TDM
    levels in 0-24 h."""
    rng = np.random.default_rng([seed, 0x3192])
    train_truth = individuals(n_train, rng)
    grid = np.round(np.arange(0.25, 84.0, 0.25), 2)
    train = simulate(train_truth, rng, rng.choice(np.arange(50.0, 251.0, 25.0), n_train), 6,
                     lambda r: np.sort(r.choice(grid, int(r.integers(8, 13)), replace=False)))
    test_truth = individuals(n_test, rng)
    tdm_grid = np.round(np.arange(0.5, 24.0, 0.25), 2)
    test = simulate(test_truth, rng, [100.0] * n_test, 2, lambda r: np.sort(r.choice(tdm_grid, 3, replace=False)))
    return train_truth, train, test_truth, test


#: the truth's IIV (variances of log CL, V, KA) and residual error SDs
TRUE_OMEGA = dict(CL=0.09, V=0.04, KA=0.09)
TRUE_SIGMA = {"ADD": 0.05, "PROP": 0.10}


def true_oracle(kgb_variance: float = 1.0, name: str = "true EHC"):
    """The true structure (1cmt_oral_ehc) at the true population values, with ``kgb_variance`` the variance of
    log KGB: the benchmark's oracle takes 1 (as the ceiling of benchmarks/vae_ehc.py)."""
    epm = build_model("1cmt_oral_ehc", iiv=["CL", "V", "KA", "KGB"], error="combined",
                      fixed={k: EHC[k] for k in ("TMEAL", "MEALII", "TEMPT")})
    return FittedPopulation.from_values(epm, EHC, dict(TRUE_OMEGA, KGB=kgb_variance), TRUE_SIGMA, name=name)


def recommend(model, pat, sid, post=None):
    """(the dose (mg) a model recommends for one held-out patient from 24 h, or None where it refuses;
    the recommendation)."""
    post = post if post is not None else estimate_patient(model, pat, seed=int(sid))
    try:
        rec = recommend_dose(model, pat, f"auc24={WINDOW[0]:g}:{WINDOW[1]:g}", interval=TAU, duration=0,
                             dose_step=10, start=24.0, n_doses=N_NEW, posterior=post)
    except HybridPKError:
        return None, None
    return rec.dose, rec


def next_level(p, t: float, rng) -> float:
    """A TDM level at ``t`` (24-36 h) with the regimen continued by 100 mg at 24 h."""
    rows = [dict(ID=1, TIME=0.0, DV=0.0, AMT=100.0, ADDL=2, II=TAU, EVID=1, MDV=1, CMT=1),
            dict(ID=1, TIME=float(t), DV=0.0, AMT=0.0, ADDL=0, II=0.0, EVID=2, MDV=1, CMT=2)]
    b = hp.read_nonmem(pd.DataFrame(rows)).to_batch()
    c = float(hp.simulate("1cmt_oral_ehc", {k: torch.tensor([float(p[k])]) for k in EHC}, b).ipred[0, -1])
    return c * (1 + 0.10 * rng.normal()) + 0.05 * rng.normal()



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--learn-sigma", action="store_true",
                    help="learn the residual error SDs in training (TrainConfig.learn_sigma)")
    ap.add_argument("--form", choices=("auto", "log", "input", "reservoir"), default="reservoir")
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    print(f"seed {args.seed}; hybridpk {hp.__version__}, torch {torch.__version__}; form {args.form}; "
          f"OMP_WAIT_POLICY {OMP_POLICY}")
    train_truth, train, test_truth, test = benchmark_data(args.seed, args.train, args.test)

    pm = build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined")
    t0 = time.perf_counter()
    ode = fit_population(pm, train, progress=False, covariance=False)
    t1 = time.perf_counter()
    hyb = fit_hybrid(pm, train, population=ode, config=TrainConfig(form=args.form, epochs=args.epochs,
                                                                    learn_sigma=args.learn_sigma),
                     seed=args.seed, progress=False)
    t2 = time.perf_counter()
    print(f"ODE-only FOCE-I fit {t1 - t0:.1f} s (OFV {ode.estimation.ofv:.1f}); hybrid training {t2 - t1:.1f} s "
          f"({len(hyb.history)} epochs, form {hyb.vae.form_name})")
    sds = {"ODE-only fit": {r.kind: r.sd for r in ode.sigma.rows},
           "in training": getattr(hyb.vae, "trained_sd", None) or {}, "the hybrid's (ITS)": hyb.sigma or {}}
    print("SIGMA (SD): " + "; ".join(f"{name} " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(d.items()))
                                     for name, d in sds.items()))
    models = {"ODE-only": ode, "hybrid": hyb, "oracle": true_oracle()}
    hits = {m: [] for m in models}
    ratio = {m: [] for m in models}     # recommended dose / the dose that gives the patient an AUC24 of 50
    cover = {m: [] for m in models}
    secs = {m: [] for m in models}
    refused = {m: 0 for m in models}
    by_median = {m: [] for m in models}   # diagnosis: true AUC24 had the dose put the posterior median at 50
    lrng = np.random.default_rng([args.seed, 0x7E57])
    for i, sid in enumerate(test.ids):
        p = test_truth.iloc[i]
        pat = test.subset([sid])
        t_next = float(lrng.uniform(24.25, 35.75))
        y_next = next_level(p, t_next, lrng)
        for name, model in models.items():
            ts = time.perf_counter()
            post = estimate_patient(model, pat, seed=int(sid))
            dose, rec = recommend(model, pat, sid, post)
            secs[name].append(time.perf_counter() - ts)
            if dose is None:
                refused[name] += 1
                hits[name].append(False)
                ratio[name].append(float("nan"))
            else:
                auc = true_auc24(p, dose)
                hits[name].append(WINDOW[0] <= auc <= WINDOW[1])
                ratio[name].append(auc / 50.0)      # AUC24 is proportional to the dose (a linear model)
                median = next(iter(rec.exposure.values()))["median"]
                d_med = max(10.0, 10.0 * round(dose * 50.0 / median / 10.0))
                by_median[name].append(auc * d_med / dose)
            fc = forecast(post.estimate, post.draws, [t_next], regimen=Regimen(24.0, 100.0, TAU, 1), seed=int(sid))
            row = fc.table.iloc[0]
            cover[name].append(row.PI90_LOW <= y_next <= row.PI90_HIGH)
        if (i + 1) % 20 == 0:
            print(f"  {i + 1} patients ...", flush=True)
    rec_mask = test_truth.RECIRC.to_numpy() == 1
    for group, sel in (("recirculating", rec_mask), ("not recirculating", ~rec_mask), ("all", rec_mask | ~rec_mask)):
        parts = []
        for name in models:
            f = np.mean(np.asarray(hits[name])[sel])
            se = np.sqrt(f * (1 - f) / sel.sum())
            parts.append(f"{name} {100 * f:.1f}% (SE {100 * se:.1f})")
        print(f"AUC24 in {WINDOW[0]:g}-{WINDOW[1]:g}, {group:<17} ({sel.sum()} patients): " + "; ".join(parts))
    for group, sel in (("recirculating", rec_mask), ("not recirculating", ~rec_mask)):
        parts = []
        for name in models:
            lr = np.log(np.asarray(ratio[name])[sel])
            lr = lr[np.isfinite(lr)]
            parts.append(f"{name} {np.exp(lr.mean()):.3f} x/ {np.exp(lr.std()):.3f}")
        print(f"recommended / ideal dose, {group:<17} (geometric mean x/ geometric SD): " + "; ".join(parts))
    for group, sel in (("recirculating", rec_mask), ("not recirculating", ~rec_mask)):
        parts = []
        for name in models:
            a = np.asarray(by_median[name]) if len(by_median[name]) == len(rec_mask) else np.full(len(rec_mask), np.nan)
            parts.append(f"{name} {100 * np.mean((a[sel] >= WINDOW[0]) & (a[sel] <= WINDOW[1])):.1f}%")
        print(f"diagnosis, dose putting the posterior median AUC24 (not the MAP's) at 50, {group}: " + "; ".join(parts))
    for name in models:
        c = np.asarray(cover[name])
        print(f"{name:<8} 90% PI coverage of the next level: {100 * c.mean():.1f}% (recirculating "
              f"{100 * c[rec_mask].mean():.1f}%); one recommendation (estimate + dose) median "
              f"{np.median(secs[name]):.2f} s, max {np.max(secs[name]):.2f} s; refused {refused[name]}")


if __name__ == "__main__":
    main()
